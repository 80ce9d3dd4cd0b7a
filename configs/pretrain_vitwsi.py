"""Stage 3: DINO pretraining of ViT-WSI on slides of region embeddings (no labels).

    hipt-pretrain --config configs/pretrain_vitwsi.py --workdir runs/vitwsi \
        --config.data.path=EMB_DIR          # hipt-extract output (EMB_DIR/slides/*.npz|h5)
    hipt-pretrain --config configs/pretrain_vitwsi.py:runlocal --workdir /tmp/rwsi \
        --config.data.path=EMB_DIR

One sample = one slide: its CLS-4K region embeddings [M,192] (data.feature="mean256_cls4k":
[M,576], with model = get_arch("vitwsi_576")) and their region-grid cells. Views are made of
regions: 2 global windows (a rectangle keeping >= half of the slide's regions, padded to
crops.global_tokens with a key mask; -1 = the bucket of the cohort's largest slide) and
crops.n_local local windows of local_size x local_size regions; region dropout, Gaussian noise
(noise_std x the slide's feature std) and a random flip/rotation of the grid cells per view.
Every draw comes from (seed, sample index), as at stages 1-2 (hipt_jax/pretrain/augment.py).

Arg flags as in pretrain_vit256.py (``runlocal``, ``bf16``).
"""
from __future__ import annotations

import os
import sys

import ml_collections

try:
    from configs.pretrain_common import base_config
except ImportError:  # config file loaded by path from outside the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs.pretrain_common import base_config

from hipt_jax.models.archs import get_arch


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(stage=2, arg=arg)
    runlocal = "runlocal" in (arg or "")
    c.stage = 3
    c.model = get_arch("vitwsi_tiny" if runlocal else "vitwsi")
    # Post-norm blocks (HIPT-LGP's global layers) have no CLS-only last block.
    c.last_block_cls_only = False
    c.drop_path_rate = 0.0                    # post-norm blocks take no stochastic depth
    # A cohort has hundreds of slides, not millions of patches: fewer, smaller steps.
    c.global_batch = 64
    c.total_steps = 20_000
    c.optim.warmup_steps = 1_000
    c.head.update(out_dim=4096, hidden_dim=512, bottleneck_dim=128)
    c.crops = ml_collections.ConfigDict(dict(
        global_tokens=-1, n_local=8, local_size=4, global_scale=(0.5, 1.0),
        region_dropout=0.1, noise_std=0.05))
    c.data.kind = "slide_bags"
    c.data.feature = "cls4k"
    c.data.in_features = 192
    c.checkpoint.every_steps = 1000
    if runlocal:
        c.head.update(out_dim=256, hidden_dim=64, bottleneck_dim=32)
        c.global_batch = 4
        c.total_steps = 6
        c.optim.warmup_steps = 2
        c.crops.n_local = 2
        c.checkpoint.every_steps = 3
    return c
