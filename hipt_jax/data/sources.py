"""Grain data sources over the ArrayRecord shards written by `hipt-prep` (data_prep.shards).

Each source is a plain random-access source (`__len__`, `__getitem__` -> dict of numpy arrays and
str), so it plugs into `grain.DataLoader`, `grain.MapDataset.source(...)` or a hand-written loop:

    src = RegionSource("OUT")                 # OUT/regions/*.array_record
    src[0]["image"].shape                     # (4096, 4096, 3) uint8
    loader = make_loader(FeatureSource("FEATS"), batch_size=64, seed=0)
    it = iter(loader); batch = next(it); state = it.get_state()   # checkpointable position

Sources accept whatever data_prep.shards.find_shards does (a shard, a glob, a folder, a hipt-prep
output folder, a manifest.json, a list). The keys of an element are the example fields of the
record kind's table in data_prep.shards.

`make_loader` shards records by JAX process (each host reads a disjoint part), shuffles with a
seed per epoch, batches, and exposes Grain's iterator state for checkpoint/resume.
"""
from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from data_prep import shards


class RegionSource(shards.RecordSource):
    """Region records -> dict(image uint8 [S,S,3], slide_id, x, y, level, read_px, mpp, region_px,
    tissue_fraction, region_index).

    The record's `index` (position within its slide) is returned as `region_index`, leaving the
    key `index` to pipelines that tag elements with their global position.
    """

    def __init__(self, paths: str | Sequence[str]):
        super().__init__(paths, shards.REGION)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = super().__getitem__(index)
        example["region_index"] = example.pop("index")
        return example


class PatchSource(shards.RecordSource):
    """Patch records -> dict(image uint8 [P,P,3], slide_id, x, y, region_x, region_y, row, col,
    mpp, tissue_fraction)."""

    def __init__(self, paths: str | Sequence[str]):
        super().__init__(paths, shards.PATCH)


class FeatureSource(shards.RecordSource):
    """Feature records -> dict(features float32 [R*C,384] (or [R,C,384] with as_grid=True),
    grid int32 [2], slide_id, x, y, mpp, region_px)."""

    def __init__(self, paths: str | Sequence[str], as_grid: bool = False):
        super().__init__(paths, shards.FEATURE)
        self.as_grid = as_grid

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = super().__getitem__(index)  # features [R*C, D]: token i*C+j = grid row i, col j
        if self.as_grid:
            rows, cols = example["grid"]
            # [R*C,D] -> [R,C,D] (row-major)
            example["features"] = example["features"].reshape(rows, cols, -1)
        return example

    def slide_index(self) -> dict[str, list[int]]:
        """slide_id -> record indices of its regions (in shard order)."""
        index: dict[str, list[int]] = {}
        for i in range(len(self)):
            index.setdefault(self.raw(i)["slide_id"], []).append(i)
        return index

    def slide_bag(self, indices: Sequence[int]) -> np.ndarray:
        """Stack the regions of one slide: [M, R*C, 384] float32 (input of slide models)."""
        return np.stack([self[i]["features"] for i in indices])


def shard_options(shard_by_process: bool = True, drop_remainder: bool = True):
    """Grain shard options: one disjoint shard per JAX process (or none)."""
    if shard_by_process:
        return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    return grain.sharding.NoSharding()


def make_loader(source, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None, operations: Sequence = (), worker_count: int = 0,
                shard_by_process: bool = True, drop_remainder: bool = True) -> grain.DataLoader:
    """A Grain DataLoader over `source`: per-process shard, seeded shuffle, batches.

    `batch_size` is per process. `operations` (Grain transforms, e.g. augmentations) run before
    batching. Iterate with `it = iter(loader)`; `it.get_state()` / `it.set_state(state)`
    checkpoint and restore the exact position (also through orbax via grain.checkpoint).
    """
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard_options(shard_by_process, drop_remainder),
        shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    ops = list(operations) + [grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                            worker_count=worker_count)


def make_iter_dataset(source, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                      num_epochs: int | None = None, shard_by_process: bool = True,
                      drop_remainder: bool = True) -> grain.IterDataset:
    """The same pipeline with Grain's dataset API (for users who compose MapDataset/IterDataset)."""
    import jax

    ds = grain.MapDataset.source(source)
    if shard_by_process:
        ds = ds[jax.process_index()::jax.process_count()]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    return ds.to_iter_dataset().batch(batch_size, drop_remainder=drop_remainder)
