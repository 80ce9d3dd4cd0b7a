"""Stage-3 (ViT-WSI) slide embeddings over existing hipt-extract outputs.

``add_wsi_embeddings(out_dir, ckpt)`` runs a stage-3 export (hipt-pretrain with
configs/pretrain_vitwsi.py) over every bag under ``out_dir`` and adds to each
    slide_embedding_wsi  [D]  the ViT-WSI CLS of the slide (all its regions, bucket-padded)
    attention_wsi        [M]  that CLS's last-block attention over the regions (heads averaged)
rewriting the bag in its own format (``hipt-extract --vitwsi CKPT``). ``hipt-knn --embedding wsi``
reads the first, ``hipt-heatmap --wsi-attention`` paints the second.
"""
from __future__ import annotations

import os

import numpy as np

from data_prep import bags

WSI_KEY = "slide_embedding_wsi"
ATTENTION_KEY = "attention_wsi"


def load_vitwsi(path: str):
    """(module, params, arch config) of a stage-3 export; CheckpointError if it is not one."""
    import jax
    import jax.numpy as jnp

    from hipt_jax.models import checkpoint

    loaded = checkpoint.load(path, kind="vit")
    if loaded.config.stem != "regions":
        raise checkpoint.CheckpointError(f"{path}: is a {loaded.config.arch} backbone, not a stage-3 "
                                         "ViT-WSI export (configs/pretrain_vitwsi.py)")
    return loaded.module(), jax.tree.map(jnp.asarray, loaded.params), loaded.config


def slide_inputs(path: str, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(region embeddings [M,F], grid cells [M,2]) of one bag for a ViT-WSI of input width F
    (192: CLS-4K; 576: mean CLS-256 next to CLS-4K)."""
    from hipt_jax.models.vitwsi import grid_cells

    keys = ("features_cls4k", "coords") + (("features_cls256",) if in_features == 576 else ())
    a = bags.read_bag_file(path, keys)
    feats = np.asarray(a["features_cls4k"], np.float32)
    if in_features == 576:
        feats = np.concatenate([np.asarray(a["features_cls256"], np.float32).mean(axis=1), feats], 1)
    if feats.shape[1] != in_features:
        raise bags.BagError(f"{path}: region embeddings have width {feats.shape[1]}, the ViT-WSI "
                            f"takes {in_features}")
    if len(feats) == 0 or len(a["coords"]) != len(feats):
        raise bags.BagError(f"{path}: {len(feats)} regions but {len(a['coords'])} coordinates")
    step = bags.read_coords_attrs(path).get("patch_size_level0")
    return feats, grid_cells(a["coords"], step)


def add_wsi_embeddings(out_dir: str, ckpt: str, show_progress: bool = True) -> dict[str, str]:
    """Add slide_embedding_wsi and attention_wsi to every bag under ``out_dir``; returns
    {slide_id: error} of the bags that could not be read (the others are rewritten)."""
    from tqdm import tqdm

    from hipt_jax.models.vitwsi import embed_slide

    module, params, config = load_vitwsi(ckpt)
    found = bags.list_bags(out_dir)
    if not found:
        raise bags.BagError(f"{out_dir}: no bags (slides/*.npz|h5|pt); run hipt-extract first")
    failed = {}
    for sid, path in tqdm(found.items(), desc="vitwsi", unit="slide", disable=not show_progress):
        if path.endswith(".pt"):
            failed[sid] = f"{path}: .pt bags hold only features_cls256 (no CLS-4K, no coordinates)"
            continue
        try:
            feats, cells = slide_inputs(path, config.in_features)
        except bags.BagError as e:
            failed[sid] = str(e)
            continue
        cls, attn = embed_slide(module, params, feats, cells)
        arrays = bags.read_bag_file(path)
        arrays.update({WSI_KEY: cls, ATTENTION_KEY: attn})
        bags.write_bag_file(path, arrays, bags.read_coords_attrs(path))
    return failed


def wsi_attention(bag: str, ckpt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(coords [M,2] level-0 corners, stage-3 CLS attention [M]) of one bag: the stored
    attention_wsi, or computed with the export ``ckpt``."""
    from hipt_jax.models.vitwsi import embed_slide

    held = bags.bag_keys(bag)
    coords = bags.read_bag_file(bag, ("coords",))["coords"]
    if ckpt is None:
        if ATTENTION_KEY not in held:
            raise bags.BagError(f"{bag}: no {ATTENTION_KEY}; run hipt-extract --vitwsi CKPT first "
                                "or pass the checkpoint")
        return coords, bags.read_bag_file(bag, (ATTENTION_KEY,))[ATTENTION_KEY]
    module, params, config = load_vitwsi(ckpt)
    feats, cells = slide_inputs(bag, config.in_features)
    return coords, embed_slide(module, params, feats, cells)[1]
