"""HIPT-JAX: HIPT (Chen et al., CVPR 2022) in JAX/Flax.

    from hipt_jax import HIPT4K
    model = HIPT4K.from_checkpoints(vit256="ckpt/vit256", vit4k="ckpt/vit4k")
    out = model(region_uint8_hwc)   # features_cls4k [192], features_cls256 [R*C,384], ...
"""
from hipt_jax.models.archs import build_vit, get_arch, vit4k_xs, vit256_small
from hipt_jax.models.hipt4k import HIPT4K, region_forward
from hipt_jax.models.lgp import HIPTLGP
from hipt_jax.models.vit import VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "HIPT4K", "HIPTLGP", "VisionTransformer", "build_vit", "get_arch", "region_forward", "vit256_small",
    "vit4k_xs",
]
