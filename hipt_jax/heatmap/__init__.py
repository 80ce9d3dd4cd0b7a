"""Hierarchical attention heatmaps (the reference's two-level CLS attention maps) and slide-level region-score maps.

    from hipt_jax import HIPT4K
    from hipt_jax.heatmap import compute_region_heatmaps, write_region_heatmaps
    maps = compute_region_heatmaps(HIPT4K.from_checkpoints(vit256=A, vit4k=B), region_u8, scale=4)
    write_region_heatmaps(maps, "out/", "region")   # PNGs per head, 4K x 256 blends, contact sheet
"""
from hipt_jax.heatmap.region import RegionHeatmaps, compute_region_heatmaps
from hipt_jax.heatmap.render import colorize, contact_sheet, overlay, write_region_heatmaps
from hipt_jax.heatmap.scores import (blend, percentile_rank, scores4k, scores256, shift_region,
                                     unshift_and_average, upsample_nearest)
from hipt_jax.heatmap.slide import slide_attention_map

__all__ = [
    "RegionHeatmaps", "blend", "colorize", "compute_region_heatmaps", "contact_sheet", "overlay",
    "percentile_rank", "scores256", "scores4k", "shift_region", "slide_attention_map",
    "unshift_and_average", "upsample_nearest", "write_region_heatmaps",
]
