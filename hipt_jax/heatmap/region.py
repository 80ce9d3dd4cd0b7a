"""Hierarchical attention heatmaps of one region (the reference's 256- and 4K-level maps), computed with HIPT4K.

The region is evaluated unshifted and shifted by each offset (default 128/256/384 px, white
padding); each evaluation gives per-head attention maps of both levels, which are ranked,
upsampled and shifted back before averaging. The 256-level maps use the shifts that move the
patch grid (128 px; 256/384 would repeat 0/128 for that level), the 4K level uses all of them,
as the reference does.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from hipt_jax.heatmap import scores
from hipt_jax.models.hipt4k import center_crop_box

DEFAULT_SHIFTS256 = (128,)
DEFAULT_SHIFTS4K = (128, 256, 384)


@dataclasses.dataclass
class RegionHeatmaps:
    """Smoothed score maps of one region, all at the output resolution (region px / scale).

    region: uint8 [H_s, W_s, 3], the (center-cropped) region downsampled for display.
    scores256: [heads256, H_s, W_s] in (0, 1]; count256: [H_s, W_s] evaluations averaged.
    scores4k / count4k: the same for the 4K level, or None without a ViT-4K.
    """
    region: np.ndarray
    scores256: np.ndarray
    count256: np.ndarray
    scores4k: Optional[np.ndarray]
    count4k: Optional[np.ndarray]
    scale: int
    crop_box: tuple[int, int, int, int]  # (top, left, height, width) of the crop in the input

    def blend(self, head4k: int, head256: int, weighting: str = "official") -> np.ndarray:
        """Blend of 4K head ``head4k`` and 256 head ``head256``.

        official: the reference's module functions, (n4k*s4k + 2*n256*s256) / (n4k + 2*n256);
        equal: the plain mean of the two maps; coverage: (n4k*s4k + n256*s256) / (n4k + n256)
        (the mean over all underlying shifted maps).
        """
        if self.scores4k is None:
            raise ValueError("no 4K-level maps: the model has no ViT-4K")
        if weighting not in scores.BLEND_WEIGHTINGS:
            raise ValueError(f"blend weighting must be one of {scores.BLEND_WEIGHTINGS}, got {weighting!r}")
        if weighting == "official":
            return scores.blend_official(self.scores4k[head4k], self.scores256[head256],
                                         self.count4k, self.count256)
        if weighting == "equal":
            return scores.blend(self.scores4k[head4k], self.scores256[head256])
        return scores.blend(self.scores4k[head4k], self.scores256[head256], self.count4k, self.count256)


def downsample(region: np.ndarray, scale: int) -> np.ndarray:
    """uint8 [H,W,3] -> [H/scale, W/scale, 3] (area average)."""
    if scale == 1:
        return region
    height, width = region.shape[:2]
    return cv2.resize(region, (width // scale, height // scale), interpolation=cv2.INTER_AREA)


def compute_region_heatmaps(model, region_u8: np.ndarray, *, scale: int = 4,
                            shifts256: Sequence[int] = DEFAULT_SHIFTS256,
                            shifts4k: Sequence[int] = DEFAULT_SHIFTS4K,
                            progress: bool = True) -> RegionHeatmaps:
    """Run ``model`` (a ``hipt_jax.HIPT4K``) on the region and its shifted copies -> maps.

    Args:
      model: HIPT4K; without ViT-4K only the 256-level maps are made.
      region_u8: uint8 [H, W, 3], H, W >= 256; center-cropped to multiples of 256 first (the
        crop HIPT4K applies), so map pixels line up with ``RegionHeatmaps.region``.
      scale: output downsampling (must divide 16); shifts must be multiples of it.
      shifts256, shifts4k: shifts in region pixels for each level's smoothing ( () = none).
    """
    region_u8 = np.asarray(region_u8)
    if region_u8.dtype != np.uint8 or region_u8.ndim != 3 or region_u8.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H,W,3] region, got {region_u8.dtype} {region_u8.shape}")
    scores._check_scale(scale)  # before any forward pass, not after the first
    top, left, crop_h, crop_w = center_crop_box(*region_u8.shape[:2])
    region_u8 = region_u8[top : top + crop_h, left : left + crop_w]
    rows, cols = crop_h // scores.PATCH, crop_w // scores.PATCH
    has4k = model.params4k is not None
    shifts4k = tuple(shifts4k) if has4k else ()
    for s in (*shifts256, *shifts4k):
        if s <= 0 or s % scale or s >= min(crop_h, crop_w):
            raise ValueError(f"shift {s} px must be positive, a multiple of scale {scale} and "
                             f"smaller than the {crop_h}x{crop_w} region")
    offsets = sorted({0, *shifts256, *shifts4k})

    maps256, maps4k = {}, {}
    for off in tqdm(offsets, desc="heatmap evaluations", disable=not progress):
        out = model(scores.shift_region(region_u8, off), return_attention=True)
        maps256[off] = scores.scores256(out["attention256"], rows, cols, scale)
        if has4k:
            maps4k[off] = scores.scores4k(out["attention4k"], rows, cols, scale)

    use256 = [0, *shifts256]
    s256, n256 = scores.unshift_and_average([maps256[o] for o in use256], [o // scale for o in use256])
    s4k = n4k = None
    if has4k:
        use4k = [0, *shifts4k]
        s4k, n4k = scores.unshift_and_average([maps4k[o] for o in use4k], [o // scale for o in use4k])
    return RegionHeatmaps(region=downsample(region_u8, scale), scores256=s256, count256=n256,
                          scores4k=s4k, count4k=n4k, scale=scale, crop_box=(top, left, crop_h, crop_w))
