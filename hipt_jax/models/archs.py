"""Architectures of the three HIPT scales as ml_collections ConfigDicts.

A config is JSON-serializable (it is stored beside every converted or exported checkpoint)
and ``build_vit(config)`` turns it into the one VisionTransformer module.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from hipt_jax.models.vit import VisionTransformer

_VIT_FIELDS = (
    "stem", "patch_size", "width", "depth", "num_heads", "mlp_dim", "pos_embed_grid",
    "in_features", "pre_norm", "activation", "ln_eps",
)


def _vit_config(**fields: Any) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(fields))


def vit256_small() -> ml_collections.ConfigDict:
    """ViT-256-16 ("vit_small"): 16 px pixel tokens of a 256 px patch; 21,665,664 params."""
    return _vit_config(arch="vit256", stem="pixels", patch_size=16, in_features=3, width=384,
                       depth=12, num_heads=6, mlp_dim=1536, pos_embed_grid=14)


def vit4k_xs() -> ml_collections.ConfigDict:
    """ViT-4K-256 ("vit4k_xs"): 384-d CLS features of the 256 px patches; 2,781,504 params."""
    return _vit_config(arch="vit4k", stem="features", patch_size=1, in_features=384, width=192,
                       depth=6, num_heads=6, mlp_dim=768, pos_embed_grid=14)


def vit256_tiny() -> ml_collections.ConfigDict:
    """Tiny stand-in for tests and runlocal: same interface (384-d output), 2 blocks."""
    c = vit256_small()
    c.update(depth=2, mlp_dim=384)
    return c


def vit4k_tiny() -> ml_collections.ConfigDict:
    """Tiny stand-in for ViT-4K: 384-d input, 192-d output, 1 block."""
    c = vit4k_xs()
    c.update(depth=1, mlp_dim=192)
    return c


def vitwsi() -> ml_collections.ConfigDict:
    """ViT-WSI (stage 3): a slide's [M,192] CLS-4K region embeddings -> slide CLS [192].

    The blocks are exactly HIPT-LGP's global transformer (2 post-norm layers, 3 heads, ReLU,
    feed-forward 192, LayerNorm eps 1e-5) and the stem its Linear + ReLU ``phi``, so that a
    stage-3 export initializes HIPT-LGP's global part (``model.pretrained_global``). Positions:
    2D sin-cos of the region grid cell (no table; ``pos_embed_grid`` unused)."""
    return _vit_config(arch="vitwsi", stem="regions", patch_size=1, in_features=192, width=192,
                       depth=2, num_heads=3, mlp_dim=192, pos_embed_grid=0, pre_norm=False,
                       activation="relu", ln_eps=1e-5)


def vitwsi_tiny() -> ml_collections.ConfigDict:
    """Tiny stand-in for ViT-WSI: 1 layer."""
    c = vitwsi()
    c.update(depth=1)
    return c


def vitwsi_576() -> ml_collections.ConfigDict:
    """ViT-WSI over the 576-d ``mean256_cls4k`` region embeddings [mean CLS-256 | CLS-4K]."""
    c = vitwsi()
    c.update(in_features=576)
    return c


ARCHITECTURES = {
    "vit256": vit256_small,
    "vit4k": vit4k_xs,
    "vit256_tiny": vit256_tiny,
    "vit4k_tiny": vit4k_tiny,
    "vitwsi": vitwsi,
    "vitwsi_tiny": vitwsi_tiny,
    "vitwsi_576": vitwsi_576,
}


def get_arch(name: str) -> ml_collections.ConfigDict:
    try:
        return ARCHITECTURES[name]()
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None


def build_vit(config: ml_collections.ConfigDict, *, drop_path_rate: float = 0.0,
              dtype: Any = jnp.float32) -> VisionTransformer:
    """The Flax module for an architecture config (compute dtype and stochastic depth are
    run-time choices, not part of the stored architecture)."""
    return VisionTransformer(
        stem=config.stem, patch_size=config.patch_size, width=config.width, depth=config.depth,
        num_heads=config.num_heads, mlp_dim=config.mlp_dim, pos_embed_grid=config.pos_embed_grid,
        drop_path_rate=drop_path_rate, dtype=dtype, pre_norm=config.get("pre_norm", True),
        activation=config.get("activation", "gelu"), ln_eps=config.get("ln_eps", 1e-6),
    )


def dummy_input(config: ml_collections.ConfigDict, batch: int = 1, grid: int = 14):
    """A zero input of the right kind for ``init``: [B,grid*p,grid*p,3], [B,grid,grid,F] or,
    for region tokens, [B,grid,F]."""
    if config.stem == "regions":
        return jnp.zeros((batch, grid, config.in_features), jnp.float32)
    if config.stem == "pixels":
        side = grid * config.patch_size
        return jnp.zeros((batch, side, side, config.in_features), jnp.float32)
    return jnp.zeros((batch, grid, grid, config.in_features), jnp.float32)
