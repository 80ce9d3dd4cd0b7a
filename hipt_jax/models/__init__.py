"""Flax modules of HIPT: the one ViT, its configurations, and the region/slide models."""
from hipt_jax.models.archs import build_vit, get_arch, vit4k_xs, vit256_small
from hipt_jax.models.vit import VisionTransformer

__all__ = ["VisionTransformer", "build_vit", "get_arch", "vit256_small", "vit4k_xs"]
