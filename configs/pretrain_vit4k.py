"""Stage 2: DINO pretraining of ViT-4K-256 on [16,16,384] ViT-256 feature grids, HIPT's 2nd stage.

    hipt-pretrain --config configs/pretrain_vit4k.py --workdir runs/vit4k \
        --config.data.path=/data/features      # folder of [256,384] .npy/.pt files
    hipt-pretrain --config configs/pretrain_vit4k.py:runlocal --workdir /tmp/r4k \
        --config.data.path=/tmp/feats

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


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return base_config(stage=2, arg=arg)
