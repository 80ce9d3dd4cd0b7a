"""Per-slide bags: the embeddings of every region of one slide, one file per slide.

`hipt-extract` writes OUT/slides/<slide_id>.npz holding
    features_cls256  [M, R*C, 384]  ViT-256 CLS of every 256 px patch (row-major grid), the
                                    input of HIPT-LGP (float32 or float16)
    features_cls4k   [M, 192]       ViT-4K CLS of every region
    slide_embedding  [192]          mean of features_cls4k over the regions (KNN input)
    coords           [M, 2]         (x, y) level-0 top-left corner of each region
and the slide models, KNN and heatmap tools read them back through this module.

File formats sit behind a small seam: a BagFormat knows its file extension and how to write and
read a dict of named arrays. Only .npz exists today; another format (h5, .pt) is one more
BagFormat in FORMATS, and readers pick the format from the file name.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

SLIDES = "slides"


class BagError(ValueError):
    """A missing or unreadable bag (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class BagFormat:
    """How bags of one file format are written and read."""
    ext: str                                                     # ".npz"
    write: Callable[[str, dict[str, np.ndarray]], None]          # (path, arrays) -> file
    read: Callable[[str, tuple[str, ...] | None], dict[str, np.ndarray]]  # (path, keys|None)


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, **arrays)


def _read_npz(path: str, keys: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in (keys or z.files)}


NPZ = BagFormat(".npz", _write_npz, _read_npz)
FORMATS = {"npz": NPZ}
DEFAULT_FORMAT = "npz"


def _format_of(path: str) -> BagFormat:
    for fmt in FORMATS.values():
        if path.endswith(fmt.ext):
            return fmt
    raise BagError(f"{path}: not a bag file ({', '.join(f.ext for f in FORMATS.values())})")


def bag_path(out_dir: str, slide_id: str, fmt: str = DEFAULT_FORMAT) -> str:
    """OUT/slides/<slide_id><ext>: where a slide's bag is written."""
    return os.path.join(out_dir, SLIDES, slide_id + FORMATS[fmt].ext)


def write_bag(out_dir: str, slide_id: str, arrays: dict[str, np.ndarray],
              fmt: str = DEFAULT_FORMAT) -> str:
    """Write one slide's bag under a temporary name, then rename: a bag is complete or absent."""
    path = bag_path(out_dir, slide_id, fmt)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        FORMATS[fmt].write(tmp, arrays)
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: no partial file is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def list_bags(out_dir: str) -> dict[str, str]:
    """slide_id -> bag path of every finished bag under OUT/slides (sorted by slide id)."""
    folder = os.path.join(out_dir, SLIDES)
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in sorted(os.listdir(folder)):
        for fmt in FORMATS.values():
            if name.endswith(fmt.ext) and ".tmp-" not in name:
                out[name[: -len(fmt.ext)]] = os.path.join(folder, name)
    return out


def read_bag_file(path: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of one bag file (only ``keys`` when given); BagError when unreadable."""
    try:
        return _format_of(path).read(path, keys)
    except BagError:
        raise
    except Exception as e:  # truncated zip, missing key, bad pickle...: one clear message
        raise BagError(f"{path}: truncated or corrupt bag ({type(e).__name__}: {e})") from None


def read_bag(out_dir: str, slide_id: str) -> dict[str, np.ndarray]:
    """The arrays of one extracted slide (features_cls256 as float32)."""
    found = [p for p in (bag_path(out_dir, slide_id, f) for f in FORMATS) if os.path.isfile(p)]
    if not found:
        raise BagError(f"{bag_path(out_dir, slide_id)}: slide {slide_id!r} was not extracted")
    out = read_bag_file(found[0])
    out["features_cls256"] = out["features_cls256"].astype(np.float32)
    return out


def read_slide_embeddings(out_dir: str, failed: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """slide_id -> slide embedding [192] for every extracted slide under ``out_dir``.

    An unreadable (truncated, corrupt) bag raises BagError or, when a ``failed`` dict is given,
    is skipped and recorded there as slide_id -> error."""
    folder = os.path.join(out_dir, SLIDES)
    if not os.path.isdir(folder):
        raise BagError(f"{out_dir}: no {SLIDES}/ folder; run hipt-extract first")
    out = {}
    for sid, path in list_bags(out_dir).items():
        try:
            emb = read_bag_file(path, ("slide_embedding",))["slide_embedding"]
        except BagError as e:
            if failed is None:
                raise
            failed[sid] = str(e)
            continue
        out[sid] = np.asarray(emb, np.float32)
    if not out:
        raise BagError(f"{folder}: no extracted slides")
    return out


def manifest_items(out_dir: str, slide_ids: list[str], errors: dict[str, str]) -> dict[str, dict]:
    """Manifest entries of a bag-writing run: per slide {file, num_regions, status done}, or
    {status failed, error}, or {status pending}."""
    bags = list_bags(out_dir)
    items = {}
    for s in slide_ids:
        if s in bags:
            coords = read_bag_file(bags[s], ("coords",))["coords"]
            items[s] = {"file": os.path.relpath(bags[s], out_dir), "status": "done",
                        "num_regions": int(coords.shape[0])}
        elif s in errors:
            items[s] = {"status": "failed", "error": errors[s]}
        else:
            items[s] = {"status": "pending"}
    return items
