"""`hipt-prep patches`: region shards -> 256 px patch shards for stage-1 (ViT-256) pretraining.

One patch shard per region shard (OUT/patches/<slide_id>.array_record), patches in region order
then row-major within the region. Each patch is re-encoded as its own JPEG so stage-1 loaders
decode 256 px images, not whole regions. An optional background filter drops patches whose
fraction of saturated (stained) pixels is below a threshold.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback

import cv2
import numpy as np

from data_prep.regions import status_path
from data_prep.shards import (PATCH, REGION, decode_jpeg, encode_jpeg, find_slide_shard, iter_records,
                              open_shard_writer, product_identity, region_shard_identity, shard_path,
                              write_item_status)


@dataclasses.dataclass(frozen=True)
class PatchParams:
    patch_px: int = 256
    min_tissue_fraction: float = 0.0   # 0 keeps every patch
    background_saturation: int = 20    # HSV saturation <= this is background (glass)
    jpeg_quality: int = 90


def stained_fraction(patch: np.ndarray, saturation: int) -> float:
    """Fraction of pixels that look stained (HSV saturation above the background level)."""
    sat = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)[:, :, 1]
    return float((sat > saturation).mean())


def region_to_patches(rec: dict, params: PatchParams):
    """One region record -> [(patch record bytes)], row-major over the patch grid."""
    img = decode_jpeg(rec["image_jpeg"])  # [S,S,3]
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
            out.append(PATCH.encode(
                image_jpeg=encode_jpeg(np.ascontiguousarray(patch), params.jpeg_quality),
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
    t0 = time.time()
    path = shard_path(out_dir, kind, slide_id)
    result = dict(slide_id=slide_id, status="failed", n_records=0, error=None,
                  shard=os.path.relpath(path, out_dir),
                  source=region_shard_identity(regions_dir, slide_id))  # reruns redo it when that changes
    try:
        with open_shard_writer(path) as writer:
            fields = write_records(iter_records(find_slide_shard(regions_dir, REGION, slide_id), REGION),
                                   writer)
        result.update(status="done", **product_identity(path), **fields)
    except Exception as e:
        result["error"] = f"{slide_id}: {type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=5)
    result["seconds"] = round(time.time() - t0, 3)
    write_item_status(status_path(out_dir, slide_id), result, path)
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
