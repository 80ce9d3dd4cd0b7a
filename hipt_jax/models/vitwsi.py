"""ViT-WSI (stage 3) on one slide: region grid cells, bucket padding, slide CLS and attention.

A slide enters as its region embeddings [M,F] (CLS-4K, or mean256_cls4k) and the (row, column)
of each region on the slide's region grid [M,2]. ``grid_cells`` turns the level-0 (x, y)
corners stored in a bag into those cells. ``embed_slide`` pads the slide to a bucket length
(hipt_jax.models.lgp.bucket_length: one compiled program per bucket, not per slide) with a key
mask, so the result equals the unpadded forward.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hipt_jax.models.lgp import DEFAULT_BUCKETS, bucket_length


def grid_step(coords_xy: np.ndarray) -> int:
    """Region side in level-0 px inferred from the corners themselves (the smallest positive
    gap between distinct x or y values); 1 when every region shares both."""
    gaps = []
    for axis in range(2):
        vals = np.unique(np.asarray(coords_xy)[:, axis])
        if len(vals) > 1:
            gaps.append(int(np.diff(vals).min()))
    return max(1, min(gaps)) if gaps else 1


def grid_cells(coords_xy: np.ndarray, step: int | None = None) -> np.ndarray:
    """[M,2] level-0 (x, y) region corners -> [M,2] int32 (row, column) cells, the top-left
    tissue region's row and column being 0. ``step``: region side in level-0 px (the bag's
    patch_size_level0); inferred from the corners when None."""
    xy = np.asarray(coords_xy, np.int64).reshape(-1, 2)
    if len(xy) == 0:
        return np.zeros((0, 2), np.int32)
    step = int(step) if step else grid_step(xy)
    cells = np.rint((xy - xy.min(axis=0)) / step).astype(np.int32)  # [M,(col,row)]
    return cells[:, ::-1].copy()  # (x, y) -> (row, column)


def pad_slide(features: np.ndarray, cells: np.ndarray, length: int):
    """Zero-pad [M,F] and [M,2] to ``length`` rows -> (features, cells, mask [length])."""
    m = features.shape[0]
    feats = np.zeros((length, features.shape[1]), np.float32)
    feats[:m] = features
    pos = np.zeros((length, 2), np.float32)
    pos[:m] = cells
    mask = np.zeros((length,), bool)
    mask[:m] = True
    return feats, pos, mask


@functools.lru_cache(maxsize=4)
def _forward(module):
    def run(params, feats, cells, mask):
        # [L,F] -> [1,L,F]: one slide per call.
        cls, aux = module.apply({"params": params}, feats[None], coords=cells[None],
                                key_mask=mask[None])
        # CLS row of the last block's attention, mean over heads: [1,H,1+L,1+L] -> [L].
        return cls[0], aux["attention"][0, :, 0, 1:].mean(axis=0)
    return jax.jit(run)


def embed_slide(module, params, features: np.ndarray, cells: np.ndarray,
                buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """(slide CLS [D], CLS attention over the M regions [M], renormalized to sum to 1; heads
    averaged, last block) of one slide."""
    m = int(features.shape[0])
    if m == 0:
        raise ValueError("a slide needs at least one region")
    feats, pos, mask = pad_slide(np.asarray(features, np.float32), cells, bucket_length(m, buckets))
    cls, attn = _forward(module)(params, jnp.asarray(feats), jnp.asarray(pos), jnp.asarray(mask))
    attn = np.asarray(attn, np.float32)[:m]
    return np.asarray(cls, np.float32), attn / max(float(attn.sum()), 1e-12)
