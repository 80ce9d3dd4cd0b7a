"""Slide-level map of region attention: one score per 4096 px region painted over a thumbnail.

The scores are typically HIPT-LGP's gated-attention pooling weights (softmax over the slide's
regions), but any per-region array works (e.g. a KNN vote or a CLS-4K projection).
"""
from __future__ import annotations

import numpy as np

from hipt_jax.heatmap.render import DEFAULT_CMAP, colorize
from hipt_jax.heatmap.scores import percentile_rank


def slide_attention_map(thumbnail: np.ndarray, downsample: float, coords: np.ndarray, region_px: float,
                        region_scores: np.ndarray, *, alpha: float = 0.5, cmap: str = DEFAULT_CMAP,
                        rank: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Paint per-region scores over a slide thumbnail.

    Args:
      thumbnail: uint8 [h, w, 3] picture of the whole slide.
      downsample: level-0 pixels per thumbnail pixel.
      coords: [M, 2] level-0 (x, y) of each region's top-left corner.
      region_px: side of a region in level-0 pixels.
      region_scores: [M] one score per region.
      rank: turn the scores into percentile ranks over the slide (as the region-level maps do);
        otherwise min-max scale them to [0, 1].
    Returns:
      (overlay uint8 [h, w, 3], score map float32 [h, w] with NaN where no region lies).
    """
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    region_scores = np.asarray(region_scores, np.float64).reshape(-1)
    if len(coords) != len(region_scores):
        raise ValueError(f"{len(coords)} region coordinates but {len(region_scores)} scores")
    if rank:
        values = percentile_rank(region_scores)
    else:
        span = region_scores.max() - region_scores.min() if len(region_scores) else 0.0
        values = (region_scores - region_scores.min()) / span if span > 0 else np.ones_like(region_scores)
    height, width = thumbnail.shape[:2]
    total = np.zeros((height, width), np.float64)
    count = np.zeros((height, width), np.int32)
    for (x, y), v in zip(coords, values):
        # Region footprint in thumbnail pixels (clipped to the picture; at least one pixel).
        x0, y0 = int(np.floor(x / downsample)), int(np.floor(y / downsample))
        x1 = max(x0 + 1, int(np.ceil((x + region_px) / downsample)))
        y1 = max(y0 + 1, int(np.ceil((y + region_px) / downsample)))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        total[y0:y1, x0:x1] += v
        count[y0:y1, x0:x1] += 1
    score = np.full((height, width), np.nan, np.float32)
    covered = count > 0
    score[covered] = total[covered] / count[covered]
    out = thumbnail.copy()
    colored = colorize(np.nan_to_num(score), cmap).astype(np.float32)
    mixed = alpha * colored + (1.0 - alpha) * thumbnail.astype(np.float32)
    out[covered] = np.clip(np.rint(mixed[covered]), 0, 255).astype(np.uint8)
    return out, score


def lgp_region_attention(checkpoint: str, features_cls256: np.ndarray) -> np.ndarray:
    """Gated-attention pooling weights [M] of a trained HIPT-LGP (hipt-finetune's
    fold_k/checkpoint) for one slide's ViT-256 features [M, 256, 384] (hipt-extract's npz)."""
    import jax.numpy as jnp

    from hipt_jax.models import checkpoint as ckpt

    loaded = ckpt.load(checkpoint, kind="hipt_lgp")
    _, aux = loaded.module().apply(loaded.variables, jnp.asarray(features_cls256, jnp.float32))
    return np.asarray(aux["attention"], np.float32)
