"""Per-slide bags: the embeddings of every region of one slide, one file per slide.

`hipt-extract` writes OUT/slides/<slide_id>.<npz|h5|pt> holding
    features_cls256  [M, R*C, 384]  ViT-256 CLS of every 256 px patch (row-major grid), the
                                    input of HIPT-LGP (float32 or float16)
    features_cls4k   [M, 192]       ViT-4K CLS of every region
    slide_embedding  [192]          mean of features_cls4k over the regions (KNN input)
    coords           [M, 2]         (x, y) level-0 top-left corner of each region
and the slide models, KNN, stage-2 pretraining and heatmap tools read them back through this
module. The file format follows the extension:

- ``.npz``: the arrays above under their names (plus the coordinate attributes as a JSON string
  ``coords_attrs_json``).
- ``.h5``: the TRIDENT/CLAM layout: dataset ``features`` [M, D] and ``coords`` int64 [M, 2] whose
  attributes describe the grid (patch_size at the target magnification, patch_size_level0,
  level0_magnification, target_magnification, overlap, name, ...). hipt-extract stores the
  CLS-4K [M, 192] as ``features`` and adds ``features_cls256`` and ``slide_embedding``.
  A foreign h5 is read by the shape of ``features``: [M, 192] -> features_cls4k (CLS-4K of each
  region); [M, R*C, 384] -> features_cls256 (the official region bags); any other [M, D]
  (a patch encoder's features, or a mean ViT-256 vector per region) -> features_region.
- ``.pt``: the official HIPT region bag, ``torch.save`` of one float tensor [M, R*C, 384]
  (features_cls256 only; torch is imported only for this format). A foreign 2-D tensor [M, D]
  (CLAM's pt_files) is named by its shape as an h5 ``features`` is.

Every bag written here gets its SHA-256 in ``<bag>.sha256`` next to it (sha256sum's format);
every read verifies it, and a mismatch is a BagError naming the file (foreign bags have none).
A bag of hipt-extract also carries the identity of the extraction that made it, which the
readers of a folder of bags compare with the folder's (``check_extraction``).

Slide embedding of a bag (`slide_embedding_of`, what hipt-knn uses): the stored
``slide_embedding`` if any, else the mean over regions of features_cls4k ([192], the paper's
protocol), else the mean of features_region ([D]), else the mean of features_cls256 over regions
and patches ([384], a mean ViT-256 embedding: no ViT-4K has run on such a bag). One cohort must
give one embedding width; a mixed cohort is refused naming the odd file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from typing import Callable

import numpy as np

from data_prep.shards import file_sha256, safe_slide_id

SLIDES = "slides"
ATTRS_KEY = "coords_attrs_json"  # npz: the h5 coords attributes, as JSON


class BagError(ValueError):
    """A missing or unreadable bag (the message names the file)."""


# numpy parses every .npy header (also each array inside an .npz) with ast.literal_eval, and
# CPython releases without the fix for python/cpython#106905 (3.11.7, for one) keep that
# parser's recursion counter per interpreter, not per thread: two threads parsing at once can
# fail a valid file with "SystemError: AST constructor recursion depth mismatch" (seen in a
# 2-task pretraining job here). Grain reads records from several
# threads, so every numpy read of ours goes through this lock (headers are tiny; the arrays
# read here are feature files and bags, read once per file).
NUMPY_READ_LOCK = threading.Lock()


def load_npy(path: str) -> np.ndarray:
    """``np.load`` of one .npy file, safe to call from several threads (``NUMPY_READ_LOCK``)."""
    with NUMPY_READ_LOCK:
        return np.load(path)


@dataclasses.dataclass(frozen=True)
class BagFormat:
    """How bags of one file format are written and read."""
    ext: str                                                     # ".npz"
    write: Callable[[str, dict[str, np.ndarray], dict], None]    # (path, arrays, coords attrs)
    read: Callable[[str, tuple[str, ...] | None], dict[str, np.ndarray]]  # (path, keys|None)
    keys: Callable[[str], tuple[str, ...]]                       # path -> array names it holds
    attrs: Callable[[str], dict]                                 # path -> coords attributes


def _write_npz(path: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    extra = {ATTRS_KEY: np.array(json.dumps(attrs))} if attrs else {}
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, **arrays, **extra)


def _read_npz(path: str, keys: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    with NUMPY_READ_LOCK, np.load(path) as z:
        return {k: z[k] for k in (keys or z.files) if k in z.files and k != ATTRS_KEY}


def _npz_keys(path: str) -> tuple[str, ...]:
    with NUMPY_READ_LOCK, np.load(path) as z:
        return tuple(k for k in z.files if k != ATTRS_KEY)


def _npz_attrs(path: str) -> dict:
    with NUMPY_READ_LOCK, np.load(path) as z:
        return json.loads(str(z[ATTRS_KEY])) if ATTRS_KEY in z.files else {}


def _h5py():
    import h5py  # a hard dependency, imported late so .npz users never pay for it
    return h5py


def _features_key(shape: tuple) -> str:
    """The bag key of a foreign file's one feature array (an h5 ``features``, a .pt tensor),
    from its shape: [M, R*C, 384] ViT-256 grids, [M, 192] CLS-4K, any other [M, D] generic
    region features."""
    if len(shape) == 3:
        return "features_cls256"
    return "features_cls4k" if len(shape) == 2 and shape[1] == 192 else "features_region"


def _h5_names(f) -> dict[str, str]:
    """bag key -> h5 dataset name, deciding what ``features`` holds from its shape."""
    names = {k: k for k in f.keys() if k != "features"}
    if "features" in f:
        names.setdefault(_features_key(f["features"].shape), "features")
    return names


def _write_h5(path: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    main = "features_cls4k" if "features_cls4k" in arrays else "features_cls256"
    with _h5py().File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset("features" if k == main else k, data=v)
        for k, v in attrs.items():
            if "coords" in f:
                f["coords"].attrs[k] = v


def _read_h5(path: str, keys: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    with _h5py().File(path, "r") as f:
        names = _h5_names(f)
        return {k: f[names[k]][()] for k in (keys or names) if k in names}


def _h5_keys(path: str) -> tuple[str, ...]:
    with _h5py().File(path, "r") as f:
        return tuple(_h5_names(f))


def _h5_attrs(path: str) -> dict:
    with _h5py().File(path, "r") as f:
        if "coords" not in f:
            return {}
        return {k: (v.item() if isinstance(v, np.generic) else v.decode() if isinstance(v, bytes) else v)
                for k, v in f["coords"].attrs.items()}


def _torch():
    try:
        import torch  # optional: only the official .pt bags need it
    except ImportError:
        raise BagError(".pt bags need PyTorch: pip install torch (or use --format npz|h5)") from None
    return torch


def _write_pt(path: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    torch = _torch()
    feats = np.ascontiguousarray(arrays["features_cls256"], np.float32)  # [M,R*C,384], official dtype
    torch.save(torch.from_numpy(feats), path)


def _pt_tensor(path: str):
    t = _torch().load(path, map_location="cpu", weights_only=True)
    if not hasattr(t, "numpy") or t.ndim not in (2, 3):
        raise BagError(f"{path}: expected a tensor [M, R*C, 384] (official HIPT region bag) or [M, D] "
                       f"(CLAM's pt_files), got {getattr(t, 'shape', type(t).__name__)}")
    return t


def _read_pt(path: str, keys: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    t = _pt_tensor(path)
    key = _features_key(tuple(t.shape))
    return {key: t.float().numpy()} if not keys or key in keys else {}


NPZ = BagFormat(".npz", _write_npz, _read_npz, _npz_keys, _npz_attrs)
H5 = BagFormat(".h5", _write_h5, _read_h5, _h5_keys, _h5_attrs)
PT = BagFormat(".pt", _write_pt, _read_pt, lambda path: (_features_key(tuple(_pt_tensor(path).shape)),),
               lambda path: {})
FORMATS = {"npz": NPZ, "h5": H5, "pt": PT}
DEFAULT_FORMAT = "npz"


def check_format(fmt: str) -> None:
    """BagError unless bags of format ``fmt`` can be written here (known name, torch for .pt)."""
    if fmt not in FORMATS:
        raise BagError(f"unknown bag format {fmt!r} ({', '.join(FORMATS)})")
    if fmt == "pt":
        _torch()


def _format_of(path: str) -> BagFormat:
    for fmt in FORMATS.values():
        if path.endswith(fmt.ext):
            return fmt
    raise BagError(f"{path}: not a bag file ({', '.join(f.ext for f in FORMATS.values())})")


def bag_path(out_dir: str, slide_id: str, fmt: str = DEFAULT_FORMAT) -> str:
    """OUT/slides/<slide_id><ext>: where a slide's bag is written."""
    return os.path.join(out_dir, SLIDES, slide_id + FORMATS[fmt].ext)


def write_bag(out_dir: str, slide_id: str, arrays: dict[str, np.ndarray],
              fmt: str = DEFAULT_FORMAT, attrs: dict | None = None, made_by: dict | None = None) -> str:
    """Write one slide's bag under a temporary name, then rename: a bag is complete or absent.
    ``attrs`` (h5 coords attributes: patch_size, patch_size_level0, ...) go where the format
    keeps them (.pt keeps only features_cls256), and with them ``made_by``, the identity of the
    extraction (``check_extraction``)."""
    path = bag_path(out_dir, slide_id, fmt)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    extra = {EXTRACTION_ATTR: json.dumps(made_by, sort_keys=True)} if made_by else {}
    write_bag_file(path, arrays, {**(attrs or {}), **extra})
    return path


# ---------------------------------------------------------------------------------------------
# Which extraction made a bag
# ---------------------------------------------------------------------------------------------
# A bag carries the identity of the extraction that made it (weights, region size and
# resolution: hipt-extract's ``made_by``) among its coordinate attributes, so it travels with the
# file when bags are copied between folders; the folder's manifest records the identity of the
# extraction that made the folder (params.extraction). A bag copied in from another extraction
# has the same shapes (CLS-4K [M,192] whatever the region size) and would be scored silently.
EXTRACTION_ATTR = "hipt_extraction"
_GEOMETRY = ("region_px", "target_mpp")
_WEIGHTS = ("vit256", "vit4k")
_said: set[tuple[str, str]] = set()      # (folder, what) notes already printed by this process
_first_recorded: dict[str, str] = {}     # folder -> its first bag read that records its extraction
# manifest path -> (mtime_ns, params.extraction, the bag files its slides list, relative to the folder)
_manifests: dict[str, tuple[int, dict | None, frozenset]] = {}


def extraction_of(path: str) -> dict | None:
    """The extraction identity the bag ``path`` records, None for bags without one (.pt, bags
    of older versions and of other tools)."""
    text = read_coords_attrs(path).get(EXTRACTION_ATTR)
    try:
        made_by = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return made_by if isinstance(made_by, dict) else None


def geometry_of(made_by: dict | None) -> dict:
    """The region size and resolution ({"region_px", "target_mpp"}) of an extraction identity;
    {} for None, and only the keys it records."""
    return {k: made_by[k] for k in _GEOMETRY if (made_by or {}).get(k) is not None}


def folder_extraction(out_dir: str) -> dict | None:
    """The extraction identity an embeddings folder's manifest records (None before it did)."""
    return _manifest(out_dir)[0]


def _manifest(out_dir: str) -> tuple[dict | None, frozenset]:
    """The extraction identity an embeddings folder's manifest records and the bag files it
    lists (None and nothing without one); read once per process while the manifest stays the
    same (it lists every slide)."""
    path = os.path.join(out_dir, "manifest.json")
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        return None, frozenset()
    if _manifests.get(path, (None,))[0] != stamp:
        try:
            with open(path) as f:
                data = json.load(f)
            made_by = (data.get("params") or {}).get("extraction")
            files = frozenset(os.path.normpath(e["file"]) for e in (data.get("slides") or {}).values()
                              if isinstance(e, dict) and isinstance(e.get("file"), str))
        except (OSError, ValueError, AttributeError):
            made_by, files = None, frozenset()
        _manifests[path] = (stamp, made_by if isinstance(made_by, dict) else None, files)
    return _manifests[path][1:]


def extraction_difference(made_by: dict, expected: dict) -> tuple[list[str], list[str]]:
    """(differences that make a bag another extraction's, differences only in checkpoint files),
    each "key then -> now". Another region size or resolution, or another random init, is
    another model input; two checkpoint FILES may hold the same weights (a .pth and its
    hipt-convert output record differently), as hipt-predict reasons, so those only warn."""
    refused, warned = [], []
    for key in (*_WEIGHTS, *_GEOMETRY):
        a, b = made_by.get(key), expected.get(key)
        if a is None or b is None or a == b:
            continue
        said = f"{key} {_short(a)} (expected {_short(b)})"
        files = key in _WEIGHTS and not str(a).startswith("random:") and not str(b).startswith("random:")
        (warned if files else refused).append(said)
    return refused, warned


def _short(value) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 16 and all(c in "0123456789abcdef" for c in text) else text


def check_extraction(out_dir: str, path: str) -> None:
    """BagError naming the bag ``path`` of the folder ``out_dir`` when it records another
    extraction than the folder's manifest (or, without one, than the folder's first recorded
    bag read here) in region size, resolution or random init; a note (once per folder) when only
    its checkpoint files differ, and when bags carry no record (they cannot be checked)."""
    made_by = extraction_of(path)
    folder = os.path.abspath(out_dir)
    if made_by is None and _format_of(path) is PT:
        _check_pt_listed(out_dir, path)
        return
    if made_by is None:
        _say_once(folder, "unrecorded", f"{out_dir}: note: bags that do not record the extraction that made "
                  f"them (an older hipt-extract, another tool; e.g. {path}) cannot be checked to "
                  "come from this folder's extraction")
        return
    expected, where = folder_extraction(out_dir), f"{os.path.join(out_dir, 'manifest.json')} records"
    if expected is None:
        first = _first_recorded.setdefault(folder, path)
        expected, where = extraction_of(first) or made_by, f"the folder's first bag ({first}) records"
    refused, warned = extraction_difference(made_by, expected)
    if refused:
        raise BagError(f"{path}: made by another extraction than {where} ({'; '.join(refused)}): a bag "
                       "copied from another embeddings folder? move it to a folder of its own, or re-extract it")
    if warned:
        _say_once(folder, "weights", f"{path}: warning: extracted from other checkpoint files than {where} "
                  f"({'; '.join(warned)}); unless they hold the same weights (a .pth and its hipt-convert "
                  "output), its features are another model's (further such bags in this folder not named)")


def _check_pt_listed(out_dir: str, path: str) -> None:
    """A .pt bag holds one tensor, so no bag can record its extraction: one the folder's
    manifest lists, beside the extraction it records, is that extraction's (silent; the note
    fired on every hipt-extract --format pt folder). Otherwise a note, once per folder, says why
    such bags cannot be checked."""
    made_by, files = _manifest(out_dir)
    manifest = os.path.join(out_dir, "manifest.json")
    if made_by is not None and os.path.normpath(os.path.relpath(path, out_dir)) in files:
        return
    why = (f"{manifest} does not list it" if made_by is not None else
           f"{manifest} records no extraction" if os.path.exists(manifest) else f"there is no {manifest}")
    _say_once(os.path.abspath(out_dir), "pt", f"{out_dir}: note: a .pt bag cannot record the extraction that made "
              f"it (it holds one tensor) and {why} (e.g. {path}): such bags cannot be checked to come from "
              "this folder's extraction")


def _say_once(folder: str, what: str, line: str) -> None:
    if (folder, what) not in _said:
        _said.add((folder, what))
        print(line, file=sys.stderr)


def write_bag_file(path: str, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> None:
    """One bag at ``path`` in the format its extension names (temporary name, then rename),
    and its SHA-256 next to it (``checksum_path``), which every read verifies."""
    fmt = _format_of(path)
    tmp = f"{path}.tmp-{os.getpid()}{fmt.ext}"
    side = checksum_path(path)
    side_tmp = f"{side}.tmp-{os.getpid()}"
    try:
        fmt.write(tmp, arrays, {k: v for k, v in (attrs or {}).items() if v is not None})
        with open(side_tmp, "w") as f:  # sha256sum's format: `sha256sum -c` checks it in the folder
            f.write(f"{file_sha256(tmp)}  {os.path.basename(path)}\n")
        # Bag first, its checksum second, each renamed over the old one: a kill between the two
        # leaves the new bag beside the old bag's checksum, which verify_bag takes for damage
        # (the rerun redoes it). Removing the old checksum first left, on a kill before the
        # bag's rename, the old bag (often a damaged one being redone) with no checksum at all.
        os.replace(tmp, path)
        os.replace(side_tmp, side)
    except BaseException:  # disk full, Ctrl-C: no partial file is left behind
        for leftover in (tmp, side_tmp):
            _remove(leftover)
        raise


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


CHECKSUM_EXT = ".sha256"
# path -> (size, mtime_ns, SHA-256) of a bag hashed in this process (``_sha256``)
_verified: dict[str, tuple[int, int, str]] = {}


SOURCE_EXT = ".source"


def write_source(path: str, source: dict) -> None:
    """Record next to the bag ``path`` what it was made from (<bag>.source, JSON: e.g. the
    region shard's SHA-256), so a rerun can tell a finished bag from a stale one."""
    tmp = f"{path}{SOURCE_EXT}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(source, f, sort_keys=True)
    os.replace(tmp, path + SOURCE_EXT)


def read_source(path: str) -> dict | None:
    """What the bag ``path`` was made from (``write_source``); None when not recorded."""
    try:
        with open(path + SOURCE_EXT) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove_bag(path: str) -> None:
    """Remove a bag file with its checksum and source record (nothing is left to be read)."""
    for f in (path, checksum_path(path), path + SOURCE_EXT):
        if os.path.exists(f):
            os.remove(f)


def checksum_path(path: str) -> str:
    """Where the SHA-256 of the bag file ``path`` is recorded when it is written (<bag>.sha256)."""
    return path + CHECKSUM_EXT


def verify_bag(path: str) -> None:
    """BagError naming the file when its bytes differ from the checksum recorded at writing.
    Bags written elsewhere (CLAM/TRIDENT h5, official .pt) have no checksum and are not checked;
    a bag is hashed once per process while its size and mtime stay the same."""
    try:
        st = os.stat(path)
    except OSError:
        return  # the read itself names a missing file
    side = checksum_path(path)
    try:
        with open(side) as f:
            expected = f.read().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return
    if _sha256(path, st) != expected:
        raise BagError(f"{path}: truncated or corrupt bag (its SHA-256 does not match {side}); "
                       "rerun hipt-extract into the same folder (it redoes damaged bags)")


def bag_identity(path: str) -> dict:
    """What a result made from the bag ``path`` records of it: {"sha256", "bytes", "mtime_ns"}.
    The SHA-256 is the one its checksum verified in this process when it was read (no second
    read of the file), else computed here (bags of other tools have no checksum)."""
    st = os.stat(path)
    return {"sha256": _sha256(path, st), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256(path: str, st: os.stat_result) -> str:
    """The SHA-256 of a bag, hashed once per process while its size and mtime stay the same."""
    known = _verified.get(path)
    if known is None or known[:2] != (st.st_size, st.st_mtime_ns):
        known = (st.st_size, st.st_mtime_ns, file_sha256(path))
        _verified[path] = known
    return known[2]


def bag_change(path: str | None, recorded: dict) -> str | None:
    """Why the bag at ``path`` is not the one ``recorded`` (a ``bag_identity``) describes, None
    when it is. Size and mtime are compared first; the file is hashed only when its mtime moved
    (a bag damaged or rewritten in place keeps its size, and hashing a whole cohort on every
    rerun would cost a read of every bag), so a copy or a touch costs one hash, not a redo."""
    if path is None or not os.path.isfile(path):
        return f"{path}: gone" if path else "its bag is gone"
    st = os.stat(path)
    if st.st_size != recorded.get("bytes"):
        return f"{path}: {st.st_size} bytes, {recorded.get('bytes')} when it was read (replaced or truncated)"
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return None
    if bag_identity(path)["sha256"] != recorded.get("sha256"):
        return f"{path}: its bytes changed since it was read (SHA-256 differs: damaged or replaced)"
    return None


def list_bags(out_dir: str) -> dict[str, str]:
    """slide_id -> bag path of every finished bag under OUT/slides (sorted by slide id), or
    directly in ``out_dir`` when it has no slides/ folder (a folder of CLAM/TRIDENT h5 or
    official .pt bags). Hidden files (macOS ``._x.h5`` metadata) are not bags."""
    folder = os.path.join(out_dir, SLIDES)
    if not os.path.isdir(folder):
        folder = out_dir
    if not os.path.isdir(folder):
        return {}
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        for fmt in FORMATS.values():
            if name.endswith(fmt.ext) and ".tmp-" not in name:
                # Keyed as hipt-prep names slides (and the labels name rows): a TRIDENT bag
                # named after its slide file, "my slide.h5", is slide my_slide.
                slide_id = safe_slide_id(name[: -len(fmt.ext)])
                if slide_id in out:
                    raise same_id_error(slide_id, [out[slide_id], os.path.join(folder, name)])
                out[slide_id] = os.path.join(folder, name)
    return out


def same_id_error(slide_id: str, paths: list[str]) -> BagError:
    """Two bag files of one slide id: the same name in two formats, or two names that map to
    one id ("my slide.h5" and "my_slide.h5")."""
    stems = {os.path.splitext(os.path.basename(p))[0] for p in paths}
    if len(stems) == 1:
        return two_formats_error(slide_id, paths)
    return BagError(f"{' and '.join(paths)}: both are the bag of slide {slide_id!r} (ids are file names "
                    "with spaces and other punctuation as '_'); keep one of them")


def two_formats_error(slide_id: str, paths: list[str]) -> BagError:
    """One slide with bags in two formats (x.npz beside x.h5): which one a reader took would
    depend on the reader, so the commands could score different embeddings of one slide."""
    return BagError(f"{' and '.join(paths)}: slide {slide_id!r} has bags in two formats; "
                    "keep one of them (hipt-extract writes one format per folder)")


def find_bag(out_dir: str, slide_id: str) -> str | None:
    """The bag file of ``slide_id`` under ``out_dir`` in any format, or None (BagError when
    it has bags in two formats)."""
    folder = os.path.join(out_dir, SLIDES)
    folder = folder if os.path.isdir(folder) else out_dir
    found = [p for p in (os.path.join(folder, slide_id + fmt.ext) for fmt in FORMATS.values())
             if os.path.isfile(p)]
    if not found and os.path.isdir(folder):  # a bag named after its slide file: "my slide.h5"
        found = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                 for fmt in FORMATS.values() if n.endswith(fmt.ext) and not n.startswith(".")
                 and ".tmp-" not in n and safe_slide_id(n[: -len(fmt.ext)]) == slide_id]
    if len(found) > 1:
        raise same_id_error(slide_id, found)
    return found[0] if found else None


def _first_sentence(e: Exception) -> str:
    """"Type: first sentence" of a reader's error: torch appends paragraphs of advice (among
    them loading with weights_only=False, which would run the file's code) that do not belong
    in a one-line error about a damaged file."""
    text = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def read_bag_file(path: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of one bag file (only ``keys`` when given); BagError when unreadable or when
    a requested array is not in the file."""
    verify_bag(path)
    try:
        out = _format_of(path).read(path, keys)
    except BagError:
        raise
    except Exception as e:  # truncated zip, bad h5, bad pickle...: one clear message
        raise BagError(f"{path}: truncated or corrupt bag ({_first_sentence(e)})") from None
    missing = [k for k in (keys or ()) if k not in out]
    if missing:
        held = sorted(_format_of(path).keys(path))  # not just the keys asked for ("it holds nothing")
        raise BagError(f"{path}: bag has no {', '.join(missing)} (it holds {', '.join(held) or 'nothing'})")
    _check_finite(path, out)
    return out


# The arrays a model or a slide embedding is computed from (not coords or attention maps).
FEATURE_KEYS = ("features_cls256", "features_cls4k", "features_region", "slide_embedding")


def _check_finite(path: str, arrays: dict[str, np.ndarray]) -> None:
    """A NaN or Inf in a bag's features would flow into every score made from it (an argmax
    over NaN probabilities is a confident class 0): refuse the bag, naming it."""
    for key in FEATURE_KEYS:
        arr = arrays.get(key)
        if arr is None or not np.issubdtype(np.asarray(arr).dtype, np.floating):
            continue
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise BagError(f"{path}: {bad} non-finite value(s) (NaN/Inf) in {key} {tuple(arr.shape)}; "
                           "re-extract this slide")


def bag_keys(path: str) -> tuple[str, ...]:
    """Names of the arrays a bag file holds (h5 ``features`` named by its shape)."""
    verify_bag(path)
    try:
        return tuple(_format_of(path).keys(path))
    except BagError:
        raise
    except Exception as e:  # noqa: BLE001 - same message as read_bag_file
        raise BagError(f"{path}: truncated or corrupt bag ({_first_sentence(e)})") from None


def read_coords_attrs(path: str) -> dict:
    """The coordinate attributes of a bag (patch_size, patch_size_level0, ...; {} for .pt)."""
    try:
        return _format_of(path).attrs(path)
    except Exception as e:  # noqa: BLE001
        raise BagError(f"{path}: truncated or corrupt bag ({_first_sentence(e)})") from None


def convert_bag(src: str, dst: str) -> None:
    """Rewrite the bag ``src`` in the format of ``dst``'s extension (arrays and attributes)."""
    write_bag_file(dst, read_bag_file(src), read_coords_attrs(src))


def read_bag(out_dir: str, slide_id: str) -> dict[str, np.ndarray]:
    """The arrays of one extracted slide, any format (features_cls256 as float32)."""
    path = find_bag(out_dir, slide_id)
    if path is None:
        raise BagError(f"{bag_path(out_dir, slide_id)}: slide {slide_id!r} was not extracted")
    out = read_bag_file(path)
    check_extraction(out_dir, path)
    for key in ("features_cls256", "features_cls4k", "features_region"):
        if key in out and len(out[key]) == 0:
            raise BagError(f"{path}: bag of slide {slide_id!r} has no regions ({key} {tuple(out[key].shape)})")
    _check_region_counts(path, out)
    if "features_cls256" in out:
        out["features_cls256"] = out["features_cls256"].astype(np.float32)
    return out


# The arrays with one row per region of the slide (the first axis is the region).
REGION_KEYS = ("features_cls256", "features_cls4k", "features_region", "coords")


def _check_region_counts(path: str, arrays: dict[str, np.ndarray]) -> None:
    """A bag whose per-region arrays disagree on the number of regions (pieces of two
    extractions, a hand-edited file) is refused, naming it: a model reads one of them and the
    attention map is saved beside the coords of another, so each weight lands on some other
    region of the heatmap (or the map cannot be shaped and the whole run stops)."""
    counts = {k: len(arrays[k]) for k in REGION_KEYS if k in arrays and np.ndim(arrays[k]) >= 1}
    if len(set(counts.values())) > 1:
        said = ", ".join(f"{k} {tuple(arrays[k].shape)}" for k in counts)
        raise BagError(f"{path}: its arrays disagree on the number of regions ({said}); re-extract this slide")


# Which arrays give a slide embedding, best first, and how (see the module docstring).
_EMBEDDING_SOURCES = (
    ("slide_embedding", lambda a: a),
    ("features_cls4k", lambda a: a.mean(axis=0)),          # [M,192] -> [192]
    ("features_region", lambda a: a.mean(axis=0)),         # [M,D] -> [D]
    ("features_cls256", lambda a: a.mean(axis=(0, 1))),    # [M,R*C,384] -> [384]
)


def read_slide_embedding(path: str) -> np.ndarray:
    """The slide embedding of one bag file (float32 vector; see the module docstring)."""
    held = bag_keys(path)
    for key, reduce in _EMBEDDING_SOURCES:
        if key in held:
            arr = read_bag_file(path, (key,))[key]
            if key != "slide_embedding" and len(arr) == 0:
                raise BagError(f"{path}: bag has no regions")
            emb = np.asarray(reduce(np.asarray(arr, np.float32)), np.float32)
            if emb.ndim != 1:
                raise BagError(f"{path}: {key} has shape {tuple(np.shape(arr))}, which gives no "
                               "slide embedding vector (expected [M, D] region features)")
            return emb
    raise BagError(f"{path}: bag has no features ({', '.join(held) or 'empty'})")


def no_bag_read_error(out_dir: str, failed: dict[str, str] | None) -> BagError:
    """The error of a folder that gave no slide: it has no bags, or none of them could be read
    (then the first reason: "no extracted slides" sent the user looking for missing files)."""
    folder = os.path.join(out_dir, SLIDES)
    folder = folder if os.path.isdir(folder) else out_dir
    if not failed:
        return BagError(f"{folder}: no extracted slides")
    first = sorted(failed)[0]
    return BagError(f"{folder}: none of its {len(failed)} bag(s) could be read ({first}: {failed[first]})")


def read_slide_embeddings(out_dir: str, failed: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """slide_id -> slide embedding for every bag under ``out_dir`` (its slides/ folder, or the
    folder itself for a folder of h5/.pt bags).

    An unreadable (truncated, corrupt) bag raises BagError or, when a ``failed`` dict is given,
    is skipped and recorded there as slide_id -> error. Bags whose embeddings differ in width
    (CLS-4K [192] next to mean ViT-256 [384]) raise BagError naming the first odd file."""
    found = list_bags(out_dir)
    if not found and not os.path.isdir(os.path.join(out_dir, SLIDES)):
        exts = "|".join(f.ext[1:] for f in FORMATS.values())
        raise BagError(f"{out_dir}: no {SLIDES}/ folder and no *.{{{exts}}} bags; run hipt-extract first")
    out: dict[str, np.ndarray] = {}
    for sid, path in found.items():
        try:
            emb = read_slide_embedding(path)
            check_extraction(out_dir, path)
        except BagError as e:
            if failed is None:
                raise
            failed[sid] = str(e)
            continue
        out[sid] = emb
    if not out:
        raise no_bag_read_error(out_dir, failed)
    check_one_width(out, found)
    return out


def check_one_width(embeddings: dict[str, np.ndarray], paths: dict[str, str],
                    what: str = "slide embedding") -> None:
    """BagError naming the odd bag when ``embeddings`` (slide_id -> [D], read from ``paths``)
    differ in width (bags of two models or feature kinds in one folder): the slides cannot
    be compared, and numpy's stack would fail without naming a file."""
    widths: dict[int, list[str]] = {}
    for sid, emb in embeddings.items():
        widths.setdefault(emb.shape[0], []).append(sid)
    if len(widths) > 1:  # name the odd bags, not whichever sorted first
        common = max(widths, key=lambda w: len(widths[w]))
        odd = next(sid for w, sids in widths.items() if w != common for sid in sids)
        raise BagError(f"{paths[odd]}: {what} has width {embeddings[odd].shape[0]} but "
                       f"{len(widths[common])} of the {len(embeddings)} bags (e.g. {paths[widths[common][0]]}) "
                       f"have {common}; one cohort needs one kind of bag")


def num_regions(path: str) -> int:
    """M, the number of regions of a bag file."""
    held = bag_keys(path)
    key = next((k for k in ("coords", "features_cls256", "features_cls4k", "features_region") if k in held),
               "features_cls256")
    return int(read_bag_file(path, (key,))[key].shape[0])


def manifest_items(out_dir: str, slide_ids: list[str], errors: dict[str, str]) -> dict[str, dict]:
    """Manifest entries of a bag-writing run: per slide {file, num_regions, status done}, or
    {status failed, error}, or {status pending}; bags an earlier run left in the folder are
    listed too (the manifest says what the folder holds, which is what readers use)."""
    bags = list_bags(out_dir)
    items = {}
    for s in list(slide_ids) + sorted(set(bags) - set(slide_ids)):
        if s in bags:
            try:
                items[s] = {"file": os.path.relpath(bags[s], out_dir), "status": "done",
                            "num_regions": num_regions(bags[s])}
            except BagError as e:  # damaged since it was written: failed, named
                items[s] = {"status": "failed", "error": str(e)}
        elif s in errors:
            items[s] = {"status": "failed", "error": errors[s]}
        else:
            items[s] = {"status": "pending"}
    return items
