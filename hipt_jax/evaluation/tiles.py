"""Labelled tile datasets for patch-level evaluation (CRC-100K, BCSS, BreastPathQ-style).

Three layouts are read:
- ImageFolder: ``DIR/<class>/*.png|jpg|jpeg|tif|tiff`` (no split: a seeded stratified split
  makes the test part, see ``split_tiles``);
- ``DIR/train/<class>/...`` + ``DIR/test/<class>/...`` (and optionally ``DIR/val/<class>``);
- a CSV with columns ``path,label[,split]`` (paths relative to the CSV's folder; split one of
  train/val/test; without the column the seeded split is used).

Classes are the sorted unique label strings. ``label_fraction`` keeps a seeded, per-class
fraction of the TRAIN tiles (ceil, so at least one per class), as in the few-label protocol.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys

import numpy as np

from data_prep import csv_table

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


class TileDatasetError(ValueError):
    """Bad tile dataset (message names the folder or file and the problem)."""


@dataclasses.dataclass
class TileSet:
    paths: list[str]
    labels: np.ndarray          # int [N]
    splits: np.ndarray          # str [N] in SPLITS
    class_names: list[str]

    def select(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


def _visible(name: str) -> bool:
    """Hidden entries are not data: macOS's AppleDouble "._x.png" files (not images: they failed
    the run), "__MACOSX" folders of unzipped archives and dot-folders (both became classes)."""
    return not name.startswith(".") and name != "__MACOSX"


def _subfolders(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if _visible(d) and os.path.isdir(os.path.join(root, d)))


def _images_in(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if _visible(f) and f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(folder, f)))


def _class_folders(root: str) -> dict[str, list[str]]:
    classes = {c: _images_in(os.path.join(root, c)) for c in _subfolders(root)}
    for c, files in classes.items():
        if not files:  # said: a class the user expects must not vanish from the table unnoticed
            print(f"{os.path.join(root, c)}: class folder without tiles ({', '.join(IMAGE_EXTS)}); "
                  "left out", file=sys.stderr)
    return {c: files for c, files in classes.items() if files}


def _read_folder(root: str) -> tuple[list[str], list[str], list[str]]:
    subdirs = set(_subfolders(root))
    if {"train", "test"} <= subdirs:
        parts = [s for s in SPLITS if s in subdirs]
    else:
        parts = [None]
    paths, labels, splits = [], [], []
    for part in parts:
        base = os.path.join(root, part) if part else root
        for cls, files in _class_folders(base).items():
            paths += files
            labels += [cls] * len(files)
            splits += [part or ""] * len(files)
    return paths, labels, splits


def _read_csv(path: str) -> tuple[list[str], list[str], list[str]]:
    rows = csv_table.read_rows(path, "CSV", TileDatasetError)[1]
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise TileDatasetError(f"{path}: expected a header with columns path,label[,split]")
    base = os.path.dirname(os.path.abspath(path))
    paths = [os.path.join(base, r["path"].strip()) for r in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise TileDatasetError(f"{path}: {len(missing)} listed tile(s) do not exist, e.g. {missing[0]}")
    splits = [(r.get("split") or "").strip() for r in rows]
    bad = sorted({s for s in splits if s and s not in SPLITS})
    if bad:
        raise TileDatasetError(f"{path}: unknown split value(s) {bad}; use train/val/test")
    labels = [(r["label"] or "").strip() for r in rows]
    from hipt_jax.evaluation.cohort import is_missing

    missing = [(n, v) for n, v in enumerate(labels, start=2) if is_missing(v)]
    if missing:
        n, v = missing[0]
        raise TileDatasetError(f"{path}: line {n}: label {v!r} is empty or a missing value "
                               f"({len(missing)} such line(s)); label every tile or leave it out")
    return paths, labels, splits


def _check_unique(source: str, paths: list[str], names: list[str], splits: list[str]) -> None:
    """A tile listed twice (or reached twice through a link) would sit on both sides of a split,
    or count twice, and inflate every score: refused, naming the tile and its entries."""
    seen: dict[str, int] = {}
    for i, p in enumerate(paths):
        key = os.path.realpath(p)
        if key in seen:
            j = seen[key]
            where = lambda k: f"label {names[k]!r}" + (f", split {splits[k]}" if splits[k] else "")  # noqa: E731
            raise TileDatasetError(
                f"{source}: tile {p} is listed more than once ({where(j)}; {where(i)}); "
                "list every tile once")
        seen[key] = i


def split_tiles(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Seeded stratified train/test assignment (str [N]); at least one test tile per class
    that has two or more tiles."""
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), "train", dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx))) if len(idx) > 1 else 0
        n_test = min(max(n_test, 1 if len(idx) > 1 else 0), len(idx) - 1)
        out[idx[:n_test]] = "test"
    return out.astype(str)


def subsample_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices (sorted) of a seeded per-class ``fraction`` of ``labels``: ceil(fraction * n) of
    a class of n (so at least one), as CLAM and the slide/patient-level fraction
    (cohort.apply_label_frac) round; round() would keep 2 of 10 at 0.25."""
    if not 0 < fraction <= 1:
        raise TileDatasetError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, max(1, math.ceil(fraction * len(idx) - 1e-9)), replace=False))
    return np.sort(np.concatenate(keep))


def read_tiles(source: str, *, test_fraction: float = 0.3, seed: int = 0,
               label_fraction: float = 1.0) -> TileSet:
    """The tile dataset at ``source`` (folder or CSV), with every tile assigned to a split."""
    if csv_table.is_table(source):
        paths, names, splits = _read_csv(source)
    elif os.path.isdir(source):
        paths, names, splits = _read_folder(source)
    else:
        raise TileDatasetError(f"{source}: not a tile folder or a table of tiles (.csv, .tsv, .txt)")
    if not paths:
        raise TileDatasetError(f"{source}: no tiles ({', '.join(IMAGE_EXTS)}) in class folders")
    _check_unique(source, paths, names, splits)
    class_names = sorted(set(names))
    if len(class_names) < 2:
        raise TileDatasetError(f"{source}: needs at least 2 classes, found {class_names}")
    labels = np.array([class_names.index(n) for n in names])
    splits = np.array(splits, dtype=object)
    if (splits == "").all():
        splits = split_tiles(labels, test_fraction, seed).astype(object)
    elif (splits == "").any():
        raise TileDatasetError(f"{source}: give a split for every tile or for none")
    splits = splits.astype(str)
    if not (splits == "train").any() or not (splits == "test").any():
        raise TileDatasetError(f"{source}: needs both train and test tiles")
    trained = sorted({class_names[c] for c in labels[splits == "train"]})
    if len(trained) < 2:  # nothing to tell apart: the probe could not be fitted, every KNN vote is one class
        raise TileDatasetError(f"{source}: the train split holds only class {trained[0]!r} (of {class_names}); "
                               "train needs tiles of at least 2 classes")
    train = np.flatnonzero(splits == "train")
    kept = train[subsample_fraction(labels[train], label_fraction, seed)]
    dropped = np.setdiff1d(train, kept)
    keep_mask = np.ones(len(paths), bool)
    keep_mask[dropped] = False
    idx = np.flatnonzero(keep_mask)
    return TileSet([paths[i] for i in idx], labels[idx], splits[idx], class_names)
