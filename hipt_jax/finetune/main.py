"""HIPT-LGP subtyping or survival with k-fold cross-validation (`hipt-finetune`, whose command
line is hipt_jax/cli/finetune.py).

    hipt-finetune --config configs/lgp_subtyping.py --workdir runs/x \
        --config.data.embeddings=EMB --config.data.labels=labels.csv [--config.data.splits=DIR]

Reads the bags written by hipt-extract, trains one model per fold (fresh init per fold):
HIPT-LGP on the [M,256,384] ViT-256 features, or a baseline of hipt_jax.models.mil
(``model.name``: abmil, clam_sb, mean_pool) on region ([M,192]) or patch ([M*256,384]) bags.
With a val part, the epoch with the best validation loss (or ``selection.metric``) is selected
(optional early stopping by CLAM's rule). Writes to the workdir:
    fold_{k}/checkpoint/   the model evaluated on test (hipt_jax.models.checkpoint: arch.json + state)
    fold_{k}/checkpoint_final/  the last epoch's model, when a selected epoch was evaluated instead
    fold_{k}/result.json   test (and val) metrics, which model was evaluated, per-epoch history,
                           per-item predictions
    fold_{k}/tensorboard/  per-epoch train/val loss and metrics
    summary.csv            CLAM-style: one row per fold, test_* and val_* metrics
    results.json, results.md   per-fold table with mean +/- std (results.json also names the
                               slides whose feature file could not be read: "failed_slides")
    roc.png (subtyping) or km.png (survival)
The workdir may not hold the input bags, nor have the embeddings folder among its outputs
(``_check_workdir_apart``); a workdir inside the embeddings folder is fine.
A fold whose result.json exists is skipped, so an interrupted run resumes at the next fold,
but only when the workdir's provenance.json (hashes of the config, the label and split files,
the embeddings' provenance and the pretrained ViT-4K) matches this run: finished folds are never
reported under other labels or another config (hipt_jax.provenance; ``overwrite`` /
``resume_anyway``). A finished fold is also redone when its slides differ from this run's (its
result.json lists them: a bag unreadable then and repaired since, or gone now), when a bag it
was trained on was damaged or replaced since (its result.json records each bag's size, mtime
and SHA-256), or when its result.json cannot be read. A rerun that finds every fold finished
rebuilds the results from the folds' records without reading the bags' features.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_prep import bags
from data_prep.bags import BagError, read_bag
from hipt_jax.evaluation import cohort as cohort_lib
from hipt_jax.evaluation import metrics
from hipt_jax import provenance, workdir_lock
from hipt_jax.outputs import atomic_path, check_not_among_bags, metric_or_nan, write_json, write_text
from hipt_jax.finetune import plots, reporting, survival
from hipt_jax.finetune.trainer import METRICS, Item, LGPTrainer, TrainConfig, encode_local
from hipt_jax.models import checkpoint, lgp, mil
from hipt_jax.models.archs import ARCHITECTURES
from hipt_jax.models.precision import resolve_dtype

OUTPUTS = ("results.json", "results.md", "roc.png", "km.png")  # + fold_*/


class FinetuneError(Exception):
    """Bad run input (message names the file and the problem)."""


def _model_name(config) -> str:
    name = config.model.get("name", "hipt_lgp")
    if name != "hipt_lgp" and name not in mil.MIL_MODELS:
        raise FinetuneError(f"config.model.name={name!r}: expected hipt_lgp or one of {list(mil.MIL_MODELS)}")
    bag = config.model.get("bag", "region")
    if bag not in ("region", "patch"):
        raise FinetuneError(f"config.model.bag={bag!r}: expected region or patch")
    return name


def _mil_arch(config, n_classes: int, in_features: int):
    m = config.model
    return mil.mil_arch(m.name, n_classes, in_features, embed=m.embed, attn_hidden=m.attn_hidden,
                        dropout_rate=m.dropout, k_sample=m.k_sample, subtyping=config.task == "subtyping",
                        task=config.task, bag=m.bag)


def _build_model(config, n_classes: int, in_features: int = 384):
    if _model_name(config) != "hipt_lgp":
        return mil.build_mil(_mil_arch(config, n_classes, in_features))
    return lgp.HIPTLGP(n_classes=n_classes, local_arch=config.model.local_arch,
                       freeze_local=config.model.freeze_local, dropout_rate=config.model.dropout,
                       dtype=resolve_dtype(config.get("compute_dtype", "auto")))


def _init_variables(model, config, seed: int, grid: int, in_features: int = 384):
    if not isinstance(model, lgp.HIPTLGP):  # a baseline: a bag of two instances [2,F]
        return model.init(jax.random.PRNGKey(seed), jnp.zeros((2, in_features), jnp.float32))
    variables = lgp.init_lgp(model, seed=seed, grid=grid)
    if config.model.pretrained_vit4k:
        vit4k, _ = checkpoint.load_backbone(config.model.pretrained_vit4k, expect_arch="vit4k")
        variables = lgp.with_pretrained_local(variables, vit4k)
    if config.model.get("pretrained_global"):
        loaded = checkpoint.load(config.model.pretrained_global, kind="vit")
        variables = lgp.with_pretrained_global(variables, loaded.params, config.model.pretrained_global)
    return variables


def load_items(config, coh: cohort_lib.Cohort, model: lgp.HIPTLGP, local_variables,
               failed: Optional[dict[str, str]] = None,
               identities: Optional[dict[str, dict]] = None) -> tuple[list[Item], np.ndarray, dict]:
    """Items (slides or patients) and their stratification labels.

    With a frozen ViT-4K each slide is encoded once here ([M,256,384] -> [M,192]); otherwise the
    items hold the raw features. Slides without a feature file are skipped with a warning; a
    file that cannot be read is skipped and recorded in ``failed`` (slide_id -> error). The
    bag of every slide read is described in ``identities`` (slide_id -> bags.bag_identity) as
    it was read: the folds trained on it record it.
    """
    emb = config.data.embeddings
    name, level = _model_name(config), config.model.get("bag", "region")
    per_slide: dict[str, np.ndarray] = {}
    missing = []
    first: Optional[tuple[str, tuple]] = None  # (bag path, instance shape) of the first good bag
    for sid in coh.slide_ids:
        path = cohort_lib.bag_file(emb, sid)
        if path is None:  # ids are names inside EMB/slides, never paths
            missing.append(sid)
            continue
        try:
            bag = read_bag(emb, sid)
            try:
                shape = instance_shape(bag, name, level)
            except BagError as e:
                raise BagError(f"{path}: {e}") from None
            if first is not None and shape != first[1]:
                raise BagError(f"{path}: instances {shape} while the cohort's first bag ({first[0]}) has "
                               f"{first[1]}: extracted with another region size or backbone")
        except BagError as e:
            if failed is None:
                raise
            failed[sid] = str(e)
            continue
        first = first or (path, shape)
        if identities is not None:
            identities[sid] = bags.bag_identity(path)
        per_slide[sid] = bag_input(model, local_variables, bag, config.model.get("bag", "region"),
                                   config.train.buckets)
    _say_missing(emb, missing)
    if not per_slide:
        raise FinetuneError(f"{emb}: none of the labelled slides were extracted")
    info = _embeddings_info(emb, coh, len(per_slide), first[1])
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
    info["survival"] = _censorship_report(config.data.labels, cens)
    try:
        bins, edges = survival.quartile_bins(times, cens, config.train.n_bins)
    except ValueError as e:  # e.g. all patients censored: no event times to cut bins from
        raise FinetuneError(f"{config.data.labels}: {e}") from None
    info["bin_edges"] = edges.tolist()
    items = [Item(c, np.concatenate([per_slide[coh.slide_ids[i]] for i in cases[c]]), int(b), float(t), bool(e))
             for c, b, t, e in zip(case_ids, bins, times, cens)]
    return items, bins * 2 + cens, info


# Most survival cohorts are mostly censored, so a mostly-event one may have its censorship
# column coded the other way round (1 = event), which still gives a plausible C-index, of the
# reversed outcome. High-mortality cohorts (GBM, pancreatic) are mostly events and rightly
# so: the note states the numbers and the coding and leaves the judgement to the user.
LOW_CENSORED_FRACTION = 0.5


def _censorship_report(labels: str, censored: np.ndarray) -> dict:
    """Patients, events and censored fraction of the survival items, printed and recorded;
    a note on the coding when fewer than half are censored (recorded as "warning")."""
    n, n_cens = len(censored), int(np.sum(censored))
    report = {"n_patients": n, "n_events": n - n_cens, "censored_fraction": n_cens / n if n else float("nan")}
    print(f"hipt-finetune: {n} patients, {n - n_cens} events, {report['censored_fraction']:.0%} censored",
          file=sys.stderr)
    if n and report["censored_fraction"] < LOW_CENSORED_FRACTION:
        report["warning"] = (f"{labels}: {n_cens} of {n} patients ({report['censored_fraction']:.0%}) are "
                             f"censored, {n - n_cens} had the event (column censorship: 1 = censored, "
                             "0 = event); if most of your patients had the event this is expected; "
                             "otherwise check the coding")
        print(f"hipt-finetune: note: {report['warning']}", file=sys.stderr)
    return report


def embedding_models(embeddings: str) -> dict:
    """The weights an embeddings folder was extracted with, as hipt-extract recorded them
    ({"vit256": ..., "vit4k": ...}; {} for folders without a record, e.g. TRIDENT bags)."""
    recorded = provenance.read(embeddings) if os.path.isdir(embeddings) else None
    return {k: recorded[k] for k in ("vit256", "vit4k") if k in (recorded or {})}


def embedding_geometry(embeddings: str) -> dict:
    """The region size and resolution an embeddings folder was extracted at ({"region_px",
    "target_mpp"}), as hipt-extract recorded them: the folder's manifest, else its first bag
    (bags of one folder agree: bags.check_extraction); {} when nothing records them (TRIDENT
    bags, older folders)."""
    made_by = bags.folder_extraction(embeddings) if os.path.isdir(embeddings) else None
    if made_by is None:
        first = next(iter(bags.list_bags(embeddings).values()), None)
        try:
            made_by = bags.extraction_of(first) if first else None
        except BagError:
            made_by = None  # a damaged first bag: its reader names it
    return bags.geometry_of(made_by)


def _say_missing(emb: str, missing: list[str]) -> None:
    if missing:
        print(f"hipt-finetune: {len(missing)} labelled slide(s) not extracted in {emb}, skipped: "
              f"{missing[:5]}", file=sys.stderr)


def _embeddings_info(emb: str, coh: cohort_lib.Cohort, n_slides: int, shape: tuple) -> dict[str, Any]:
    """The results' "info" on the bags used; the extracted slides without a label row are said."""
    info: dict[str, Any] = {"n_slides": n_slides, "instance_shape": list(shape),
                            "unlabelled_slides": _unlabelled(emb, coh), "embedding_models": embedding_models(emb),
                            "embedding_geometry": embedding_geometry(emb)}
    if info["unlabelled_slides"]:
        print(f"hipt-finetune: {len(info['unlabelled_slides'])} extracted slide(s) in {emb} have no row in "
              f"{coh.path} (not used): {info['unlabelled_slides'][:5]}", file=sys.stderr)
    return info


def _unlabelled(embeddings: str, coh: cohort_lib.Cohort) -> list[str]:
    """Extracted bags with no row in the labels, or only a row the class list dropped: a
    mistyped id or a labels file of another cohort shows up here rather than as a smaller cohort."""
    insensitive = cohort_lib._case_insensitive(embeddings)
    labelled = {cohort_lib.id_key(s, insensitive) for s in (*coh.slide_ids, *coh.dropped_ids)}
    return [s for s in bags.list_bags(embeddings) if cohort_lib.id_key(s, insensitive) not in labelled]


def bag_input(model, variables, bag: dict, level: str, buckets=lgp.DEFAULT_BUCKETS) -> np.ndarray:
    """The model input of one slide's bag (data_prep.bags): HIPT-LGP with a frozen ViT-4K gets
    its [M,192] outputs (computed here once), an unfrozen one the raw [M,R*C,384] features; a
    baseline gets the [M,192] features_cls4k (``level`` "region") or the [M*R*C,384] patch
    features (``level`` "patch")."""
    if not isinstance(model, lgp.HIPTLGP) and level == "region":
        # A bag of CLS-4K features alone (a TRIDENT-style h5 with only `features`) is enough.
        return np.asarray(bag["features_cls4k"], np.float32)  # [M,192]
    feats = bag["features_cls256"]  # [M,R*C,384]
    if isinstance(model, lgp.HIPTLGP):
        return encode_local(model, variables, feats, buckets) if model.freeze_local else feats
    return feats.reshape(-1, feats.shape[-1])  # [M,R*C,384] -> [M*R*C,384]


def instance_shape(bag: dict, model_name: str, level: str) -> tuple[int, ...]:
    """The shape of one instance a model reads from ``bag``: a region's ViT-256 grid [R*C, 384]
    (HIPT-LGP), a region's CLS-4K [192] (region-level baselines) or a patch's [384] (patch-level
    baselines). Bags of one cohort, and the slides a finished run scores, must agree on it."""
    key = "features_cls4k" if model_name != "hipt_lgp" and level == "region" else "features_cls256"
    if key not in bag:
        raise BagError(f"bag has no {key}, which a {model_name} model on {level} bags reads "
                       f"(it holds {', '.join(sorted(bag))})")
    shape = tuple(bag[key].shape[1:])
    return shape if key == "features_cls4k" or model_name == "hipt_lgp" else shape[1:]


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


def _extracted(config, coh: cohort_lib.Cohort) -> list[str]:
    """The labelled slides that have a bag (readable or not)."""
    cohort_lib.check_leading_zeros(coh, bags.list_bags(config.data.embeddings), config.data.embeddings)
    present = [s for s in coh.slide_ids if cohort_lib.bag_file(config.data.embeddings, s) is not None]
    if not present:
        raise FinetuneError(f"{config.data.embeddings}: none of the labelled slides were extracted"
                            + cohort_lib.case_ids_as_slide_ids_hint(coh.slide_ids))
    return present


def _featureless_items(config, coh: cohort_lib.Cohort, present: list[str]):
    """(items without features, strata, survival info or {}) of the slides ``present``: what
    ``load_items`` gives when every one of their bags reads."""
    if config.task == "subtyping":
        label_of = dict(zip(coh.slide_ids, coh.labels))
        items = [Item(s, None, int(label_of[s])) for s in present]
        return items, np.array([it.label for it in items]), {}
    first, extracted = {}, set(present)
    for i, (s, c) in enumerate(zip(coh.slide_ids, coh.case_ids)):
        if s in extracted:
            first.setdefault(c, i)
    cases = sorted(first)
    times = np.array([coh.times[first[c]] for c in cases])
    cens = np.array([bool(coh.censored[first[c]]) for c in cases])
    try:
        bins, edges = survival.quartile_bins(times, cens, config.train.n_bins)
    except ValueError as e:
        raise FinetuneError(f"{config.data.labels}: {e}") from None
    items = [Item(c, None, int(b), float(t), bool(e)) for c, b, t, e in zip(cases, bins, times, cens)]
    return items, bins * 2 + cens, {"censored": cens, "bin_edges": edges.tolist()}


def check_folds_before_work(config, coh: cohort_lib.Cohort) -> None:
    """Build the folds from the slides that have a bag, before any feature is read, so a bad
    split file or a class missing from a training part stops the run at once."""
    items, strata, _ = _featureless_items(config, coh, _extracted(config, coh))
    _splits(config, items, strata, coh, quiet=True)


def _splits(config, items: list[Item], strata: np.ndarray, coh: cohort_lib.Cohort,
            workdir: Optional[str] = None, quiet: bool = False) -> cohort_lib.FoldPlan:
    """The folds (hipt_jax.evaluation.cohort.plan_folds: the same rules as hipt-knn), written
    to WORKDIR/splits/ as CLAM split files when a workdir is given."""
    ids = [it.item_id for it in items]
    spec = config.data.splits
    unit = "case" if config.task == "survival" else "slide"
    frac = float(config.data.get("label_frac", 1.0))
    allow = bool(config.data.get("allow_leaky_splits", False))
    try:
        plan = cohort_lib.plan_folds(coh, spec, ids, strata, unit=unit, seed=config.seed, label_frac=frac,
                                     allow_leaks=allow)
    except cohort_lib.CohortError:
        if config.task != "survival" or not spec.startswith("kfold:"):
            raise
        # Too few patients per (bin, censorship) stratum: stratify by censorship only, and say so
        # (the folds are then not balanced in survival time).
        plan = cohort_lib.plan_folds(coh, spec, ids, strata % 2, unit=unit, seed=config.seed, label_frac=frac,
                                     allow_leaks=allow)
        plan.warnings.append(_censorship_only_note(config, strata, spec))
    where = f"{spec} fold {{k}}" if spec.startswith("kfold:") else os.path.join(spec, "splits_{k}.csv")
    if config.task == "subtyping":
        cohort_lib.check_training_classes(plan.folds, {it.item_id: it.label for it in items},
                                          coh.class_names, where)
    _check_selection_metric(config, plan.folds, items, coh, where)
    for warning in [] if quiet else plan.warnings:  # the folds are planned twice: said once
        print(f"hipt-finetune: {warning}", file=sys.stderr)
    if plan.skipped_ids and not quiet:
        print(f"hipt-finetune: {len(plan.skipped_ids)} split id(s) not in {config.data.labels} "
              f"(skipped): {plan.skipped_ids[:10]}", file=sys.stderr)
    if plan.leaky_patients and not quiet:
        print(f"hipt-finetune: WARNING: {sum(map(len, plan.leaky_patients.values()))} patient(s) appear in "
              "two parts of a fold (data.allow_leaky_splits; listed under leaky_patients in results.json)",
              file=sys.stderr)
    if workdir:
        cohort_lib.write_clam_splits(plan.folds, os.path.join(workdir, "splits"))
    return plan


def _record_absent_classes(result: dict, k: int, parts: dict, class_names: list[str]) -> None:
    """The classes a part's macro AUC left out (no item of them there), named on stderr and
    under ``auc_absent_classes`` in the fold's result."""
    for part, items in parts.items():
        if not items:
            continue
        absent = [class_names[c] for c in metrics.absent_classes([it.label for it in items], len(class_names))]
        if absent:
            result.setdefault("auc_absent_classes", {})[part] = absent
            left = len(class_names) - len(absent)
            # An average over the classes present needs two of them; with one the AUC has no value.
            said = (f"its macro AUC averages the {left} classes present" if left >= 2 else
                    "its AUC is undefined with one class")
            print(f"hipt-finetune: fold {k}: no {part} slide of class(es) {', '.join(absent)}: {said}",
                  file=sys.stderr)


def _censorship_only_note(config, strata: np.ndarray, spec: str) -> str:
    k = cohort_lib.parse_kfold(spec)[0]
    values, counts = np.unique(strata, return_counts=True)
    few = ", ".join(f"time bin {v // 2} {'censored' if v % 2 else 'with event'}: {c}"
                    for v, c in zip(values, counts) if c < k)
    return (f"{config.data.labels}: fewer patients than the {k} folds in some (time bin x censorship) "
            f"stratum ({few}): the folds are stratified by censorship only, not by survival time")


def _check_selection_metric(config, folds: list[dict], items: list[Item], coh: cohort_lib.Cohort,
                            where: str) -> None:
    """A selection metric that cannot be computed on a fold's val part (an AUC without two
    classes, a C-index without a comparable pair) is NaN at every epoch: no epoch could be
    selected by it. Refused before any training, naming the fold."""
    sel = config.get("selection")
    metric = sel.get("metric", "loss") if sel is not None else "loss"
    if metric not in ("auc", "c_index"):
        return
    by_id = {it.item_id: it for it in items}
    for k, fold in enumerate(folds):
        val = [by_id[i] for i in fold.get("val", []) if i in by_id]
        if not val:  # no val part: the final epoch is evaluated, nothing is selected
            continue
        if metric == "auc":
            present = sorted({it.label for it in val})
            if len(present) >= 2:
                continue
            names = [coh.class_names[c] for c in present] if coh.class_names else present
            problem = f"its val part holds {len(present)} class ({', '.join(map(str, names))}), an AUC needs two"
        else:
            times = np.array([it.time for it in val])
            events = ~np.array([it.censored for it in val])
            if metrics.comparable_pairs(times, events):
                continue
            problem = (f"its val part has {int(events.sum())} event(s) among {len(val)} patients and no "
                       "comparable pair, a C-index needs one")
        raise FinetuneError(f"{where.format(k=k)}: {problem}: config.selection.metric={metric} cannot be "
                            "computed on it at any epoch; use --config.selection.metric=loss (or a val "
                            "part with both outcomes)")


def _class_list(classes) -> Optional[list[str]]:
    """config.data.classes: "IDC,ILC" or a sequence; empty = every class."""
    if not classes:
        return None
    if isinstance(classes, str):
        return [c.strip() for c in classes.split(",") if c.strip()] or None
    return [str(c) for c in classes]


def _save_checkpoint(path: str, params, model, task: str, config=None, in_features: int = 384,
                     meta: Optional[dict] = None) -> None:
    """The fold's model as kind "hipt_lgp" or "mil" (arch.json rebuilds it; a rerun replaces it)."""
    with atomic_path(path) as tmp:  # a full disk leaves no half-written checkpoint
        if isinstance(model, lgp.HIPTLGP):
            checkpoint.save(tmp, params, "hipt_lgp", lgp.lgp_arch(model, task), meta=meta)
        else:
            checkpoint.save(tmp, params, "mil", _mil_arch(config, model.n_classes, in_features), meta=meta)


def _hashed_config(config: ml_collections.ConfigDict) -> dict:
    """The config fields a fold's numbers depend on beyond the data files (hashed separately)."""
    return {k: v for k, v in config.to_dict().items() if k != "data"}


def fingerprint(config: ml_collections.ConfigDict) -> dict:
    """What decides a fold's numbers: the config, the label file, the split files, the
    embeddings (their provenance, or their slide files' names when they have none) and the
    pretrained ViT-4K, each as a content hash."""
    splits = config.data.splits
    emb_fp = provenance.read(config.data.embeddings) if os.path.isdir(config.data.embeddings) else None
    return {
        "config": provenance.config_hash(_hashed_config(config)),
        "labels": provenance.content_hash(config.data.labels),
        "splits": splits if str(splits).startswith("kfold:") else provenance.content_hash(splits),
        "embeddings": provenance.config_hash(emb_fp) if emb_fp is not None else
        provenance.config_hash(sorted(bags.list_bags(config.data.embeddings))),
        "pretrained_vit4k": provenance.weights_identity(config.model.pretrained_vit4k or None),
        **({"pretrained_global": provenance.weights_identity(config.model.pretrained_global)}
           if config.model.get("pretrained_global") else {}),
    }


def _outputs(workdir: str) -> list[str]:
    # A pattern, not the folds there now: a run refused after fold 0 finished must see it
    # (provenance.forget_new_records looks when it runs). splits/ and summary.csv too: an
    # --overwrite that left them would show the old run's folds and metrics beside the new
    # record until the new run finished (or for good, if it failed).
    return ["fold_*", "splits", "summary.csv", *OUTPUTS]


def run(config: ml_collections.ConfigDict, workdir: str, show_progress: bool = True,
        overwrite: bool = False, resume_anyway: bool = False) -> dict:
    """Run every fold; returns the results dict written to workdir/results.json."""
    _check_inputs(config)
    _check_workdir_apart(config, workdir)
    coh = _read_cohort(config)  # labels and folds validated: bad input writes nothing
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock.hold(workdir):
        provenance.check(workdir, fingerprint(config), outputs=_outputs(workdir), overwrite=overwrite,
                         resume_anyway=resume_anyway, what="fine-tuning workdir",
                         details={"config": _hashed_config(config)})
        return _run_folds(config, workdir, show_progress, coh)


def _read_cohort(config) -> cohort_lib.Cohort:
    """The labelled cohort, with its folds checked before any feature is read."""
    frac = float(config.data.get("label_frac", 1.0))
    if not 0.0 < frac <= 1.0:
        raise FinetuneError(f"config.data.label_frac={frac}: expected a fraction in (0, 1]")
    coh = cohort_lib.read_labels_csv(config.data.labels, require_survival=config.task == "survival",
                                     label_column=config.data.get("label_column", "label") or "label",
                                     classes=_class_list(config.data.get("classes", "")))
    for cls, n in sorted(coh.dropped.items()):
        print(f"hipt-finetune: dropped {n} row(s) of class {cls!r} (not in data.classes)", file=sys.stderr)
    check_folds_before_work(config, coh)
    return coh


def _check_inputs(config) -> None:
    if config.task not in ("subtyping", "survival"):
        raise FinetuneError(f"config.task={config.task!r}: expected subtyping or survival")
    if not config.data.embeddings or not config.data.labels:
        raise FinetuneError("set --config.data.embeddings (hipt-extract output) and --config.data.labels (CSV)")
    what = {"labels": "labels file not found", "embeddings": "embeddings folder not found"}
    for name in ("labels", "embeddings"):
        path = config.data[name]
        if path and not os.path.exists(path):
            raise FinetuneError(f"{path}: {what[name]} (config.data.{name})")
    splits = config.data.splits
    if splits and not str(splits).startswith("kfold:") and not os.path.isdir(splits):
        raise FinetuneError(f"{splits}: no such folder of splits_{{i}}.csv (config.data.splits)")
    vit4k = config.model.pretrained_vit4k
    if vit4k and not os.path.exists(vit4k):
        raise FinetuneError(f"{vit4k}: no such checkpoint (config.model.pretrained_vit4k)")
    # Checked here, before the workdir records a fingerprint: a typo must not lock the workdir
    # against the corrected run.
    local_archs = sorted(a for a in ARCHITECTURES if a.startswith("vit4k"))
    if _model_name(config) == "hipt_lgp" and config.model.get("local_arch", "vit4k") not in local_archs:
        raise FinetuneError(f"config.model.local_arch={config.model.local_arch!r}: expected one of {local_archs}")
    sel = config.get("selection")
    if sel is not None:
        if sel.get("evaluate", "best") not in ("best", "final"):
            raise FinetuneError(f"config.selection.evaluate={sel.evaluate!r}: expected best or final")
        if sel.get("metric", "loss") not in METRICS[config.task]:
            raise FinetuneError(f"config.selection.metric={sel.metric!r}: expected one of {list(METRICS[config.task])}")


# What a workdir holds besides its lock (shell patterns): an input under one of these names would
# be written over, or removed by an ``overwrite``.
WORKDIR_ENTRIES = (*_outputs(""), provenance.FILE)


def _check_workdir_apart(config, workdir: str) -> None:
    """The workdir must not be the embeddings folder or its bag folder (the run's folds, results
    and provenance.json would sit among the input bags, and the next run would read that
    provenance.json as the embeddings'), nor a folder one of whose outputs is an input or holds
    it (WORKDIR/fold_0 as the embeddings, an earlier run's WORKDIR/splits as data.splits, which
    this run would write over with the folds it used). A workdir inside the embeddings folder is
    fine, unless it is named like a bag among the bags."""
    import fnmatch

    emb, here = config.data.embeddings, os.path.realpath(workdir)
    held = os.path.join(emb, bags.SLIDES)
    held = held if os.path.isdir(held) else emb
    if here in (os.path.realpath(emb), os.path.realpath(held)):
        raise FinetuneError(f"{workdir}: holds the input bags (config.data.embeddings={emb}); the run would write "
                            "its folds, results and provenance.json among them: give --workdir another folder")
    check_not_among_bags(workdir, [emb])
    splits = str(config.data.splits or "")
    inputs = {"the embeddings folder (config.data.embeddings)": emb,
              "the labels (config.data.labels)": config.data.labels,
              **({} if splits.startswith("kfold:") or not splits else {"the split files (config.data.splits)": splits})}
    for role, path in inputs.items():
        inside = os.path.relpath(os.path.realpath(path), here).split(os.sep)[0]
        if inside != os.pardir and any(fnmatch.fnmatchcase(inside, p) for p in WORKDIR_ENTRIES):
            # e.g. data.splits=WORKDIR/splits: the run writes the folds it used over them
            raise FinetuneError(f"{path}: {role} lies in {workdir}/{inside}, which the run writes (or removes to "
                                "start over): give --workdir another folder, or copy the input out of it")


def _damaged_checkpoint(fold_dir: str) -> Optional[str]:
    """Why a finished fold's saved models cannot be used (a description naming the file), None
    when they verify against the checksum their arch.json records. Its result.json alone made
    the fold "finished": a checkpoint damaged since was kept, and hipt-predict then failed on it
    with no way to redo it."""
    for name in ("checkpoint", "checkpoint_final"):
        path = os.path.join(fold_dir, name)
        if name == "checkpoint_final" and not os.path.exists(path):
            continue  # written only when a selected epoch was evaluated
        try:
            checkpoint.verify_state(path, checkpoint.read_arch(path))
        except checkpoint.CheckpointError as e:
            return str(e)
    return None


def _finished_fold(result_path: str, k: int, fold_ids: dict, embeddings: str,
                   quiet: bool = False) -> Optional[dict]:
    """The result of fold ``k`` when an earlier run finished it on the same slides and bags,
    else None (a line on stderr says why it is redone, unless ``quiet``). A resumed run must
    not report folds trained without a slide whose bag was unreadable then and has been repaired
    since (or with one that is gone now), nor folds trained on a bag damaged or replaced since
    (``_changed_bag``); an unreadable result.json is redone, not a traceback."""
    def say(line: str) -> None:
        if not quiet:
            print(f"hipt-finetune: {line}", file=sys.stderr)

    if not os.path.isfile(result_path):
        return None
    try:
        with open(result_path) as f:
            result = json.load(f)
        if not isinstance(result, dict) or not isinstance(result.get("test"), dict):
            raise ValueError("not a fold result")
    except (OSError, ValueError) as e:
        say(f"{result_path}: unreadable ({e}); redoing fold {k}")
        return None
    recorded = result.get("items")
    if recorded is not None and recorded != fold_ids:
        then = {p: len(v) for p, v in recorded.items()} if isinstance(recorded, dict) else recorded
        now = {p: len(v) for p, v in fold_ids.items()}
        say(f"fold {k} was trained on other slides ({then} then, {now} now: a bag repaired, added or "
            "gone); redoing it")
        return None
    changed = _changed_bag(result, embeddings)
    if changed:
        say(f"fold {k} was trained on {changed}; redoing it")
        return None
    damaged = _damaged_checkpoint(os.path.dirname(result_path))
    if damaged:
        say(f"{damaged}; redoing fold {k}")
        return None
    for part in ("test", "val", "test_final_epoch"):  # an undefined metric was written as null
        if isinstance(result.get(part), dict):
            result[part] = {m: metric_or_nan(v) if v is None or isinstance(v, (int, float)) else v
                            for m, v in result[part].items()}
    _keep_bag_times(result_path, result, embeddings)
    return result


def _fold_ids(fold: dict) -> dict:
    return {part: sorted(fold.get(part, [])) for part in ("train", "val", "test")}


def _changed_bag(result: dict, embeddings: str) -> Optional[str]:
    """The first bag the fold's result records (slide_id -> bags.bag_identity, as it was read
    for training) that is not that bag any more ("<bag>: why"), with how many more; None when
    all are the same, or when the result predates the record (``_record_bags`` adds it)."""
    recorded = result.get("bags")
    if not isinstance(recorded, dict):
        return None
    changes = []
    for sid, rec in sorted(recorded.items()):
        change = bags.bag_change(cohort_lib.bag_file(embeddings, sid), rec if isinstance(rec, dict) else {})
        if change:
            changes.append(change)
    if not changes:
        return None
    return changes[0] + (f" (and {len(changes) - 1} more bag(s))" if len(changes) > 1 else "")


def _keep_bag_times(result_path: str, result: dict, embeddings: str) -> None:
    """A kept fold's bags with the same bytes but another mtime (a touch, a copy:
    ``_changed_bag`` hashed them) get the new mtime recorded, so the next rerun does not hash
    them again."""
    recorded = result.get("bags")
    if not isinstance(recorded, dict):
        return
    now = {sid: dict(rec, mtime_ns=os.stat(cohort_lib.bag_file(embeddings, sid)).st_mtime_ns)
           for sid, rec in recorded.items()}
    if now != recorded:
        result["bags"] = now
        write_json(result_path, result)


def _record_bags(result_path: str, result: dict, identities: dict[str, dict], slides: list[str]) -> None:
    """A kept fold whose result predates the record of its bags gets them as they are now
    (read and checksum-verified by this run; a bag replaced before it cannot be told), so that
    later reruns catch a bag damaged or replaced from here on."""
    result["bags"] = {s: identities[s] for s in slides if s in identities}
    write_json(result_path, result)


def _fold_slides(fold_ids: dict, slides_of: dict[str, list[str]]) -> list[str]:
    """The slides whose bags a fold was trained, selected or tested on (items are slides, or
    patients whose slides were concatenated)."""
    return sorted({s for ids in fold_ids.values() for i in ids for s in slides_of.get(i, [i])})


def _slides_of_items(config, coh: cohort_lib.Cohort) -> dict[str, list[str]]:
    """item id -> its slide ids: the slide itself (subtyping), a patient's slides (survival)."""
    if config.task != "survival":
        return {s: [s] for s in coh.slide_ids}
    out: dict[str, list[str]] = {}
    for sid, case in zip(coh.slide_ids, coh.case_ids):
        out.setdefault(case, []).append(sid)
    return out


def _kept_run(config: ml_collections.ConfigDict, workdir: str, show_progress: bool,
              coh: cohort_lib.Cohort) -> Optional[dict]:
    """The results of a rerun whose every fold an earlier run finished on the same slides,
    rebuilt from the folds' result.json without reading the bags' features (loading, checking
    and encoding every bag took minutes on a large cohort before each fold was found done);
    None when a fold is to be (re)done, or when the earlier run could not read a bag (its folds
    are planned without it: only reading them all tells whether it reads now)."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            if json.load(f).get("failed_slides"):
                return None
    except (OSError, ValueError, AttributeError):
        pass  # no summary yet (killed after its last fold): the folds' own records decide
    present = _extracted(config, coh)
    items, strata, surv = _featureless_items(config, coh, present)
    folds = _splits(config, items, strata, coh, quiet=True).folds
    paths = [os.path.join(workdir, f"fold_{k}", "result.json") for k in range(len(folds))]
    if not all(os.path.isfile(p) for p in paths):  # cheap first: no checkpoint verified in vain
        return None
    fold_results = []
    emb, name = config.data.embeddings, _model_name(config)
    for k, (fold, path) in enumerate(zip(folds, paths)):
        done = _finished_fold(path, k, _fold_ids(fold), emb, quiet=True)  # the full pass says why it redoes
        if done is None or "bags" not in done:  # a result without its bags: the full pass records them
            return None
        fold_results.append(done)
    try:  # the instance shape the results record, from one bag
        shape = instance_shape(read_bag(emb, present[0]), name,
                               "region" if name == "hipt_lgp" else config.model.get("bag", "region"))
    except BagError:
        return None
    extracted = set(present)
    _say_missing(emb, [s for s in coh.slide_ids if s not in extracted])
    info = _embeddings_info(emb, coh, len(present), shape)
    if surv:
        info["survival"] = _censorship_report(config.data.labels, surv["censored"])
        info["bin_edges"] = surv["bin_edges"]
    plan = _splits(config, items, strata, coh, workdir)  # said and written as a full run does
    print(f"hipt-finetune: all {len(folds)} folds finished earlier, kept: results rebuilt from them "
          "(--overwrite starts over)", file=sys.stderr)
    return _write_results(config, workdir, show_progress, coh, fold_results, len(items), info, {}, plan)


def _run_folds(config: ml_collections.ConfigDict, workdir: str, show_progress: bool,
               coh: cohort_lib.Cohort) -> dict:
    kept = _kept_run(config, workdir, show_progress, coh)
    if kept is not None:
        return kept
    n_classes = config.model.n_classes
    if n_classes < 1:
        n_classes = config.train.n_bins if config.task == "survival" else len(coh.class_names)
    grid, in_features = _bag_shape(config, coh.slide_ids)
    model = _build_model(config, n_classes, in_features)
    base_vars = _init_variables(model, config, config.seed, grid, in_features)
    failed: dict[str, str] = {}
    identities: dict[str, dict] = {}
    items, strata, info = load_items(config, coh, model, base_vars, failed, identities)
    slides_of = _slides_of_items(config, coh)
    plan = _splits(config, items, strata, coh, workdir)
    folds = plan.folds
    by_id = {it.item_id: it for it in items}
    sel = config.get("selection", ml_collections.ConfigDict(dict(
        metric="loss", evaluate="best", early_stopping=False, patience=20, min_epochs=50)))
    trainer_cfg = TrainConfig(
        task=config.task, epochs=config.optim.epochs, lr=config.optim.lr,
        weight_decay=config.optim.weight_decay, accumulate_steps=config.train.accumulate_steps,
        balanced_sampling=config.train.balanced_sampling, alpha_surv=config.train.alpha_surv,
        buckets=tuple(config.train.buckets), seed=config.seed,
        bag_weight=config.model.get("bag_weight", 0.7), select_metric=sel.metric,
        early_stopping=sel.early_stopping, patience=sel.patience, min_epochs=sel.min_epochs)
    trainer = LGPTrainer(model, trainer_cfg)
    metric = "auc" if config.task == "subtyping" else "c_index"
    fold_results, unrecorded = [], []
    for k, fold in enumerate(folds):
        fold_dir = os.path.join(workdir, f"fold_{k}")
        result_path = os.path.join(fold_dir, "result.json")
        fold_ids = _fold_ids(fold)
        done = _finished_fold(result_path, k, fold_ids, config.data.embeddings)
        if done is not None:
            print(f"hipt-finetune: fold {k}: finished earlier, kept", file=sys.stderr)
            if "bags" not in done:
                _record_bags(result_path, done, identities, _fold_slides(fold_ids, slides_of))
                unrecorded.append(k)
            fold_results.append(done)
            continue
        if os.path.isdir(fold_dir):  # an unfinished or outdated fold: nothing of it is kept
            shutil.rmtree(fold_dir)
        os.makedirs(fold_dir, exist_ok=True)
        train = [by_id[i] for i in fold["train"]]
        test = [by_id[i] for i in fold["test"]]
        val_items = [by_id[i] for i in fold.get("val", [])]
        if not train or not test:
            raise FinetuneError(f"fold {k}: empty train or test set after matching ids to extracted slides")
        # Fresh init per fold (the frozen ViT-4K is the same in every fold).
        fold_vars = _init_variables(model, config, config.seed + 1 + k, grid, in_features)
        if isinstance(model, lgp.HIPTLGP) and config.model.freeze_local:
            fold_vars = lgp.with_pretrained_local(fold_vars, {"params": base_vars["params"]["local_vit"]})
        trainer.cfg.seed = config.seed + k
        with reporting.EpochWriter(os.path.join(fold_dir, "tensorboard")) as writer:
            fit = trainer.train(fold_vars, train, val_items or None,
                                desc=f"fold {k}" if show_progress else None, log=writer)
        use_best = fit.selected_by != "final_epoch" and sel.evaluate == "best"
        params = fit.selected if use_best else fit.final
        test_metrics, preds = trainer.evaluate(params, test)
        evaluated = {"model": "best_val" if use_best else "final_epoch",
                     "epoch": fit.selected_epoch if use_best else fit.last_epoch,
                     "selected_by": fit.selected_by if use_best else "final_epoch",
                     "best_val_epoch": fit.selected_epoch if fit.selected_by != "final_epoch" else None,
                     "last_epoch": fit.last_epoch, "stopped_early": fit.stopped_early}
        if fit.note:
            evaluated["note"] = fit.note
            print(f"hipt-finetune: fold {k}: {fit.note}", file=sys.stderr)
        result = {"fold": k, "n_train": len(train), "n_val": len(val_items), "n_test": len(test),
                  "items": fold_ids,
                  "bags": {s: identities[s] for s in _fold_slides(fold_ids, slides_of) if s in identities},
                  "test": test_metrics, "evaluated": evaluated, "history": fit.history,
                  "predictions": jax.tree.map(lambda a: a.tolist() if hasattr(a, "tolist") else a, preds)}
        if config.task == "subtyping":
            _record_absent_classes(result, k, {"test": test, "val": val_items}, coh.class_names)
        if val_items:
            result["val"] = trainer.evaluate(params, val_items)[0]
            if use_best:  # the final-epoch model on test, for comparison
                result["test_final_epoch"] = trainer.evaluate(fit.final, test)[0]
        meta = {"fold": k, "epoch": evaluated["epoch"], "evaluated": evaluated["model"]}
        _save_checkpoint(os.path.join(fold_dir, "checkpoint"), params, model, config.task, config,
                         in_features, meta)
        if use_best:  # the final-epoch model stays available
            _save_checkpoint(os.path.join(fold_dir, "checkpoint_final"), fit.final, model, config.task,
                             config, in_features, {"fold": k, "epoch": fit.last_epoch, "evaluated": "final_epoch"})
        write_json(result_path, result)  # last: a fold is finished when its result.json exists
        if show_progress:
            print(f"fold {k}: test {metric} {test_metrics[metric]:.4f} ({evaluated['model']}, "
                  f"epoch {evaluated['epoch']})", flush=True)
        fold_results.append(result)
    if unrecorded:
        print(f"hipt-finetune: note: fold(s) {', '.join(map(str, unrecorded))} did not record their bags "
              "(an older version): recorded now as they are; a bag replaced before this run cannot be told "
              "(--overwrite retrains)", file=sys.stderr)
    return _write_results(config, workdir, show_progress, coh, fold_results, len(items), info, failed, plan)


def _write_results(config: ml_collections.ConfigDict, workdir: str, show_progress: bool,
                   coh: cohort_lib.Cohort, fold_results: list[dict], n_items: int, info: dict,
                   failed: dict, plan: cohort_lib.FoldPlan) -> dict:
    """results.json, summary.csv, results.md and the ROC / Kaplan-Meier plot of the folds."""
    frac = float(config.data.get("label_frac", 1.0))
    names = list(fold_results[0]["test"])
    summary = {m: metrics.fold_summary([r["test"][m] for r in fold_results], f"test {m}", sys.stderr)
               for m in names}
    results = {"task": config.task, "model": _model_name(config), "n_items": n_items, "info": info,
               "class_names": coh.class_names,
               "folds": [{"fold": r["fold"], **r["test"],
                          "evaluated": r.get("evaluated", {}).get("model", "final_epoch")} for r in fold_results],
               "summary": summary, "failed_slides": failed, "config": config.to_dict(),
               "folds_source": plan.describe(), "label_frac": frac, "dropped_by_class": coh.dropped,
               "skipped_split_ids": plan.skipped_ids,
               "leaky_patients": {str(k): v for k, v in plan.leaky_patients.items()},
               "patients_from": plan.patients_from or "unknown", "fold_warnings": plan.warnings}
    write_json(os.path.join(workdir, "results.json"), results, indent=1, default=str)
    reporting.write_summary_csv(os.path.join(workdir, "summary.csv"), fold_results)
    table = format_table(results["folds"], names, summary)
    write_text(os.path.join(workdir, "results.md"), table + "\n")
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


def _bag_shape(config, slide_ids: list[str]) -> tuple[int, int]:
    """(side of the ViT-256 feature grid: 16 for 4096 px regions, which sizes the ViT-4K
    pos-embed; instance width of the model's bags) from the first readable labelled slide."""
    emb = config.data.embeddings
    for sid in slide_ids:
        if cohort_lib.bag_file(emb, sid) is not None:
            try:
                bag = read_bag(emb, sid)
            except BagError:
                continue  # recorded as failed by load_items
            name = _model_name(config)
            level = "region" if name == "hipt_lgp" else config.model.bag
            try:
                shape = instance_shape(bag, name, level)  # names what the bag lacks
            except BagError as e:
                raise FinetuneError(f"{cohort_lib.bag_file(emb, sid)}: {e}") from None
            if name != "hipt_lgp" and level == "region":
                feats = bag.get("features_cls256")  # the grid side is unused by these models
                grid = int(round(feats.shape[1] ** 0.5)) if feats is not None and feats.ndim == 3 else 16
                return grid, int(shape[-1])
            feats = bag["features_cls256"]
            return int(round(feats.shape[1] ** 0.5)), int(feats.shape[-1])
    raise FinetuneError(f"{emb}: none of the labelled slides were extracted")


def format_table(rows: list[dict], names: list[str], summary: dict) -> str:
    """Markdown table: one row per fold and a mean +/- std row."""
    lines = ["| fold | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['fold']} | " + " | ".join(f"{r[m]:.4f}" for m in names) + " |")
    lines.append("| mean +/- std | " + " | ".join(metrics.format_mean_std(summary[m]) for m in names) + " |")
    return "\n".join(lines)
