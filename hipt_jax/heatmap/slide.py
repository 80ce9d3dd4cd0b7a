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


def _lgp_local_arch(params) -> str:
    """The ViT-4K architecture name inside trained HIPT-LGP params (matched by depth and mlp)."""
    from hipt_jax.models.configs import ARCHITECTURES

    encoder = params["local_vit"]["encoder"]
    depth = sum(k.startswith("blocks_") for k in encoder)
    mlp = encoder["blocks_0"]["mlp"]["fc1"]["kernel"].shape[-1]
    for name, make in ARCHITECTURES.items():
        cfg = make()
        if cfg.arch == "vit4k" and cfg.depth == depth and cfg.mlp_dim == mlp:
            return name
    raise ValueError(f"HIPT-LGP local ViT-4K with depth {depth}, mlp {mlp} matches no known architecture")


def lgp_region_attention(checkpoint: str, features_cls256: np.ndarray) -> np.ndarray:
    """Gated-attention pooling weights [M] of a trained HIPT-LGP (hipt-finetune's
    fold_k/checkpoint) for one slide's ViT-256 features [M, 256, 384] (hipt-extract's npz)."""
    import os

    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from hipt_jax.models.lgp import HIPTLGP

    path = os.path.abspath(checkpoint)
    if not os.path.isdir(path):
        raise ValueError(f"{checkpoint}: no such HIPT-LGP checkpoint directory")
    params = ocp.StandardCheckpointer().restore(path)
    params = params.get("params", params)
    n_classes = int(params["classifier"]["kernel"].shape[-1])
    model = HIPTLGP(n_classes=n_classes, local_arch=_lgp_local_arch(params), dropout_rate=0.0)
    _, aux = model.apply({"params": params}, jnp.asarray(features_cls256, jnp.float32))
    return np.asarray(aux["attention"], np.float32)
