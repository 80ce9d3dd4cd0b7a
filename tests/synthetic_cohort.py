"""Small synthetic cohorts with a learnable signal, for the evaluation/finetune tests.

Two ways in:
- ``make_tissue_cohort``: region shards (hipt-prep layout, PREP/regions/<slide_id>.array_record)
  of real tissue crops of the CMU test slide, stain-perturbed per class (class 1 looks bluer),
  with per-slide stain jitter, random crop positions and flips. Goes through JPEG and extraction.
- ``make_feature_cohort``: hipt-extract output folders written directly (EMB/slides/<id>.npz)
  with [M, R*C, 384] features whose mean is shifted along a class direction; fast enough for
  survival and shuffled-label runs on hundreds of items.
"""
from __future__ import annotations

import csv
import os

import numpy as np

from data_prep import bags, shards
from data_prep.synth import _source_pixels, stain_perturb
from tests.shards import write_shard

CLASS_STAINS = ((1.0, 1.0, 1.0), (1.45, 0.7, 1.0))


def tissue_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random size x size crop of the dense tissue of the real slide (mirrored if needed)."""
    src = _source_pixels(True)  # [H,W,3] uint8
    h, w, _ = src.shape
    y, x = rng.integers(0, max(1, h - size)), rng.integers(0, max(1, w - size))
    crop = np.pad(src[y:y + size, x:x + size], ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)),
                  mode="reflect")[:size, :size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(np.rot90(crop, rng.integers(4)))


def write_region_shard(prep_dir: str, slide_id: str, images: list[np.ndarray]) -> str:
    """Region shard in hipt-prep's layout and schema (data_prep.shards.REGION)."""
    path = os.path.join(prep_dir, "regions", slide_id + ".array_record")
    return write_shard(path, (shards.REGION.encode(
        image_jpeg=shards.encode_jpeg(img), slide_id=slide_id, x=i * img.shape[1], y=0, level=0,
        read_px=img.shape[0], mpp=0.5, region_px=img.shape[0], tissue_fraction=1.0, index=i)
        for i, img in enumerate(images)))


def write_feature_grids(folder, n: int, seed: int = 0):
    """``n`` stage-2 pretraining inputs in ``folder`` (created): r{i}.npy, [256, 384] ViT-256
    feature grids of random numbers. Returns the folder."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.save(os.path.join(folder, f"r{i}.npy"), rng.normal(size=(256, 384)).astype(np.float32))
    return folder


def write_labels(path: str, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def make_tissue_cohort(root: str, n_per_class: int = 10, regions=(1, 3), size: int = 512,
                       seed: int = 0) -> tuple[str, list[dict]]:
    """-> (prep_dir with region shards, label rows [{slide_id, label}])."""
    rng = np.random.default_rng(seed)
    prep = os.path.join(root, "prep")
    rows = []
    for c, stain in enumerate(CLASS_STAINS):
        for i in range(n_per_class):
            sid = f"c{c}_s{i:03d}"
            gains = np.asarray(stain) * rng.uniform(0.93, 1.07, 3)
            m = int(rng.integers(regions[0], regions[1] + 1))
            write_region_shard(prep, sid, [stain_perturb(tissue_crop(rng, size), gains) for _ in range(m)])
            rows.append({"slide_id": sid, "label": ["typeA", "typeB"][c]})
    return prep, rows


# What hipt-extract --random-init tiny records in each bag (data_prep.bags.check_extraction).
MADE_BY = {"vit256": "random:tiny:seed0", "vit4k": "random:tiny:seed0", "region_px": 4096, "target_mpp": 0.5}


def write_embedding(emb_dir: str, slide_id: str, features_cls256: np.ndarray) -> None:
    """One slide in hipt-extract's output layout (slide_embedding = feature mean stand-in)."""
    m = len(features_cls256)
    bags.write_bag(emb_dir, slide_id, dict(
        features_cls256=features_cls256, features_cls4k=np.zeros((m, 192), np.float32),
        slide_embedding=features_cls256.mean(axis=(0, 1))[:192].astype(np.float32),
        coords=np.zeros((m, 2), np.int64)), made_by=MADE_BY)


def zero_padded_cohort(emb_dir: str, n: int) -> list[dict]:
    """Bags 001..009, then 100, 110, ... (ids with and without leading zeros), two classes; the
    label rows as a spreadsheet would save them: the zeros lost ('1' for bag 001)."""
    rng, rows = np.random.default_rng(0), []
    for i in range(1, n + 1):
        sid = f"{i:03d}" if i < 10 else str(i * 10)
        write_embedding(emb_dir, sid, (rng.normal(size=(2, 4, 384)) + i % 2).astype(np.float32))
        rows.append({"slide_id": str(int(sid)), "label": "ab"[i % 2]})
    return rows


def padded_id_cohort(root, n: int) -> tuple[str, list[str], str]:
    """Bags 001..n (two classes, learnable) in ROOT/emb and their labels, zeros kept, in
    ROOT/labels.csv -> (emb, ids, labels): for split files that lose the zeros."""
    rng, emb = np.random.default_rng(0), os.path.join(str(root), "emb")
    ids = [f"{i:03d}" for i in range(1, n + 1)]
    for i, sid in enumerate(ids):
        write_embedding(emb, sid, (rng.normal(size=(2, 4, 384)) + i % 2).astype(np.float32))
    labels = write_labels(os.path.join(str(root), "labels.csv"), [{"slide_id": s, "label": "ab"[i % 2]}
                                                                   for i, s in enumerate(ids)])
    return emb, ids, labels


def make_feature_cohort(emb_dir: str, n_items: int, n_classes: int = 2, grid: int = 2,
                        regions=(2, 6), signal: float = 1.0, seed: int = 0,
                        classes: np.ndarray | None = None) -> np.ndarray:
    """Write ``n_items`` slides slide_{i:04d}; features ~ N(0,1) + signal * class direction.
    ``classes`` fixes the class of every slide (default: balanced, shuffled). Returns them."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_classes, 384)).astype(np.float32)
    if classes is None:
        classes = np.arange(n_items) % n_classes
        rng.shuffle(classes)
    for i, c in enumerate(classes):
        m = int(rng.integers(regions[0], regions[1] + 1))
        feats = rng.normal(size=(m, grid * grid, 384)).astype(np.float32) + signal * directions[c]
        write_embedding(emb_dir, f"slide_{i:04d}", feats)
    return classes


def small_labelled_feature_cohort(root) -> tuple[str, str]:
    """6 extracted slides (2 classes, 2x2 grids, 1-2 regions) and their labels CSV under root:
    hipt-knn / hipt-finetune input for the bad-input tests."""
    emb = os.path.join(str(root), "emb")
    classes = make_feature_cohort(emb, 6, grid=2, regions=(1, 2))
    labels = write_labels(os.path.join(str(root), "labels.csv"),
                          [{"slide_id": f"slide_{i:04d}", "label": f"t{c}"} for i, c in enumerate(classes)])
    return emb, labels
