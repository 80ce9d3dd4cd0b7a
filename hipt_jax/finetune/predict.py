"""Apply a finished hipt-finetune run to slides (`hipt-predict`, command line in
hipt_jax/cli/predict.py).

Every fold's evaluated model (WORKDIR/fold_k/checkpoint: the one its result.json says was
evaluated on test) scores every slide of an embeddings folder (hipt-extract output), one slide
at a time, exactly as the run scored its test slides; the ensemble is the mean over folds of
the class probabilities (subtyping) or of the risk (survival). Survival runs trained on
patients (their slides concatenated); here each slide is scored on its own.

Writes OUT (CSV, one row per slide):
    subtyping: slide_id, fold{k}_p_{class}..., ensemble_p_{class}..., ensemble_pred
    survival:  slide_id, fold{k}_risk..., ensemble_risk
and OUT_attention/<slide_id>.npz with ``attention`` [folds, M] (region bags and HIPT-LGP) or
[folds, M, R*C] (patch bags: one weight per patch of each region), the ensemble mean
``attention_mean`` and the bag's ``coords`` [M,2], for heatmaps.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import sys
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from data_prep import bags
from data_prep.bags import BagError
from hipt_jax.evaluation import cohort as cohort_lib
from hipt_jax.finetune import survival
from hipt_jax.finetune.main import FinetuneError, bag_input, instance_shape
from hipt_jax.finetune.trainer import Item, LGPTrainer, TrainConfig
from hipt_jax.models import checkpoint
from hipt_jax.outputs import atomic_path


def _fold_dirs(run_dir: str) -> list[str]:
    dirs = [d for d in glob.glob(os.path.join(run_dir, "fold_*")) if re.fullmatch(r"fold_\d+", os.path.basename(d))]
    dirs = sorted(dirs, key=lambda d: int(d.rsplit("_", 1)[1]))
    dirs = [d for d in dirs if os.path.isfile(os.path.join(d, "checkpoint", checkpoint.ARCH_FILE))]
    if not dirs:
        raise FinetuneError(f"{run_dir}: no fold_k/checkpoint (not a finished hipt-finetune run)")
    return dirs


def _check_embedding_models(run_dir: str, trained_on: dict, embeddings: str) -> None:
    """Bags extracted with other weights than the run's training bags have the same shape and
    get confident, meaningless scores: a warning naming both when the folders' records differ.
    Not a refusal: the records identify checkpoint FILES (the same weights as a .pth and as its
    converted folder, or converted twice, record differently). A random init on either side
    ("random:tiny:seed0", a smoke-test extraction) is never the other side's weights: refused,
    as bags.extraction_difference refuses it inside one folder."""
    from hipt_jax.finetune.main import embedding_models

    now = embedding_models(embeddings)
    differ = [k for k in trained_on if k in now and now[k] != trained_on[k]]
    changed = [f"{k} {now[k]} (trained on {trained_on[k]})" for k in differ]
    if any(str(now[k]).startswith("random:") or str(trained_on[k]).startswith("random:") for k in differ):
        raise FinetuneError(f"{embeddings}: extracted with other weights than the bags {run_dir} was trained on, "
                            f"one side randomly initialized: {'; '.join(changed)}; extract these slides with the "
                            "run's checkpoints")
    if changed:
        print(f"hipt-predict: warning: {embeddings} was extracted from other checkpoint files than the bags "
              f"{run_dir} was trained on: {'; '.join(changed)}. Unless they hold the same weights (a .pth "
              "and its hipt-convert output, a second conversion), the scores mean nothing", file=sys.stderr)
    elif trained_on and not now:
        print(f"hipt-predict: warning: {embeddings} does not record the weights it was extracted with; "
              f"the run was trained on bags from {trained_on}", file=sys.stderr)


def _run_folds(run_dir: str, info: dict) -> tuple[list[int], list[str]]:
    """(fold numbers, fold folders) of the run: every fold its results.json lists, each with its
    checkpoint. A copy or a run missing one is refused: the ensemble would silently be another
    (and its columns misnamed)."""
    found = {int(os.path.basename(d).rsplit("_", 1)[1]): d for d in _fold_dirs(run_dir)}
    listed = [int(f["fold"]) for f in info.get("folds") or [] if isinstance(f, dict) and "fold" in f]
    missing = [k for k in listed if k not in found]
    if missing:
        raise FinetuneError(f"{run_dir}: results.json lists folds {listed}, but "
                            f"{', '.join(f'fold_{k}/checkpoint' for k in missing)} is missing "
                            "(an unfinished run, or an incomplete copy)")
    numbers = listed or sorted(found)
    return numbers, [found[k] for k in numbers]


def _run_info(run_dir: str) -> dict:
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise FinetuneError(f"{path}: not found (not a finished hipt-finetune run)")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise FinetuneError(f"{path}: unreadable ({e})") from None
    # The task decides what the scores mean (class probabilities or a risk): a file that does
    # not say it (edited by hand, or not hipt-finetune's) failed later naming neither.
    task = info.get("task") if isinstance(info, dict) else None
    if task not in ("subtyping", "survival"):
        raise FinetuneError(f"{path}: no task 'subtyping' or 'survival' (task {task!r}): not a "
                            "hipt-finetune results file")
    return info


class FoldModel:
    """One fold's saved model and a trainer that scores bags with it."""

    def __init__(self, path: str, task: str, buckets):
        try:
            loaded = checkpoint.load(path)
        except checkpoint.CheckpointError as e:
            if "damaged checkpoint" not in str(e):
                raise
            run_dir = os.path.dirname(os.path.dirname(path))  # RUN/fold_k/checkpoint
            raise checkpoint.CheckpointError(f"{e}; rerun hipt-finetune on the run folder ({run_dir}, same "
                                             "config) to redo the fold") from None
        self.module, self.params = loaded.module(), loaded.params
        self.n_outputs = loaded.config.get("n_classes")
        self.level = loaded.config.get("bag", "region") if loaded.kind == "mil" else "region"
        self.trainer = LGPTrainer(self.module, TrainConfig(task=task, buckets=tuple(buckets)))

    def score(self, slide_id: str, bag: dict) -> tuple[np.ndarray, np.ndarray]:
        """(logits [K], attention [M_instances])."""
        x = bag_input(self.module, {"params": self.params}, bag, self.level, self.trainer.cfg.buckets)
        logits, _, attention = self.trainer.predict_with_attention(self.params, [Item(slide_id, x)])
        return logits[0], attention[0]


def predict_run(run_dir: str, embeddings: str, out_csv: str, show_progress: bool = True,
                slide_ids: Optional[list[str]] = None) -> dict:
    """Score the slides of ``embeddings`` (all, or ``slide_ids``) with every fold of ``run_dir``;
    returns {"n_slides", "folds", "failed_slides": {slide_id: error}, "out", "attention_dir"}."""
    info = _run_info(run_dir)
    task, class_names = info.get("task"), info.get("class_names") or []
    buckets = info.get("config", {}).get("train", {}).get("buckets") or (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    numbers, dirs = _run_folds(run_dir, info)
    folds = [FoldModel(os.path.join(d, "checkpoint"), task, buckets) for d in dirs]
    if task != "survival" and class_names and folds[0].n_outputs not in (None, len(class_names)):
        raise FinetuneError(f"{os.path.join(run_dir, 'results.json')}: {len(class_names)} class names "
                            f"{class_names} for a {folds[0].n_outputs}-class model")
    expected = (info.get("info") or {}).get("instance_shape")  # absent in runs before it was recorded
    geometry = (info.get("info") or {}).get("embedding_geometry") or {}  # likewise
    _check_embedding_models(run_dir, (info.get("info") or {}).get("embedding_models") or {}, embeddings)
    available = bags.list_bags(embeddings)
    if not available:
        raise FinetuneError(f"{embeddings}: no extracted slides (expected hipt-extract output with slides/)")
    ids = list(available) if slide_ids is None else [s for s in slide_ids if s in available]
    seen = _seen_in_training(run_dir, info, numbers, ids)
    if seen:
        first = next(iter(seen))
        print(f"hipt-predict: warning: {len(seen)} of the {len(ids)} slide(s) in {embeddings} were in the "
              f"training or validation part of folds of {run_dir} (e.g. {first}: fold(s) "
              f"{', '.join(map(str, seen[first]))}): those folds' scores and the ensemble's are not held-out "
              f"predictions for them (column {SEEN_COLUMN})", file=sys.stderr)
    att_dir = os.path.splitext(out_csv)[0] + "_attention"
    os.makedirs(att_dir, exist_ok=True)
    rows, failed = [], {}
    for sid in tqdm(ids, desc="predict", disable=not show_progress, dynamic_ncols=True):
        try:
            bag = bags.read_bag(embeddings, sid)
            _check_geometry(available[sid], geometry)
            scores = _score(folds, sid, bag, available[sid], info.get("model"), expected)
        except BagError as e:
            failed[sid] = str(e)
            print(f"hipt-predict: {e}", file=sys.stderr)
            continue
        logits = np.stack([s[0] for s in scores])  # [folds,K]
        attention = np.stack([s[1] for s in scores])  # [folds,M] or [folds,M*R*C]
        # regions in the bag: TRIDENT-style h5 bags hold CLS-4K features (and coords) alone
        m = len(next(bag[k] for k in ("features_cls256", "features_cls4k", "coords") if k in bag))
        attention = attention.reshape((len(folds), m, -1)) if attention.shape[1] != m else attention
        with atomic_path(os.path.join(att_dir, sid + ".npz")) as tmp, open(tmp, "wb") as f:
            np.savez(f, attention=attention, attention_mean=attention.mean(0),
                     coords=bag.get("coords", np.zeros((m, 2), np.int64)))
        rows.append(_row(sid, logits, task, class_names, numbers))
        if seen is not None:
            rows[-1][SEEN_COLUMN] = " ".join(map(str, seen.get(sid, [])))
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["slide_id"])
        w.writeheader()
        w.writerows(rows)
    scored = {r["slide_id"] for r in rows}
    for name in os.listdir(att_dir):  # an earlier run's maps of slides not in this CSV
        if name.endswith(".npz") and name[:-len(".npz")] not in scored:
            os.remove(os.path.join(att_dir, name))
    return {"n_slides": len(rows), "folds": len(folds), "failed_slides": failed, "out": out_csv,
            "attention_dir": att_dir, "seen_in_training": {s: f for s, f in (seen or {}).items() if s in scored}}


SEEN_COLUMN = "in_training_of_folds"


def _seen_in_training(run_dir: str, info: dict, numbers: list[int], slide_ids: list[str]) -> Optional[dict]:
    """slide id -> the folds whose training or validation part held that slide (or its patient:
    survival splits list case ids), read from the split files the run wrote (WORKDIR/splits/);
    None when the run has none. Scoring the run's own cohort is legitimate for a fold's test
    part, but the other folds (and the ensemble) were fit on those slides: their scores look
    like held-out predictions and are not."""
    try:
        folds = cohort_lib.read_clam_splits(os.path.join(run_dir, "splits"))
    except cohort_lib.CohortError:
        return None
    patient_of = _patients_of(info)
    fitted = {k: {*folds[k]["train"], *folds[k]["val"]} for k in numbers if k < len(folds)}
    out = {}
    for sid in slide_ids:
        keys = {sid, patient_of.get(sid, sid)}
        if (m := cohort_lib.TCGA_SLIDE.match(sid)):
            keys.add(m.group(1).upper())
        hit = [k for k, ids in fitted.items() if keys & ids]
        if hit:
            out[sid] = hit
    return out


def _patients_of(info: dict) -> dict[str, str]:
    """slide id -> case id from the run's labels CSV when it is still there and has a case_id
    column ({} otherwise: slides are then matched by their own id and TCGA barcode)."""
    labels = ((info.get("config") or {}).get("data") or {}).get("labels")
    try:
        rows = cohort_lib.read_csv_rows(labels, "labels") if labels else []
        return {cohort_lib.normalize_id(r["slide_id"], labels): cohort_lib.normalize_id(r["case_id"], labels)
                for r in rows if (r.get("slide_id") or "").strip() and (r.get("case_id") or "").strip()}
    except cohort_lib.CohortError:
        return {}


def _geometry_text(geometry: dict) -> str:
    return ", ".join(f"{k} {geometry[k]}" for k in ("region_px", "target_mpp") if k in geometry)


def _check_geometry(path: str, trained: dict) -> None:
    """BagError naming the bag when it records another region size or resolution than the run's
    training bags. The instance shape cannot tell: CLS-4K is [192] for a 2048 px region or a
    10x one alike, and such bags were scored with exit 0. Bags or runs that record nothing
    cannot be checked (bags.check_extraction notes unrecorded bags)."""
    if not trained:
        return
    now = bags.geometry_of(bags.extraction_of(path))
    differ = [k for k in trained if k in now and not np.isclose(float(now[k]), float(trained[k]), rtol=1e-6)]
    if differ:
        raise BagError(f"{path}: extracted at {_geometry_text(now)}, but this run was trained on bags extracted "
                       f"at {_geometry_text(trained)}: re-extract these slides at the run's region size and resolution")


def _score(folds: list[FoldModel], sid: str, bag: dict, path: str, model_name, expected) -> list:
    """Every fold's (logits, attention) for one bag; BagError naming the file when the bag's
    instances are not the ones the run was trained on (another region size, feature width or
    backbone) or the model cannot take them."""
    if expected is not None:
        try:
            shape = instance_shape(bag, model_name, folds[0].level)
        except BagError as e:
            raise BagError(f"{path}: {e}") from None
        if list(shape) != list(expected):
            raise BagError(f"{path}: instances {tuple(shape)}, but this run was trained on "
                           f"{tuple(expected)}: extracted with another region size or backbone")
    try:
        return [f.score(sid, bag) for f in folds]
    except Exception as e:  # noqa: BLE001 - one slide's failure is reported, the rest are scored
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        shapes = {k: tuple(v.shape) for k, v in bag.items() if k.startswith("features")}
        raise BagError(f"{path}: this run's model cannot score the bag {shapes} "
                       f"({type(e).__name__}: {first[:300]})") from None


def _row(slide_id: str, logits: np.ndarray, task: str, class_names: list[str], numbers: list[int]) -> dict:
    """One CSV row; columns are named after the run's fold numbers (``numbers``, one per row of
    ``logits``)."""
    row: dict = {"slide_id": slide_id}
    if task == "survival":
        risk = np.asarray(survival.risk_score(logits))  # [folds]
        row.update({f"fold{k}_risk": float(r) for k, r in zip(numbers, risk)})
        row["ensemble_risk"] = float(risk.mean())
        return row
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)  # [folds,K]
    names = class_names or [str(c) for c in range(probs.shape[1])]  # checked against the model above
    for k, p in zip(numbers, probs):
        row.update({f"fold{k}_p_{n}": float(v) for n, v in zip(names, p)})
    mean = probs.mean(0)
    row.update({f"ensemble_p_{n}": float(v) for n, v in zip(names, mean)})
    row["ensemble_pred"] = names[int(mean.argmax())]
    return row
