"""Stage 1: DINO pretraining of ViT-256-16 on 256 px patches, HIPT's first stage.

    hipt-pretrain --config configs/pretrain_vit256.py --workdir runs/vit256 \
        --config.data.path=/data/patches --config.global_batch=256
    hipt-pretrain --config configs/pretrain_vit256.py:runlocal --workdir /tmp/r \
        --config.data.path=/tmp/pngs          # tiny model, few steps: CPU seconds

The arg is a comma-separated list of flags: ``runlocal`` (shrink everything),
``bf16`` (bfloat16 compute, fp32 params and optimizer state).
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
    return base_config(stage=1, arg=arg)
