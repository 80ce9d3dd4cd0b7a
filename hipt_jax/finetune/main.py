"""HIPT-LGP subtyping or survival with k-fold cross-validation (`hipt-finetune`, whose command
line is hipt_jax/cli/finetune.py).

    hipt-finetune --config configs/lgp_subtyping.py --workdir runs/x \
        --config.data.embeddings=EMB --config.data.labels=labels.csv [--config.data.splits=DIR]

Reads the [M,256,384] ViT-256 features written by hipt-extract, trains one HIPT-LGP per fold
(fresh init per fold), and writes to the workdir:
    fold_{k}/checkpoint/   the trained HIPT-LGP (hipt_jax.models.checkpoint: arch.json + state)
    fold_{k}/result.json   test (and val) metrics and per-item predictions
    results.json, results.md   per-fold table with mean +/- std (results.json also names the
                               slides whose feature file could not be read: "failed_slides")
    roc.png (subtyping) or km.png (survival)
A fold whose result.json exists is skipped, so an interrupted run resumes at the next fold,
but only when the workdir's provenance.json (hashes of the config, the label and split files,
the embeddings' provenance and the pretrained ViT-4K) matches this run: finished folds are never
reported under other labels or another config (hipt_jax.provenance; ``overwrite`` /
``resume_anyway``).
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from data_prep import bags
from data_prep.bags import BagError, read_bag
from hipt_jax.evaluation import cohort as cohort_lib
from hipt_jax.finetune import plots, survival
from hipt_jax import provenance, workdir_lock
from hipt_jax.finetune.trainer import Item, LGPTrainer, TrainConfig, encode_local
from hipt_jax.models import checkpoint, lgp

OUTPUTS = ("results.json", "results.md", "roc.png", "km.png")  # + fold_*/


class FinetuneError(Exception):
    """Bad run input (message names the file and the problem)."""


def _build_model(config, n_classes: int) -> lgp.HIPTLGP:
    return lgp.HIPTLGP(n_classes=n_classes, local_arch=config.model.local_arch,
                       freeze_local=config.model.freeze_local, dropout_rate=config.model.dropout)


def _init_variables(model: lgp.HIPTLGP, config, seed: int, grid: int):
    variables = lgp.init_lgp(model, seed=seed, grid=grid)
    if config.model.pretrained_vit4k:
        vit4k, _ = checkpoint.load_backbone(config.model.pretrained_vit4k, expect_arch="vit4k")
        variables = lgp.with_pretrained_local(variables, vit4k)
    return variables


def load_items(config, coh: cohort_lib.Cohort, model: lgp.HIPTLGP, local_variables,
               failed: Optional[dict[str, str]] = None) -> tuple[list[Item], np.ndarray, dict]:
    """Items (slides or patients) and their stratification labels.

    With a frozen ViT-4K each slide is encoded once here ([M,256,384] -> [M,192]); otherwise the
    items hold the raw features. Slides without a feature file are skipped with a warning; a
    file that cannot be read is skipped and recorded in ``failed`` (slide_id -> error).
    """
    emb = config.data.embeddings
    per_slide: dict[str, np.ndarray] = {}
    missing = []
    for sid in coh.slide_ids:
        if not os.path.isfile(bags.bag_path(emb, sid)):
            missing.append(sid)
            continue
        try:
            feats = read_bag(emb, sid)["features_cls256"]  # [M,R*C,384]
        except BagError as e:
            if failed is None:
                raise
            failed[sid] = str(e)
            continue
        per_slide[sid] = (encode_local(model, local_variables, feats, config.train.buckets)
                          if config.model.freeze_local else feats)
    if missing:
        print(f"hipt-finetune: {len(missing)} labelled slide(s) not extracted in {emb}, skipped: "
              f"{missing[:5]}", file=sys.stderr)
    if not per_slide:
        raise FinetuneError(f"{emb}: none of the labelled slides were extracted")
    info: dict[str, Any] = {"n_slides": len(per_slide)}
    if config.task == "subtyping":
        items = [Item(sid, per_slide[sid], int(lab))
                 for sid, lab in zip(coh.slide_ids, coh.labels) if sid in per_slide]
        return items, np.array([it.label for it in items]), info
    # Survival: one item per patient, its slides concatenated along the region axis.
    cases: dict[str, list[int]] = {}
    for i, (sid, case) in enumerate(zip(coh.slide_ids, coh.case_ids)):
        if sid in per_slide:
            cases.setdefault(case, []).append(i)
    case_ids = sorted(cases)
    times = np.array([coh.times[cases[c][0]] for c in case_ids])
    cens = np.array([bool(coh.censored[cases[c][0]]) for c in case_ids])
    bins, edges = survival.quartile_bins(times, cens, config.train.n_bins)
    info["bin_edges"] = edges.tolist()
    items = [Item(c, np.concatenate([per_slide[coh.slide_ids[i]] for i in cases[c]]), int(b), float(t), bool(e))
             for c, b, t, e in zip(case_ids, bins, times, cens)]
    return items, bins * 2 + cens, info


def _map_split_ids(folds, items: list[Item], coh: cohort_lib.Cohort, task: str):
    """Split files may list slide ids or (survival) case ids; map both to item ids."""
    item_ids = {it.item_id for it in items}
    to_item = {s: c for s, c in zip(coh.slide_ids, coh.case_ids)} if task == "survival" else {}
    out = []
    for fold in folds:
        mapped = {}
        for part, ids in fold.items():
            mapped[part] = sorted({to_item.get(i, i) for i in ids} & item_ids)
        out.append(mapped)
    return out


def _splits(config, items: list[Item], strata: np.ndarray, coh: cohort_lib.Cohort):
    ids = [it.item_id for it in items]
    spec = config.data.splits
    if spec.startswith("kfold:"):
        try:
            return cohort_lib.resolve_splits(spec, ids, strata, config.seed)
        except cohort_lib.CohortError:
            if config.task != "survival":
                raise
            # Too few patients per (bin, censorship) stratum: stratify by censorship only.
            return cohort_lib.resolve_splits(spec, ids, strata % 2, config.seed)
    folds = cohort_lib.read_clam_splits(spec)
    return _map_split_ids(folds, items, coh, config.task)


def _save_checkpoint(path: str, params, model: lgp.HIPTLGP, task: str) -> None:
    """The fold's model as kind "hipt_lgp" (arch.json rebuilds it; a rerun replaces it)."""
    checkpoint.save(path, params, "hipt_lgp", lgp.lgp_arch(model, task), overwrite=True)


def _summary(values: list[float]) -> dict:
    arr = np.array([v for v in values if v == v], np.float64)  # drop NaN folds
    return {"mean": float(arr.mean()) if len(arr) else float("nan"),
            "std": float(arr.std()) if len(arr) else float("nan")}


def fingerprint(config: ml_collections.ConfigDict) -> dict:
    """What decides a fold's numbers: the config, the label file, the split files, the
    embeddings (their provenance, or their slide files' names when they have none) and the
    pretrained ViT-4K, each as a content hash."""
    splits = config.data.splits
    emb_fp = provenance.read(config.data.embeddings) if os.path.isdir(config.data.embeddings) else None
    return {
        "config": provenance.config_hash({k: v for k, v in config.to_dict().items() if k != "data"}),
        "labels": provenance.content_hash(config.data.labels),
        "splits": splits if str(splits).startswith("kfold:") else provenance.content_hash(splits),
        "embeddings": provenance.config_hash(emb_fp) if emb_fp is not None else
        provenance.config_hash(sorted(bags.list_bags(config.data.embeddings))),
        "pretrained_vit4k": provenance.content_hash(config.model.pretrained_vit4k or None),
    }


def _outputs(workdir: str) -> list[str]:
    folds = [os.path.basename(p) for p in glob.glob(os.path.join(workdir, "fold_*"))]
    return sorted(folds) + [o for o in OUTPUTS]


def run(config: ml_collections.ConfigDict, workdir: str, show_progress: bool = True,
        overwrite: bool = False, resume_anyway: bool = False) -> dict:
    """Run every fold; returns the results dict written to workdir/results.json."""
    _check_inputs(config)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock.hold(workdir):
        provenance.check(workdir, fingerprint(config), outputs=_outputs(workdir), overwrite=overwrite,
                         resume_anyway=resume_anyway, what="fine-tuning workdir")
        return _run_folds(config, workdir, show_progress)


def _check_inputs(config) -> None:
    if config.task not in ("subtyping", "survival"):
        raise FinetuneError(f"config.task={config.task!r}: expected subtyping or survival")
    if not config.data.embeddings or not config.data.labels:
        raise FinetuneError("set --config.data.embeddings (hipt-extract output) and --config.data.labels (CSV)")
    for name in ("labels", "embeddings"):
        path = config.data[name]
        if path and not os.path.exists(path):
            raise FinetuneError(f"{path}: no such file or folder (config.data.{name})")
    splits = config.data.splits
    if splits and not str(splits).startswith("kfold:") and not os.path.isdir(splits):
        raise FinetuneError(f"{splits}: no such folder of splits_{{i}}.csv (config.data.splits)")
    vit4k = config.model.pretrained_vit4k
    if vit4k and not os.path.exists(vit4k):
        raise FinetuneError(f"{vit4k}: no such checkpoint (config.model.pretrained_vit4k)")


def _run_folds(config: ml_collections.ConfigDict, workdir: str, show_progress: bool) -> dict:
    if config.task not in ("subtyping", "survival"):
        raise FinetuneError(f"config.task={config.task!r}: expected subtyping or survival")
    if not config.data.embeddings or not config.data.labels:
        raise FinetuneError("set --config.data.embeddings (hipt-extract output) and --config.data.labels (CSV)")
    coh = cohort_lib.read_labels_csv(config.data.labels, require_survival=config.task == "survival")
    n_classes = config.model.n_classes
    if n_classes < 1:
        n_classes = config.train.n_bins if config.task == "survival" else len(coh.class_names)
    model = _build_model(config, n_classes)
    grid = _feature_grid(config.data.embeddings, coh.slide_ids)
    base_vars = _init_variables(model, config, config.seed, grid)
    failed: dict[str, str] = {}
    items, strata, info = load_items(config, coh, model, base_vars, failed)
    folds = _splits(config, items, strata, coh)
    by_id = {it.item_id: it for it in items}
    trainer_cfg = TrainConfig(
        task=config.task, epochs=config.optim.epochs, lr=config.optim.lr,
        weight_decay=config.optim.weight_decay, accumulate_steps=config.train.accumulate_steps,
        balanced_sampling=config.train.balanced_sampling, alpha_surv=config.train.alpha_surv,
        buckets=tuple(config.train.buckets), seed=config.seed)
    trainer = LGPTrainer(model, trainer_cfg)
    metric = "auc" if config.task == "subtyping" else "c_index"
    fold_results = []
    for k, fold in enumerate(folds):
        fold_dir = os.path.join(workdir, f"fold_{k}")
        result_path = os.path.join(fold_dir, "result.json")
        if os.path.isfile(result_path):
            with open(result_path) as f:
                fold_results.append(json.load(f))
            continue
        os.makedirs(fold_dir, exist_ok=True)
        train = [by_id[i] for i in fold["train"]]
        test = [by_id[i] for i in fold["test"]]
        if not train or not test:
            raise FinetuneError(f"fold {k}: empty train or test set after matching ids to extracted slides")
        # Fresh aggregator init per fold (the frozen ViT-4K is the same in every fold).
        fold_vars = _init_variables(model, config, config.seed + 1 + k, grid)
        if config.model.freeze_local:
            fold_vars = lgp.with_pretrained_local(fold_vars, {"params": base_vars["params"]["local_vit"]})
        trainer.cfg.seed = config.seed + k
        params = trainer.fit(fold_vars, train, desc=f"fold {k}" if show_progress else None)
        test_metrics, preds = trainer.evaluate(params, test)
        result = {"fold": k, "n_train": len(train), "n_test": len(test), "test": test_metrics,
                  "predictions": jax.tree.map(lambda a: a.tolist() if hasattr(a, "tolist") else a, preds)}
        if fold.get("val"):
            val_items = [by_id[i] for i in fold["val"]]
            result["val"] = trainer.evaluate(params, val_items)[0]
        _save_checkpoint(os.path.join(fold_dir, "checkpoint"), params, model, config.task)
        with open(result_path, "w") as f:
            json.dump(result, f)
        if show_progress:
            print(f"fold {k}: test {metric} {test_metrics[metric]:.4f}", flush=True)
        fold_results.append(result)
    names = list(fold_results[0]["test"])
    summary = {m: _summary([r["test"][m] for r in fold_results]) for m in names}
    results = {"task": config.task, "n_items": len(items), "info": info, "class_names": coh.class_names,
               "folds": [{"fold": r["fold"], **r["test"]} for r in fold_results], "summary": summary,
               "failed_slides": failed, "config": config.to_dict()}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    table = format_table(results["folds"], names, summary)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    if config.task == "subtyping":
        plots.plot_roc([{"labels": r["predictions"]["labels"], "probs": r["predictions"]["probs"],
                         "auc": r["test"]["auc"]} for r in fold_results], coh.class_names,
                       os.path.join(workdir, "roc.png"))
    else:
        cat = lambda key: np.concatenate([np.asarray(r["predictions"][key]) for r in fold_results])  # noqa: E731
        plots.plot_km(cat("times"), cat("censored"), cat("risk"), os.path.join(workdir, "km.png"))
    if show_progress:
        print(table)
    return results


def _feature_grid(embeddings: str, slide_ids: list[str]) -> int:
    """Side of the ViT-256 feature grid of the first readable labelled slide (16 for 4096 px
    regions): it decides the ViT-4K pos-embed size."""
    for sid in slide_ids:
        if os.path.isfile(bags.bag_path(embeddings, sid)):
            try:
                return int(round(read_bag(embeddings, sid)["features_cls256"].shape[1] ** 0.5))
            except BagError:
                continue  # recorded as failed by load_items
    raise FinetuneError(f"{embeddings}: none of the labelled slides were extracted")


def format_table(rows: list[dict], names: list[str], summary: dict) -> str:
    """Markdown table: one row per fold and a mean +/- std row."""
    lines = ["| fold | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['fold']} | " + " | ".join(f"{r[m]:.4f}" for m in names) + " |")
    lines.append("| mean +/- std | " + " | ".join(
        f"{summary[m]['mean']:.4f} +/- {summary[m]['std']:.4f}" for m in names) + " |")
    return "\n".join(lines)
