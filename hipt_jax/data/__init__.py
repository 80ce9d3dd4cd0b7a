"""Grain data sources over hipt-prep shards (regions, patches, ViT-256 features)."""
from hipt_jax.data.sources import (FeatureSource, PatchSource, RegionSource, make_iter_dataset,
                                   make_loader)

__all__ = ["FeatureSource", "PatchSource", "RegionSource", "make_iter_dataset", "make_loader"]
