"""Slide embeddings for the slide-KNN baselines (`hipt-knn --embedding NAME`).

Each name maps to a function of one slide's bag arrays (hipt-extract output) -> [D]:
- ``cls4k_mean``    [192]: mean over regions of the ViT-4K CLS (HIPT's slide embedding);
- ``cls256_mean``   [384]: mean over every 256 px patch of the slide of the ViT-256 CLS
                    (the paper's "mean ViT-256" baseline);
- ``mean256_cls4k`` [576]: the region embedding [mean CLS-256 of the region, CLS-4K of the
                    region] (HIPT_4K's features_mean256_cls4k) averaged over regions.
- ``wsi``           [192]: the stage-3 ViT-WSI CLS of the slide (``slide_embedding_wsi``, added
                    to the bags by ``hipt-extract --vitwsi CKPT``; hipt_jax/wsi.py).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from data_prep.bags import (BagError, bag_keys, check_extraction, check_one_width, list_bags, no_bag_read_error,
                            read_bag_file)

# name -> (bag keys read, function of those arrays -> [D])
EMBEDDINGS: dict[str, tuple[tuple[str, ...], Callable[[dict], np.ndarray]]] = {}
RESERVED: dict[str, str] = {}
# Names whose bag arrays only an extra pass writes (not hipt-extract by default): how to get them.
# "all" leaves them out; asking for one on bags without it is a one-line error saying how.
NEEDS_PASS = {"wsi": "hipt-extract --vitwsi STAGE3_EXPORT --out EMB (a stage-3 ViT-WSI from "
                     "configs/pretrain_vitwsi.py)"}


def register(name: str, keys: tuple[str, ...], fn: Callable[[dict], np.ndarray]) -> None:
    EMBEDDINGS[name] = (keys, fn)
    RESERVED.pop(name, None)


def _cls256_mean(a):  # [M,R*C,384] -> [384]
    return a["features_cls256"].astype(np.float32).mean(axis=(0, 1))


def _mean256_cls4k(a):  # per region [mean256 (384) | cls4k (192)] -> mean over regions [576]
    region = np.concatenate([a["features_cls256"].astype(np.float32).mean(axis=1),
                             a["features_cls4k"].astype(np.float32)], axis=1)
    return region.mean(axis=0)


register("cls4k_mean", ("slide_embedding",), lambda a: a["slide_embedding"])
register("cls256_mean", ("features_cls256",), _cls256_mean)
register("mean256_cls4k", ("features_cls256", "features_cls4k"), _mean256_cls4k)
register("wsi", ("slide_embedding_wsi",), lambda a: a["slide_embedding_wsi"])


def names_for_all() -> list[str]:
    """What ``--embedding all`` runs: every name that plain hipt-extract bags provide."""
    return [n for n in EMBEDDINGS if n not in NEEDS_PASS]


def check_name(name: str) -> None:
    if name in RESERVED:
        raise ValueError(f"--embedding {name}: {RESERVED[name]}")
    if name not in EMBEDDINGS:
        raise ValueError(f"--embedding {name}: unknown; choose from {sorted(EMBEDDINGS)}")


def read(out_dir: str, name: str, failed: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """slide_id -> embedding ``name`` for every extracted slide under ``out_dir``; unreadable
    bags are skipped and recorded in ``failed`` (or raise BagError without it)."""
    check_name(name)
    keys, fn = EMBEDDINGS[name]
    found = list_bags(out_dir)
    if name in NEEDS_PASS and found and not all(k in bag_keys(p) for p in found.values() for k in keys):
        raise BagError(f"{out_dir}: --embedding {name}: some bags have no {', '.join(keys)}; "
                       f"add it with {NEEDS_PASS[name]}")
    out = {}
    for sid, path in found.items():
        try:
            out[sid] = np.asarray(fn(read_bag_file(path, keys)), np.float32)
            check_extraction(out_dir, path)
        except BagError as e:
            if failed is None:
                raise
            failed[sid] = str(e)
    if not out:
        raise no_bag_read_error(out_dir, failed)
    check_one_width(out, found, f"--embedding {name}")
    return out
