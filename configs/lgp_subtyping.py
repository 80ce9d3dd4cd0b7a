"""HIPT-LGP slide subtyping (cross-entropy, Adam 2e-4 + L2 1e-5, 20 epochs, class-balanced
sampling, 10-fold CV: the reference's recipe).

    hipt-finetune --config configs/lgp_subtyping.py --workdir runs/brca \
        --config.data.embeddings=emb/ --config.data.labels=labels.csv \
        --config.data.splits=splits/brca_100 --config.model.pretrained_vit4k=ckpt/vit4k
    hipt-finetune --config configs/lgp_subtyping.py:runlocal ...    # tiny, 3 epochs, 3 folds
"""
from __future__ import annotations

import ml_collections

from configs.lgp_common import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return base_config("subtyping", arg)
