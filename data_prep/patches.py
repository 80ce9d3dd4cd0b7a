"""`hipt-prep patches`: region shards -> 256 px patch shards for stage-1 (ViT-256) pretraining.

One patch shard per region shard (OUT/patches/<slide_id>.array_record), patches in region order
then row-major within the region. Each patch is re-encoded as its own JPEG so stage-1 loaders
decode 256 px images, not whole regions. An optional background filter drops patches whose
fraction of saturated (stained) pixels is below a threshold.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import time
import traceback

import cv2
import numpy as np

from data_prep import records
from data_prep.regions import ARRAY_RECORD_OPTIONS, SHARD_EXT, status_path, write_json_atomic
from data_prep.runner import InputError


@dataclasses.dataclass(frozen=True)
class PatchParams:
    patch_px: int = 256
    min_tissue_fraction: float = 0.0   # 0 keeps every patch
    background_saturation: int = 20    # HSV saturation <= this is background (glass)
    jpeg_quality: int = 90


def list_region_shards(regions_dir: str) -> list[str]:
    """Slide ids of the region shards under a hipt-prep regions output (or a bare shard folder)."""
    folder = os.path.join(regions_dir, "regions")
    folder = folder if os.path.isdir(folder) else regions_dir
    if not os.path.isdir(folder):
        raise InputError(f"{regions_dir}: no such folder")
    ids = sorted(os.path.basename(p)[:-len(SHARD_EXT)] for p in glob.glob(os.path.join(folder, "*" + SHARD_EXT)))
    if not ids:
        raise InputError(f"{regions_dir}: no region shards (*{SHARD_EXT}); run `hipt-prep regions` first")
    return ids


def region_shard_file(regions_dir: str, slide_id: str) -> str:
    folder = os.path.join(regions_dir, "regions")
    folder = folder if os.path.isdir(folder) else regions_dir
    return os.path.join(folder, slide_id + SHARD_EXT)


def read_shard(path: str):
    """Yield the decoded record maps of one shard, in order."""
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(path)
    try:
        for i in range(reader.num_records()):
            yield records.unpack(reader.read([i])[0])
    finally:
        reader.close()


def stained_fraction(patch: np.ndarray, saturation: int) -> float:
    """Fraction of pixels that look stained (HSV saturation above the background level)."""
    sat = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)[:, :, 1]
    return float((sat > saturation).mean())


def region_to_patches(rec: dict, params: PatchParams):
    """One region record -> [(patch record bytes)], row-major over the patch grid."""
    img = records.decode_jpeg(rec["image_jpeg"])  # [S,S,3]
    p = params.patch_px
    rows, cols = img.shape[0] // p, img.shape[1] // p
    level0_per_px = rec["read_px"] / rec["region_px"]
    out = []
    for r in range(rows):
        for c in range(cols):
            patch = img[r * p:(r + 1) * p, c * p:(c + 1) * p]  # [p,p,3]
            frac = stained_fraction(patch, params.background_saturation)
            if frac < params.min_tissue_fraction:
                continue
            out.append(records.patch_record(
                records.encode_jpeg(np.ascontiguousarray(patch), params.jpeg_quality),
                slide_id=rec["slide_id"], x=rec["x"] + round(c * p * level0_per_px),
                y=rec["y"] + round(r * p * level0_per_px), region_x=rec["x"], region_y=rec["y"],
                row=r, col=c, patch_px=p, mpp=rec["mpp"], tissue_fraction=frac))
    return out


def derive_shard(slide_id: str, regions_dir: str, out_dir: str, kind: str, write_records) -> dict:
    """Region shard of one slide -> a derived ``kind`` shard ("patches", "features"), written
    under a temporary name and renamed, the status file last (what makes reruns resumable).

    ``write_records(region_records, writer) -> dict`` writes the derived records and returns
    result fields (at least ``n_records``). Any failure is reported in the status, not raised.
    """
    from array_record.python import array_record_module

    t0 = time.time()
    shard_rel = os.path.join(kind, slide_id + SHARD_EXT)
    result = dict(slide_id=slide_id, status="failed", n_records=0, error=None, shard=shard_rel)
    os.makedirs(os.path.join(out_dir, kind), exist_ok=True)
    path = os.path.join(out_dir, shard_rel)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        writer = array_record_module.ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
        try:
            fields = write_records(read_shard(region_shard_file(regions_dir, slide_id)), writer)
        finally:
            writer.close()
        os.replace(tmp, path)
        result.update(status="done", **fields)
    except Exception as e:
        result["error"] = f"{slide_id}: {type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=5)
        if os.path.exists(tmp):
            os.remove(tmp)
    result["seconds"] = round(time.time() - t0, 3)
    write_json_atomic(status_path(out_dir, slide_id), result)
    return result


def process_region_shard(slide_id: str, regions_dir: str, out_dir: str, params: PatchParams) -> dict:
    """Region shard of one slide -> patch shard."""

    def write_patches(regions, writer) -> dict:
        n = n_regions = 0
        for rec in regions:
            for patch in region_to_patches(rec, params):
                writer.write(patch)
                n += 1
            n_regions += 1
        return dict(n_records=n, n_regions_read=n_regions)

    return derive_shard(slide_id, regions_dir, out_dir, "patches", write_patches)
