"""Record schema of the region / patch / feature shards (one msgpack map per ArrayRecord record).

Every shard is an ArrayRecord file holding one record per region (or patch). A record is a
msgpack-encoded map with plain types only (str, int, float, bytes, lists), so any language
with msgpack and an ArrayRecord reader can consume the shards without this package:

region record (schema "hipt.region.v1")
    image_jpeg       bytes  JPEG of the region, region_px x region_px x 3 RGB at `mpp`
    slide_id         str
    x, y             int    top-left corner of the region in level-0 pixels of the slide
    level            int    pyramid level the pixels were read from
    read_px          int    side of the region in level-0 pixels (8192 for 4096 px at 20x from 40x)
    mpp              float  microns per pixel of the stored image
    region_px        int    side of the stored image in pixels (4096 by default)
    tissue_fraction  float  fraction of the region covered by the tissue mask
    index            int    position of the region in its slide's row-major kept-region list

patch record (schema "hipt.patch.v1")
    image_jpeg, slide_id, mpp          as above, image is patch_px x patch_px
    x, y             int    top-left corner of the patch in level-0 pixels
    region_x, region_y int  top-left corner of the parent region (level 0)
    row, col         int    position of the patch in the parent region's patch grid
    patch_px         int
    tissue_fraction  float  non-background fraction of the patch

feature record (schema "hipt.feature.v1")
    features         bytes  little-endian array, dtype `dtype`, shape `shape` = [R*C, 384]
    dtype            str    "float16" or "float32"
    shape            [int, int]
    grid             [int, int]  (R, C): row i, column j of the patch grid is token i*C+j
    slide_id, x, y, mpp, region_px  as in the region record

This module only needs numpy, msgpack and OpenCV (no JAX), so process-pool workers stay light.
"""
from __future__ import annotations

from typing import Any

import cv2
import msgpack
import numpy as np

REGION_SCHEMA = "hipt.region.v1"
PATCH_SCHEMA = "hipt.patch.v1"
FEATURE_SCHEMA = "hipt.feature.v1"


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


def pack(record: dict[str, Any]) -> bytes:
    """Serialize one record map (plain types only)."""
    return msgpack.packb(record, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    """Inverse of `pack`; raises ValueError on bytes that are not a record of this schema."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise ValueError(f"not a msgpack record: {e}") from e
    if not isinstance(record, dict) or "schema" not in record:
        raise ValueError("record has no 'schema' field")
    return record


def region_record(image_jpeg: bytes, *, slide_id: str, x: int, y: int, level: int, read_px: int,
                  mpp: float, region_px: int, tissue_fraction: float, index: int) -> bytes:
    return pack(dict(schema=REGION_SCHEMA, image_jpeg=image_jpeg, slide_id=slide_id, x=int(x),
                     y=int(y), level=int(level), read_px=int(read_px), mpp=float(mpp),
                     region_px=int(region_px), tissue_fraction=float(tissue_fraction),
                     index=int(index)))


def patch_record(image_jpeg: bytes, *, slide_id: str, x: int, y: int, region_x: int, region_y: int,
                 row: int, col: int, patch_px: int, mpp: float, tissue_fraction: float) -> bytes:
    return pack(dict(schema=PATCH_SCHEMA, image_jpeg=image_jpeg, slide_id=slide_id, x=int(x),
                     y=int(y), region_x=int(region_x), region_y=int(region_y), row=int(row),
                     col=int(col), patch_px=int(patch_px), mpp=float(mpp),
                     tissue_fraction=float(tissue_fraction)))


def feature_record(features: np.ndarray, *, grid: tuple[int, int], slide_id: str, x: int, y: int,
                   mpp: float, region_px: int, dtype: str = "float16") -> bytes:
    if dtype not in ("float16", "float32"):
        raise ValueError(f"feature dtype must be float16 or float32, got {dtype!r}")
    rows, cols = int(grid[0]), int(grid[1])
    if features.ndim != 2 or features.shape[0] != rows * cols:
        raise ValueError(f"features {features.shape} do not match grid {rows}x{cols}")
    arr = np.ascontiguousarray(features, dtype=np.dtype(dtype).newbyteorder("<"))
    return pack(dict(schema=FEATURE_SCHEMA, features=arr.tobytes(), dtype=dtype,
                     shape=[int(s) for s in arr.shape], grid=[rows, cols], slide_id=slide_id,
                     x=int(x), y=int(y), mpp=float(mpp), region_px=int(region_px)))


def decode_features(record: dict[str, Any]) -> np.ndarray:
    """Feature record -> float32 [R*C, D] array."""
    arr = np.frombuffer(record["features"], dtype=np.dtype(record["dtype"]).newbyteorder("<"))
    return arr.reshape(record["shape"]).astype(np.float32)
