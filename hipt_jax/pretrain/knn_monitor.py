"""KNN monitor: DINO's weighted KNN (k=20, cosine, T=0.07) on the CURRENT TEACHER every N
steps of pretraining, so a long run shows whether its features are getting better.

Config block ``eval.knn`` (disabled while ``every_steps`` is 0 or ``path`` is empty):
- stage 1: ``path`` = a labelled tile dataset (any hipt-patch-eval layout); the tiles are read
  once, resized/center-cropped to ``size`` px, and the teacher ViT-256's CLS of each is taken.
- stage 2: ``path`` = hipt-prep feature shards and ``labels`` = a CSV slide_id,label; a
  slide's embedding is the mean teacher ViT-4K CLS over its regions.
Items are split once (the dataset's own train/test split, or a seeded stratified
``test_fraction``). Each evaluation logs ``knn/acc``, ``knn/balanced_acc``, ``knn/auc`` and
``knn/seconds`` to TensorBoard and metrics.jsonl (rows {"step": s, "knn/acc": ...}), and with
``keep_best`` exports the teacher to ``WORKDIR/export_best`` whenever ``knn/acc`` improves.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from hipt_jax.evaluation import knn, metrics
from hipt_jax.evaluation.tiles import split_tiles


def _teacher_backbone(state) -> dict:
    """{"params": teacher ViT params} as host-gathered arrays when sharded over hosts."""
    teacher = state["teacher"]["vit"]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        teacher = multihost_utils.process_allgather(teacher, tiled=True)
    return {"params": teacher}


class _TileItems:
    """Stage 1: uint8 tiles in memory -> CLS-256 of the teacher."""

    def __init__(self, config, knn_cfg):
        from hipt_jax.evaluation.patch_features import CLSExtractor, load_tile
        from hipt_jax.evaluation.tiles import read_tiles

        tiles = read_tiles(knn_cfg.path, test_fraction=knn_cfg.test_fraction, seed=config.seed)
        self.labels, self.splits = tiles.labels, tiles.splits
        self.tiles = np.stack([load_tile(p, knn_cfg.size) for p in tiles.paths])  # [N,S,S,3]
        self.extractor = CLSExtractor(None, config.model, batch_per_device=knn_cfg.batch_per_device,
                                      norm=config.data.norm)

    def embed(self, variables) -> np.ndarray:
        self.extractor.params = variables
        return self.extractor(self.tiles)


class _SlideItems:
    """Stage 2: per-slide feature grids -> mean teacher CLS-4K per slide."""

    def __init__(self, config, knn_cfg):
        from hipt_jax.data.sources import FeatureSource
        from hipt_jax.evaluation.cohort import read_labels_csv
        from hipt_jax.models.archs import build_vit

        if not knn_cfg.labels:
            raise ValueError("eval.knn.labels: stage 2 needs a CSV slide_id,label")
        coh = read_labels_csv(knn_cfg.labels)
        label_of = dict(zip(coh.slide_ids, coh.labels))
        src = FeatureSource(knn_cfg.path, as_grid=True)
        index = {s: idx for s, idx in src.slide_index().items() if s in label_of}
        if len(index) < 4:
            raise ValueError(f"eval.knn: {knn_cfg.path} has {len(index)} labelled slides; need >= 4")
        self.bags = [np.stack([src[i]["features"] for i in idx]) for idx in index.values()]  # [M,R,C,F]
        self.labels = np.array([label_of[s] for s in index])
        self.splits = split_tiles(self.labels, knn_cfg.test_fraction, config.seed)
        model = build_vit(config.model)
        self._forward = jax.jit(lambda v, g: model.apply(v, g, cls_only=True)[0])

    def embed(self, variables) -> np.ndarray:
        return np.stack([np.asarray(self._forward(variables, bag)).mean(0) for bag in self.bags])


class KnnMonitor:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.cfg, self.workdir = config, config.eval.knn, workdir
        self.items = (_TileItems if config.stage == 1 else _SlideItems)(config, self.cfg)
        self.best = -1.0

    def evaluate(self, state) -> dict:
        t0 = time.perf_counter()
        feats = self.items.embed(_teacher_backbone(state))
        tr, te = self.items.splits == "train", self.items.splits == "test"
        n_classes = int(self.items.labels.max()) + 1
        # A small monitoring set can hold fewer training items than k: then all of them vote.
        k = min(self.cfg.k, int(tr.sum()))
        probs = knn.knn_cosine_weighted(feats[tr], self.items.labels[tr], feats[te], k=k,
                                        temperature=self.cfg.temperature, n_classes=n_classes)
        y, pred = self.items.labels[te], probs.argmax(1)
        return {"knn/acc": metrics.accuracy(y, pred), "knn/balanced_acc": metrics.balanced_accuracy(y, pred),
                "knn/auc": metrics.auc(y, probs), "knn/seconds": time.perf_counter() - t0}

    def __call__(self, step: int, stop: int, state, logger) -> Optional[dict]:
        """After update ``step`` (1-based count of finished steps): evaluate when due, log,
        keep the best export."""
        if step % self.cfg.every_steps and step != stop:
            return None
        result = self.evaluate(state)
        if logger.active:
            for k, v in result.items():
                logger.writer.add_scalar(k, v, step)
            logger.writer.flush()
            logger.jsonl.write(json.dumps({"step": step, **result}) + "\n")
            logger.jsonl.flush()
            print(f"step {step:>7d}  KNN acc {result['knn/acc']:.4f}  balanced {result['knn/balanced_acc']:.4f}"
                  f"  AUC {result['knn/auc']:.4f}  ({result['knn/seconds']:.1f} s)", flush=True)
        if self.cfg.keep_best and result["knn/acc"] > self.best:
            from hipt_jax.pretrain.trainer import export_teacher

            self.best = result["knn/acc"]
            export_teacher(state, self.config, os.path.join(self.workdir, "export_best"),
                           meta={"knn_acc": self.best, "knn_step": step})
        return result


def from_config(config: ml_collections.ConfigDict, workdir: str) -> Optional[KnnMonitor]:
    """The monitor ``config.eval.knn`` asks for, or None when it is off."""
    cfg = config.get("eval", {}).get("knn") if "eval" in config else None
    if cfg is None or not cfg.path or cfg.every_steps <= 0:
        return None
    return KnnMonitor(config, workdir)
