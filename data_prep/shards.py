"""The shard layer: record schemas, shard discovery, reading, writing and run manifests.

Every shard is an ArrayRecord file (`<slide_id>.array_record`) holding one record per region,
patch or region feature grid. A record is a msgpack map of plain types (str, int, float, bytes,
lists of int) with a "schema" key, so any language with msgpack and an ArrayRecord reader can
consume the shards without this package. The three record kinds and their fields are defined
once, in the tables REGION, PATCH and FEATURE below; encoding, decoding, the Grain sources
(hipt_jax.data) and the TFDS feature dicts (data_prep.tfds_builders) all derive from them.

Finding shards (`find_shards`): a shard file, a glob, a folder of shards, a hipt-prep output
folder (OUT/<kind>/), a list of any of these, or a hipt-prep manifest.json (its finished items).
Reading: `iter_records` streams the records of one shard; `RecordSource` gives random access
over several shards (`__len__`, `__getitem__`, picklable for loader worker processes).

This module only needs numpy, msgpack, OpenCV and array_record (no JAX), so process-pool
workers stay light.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import platform
import sys
import time
import unicodedata
from importlib import metadata
from typing import Any, Iterable, Iterator, Sequence

import cv2
import msgpack
import numpy as np

SHARD_EXT = ".array_record"
# group_size:1 makes every record independently seekable (random access); "uncompressed"
# because JPEG bytes and float features do not compress, and trying costs ~60 ms per 4096 region.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
MANIFEST = "manifest.json"
FEATURE_DTYPES = ("float16", "float32")


class ShardError(ValueError):
    """A shard or record that cannot be read as expected (the message names the file)."""


# ---------------------------------------------------------------------------------------------
# Field codecs
# ---------------------------------------------------------------------------------------------
def encode_jpeg(image: np.ndarray, quality: int = 90, bgr: bool = False) -> bytes:
    """uint8 [H,W,3] RGB (or BGR with bgr=True) -> JPEG bytes (baseline 4:2:0, libjpeg-turbo)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 [H,W,3] RGB, got {image.dtype} {image.shape}")
    # OpenCV encodes BGR; callers with BGR pixels at hand (the region writer) skip the swap,
    # which costs as much as the encoding itself on a 4096 px region.
    pixels = image if bgr else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 [H,W,3] RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("record holds bytes that are not a decodable JPEG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _feature_dtype(record: dict[str, Any]) -> np.dtype:
    return np.dtype(record["dtype"]).newbyteorder("<")


def decode_features(record: dict[str, Any]) -> np.ndarray:
    """Feature record -> float32 [R*C, D] array."""
    arr = np.frombuffer(record["features"], dtype=_feature_dtype(record))
    return arr.reshape(record["shape"]).astype(np.float32)


def _stored_features(record: dict[str, Any]) -> np.ndarray:
    """Feature record -> [R*C, D] array in its stored dtype (float16 or float32)."""
    arr = np.frombuffer(record["features"], dtype=_feature_dtype(record))
    return arr.reshape(record["shape"]).astype(record["dtype"])


@dataclasses.dataclass(frozen=True)
class FieldType:
    """How a field is stored (`store`: value -> plain msgpack type) and how it appears in a
    decoded example (`decoded`: record map -> numpy value, used by the Grain sources;
    `raw`: record map -> value for TFDS, which does its own encoding)."""
    name: str
    store: Any
    decoded: Any
    raw: Any


def _scalar(np_type):
    return lambda name: (lambda rec: np_type(rec[name]))


def _pair(name):
    return lambda rec: np.asarray(rec[name], np.int32)


def _same(name):
    return lambda rec: rec[name]


# The `decoded`/`raw` entries take the field name and return record -> value.
JPEG = FieldType("jpeg", bytes, lambda name: (lambda rec: decode_jpeg(rec[name])), _same)
STR = FieldType("str", str, _same, _same)
INT64 = FieldType("int64", int, _scalar(np.int64), _same)
INT32 = FieldType("int32", int, _scalar(np.int32), _same)
FLOAT32 = FieldType("float32", float, _scalar(np.float32), _same)
PAIR = FieldType("pair", lambda v: [int(v[0]), int(v[1])], _pair, _pair)
FEATURES = FieldType("features", bytes, lambda name: decode_features, lambda name: _stored_features)


@dataclasses.dataclass(frozen=True)
class Field:
    name: str            # key in the record map
    type: FieldType
    doc: str
    key: str = ""        # key in decoded examples (default: name)
    in_example: bool = True

    @property
    def example_key(self) -> str:
        return self.key or self.name


# ---------------------------------------------------------------------------------------------
# Record kinds: the one definition of every field
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RecordKind:
    """One record schema: its fields in storage order, and the folder hipt-prep writes it to."""
    name: str            # "region"
    folder: str          # "regions": hipt-prep writes OUT/<folder>/<slide_id>.array_record
    schema: str          # "hipt.region.v1", stored in every record
    fields: tuple[Field, ...]

    def __reduce__(self):
        # Pickled by name (the tables hold functions): loader workers get the same table.
        return kind_of, (self.folder,)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def example_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.in_example)

    def encode(self, **values) -> bytes:
        """Field values (keywords, every field of the table) -> record bytes."""
        missing = [n for n in self.field_names if n not in values]
        extra = [n for n in values if n not in self.field_names]
        if missing or extra:
            raise TypeError(f"{self.name} record: missing fields {missing}, unknown fields {extra}")
        record = {"schema": self.schema}
        record.update((f.name, f.type.store(values[f.name])) for f in self.fields)
        return msgpack.packb(record, use_bin_type=True)

    def decode(self, data: bytes, where: str = "record") -> dict[str, Any]:
        """Record bytes -> the record map; ShardError if it is not a record of this kind."""
        record = unpack(data, where)
        if record["schema"] != self.schema:
            raise ShardError(f"{where} has schema {record['schema']!r}, expected {self.schema!r} "
                             f"(wrong shard folder? {self.folder} expected)")
        return record

    def example(self, record: dict[str, Any], decode: bool = True) -> dict[str, Any]:
        """Record map -> example dict: with ``decode`` numpy values (images as uint8 [H,W,3],
        features as float32 [R*C,D]); without, what TFDS encodes (JPEG bytes, stored dtype)."""
        return {f.example_key: (f.type.decoded if decode else f.type.raw)(f.name)(record)
                for f in self.example_fields}


def unpack(data: bytes, where: str = "record") -> dict[str, Any]:
    """Record bytes of any kind -> map; ShardError on bytes that are not a record."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise ShardError(f"{where}: not a msgpack record: {e}") from e
    if not isinstance(record, dict) or "schema" not in record:
        raise ShardError(f"{where}: record has no 'schema' field")
    return record


_SLIDE_ID = Field("slide_id", STR, "slide the record comes from")
_MPP = Field("mpp", FLOAT32, "microns per pixel of the stored image")

REGION = RecordKind("region", "regions", "hipt.region.v1", (
    Field("image_jpeg", JPEG, "JPEG of the region, region_px x region_px x 3 RGB at mpp",
          key="image"),
    _SLIDE_ID,
    Field("x", INT64, "left edge of the region in level-0 pixels of the slide"),
    Field("y", INT64, "top edge of the region in level-0 pixels of the slide"),
    Field("level", INT32, "pyramid level the pixels were read from"),
    Field("read_px", INT32, "side of the region in level-0 pixels (8192 for 4096 px at 20x from 40x)"),
    _MPP,
    Field("region_px", INT32, "side of the stored image in pixels (4096 by default)"),
    Field("tissue_fraction", FLOAT32, "fraction of the region covered by the tissue mask"),
    Field("index", INT32, "position of the region in its slide's row-major kept-region list"),
))

PATCH = RecordKind("patch", "patches", "hipt.patch.v1", (
    Field("image_jpeg", JPEG, "JPEG of the patch, patch_px x patch_px x 3 RGB at mpp", key="image"),
    _SLIDE_ID,
    Field("x", INT64, "left edge of the patch in level-0 pixels"),
    Field("y", INT64, "top edge of the patch in level-0 pixels"),
    Field("region_x", INT64, "left edge of the parent region (level 0)"),
    Field("region_y", INT64, "top edge of the parent region (level 0)"),
    Field("row", INT32, "row of the patch in the parent region's patch grid"),
    Field("col", INT32, "column of the patch in the parent region's patch grid"),
    Field("patch_px", INT32, "side of the patch in pixels (constant per shard)", in_example=False),
    _MPP,
    Field("tissue_fraction", FLOAT32, "stained (non-background) fraction of the patch"),
))

FEATURE = RecordKind("feature", "features", "hipt.feature.v1", (
    Field("features", FEATURES, "little-endian array of dtype `dtype` and shape `shape` = [R*C, 384]"),
    Field("dtype", STR, "float16 or float32", in_example=False),
    Field("shape", PAIR, "[R*C, D]", in_example=False),
    Field("grid", PAIR, "(R, C): row i, column j of the patch grid is token i*C+j"),
    _SLIDE_ID,
    Field("x", INT64, "left edge of the region in level-0 pixels"),
    Field("y", INT64, "top edge of the region in level-0 pixels"),
    _MPP,
    Field("region_px", INT32, "side of the region image the features come from"),
))

KINDS = {k.folder: k for k in (REGION, PATCH, FEATURE)}


def encode_feature(features: np.ndarray, *, dtype: str = "float16", **fields) -> bytes:
    """[R*C, D] features (+ the other FEATURE fields as keywords) -> feature record bytes."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be float16 or float32, got {dtype!r}")
    rows, cols = (int(g) for g in fields.get("grid", (0, 0)))
    if features.ndim != 2 or features.shape[0] != rows * cols:
        raise ValueError(f"features {features.shape} do not match grid {rows}x{cols}")
    arr = np.ascontiguousarray(features, dtype=np.dtype(dtype).newbyteorder("<"))
    return FEATURE.encode(features=arr.tobytes(), dtype=dtype, shape=arr.shape, **fields)


def kind_of(kind: str | RecordKind) -> RecordKind:
    """A RecordKind from itself or its folder name ("regions", "patches", "features")."""
    if isinstance(kind, RecordKind):
        return kind
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}: {', '.join(KINDS)}")
    return KINDS[kind]


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------
def kind_folder(root: str, kind: str | RecordKind) -> str:
    """OUT/<kind folder> when ``root`` is a hipt-prep output folder, else ``root`` itself."""
    sub = os.path.join(root, kind_of(kind).folder)
    return sub if os.path.isdir(sub) else root


def safe_slide_id(name: str) -> str:
    """A slide file's stem as the id its outputs are named by: letters and digits of any script,
    '.', '-' and '_' kept, every other run of characters (spaces, slashes, ...) one '_':
    'my slide' -> 'my_slide', '患者 1' -> '患者_1'. Every command that maps a slide, a coordinate
    file, a bag or a labels/split row to an id goes through here, so their names meet.
    NFC first: macOS writes 'café' as 'cafe' + a combining accent (NFD), which is not a word
    character, so without it the same name typed (NFC) and listed (NFD) would differ."""
    name = unicodedata.normalize("NFC", name)
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "slide"


def walk_visible(folder: str, exclude: tuple[str, ...] = ()):
    """os.walk for input folders: linked subfolders followed (cohorts are often assembled from
    links), each real folder once (a link back up does not loop); hidden entries skipped (macOS
    "._x.svs" AppleDouble files, ".Trash-*" copies are not inputs); the folders in ``exclude``
    (an output folder inside the input one) skipped. Yields (folder, sorted visible file names)."""
    skip = {os.path.realpath(e) for e in exclude}
    visited = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        visited.add(os.path.realpath(root))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(root, d)) not in skip | visited)
        yield root, sorted(f for f in files if not f.startswith("."))


def slide_id_of(path: str) -> str:
    return os.path.basename(path)[: -len(SHARD_EXT)]


def shard_path(out_dir: str, kind: str | RecordKind, slide_id: str) -> str:
    """Where hipt-prep writes the ``kind`` shard of a slide: OUT/<kind folder>/<slide_id>.array_record."""
    return os.path.join(out_dir, kind_of(kind).folder, slide_id + SHARD_EXT)


def find_slide_shard(root: str, kind: str | RecordKind, slide_id: str) -> str:
    """Path of a slide's ``kind`` shard under ``root`` (OUT or OUT/<kind>); it may not exist."""
    return os.path.join(kind_folder(root, kind), slide_id + SHARD_EXT)


def _folder_shards(folder: str) -> list[str]:
    # Temporary files of unfinished writes end in .tmp-<pid>, so they never match.
    return sorted(glob.glob(os.path.join(folder, "*" + SHARD_EXT)))


_WARNED_MANIFESTS: set[str] = set()


def read_prep_manifest(out_dir: str) -> dict:
    """OUT/manifest.json of a hipt-prep folder ({} when absent or unreadable: callers check what
    it records only where it records it). An unreadable one is named on stderr (once): the checks
    it feeds (failed slides, region size) are then skipped, which the user should know."""
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as f:
            data = json.load(f)
        problem = None if isinstance(data, dict) and all(
            isinstance(data.get(key, {}), dict) for key in ("params", "items")) else "not a hipt-prep manifest"
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        data, problem = {}, f"unreadable ({e.strerror if isinstance(e, OSError) and e.strerror else e})"
    if problem:
        if path not in _WARNED_MANIFESTS:
            _WARNED_MANIFESTS.add(path)
            print(f"warning: {path}: {problem}; what it records is not checked (remove it and rerun "
                  "the same hipt-prep command to rebuild it)", file=sys.stderr)
        return {}
    return data


def _manifest_shards(path: str, kind: RecordKind | None) -> list[str]:
    """The shards of the finished items of a hipt-prep manifest.json."""
    try:
        with open(path) as f:
            manifest = json.load(f)
        items = manifest["items"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{path}: not a hipt-prep manifest ({type(e).__name__}: {e})") from None
    if kind is not None and manifest.get("kind") != kind.folder:
        raise ShardError(f"{path}: manifest of {manifest.get('kind')!r} shards, expected {kind.folder!r}")
    base = os.path.dirname(os.path.abspath(path))
    return [os.path.join(base, item["shard"]) for _, item in sorted(items.items())
            if item.get("status") == "done" and item.get("shard")]


def _resolve_one(path: str, kind: RecordKind | None) -> list[str]:
    if os.path.isdir(path):
        return _folder_shards(kind_folder(path, kind) if kind else path)
    if any(ch in path for ch in "*?["):
        return sorted(glob.glob(path))
    if os.path.isfile(path) and os.path.basename(path) == MANIFEST:
        return _manifest_shards(path, kind)
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f"{path}: no such shard file or folder")


def find_shards(paths: str | os.PathLike | Sequence, kind: str | RecordKind | None = None) -> list[str]:
    """Shard files from a file, a glob, a folder, a hipt-prep output folder (OUT/<kind>/), a
    manifest.json, or a list of these. Sorted per entry, so record indices are stable across
    processes and runs; FileNotFoundError when nothing is found."""
    kind = kind_of(kind) if kind else None
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for p in items:
        out.extend(_resolve_one(os.fspath(p), kind))
    if not out:
        held = folder_kind(os.fspath(items[0])) if kind is not None and len(items) == 1 else None
        if held is not None and held is not kind:  # a hipt-prep folder of the other stage
            raise FileNotFoundError(wrong_kind(os.fspath(items[0]), held, kind))
        raise FileNotFoundError(f"{paths}: no *{SHARD_EXT} shards found")
    return sorted(set(out), key=out.index)


# How each kind of shard is made: said when a folder of another kind is given.
PREP_COMMANDS = {
    "regions": "hipt-prep regions --slides SLIDES --out OUT",
    "patches": "hipt-prep patches --regions REGIONS --out OUT",
    "features": "hipt-prep features --regions REGIONS --out OUT --vit256 MODEL",
}


def folder_kind(folder: str) -> RecordKind | None:
    """The kind of shards a hipt-prep output folder holds (its manifest's kind, else the one
    <kind folder>/ holding shards), None when it holds none."""
    if not os.path.isdir(folder):
        return None
    manifest_kind = read_prep_manifest(folder).get("kind")
    if manifest_kind in KINDS:
        return KINDS[manifest_kind]
    for kind in KINDS.values():
        if _folder_shards(os.path.join(folder, kind.folder)):
            return kind
    return None


def wrong_kind(where: str, held: RecordKind, wanted: RecordKind) -> str:
    """One line for shards of another kind than the ones wanted: what ``where`` holds, what is
    expected and the hipt-prep command that makes it (a folder of regions is its --regions)."""
    make = PREP_COMMANDS[wanted.folder]
    if held is REGION and os.path.isdir(where):
        make = make.replace("REGIONS", where)
    return (f"{where}: holds {held.name} shards (hipt-prep {held.folder}); {wanted.name} shards "
            f"expected: {make} makes them")


def list_slide_shards(root: str, kind: str | RecordKind) -> dict[str, str]:
    """slide_id -> shard path of every ``kind`` shard under ``root`` (OUT or OUT/<kind>),
    sorted by slide id; FileNotFoundError naming ``root`` when there are none."""
    kind = kind_of(kind)
    folder = kind_folder(root, kind)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{root}: no such folder")
    shards = {slide_id_of(p): p for p in _folder_shards(folder)}
    if not shards:
        raise FileNotFoundError(f"{root}: no {kind.name} shards (*{SHARD_EXT}); "
                                f"run `hipt-prep {kind.folder}` first")
    return dict(sorted(shards.items()))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (recorded in a shard's status file when it is written)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def params_digest(params: dict) -> str:
    """A short SHA-256 of the run parameters an item was made with (recorded in its status, so
    that a folder whose manifest is gone still knows them)."""
    import hashlib

    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def product_identity(path: str) -> dict:
    """What a status record keeps of a finished item's output: its SHA-256, size and mtime. A
    rerun compares size and mtime (cheap), and hashes only when one differs (data_prep.runner)."""
    return {"sha256": file_sha256(path), "shard_bytes": os.path.getsize(path),
            "shard_mtime_ns": os.stat(path).st_mtime_ns}


def current_sha256(path: str, status_file: str, status: dict) -> str:
    """The SHA-256 of the output ``path`` whose status record (``status``, read from
    ``status_file``; a ``product_identity``) holds a SHA-256. Damage in place (a zero-filled
    block) keeps the size, yet hashing every finished output on every rerun would read the whole
    folder: the recorded hash is trusted while the mtime is the recorded one, and an output whose
    mtime moved (a touch, ``cp -r``, damage) is hashed. Equal bytes then record the new mtime, so
    the next rerun is cheap again (a read-only folder is hashed again next time)."""
    mtime = os.stat(path).st_mtime_ns
    if status.get("shard_mtime_ns") == mtime:
        return status["sha256"]
    digest = file_sha256(path)
    if digest == status["sha256"]:
        try:
            write_json_atomic(status_file, dict(status, shard_mtime_ns=mtime))
        except OSError:
            pass
    return digest


def input_identity(path: str) -> dict:
    """What says a slide file is the one a finished item was made from: its name and size (not
    its folder or mtime, so moving or copying a cohort does not redo it)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    return {"name": os.path.basename(os.path.normpath(path)), "bytes": size}


def region_shard_identity(regions_dir: str, slide_id: str) -> dict:
    """What says a derived shard (patches, features) was made from a slide's current region
    shard: its name, the SHA-256 its hipt-prep status recorded (the bytes when there is none)."""
    path = find_slide_shard(regions_dir, REGION, slide_id)
    try:
        with open(shard_status_path(path)) as f:
            digest = json.load(f).get("sha256")
    except (OSError, ValueError, AttributeError):
        digest = None
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    return {"name": os.path.basename(path), "sha256": digest, "bytes": size}


def item_status_path(out_dir: str, item_id: str) -> str:
    """OUT/status/<item_id>.json: where hipt-prep records a finished item (written last)."""
    return os.path.join(out_dir, "status", item_id + ".json")


def shard_status_path(path: str) -> str:
    """OUT/status/<slide_id>.json of a shard OUT/<kind>/<slide_id>.array_record."""
    return item_status_path(os.path.dirname(os.path.dirname(os.path.abspath(path))), slide_id_of(path))


def verify_shard(path: str) -> None:
    """ShardError naming the file when its bytes differ from the checksum its status file
    recorded (shards without a status or a checksum are not checked)."""
    status = shard_status_path(path)
    try:
        with open(status) as f:
            expected = json.load(f).get("sha256")
    except (OSError, ValueError, AttributeError):
        return
    if expected and os.path.isfile(path) and file_sha256(path) != expected:
        raise ShardError(f"{path}: damaged shard (checksum does not match {status}); "
                         "rerun hipt-prep with --redo")


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _open_reader(path: str):
    from array_record.python import array_record_module

    verify_shard(path)
    try:
        reader = array_record_module.ArrayRecordReader(path)
        if not reader.ok():  # a file that is no ArrayRecord opens as "0 records" with a bad status
            reader.read_all()  # raises that status
            raise RuntimeError("reader status not ok")
        return reader
    except (RuntimeError, ValueError, OSError) as e:  # array_record raises RuntimeError on bad files
        raise ShardError(f"{path}: not a readable shard of records ({e})") from None


def iter_records(path: str, kind: str | RecordKind | None = None,
                 chunk: int = 64) -> Iterator[dict[str, Any]]:
    """The record maps of one shard, in order (schema-checked when ``kind`` is given).
    Raises ShardError naming the file when it is not a readable shard."""
    kind = kind_of(kind) if kind else None
    reader = _open_reader(path)
    try:
        n = reader.num_records()
        for start in range(0, n, chunk):
            try:
                raw = reader.read(list(range(start, min(n, start + chunk))))
            except (RuntimeError, ValueError, OSError) as e:
                raise ShardError(f"{path}: not a readable shard of records ({e})") from None
            for i, data in enumerate(raw, start):
                where = f"{path}: record {i}"
                yield kind.decode(data, where) if kind else unpack(data, where)
    finally:
        try:
            reader.close()
        except RuntimeError:
            pass


def read_records(path: str, kind: str | RecordKind | None = None) -> list[dict[str, Any]]:
    """All record maps of one shard (a slide's shard fits in host memory)."""
    return list(iter_records(path, kind))


class RecordSource:
    """Random access over the records of some shards of one kind: ``len(src)``, ``src[i]``
    (a decoded example, see RecordKind.example), ``src.raw(i)`` (the record map).

    The ArrayRecord readers open lazily, so the source pickles cheaply into loader workers.
    """

    def __init__(self, paths: str | Sequence, kind: str | RecordKind):
        self.kind = kind_of(kind)
        self.paths = find_shards(paths, self.kind)
        self._source = None

    def _records(self):
        if self._source is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            try:  # opens every shard's index: a truncated shard fails here, at start-up
                source = ArrayRecordDataSource(self.paths)
            except (RuntimeError, ValueError, OSError) as e:
                raise ShardError(self._which_damaged(e)) from None
            self._starts = np.cumsum([0] + [r.num_records for r in source._read_instructions])
            self._source = source
        return self._source

    def _which_damaged(self, error: Exception) -> str:
        """The message for shards that do not open together: each opened alone names itself."""
        for path in self.paths:
            try:
                _open_reader(path).close()
            except ShardError as e:
                return self.damaged(path, str(e).split(": ", 1)[1])
        return f"{self.paths[0]} (+{len(self.paths) - 1} more shards): cannot be opened ({error})"

    def damaged(self, path: str, problem: str, record: int | None = None) -> str:
        """One line naming a damaged shard (and record) and the two ways on."""
        where = "" if record is None else f"record {record}: "
        return (f"{path}: {where}{problem}; re-run the `hipt-prep {self.kind.folder}` that wrote it "
                f"(a rerun redoes a shard whose bytes changed) for slide {slide_id_of(path)!r}, or "
                "move the shard out of the folder")

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, record index within it) of record ``index``."""
        self._records()
        shard = int(np.searchsorted(self._starts, int(index), side="right")) - 1
        return self.paths[shard], int(index) - int(self._starts[shard])

    def __len__(self) -> int:
        return len(self._records())

    def raw(self, index: int) -> dict[str, Any]:
        """The undecoded record map (JPEG bytes and all)."""
        try:
            data = self._records()[index]
        except (RuntimeError, ValueError, OSError) as e:  # a record whose chunk is corrupted
            path, record = self.locate(index)
            raise ShardError(self.damaged(path, f"cannot be read ({_first_line(e)})", record)) from None
        path, record = self.locate(index)
        return self.kind.decode(data, f"{path}: record {record}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.raw(int(index))
        try:
            return self.kind.example(raw)
        except (ValueError, KeyError, TypeError) as e:  # e.g. JPEG bytes that do not decode
            path, record = self.locate(int(index))
            raise ShardError(self.damaged(path, f"cannot be decoded ({_first_line(e)})", record)) from None

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.paths)} {self.kind.folder} shards)"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def open_shard_writer(path: str):
    """An ArrayRecord writer on a temporary name next to ``path``, renamed to ``path`` when the
    block ends normally and deleted when it raises: a shard is either complete or absent."""
    from array_record.python import array_record_module

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = array_record_module.ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
    try:
        yield writer
        writer.close()  # flushes: a full disk may first show here
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_shard(path: str, records: Iterable[bytes]) -> int:
    """Write encoded records to one shard (atomically); returns how many."""
    n = 0
    with open_shard_writer(str(path)) as writer:
        for record in records:
            writer.write(record)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Run manifests (hipt-prep and hipt-extract)
# ---------------------------------------------------------------------------------------------
def write_json_atomic(path: str, obj: Any) -> None:
    """``obj`` as JSON at ``path``, complete or not at all (a failed write leaves no temp file;
    its OSError names ``path``, not the temporary, and often no file at all: a full disk shows
    in f.write, whose error carries no file name)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise


def write_item_status(status_file: str, result: dict, product: str) -> None:
    """Record one item's result (hipt-prep's per-slide status file, written last). When even
    that write fails (disk full), the item's product is removed and the error put in
    ``result``, which the caller returns: the run goes on and its manifest names the failure."""
    try:
        write_json_atomic(status_file, result)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(product)
        result.update(status="failed", error=f"{status_file}: status write failed ({e.strerror or e})")


def package_versions(packages: Sequence[str]) -> dict[str, str | None]:
    """Python version and the installed versions of ``packages`` (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def write_run_manifest(out_dir: str, *, schema: str, items: dict[str, dict], params: dict,
                       versions: dict, items_key: str = "items", extra: dict | None = None,
                       write: bool = True) -> dict:
    """OUT/manifest.json of a run over many items (slides, shards): every item with its status
    ("done", "failed" with its "error", or "pending") and result fields, the status counts,
    the run parameters and library versions. Replaced atomically; returns the manifest."""
    counts: dict[str, int] = {}
    for item in items.values():
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    manifest = dict(schema=schema, params=params, versions=versions, counts=counts,
                    updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **{items_key: items}, **(extra or {}))
    if write:
        write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest
