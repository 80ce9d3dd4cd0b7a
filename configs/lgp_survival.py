"""HIPT-LGP survival (MCAT-style: 4 quartile time bins of the uncensored patients, patient-level
concatenation of slides, NLL survival loss, gradient accumulation over 32 patients, c-index,
5-fold CV: the reference's recipe).

    hipt-finetune --config configs/lgp_survival.py --workdir runs/luad_surv \
        --config.data.embeddings=emb/ --config.data.labels=survival.csv
    hipt-finetune --config configs/lgp_survival.py:runlocal ...
"""
from __future__ import annotations

import ml_collections

from configs.lgp_common import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return base_config("survival", arg)
