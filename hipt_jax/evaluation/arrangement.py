"""The arrangement cohort: slides whose class is carried only by WHERE two region types lie.

Every slide is an R x C grid of regions, half of type A and half of type B (exactly equal
counts), each region a [192] CLS-4K-like embedding: its type's prototype plus per-region noise.
Class 0 ("clustered"): the A regions fill one side of the slide (split along a random axis, in
a random direction); class 1 ("interleaved"): A and B alternate as a checkerboard. The mean
over regions is (A + B) / 2 + noise in both classes, so mean pooling (HIPT's ``cls4k_mean``
slide embedding) cannot separate them by construction; a slide model that sees region positions
can. Written as hipt-extract bags (EMB/slides/<id>.npz: features_cls4k, slide_embedding (the
mean), coords with patch_size_level0) plus labels.csv (slide_id,label), so every tool runs on it.
"""
from __future__ import annotations

import csv
import os

import numpy as np

from data_prep import bags

REGION_PX = 4096  # level-0 side of a region in the written coordinates
CLASSES = ("clustered", "interleaved")


def region_types(rng: np.random.Generator, rows: int, cols: int, label: int) -> np.ndarray:
    """[rows, cols] 0/1 region types with exactly half ones (rows * cols even)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    if label == 1:
        return ((r + c) % 2).astype(np.int64)                       # checkerboard
    if rng.random() < 0.5:  # split across rows or columns, the A side at random
        order = np.argsort((r * cols + c).ravel(), kind="stable")  # row-major
    else:
        order = np.argsort((c * rows + r).ravel(), kind="stable")  # column-major
    types = np.zeros(rows * cols, np.int64)
    types[order[rows * cols // 2:]] = 1
    types = types.reshape(rows, cols)
    return 1 - types if rng.random() < 0.5 else types


def make_slide(rng: np.random.Generator, prototypes: np.ndarray, label: int, grid_range=(6, 12),
               noise: float = 0.5) -> dict[str, np.ndarray]:
    """One slide's bag arrays (features_cls4k [M,192], slide_embedding [192], coords [M,2])."""
    while True:
        rows, cols = (int(v) for v in rng.integers(grid_range[0], grid_range[1] + 1, size=2))
        if rows * cols % 2 == 0:
            break
    types = region_types(rng, rows, cols, label).ravel()            # [M], row-major cells
    feats = prototypes[types] + noise * rng.standard_normal((rows * cols, prototypes.shape[1]))
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    coords = np.stack([c.ravel(), r.ravel()], axis=1).astype(np.int64) * REGION_PX  # (x, y)
    feats = feats.astype(np.float32)
    return {"features_cls4k": feats, "slide_embedding": feats.mean(axis=0), "coords": coords}


def write_cohort(out_dir: str, n_per_class: int = 20, seed: int = 0, dim: int = 192,
                 grid_range=(6, 12), noise: float = 0.5) -> str:
    """Write the cohort under ``out_dir`` (slides/*.npz + labels.csv); returns labels.csv."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((2, dim)).astype(np.float32)
    rows = []
    for i in range(2 * n_per_class):
        label = i % 2
        sid = f"arr_{i:04d}"
        bags.write_bag(out_dir, sid, make_slide(rng, prototypes, label, grid_range, noise),
                       attrs={"patch_size_level0": REGION_PX, "patch_size": REGION_PX})
        rows.append({"slide_id": sid, "label": CLASSES[label]})
    path = os.path.join(out_dir, "labels.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["slide_id", "label"])
        w.writeheader()
        w.writerows(rows)
    return path
