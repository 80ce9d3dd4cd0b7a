"""Attention -> score maps: percentile ranks, mosaics, nearest upsampling, shift smoothing.

Everything here is plain numpy on host arrays (the maps are small once computed); the model
forward lives in ``hipt_jax.heatmap.region``. Conventions:

- A score map is float32 [H_s, W_s] at the output resolution (region pixels / ``scale``).
- Percentile ranks are ``rankdata(v) / len(v)`` in (0, 1] (ties get their average rank), the
  reference's ``rankdata(v) * 100 / len(v)`` divided by 100. We rank the n TOKENS; the
  reference ranks the upsampled PIXEL map (each token repeated B times). That is an exact
  constant offset: reference = ours - (B - 1) / (2 n B), i.e. 0.195 percentile points for the
  4K level (n = 256 patches, B = 64 x 64 at scale 4) and 0.18 points for the 256 level (B = 4 x 4).
  We keep token ranks on purpose: the offset is under half a colormap level everywhere and
  ranks stay independent of the output scale.
- A shifted evaluation at offset ``o`` looks at ``region[o:, o:]`` padded with white at the
  bottom/right, so its pixel ``p`` is the original pixel ``p + o``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import rankdata

TOKENS_PER_SIDE = 16  # a 256 px patch is 16 x 16 tokens of 16 px; a 4096 region is 16 x 16 patches
PATCH = 256


def percentile_rank(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Percentile ranks in (0, 1] along ``axis`` (average rank for ties)."""
    values = np.asarray(values, np.float64)
    return (rankdata(values, axis=axis) / values.shape[axis]).astype(np.float32)


def upsample_nearest(grid: np.ndarray, factor: int) -> np.ndarray:
    """[..., h, w] -> [..., h*factor, w*factor] by pixel repetition (torch mode="nearest")."""
    return np.repeat(np.repeat(grid, factor, axis=-2), factor, axis=-1)


def _check_scale(scale: int) -> None:
    if scale < 1 or TOKENS_PER_SIDE % scale:
        raise ValueError(f"scale must divide {TOKENS_PER_SIDE} (1, 2, 4, 8 or 16), got {scale}")


def scores256(attention256: np.ndarray, rows: int, cols: int, scale: int = 4) -> np.ndarray:
    """ViT-256 CLS->token attention of every patch -> per-head mosaic of within-patch ranks.

    Args:
      attention256: [R*C, heads, 256] (row-major patches; tokens row-major 16 x 16).
      rows, cols: the region's patch grid.
      scale: output pixels are region pixels / scale.
    Returns:
      [heads, R*256/scale, C*256/scale] float32 in (0, 1].
    """
    _check_scale(scale)
    attention256 = np.asarray(attention256)
    n, heads, tokens = attention256.shape
    if n != rows * cols or tokens != TOKENS_PER_SIDE**2:
        raise ValueError(f"attention256 {attention256.shape} does not fit a {rows}x{cols} patch grid")
    ranks = percentile_rank(attention256, axis=-1)  # within each patch, per head
    t = TOKENS_PER_SIDE
    # [R*C,heads,256] -> [R,C,heads,16,16] -> [heads,R,16,C,16] -> [heads,R*16,C*16]:
    # token (a, b) of patch (i, j) lands at mosaic row i*16+a, column j*16+b.
    mosaic = ranks.reshape(rows, cols, heads, t, t).transpose(2, 0, 3, 1, 4).reshape(heads, rows * t, cols * t)
    return upsample_nearest(mosaic, (PATCH // t) // scale)


def scores4k(attention4k: np.ndarray, rows: int, cols: int, scale: int = 4) -> np.ndarray:
    """ViT-4K CLS->patch attention -> per-head map of ranks over the whole region.

    Args:
      attention4k: [heads, R*C] (row-major patches).
    Returns:
      [heads, R*256/scale, C*256/scale] float32 in (0, 1].
    """
    _check_scale(scale)
    attention4k = np.asarray(attention4k)
    heads, n = attention4k.shape
    if n != rows * cols:
        raise ValueError(f"attention4k {attention4k.shape} does not fit a {rows}x{cols} patch grid")
    # [heads,R*C] -> [heads,R,C]: row-major, as the patches were cut.
    ranks = percentile_rank(attention4k, axis=-1).reshape(heads, rows, cols)
    return upsample_nearest(ranks, PATCH // scale)


def shift_region(region: np.ndarray, offset: int, fill: int = 255) -> np.ndarray:
    """``region[o:, o:]`` padded with ``fill`` (white) at the bottom/right back to the same size."""
    if offset == 0:
        return region
    height, width = region.shape[:2]
    if not 0 < offset < min(height, width):
        raise ValueError(f"shift {offset} px does not fit a {height}x{width} region")
    out = np.full_like(region, fill)
    out[: height - offset, : width - offset] = region[offset:, offset:]
    return out


def unshift_and_average(maps: Sequence[np.ndarray], offsets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Average score maps of shifted evaluations in the coordinates of the unshifted region.

    Args:
      maps: one [..., H_s, W_s] map per evaluation, map k computed on
        ``shift_region(region, offsets[k] * scale)``.
      offsets: shifts in OUTPUT pixels (region pixels / scale); 0 for the unshifted region.
    Returns:
      (mean, count): ``mean`` [..., H_s, W_s] is the sum of the maps covering each pixel divided
      by ``count`` [H_s, W_s], the number of evaluations covering it (pixels near the top/left
      edge are seen only by the unshifted evaluation; the white padding never counts).
    """
    if len(maps) != len(offsets) or not maps:
        raise ValueError(f"need one offset per map, got {len(maps)} maps and {len(offsets)} offsets")
    height, width = maps[0].shape[-2:]
    total = np.zeros(maps[0].shape, np.float64)
    count = np.zeros((height, width), np.int32)
    for score, off in zip(maps, offsets):
        # shifted pixel p is original pixel p + off; shifted pixels past H-off are padding.
        total[..., off:, off:] += score[..., : height - off, : width - off]
        count[off:, off:] += 1
    return (total / count).astype(np.float32), count


BLEND_WEIGHTINGS = ("official", "equal", "coverage")


def blend(score_a: np.ndarray, score_b: np.ndarray, count_a: np.ndarray | None = None,
          count_b: np.ndarray | None = None) -> np.ndarray:
    """4K x 256 blend of two smoothed maps: ``(n_a*s_a + n_b*s_b) / (n_a + n_b)``.

    Without counts, the plain average of the two maps (the blend the paper describes). With
    counts, each map is weighted by the given count (see ``blend_official`` for the weights
    the reference's module functions use).
    """
    if count_a is None or count_b is None:
        return 0.5 * (score_a + score_b)
    return ((score_a * count_a + score_b * count_b) / (count_a + count_b)).astype(np.float32)


def blend_official(score4k: np.ndarray, score256: np.ndarray, count4k: np.ndarray,
                   count256: np.ndarray) -> np.ndarray:
    """The reference's module-level hierarchical heatmap blend:
    ``(n4k*s4k + 2*n256*s256) / (n4k + 2*n256)`` with n the evaluations averaged at each pixel.

    The reference accumulates the 256 level with a per-evaluation weight of 200 against 100 for
    the 4K level, so the 256 level counts twice. Interior pixels (n4k = 4, n256 = 2) get equal
    weights; near the top/left edge (n4k = 1, n256 = 1) the 256 level gets 2/3.
    """
    return blend(score4k, score256, count4k, 2 * np.asarray(count256))
