"""Region coordinate files in the CLAM/TRIDENT h5 layout (`hipt-prep coords`, `hipt-extract --coords`).

One file per slide, `<slide_id>_patches.h5`, dataset `coords` int64 [N, 2] = level-0 top-left
(x, y) of each region, row-major, with TRIDENT's attributes on it:

    patch_size            region side at the target magnification (px)
    patch_size_level0     region side in level-0 px
    level0_magnification  objective power of level 0 (10 / mpp)
    target_magnification  objective power of the regions (10 / target mpp)
    overlap, name, savetodir, level0_width, level0_height

plus ours (`hipt_slide_mpp`, `hipt_target_mpp`, `hipt_mpp_source`) and a `tissue_fraction`
dataset. Files written by TRIDENT (same layout) and by CLAM (attributes `patch_size` at
`patch_level`, optional `custom_downsample`) are read too; `coords_file_extent` turns any of
them into the level-0 extent of a region so a reader can check it matches its own geometry.
"""
from __future__ import annotations

import dataclasses
import json
import os

import h5py
import numpy as np

from data_prep.shards import file_sha256, item_status_path, safe_slide_id, walk_visible

SUFFIX = "_patches.h5"


class CoordsError(ValueError):
    """A coordinate file that cannot be used (the message names the file and the problem)."""


@dataclasses.dataclass(frozen=True)
class CoordsFile:
    path: str
    coords: np.ndarray          # int64 [N, 2] level-0 (x, y)
    attrs: dict


def coords_path(out_dir: str, slide_id: str) -> str:
    return os.path.join(out_dir, "coords", slide_id + SUFFIX)


def write_coords(path: str, coords, *, slide_id: str, region_px: int, read_px: int, slide_mpp: float,
                 target_mpp: float, width: int, height: int, mpp_source: str = "",
                 tissue_fraction=None) -> None:
    """Write one slide's coordinate file atomically (temporary name, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    xy = np.asarray(coords, np.int64).reshape(-1, 2)  # [N, 2] level-0 x, y
    with h5py.File(tmp, "w") as f:
        d = f.create_dataset("coords", data=xy)
        d.attrs.update(dict(
            patch_size=int(region_px), patch_size_level0=int(read_px),
            level0_magnification=float(round(10.0 / slide_mpp, 3)),
            target_magnification=float(round(10.0 / target_mpp, 3)), overlap=0, name=slide_id,
            savetodir=os.path.dirname(os.path.abspath(path)), level0_width=int(width),
            level0_height=int(height), hipt_slide_mpp=float(slide_mpp),
            hipt_target_mpp=float(target_mpp), hipt_mpp_source=mpp_source))
        if tissue_fraction is not None:
            f.create_dataset("tissue_fraction", data=np.asarray(tissue_fraction, np.float32))
    os.replace(tmp, path)


def verify_coords(path: str) -> None:
    """CoordsError naming the file when `hipt-prep coords` wrote it (the status record of its
    prep folder, OUT/status/<id>.json, names this file) and its bytes now differ from the
    SHA-256 recorded there: an h5 row changed in place still reads as valid coordinates, of
    another region. Files without such a record (CLAM, TRIDENT) are not checked."""
    name = os.path.basename(path)
    if not name.endswith(SUFFIX):
        return
    out = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    status = item_status_path(out, name[: -len(SUFFIX)])
    try:
        with open(status) as f:
            record = json.load(f)
        expected, made = record.get("sha256"), os.path.join(out, record["shard"])
        ours = record.get("status") == "done" and os.path.samefile(made, path)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return  # no record of ours (or not for this file): nothing to compare with
    if ours and expected and file_sha256(path) != expected:
        raise CoordsError(f"{path}: damaged coordinate file (its SHA-256 does not match the one hipt-prep "
                          f"recorded in {status}); rerun the same `hipt-prep coords ... --out {out}` to redo it")


def read_coords(path: str) -> CoordsFile:
    """Any CLAM/TRIDENT/HIPT-JAX coordinate file -> CoordsFile (CoordsError if unusable)."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise CoordsError(f"{path}: no 'coords' dataset (not a CLAM/TRIDENT coordinate file)")
            d = f["coords"]
            xy = np.asarray(d[()])
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in d.attrs.items()}
    except CoordsError:
        raise
    except (OSError, KeyError) as e:
        raise CoordsError(f"{path}: not a readable h5 file ({e})") from None
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.issubdtype(xy.dtype, np.number):
        raise CoordsError(f"{path}: 'coords' must be a numeric [N, 2] array, got {xy.dtype} {xy.shape}")
    if not np.isfinite(xy).all():
        raise CoordsError(f"{path}: 'coords' holds NaN/Inf values")
    if np.issubdtype(xy.dtype, np.floating) and (xy != np.round(xy)).any():
        bad = xy[(xy != np.round(xy)).any(axis=1)][0]
        raise CoordsError(f"{path}: coordinates must be whole level-0 pixels, got ({bad[0]:g}, {bad[1]:g}); "
                          "truncating them would read other regions than the file names")
    xy = xy.astype(np.int64)
    _, first, counts = np.unique(xy, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        # A region listed twice counts twice in every mean over the bag: a file written twice
        # over, or two coordinate sets concatenated.
        dup = xy[first[np.argmax(counts > 1)]]
        raise CoordsError(f"{path}: {int((counts - 1).sum())} duplicate coordinate row(s), e.g. "
                          f"({dup[0]}, {dup[1]}); each region once")
    return CoordsFile(path, xy, attrs)


def coords_file_extent(cf: CoordsFile, level_downsamples) -> int | None:
    """Level-0 side of the regions a coordinate file describes, or None when it does not say.

    TRIDENT and HIPT-JAX: `patch_size_level0`. CLAM: `patch_size` px at pyramid level
    `patch_level` (a `custom_downsample` only shrinks the output, not the area read).
    """
    a = cf.attrs
    if "patch_size_level0" in a:
        return int(a["patch_size_level0"])
    if "patch_size" in a and "patch_level" in a:
        level = int(a["patch_level"])
        if not 0 <= level < len(level_downsamples):
            raise CoordsError(f"{cf.path}: patch_level {level} but the slide has "
                              f"{len(level_downsamples)} levels")
        return int(round(int(a["patch_size"]) * level_downsamples[level]))
    return None


def find_coords_files(folder: str, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """slide_id -> coordinate file under `folder` (recursive, links followed, hidden entries
    and the folders in ``exclude`` skipped): `<id>_patches.h5` or `<id>.h5`. Two files for one
    slide (CLAM and TRIDENT outputs side by side, two job folders) are refused naming both:
    which one to use is the user's call."""
    if not os.path.isdir(folder):
        raise CoordsError(f"{folder}: not a folder of coordinate files")
    found: dict[str, str] = {}
    for root, files in walk_visible(folder, exclude):
        for name in files:
            if not name.endswith(".h5"):
                continue
            # Keyed like the slides ("my slide_patches.h5" -> "my_slide", as "my slide.svs").
            sid = safe_slide_id(name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name[:-3])
            path = os.path.join(root, name)
            if sid in found:
                raise CoordsError(f"{folder}: two coordinate files for slide {sid!r}: {found[sid]} and {path}; "
                                  "keep one (or give each set its own --coords folder)")
            found[sid] = path
    if not found:
        raise CoordsError(f"{folder}: no .h5 coordinate files found")
    return found
