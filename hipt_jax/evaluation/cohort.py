"""Cohort tables: slide labels, survival columns, and cross-validation splits.

Labels CSV (one row per slide; extra columns are ignored):
    slide_id,label[,case_id][,survival_months,censorship]
``label`` may be any strings (classes are their sorted unique values) or integers 0..K-1.
``censorship`` follows CLAM/MCAT: 1 = censored (no event observed), 0 = event.

Splits: either a directory of CLAM split files ``splits_{i}.csv`` (columns train, val, test,
each a list of slide ids; shorter columns padded with empty cells), or ``kfold:K`` for a seeded
stratified K-fold generated here (test = one fold, train = the rest, no val).
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import os
import re
from typing import Optional, Sequence

import numpy as np


class CohortError(ValueError):
    """Bad cohort input (message names the file and the problem)."""


@dataclasses.dataclass
class Cohort:
    slide_ids: list[str]
    labels: np.ndarray                 # int [N] class index ("" -> -1 when only survival is given)
    class_names: list[str]
    case_ids: list[str]                # = slide_ids when the CSV has no case_id column
    times: Optional[np.ndarray] = None     # survival_months [N] float
    censored: Optional[np.ndarray] = None  # bool [N], True = censored


def read_labels_csv(path: str, require_survival: bool = False) -> Cohort:
    """Parse the labels CSV described in the module docstring."""
    if not os.path.isfile(path):
        raise CohortError(f"{path}: labels file not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise CohortError(f"{path}: no rows")
    cols = set(rows[0])
    need = {"slide_id"} | ({"survival_months", "censorship"} if require_survival else {"label"})
    if need - cols:
        raise CohortError(f"{path}: missing column(s) {sorted(need - cols)}; has {sorted(cols)}")
    ids = [r["slide_id"].strip() for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise CohortError(f"{path}: duplicate slide_id(s) {dup}")
    labels, class_names = np.full(len(rows), -1), []
    if "label" in cols:
        raw = [r["label"].strip() for r in rows]
        if all(re.fullmatch(r"-?\d+", v) for v in raw):
            labels = np.array([int(v) for v in raw])
            class_names = [str(c) for c in range(int(labels.max()) + 1)]
        else:
            class_names = sorted(set(raw))
            labels = np.array([class_names.index(v) for v in raw])
    case_ids = [r.get("case_id", "").strip() or r["slide_id"].strip() for r in rows]
    times = censored = None
    if {"survival_months", "censorship"} <= cols:
        try:
            times = np.array([float(r["survival_months"]) for r in rows])
            censored = np.array([int(float(r["censorship"])) for r in rows]) == 1
        except ValueError as e:
            raise CohortError(f"{path}: survival_months/censorship must be numbers ({e})") from None
    return Cohort(ids, labels, class_names, case_ids, times, censored)


def read_clam_splits(directory: str) -> list[dict[str, list[str]]]:
    """splits_0.csv, splits_1.csv, ... -> [{"train": [...], "val": [...], "test": [...]}, ...]."""
    files = glob.glob(os.path.join(directory, "splits_*.csv"))
    numbered = sorted((int(m.group(1)), f) for f in files
                      if (m := re.fullmatch(r"splits_(\d+)\.csv", os.path.basename(f))))
    if not numbered:
        raise CohortError(f"{directory}: no splits_{{i}}.csv files")
    folds = []
    for _, f in numbered:
        with open(f, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "train" not in rows[0] or "test" not in rows[0]:
            raise CohortError(f"{f}: expected columns train, val, test")
        folds.append({part: [r[part].strip() for r in rows if r.get(part, "") and r[part].strip()]
                      for part in ("train", "val", "test")})
    return folds


def stratified_kfold(ids: Sequence[str], strata: Sequence, k: int, seed: int) -> list[dict[str, list[str]]]:
    """Seeded stratified K-fold over ``ids`` (scikit-learn's StratifiedKFold with shuffling)."""
    from sklearn.model_selection import StratifiedKFold

    ids = list(ids)
    strata = np.asarray(strata)
    counts = np.unique(strata, return_counts=True)[1]
    if k < 2 or len(ids) < k:
        raise CohortError(f"cannot make {k} folds from {len(ids)} items")
    if counts.min() < k:  # a stratum smaller than k: fall back to class-level strata
        raise CohortError(f"a class/stratum has only {counts.min()} member(s), fewer than {k} folds")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [{"train": [ids[i] for i in tr], "val": [], "test": [ids[i] for i in te]}
            for tr, te in skf.split(np.zeros(len(ids)), strata)]


def resolve_splits(spec: str, ids: Sequence[str], strata: Sequence, seed: int = 0) -> list[dict[str, list[str]]]:
    """``spec`` = a CLAM split directory or ``kfold:K``; ids absent from ``ids`` are an error."""
    if re.fullmatch(r"kfold:\d+", spec or ""):
        return stratified_kfold(ids, strata, int(spec.split(":")[1]), seed)
    if not spec or not os.path.isdir(spec):
        raise CohortError(f"{spec!r}: splits must be a directory of splits_{{i}}.csv or 'kfold:K'")
    folds = read_clam_splits(spec)
    known = set(ids)
    for i, fold in enumerate(folds):
        unknown = [s for part in fold.values() for s in part if s not in known]
        if unknown:
            raise CohortError(f"{spec}/splits_{i}.csv: ids not in the cohort: {unknown[:5]}")
        leak = set(fold["train"]) & set(fold["test"])
        if leak:
            raise CohortError(f"{spec}/splits_{i}.csv: ids in both train and test: {sorted(leak)[:5]}")
    return folds
