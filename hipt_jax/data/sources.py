"""Grain data sources over the ArrayRecord shards written by `hipt-prep` (schema: data_prep.records).

Each source is a plain random-access source (`__len__`, `__getitem__` -> dict of numpy arrays and
str), so it plugs into `grain.DataLoader`, `grain.MapDataset.source(...)` or a hand-written loop:

    src = RegionSource("OUT")                 # OUT/regions/*.array_record
    src[0]["image"].shape                     # (4096, 4096, 3) uint8
    loader = make_loader(FeatureSource("FEATS"), batch_size=64, seed=0)
    it = iter(loader); batch = next(it); state = it.get_state()   # checkpointable position

`make_loader` shards records by JAX process (each host reads a disjoint part), shuffles with a
seed per epoch, batches, and exposes Grain's iterator state for checkpoint/resume.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Sequence

import grain
import numpy as np

from data_prep import records

SHARD_EXT = ".array_record"


def resolve_shards(paths: str | Sequence[str], kind: str | None = None) -> list[str]:
    """Shard files from a file, a glob, a folder, or a hipt-prep output folder (OUT/<kind>/).

    The result is sorted, so record indices are stable across processes and runs.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for p in items:
        p = os.fspath(p)
        if os.path.isdir(p):
            sub = os.path.join(p, kind) if kind else None
            folder = sub if sub and os.path.isdir(sub) else p
            out.extend(sorted(glob.glob(os.path.join(folder, "*" + SHARD_EXT))))
        elif any(ch in p for ch in "*?["):
            out.extend(sorted(glob.glob(p)))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such shard file or folder")
    if not out:
        raise FileNotFoundError(f"{paths}: no *{SHARD_EXT} shards found")
    return sorted(set(out), key=out.index)


class _ShardSource:
    """Random access over the records of some shards; subclasses decode one record."""

    kind: str = ""
    schema: str = ""

    def __init__(self, paths: str | Sequence[str]):
        self.paths = resolve_shards(paths, self.kind)
        self._source = None

    def _records(self):
        # Opened lazily so the source pickles cheaply into Grain worker processes.
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def __len__(self) -> int:
        return len(self._records())

    def raw(self, index: int) -> dict[str, Any]:
        """The undecoded record map (JPEG bytes and all)."""
        rec = records.unpack(self._records()[index])
        if rec["schema"] != self.schema:
            raise ValueError(f"record {index} has schema {rec['schema']!r}, expected {self.schema!r} "
                             f"(wrong shard folder for {type(self).__name__}?)")
        return rec

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.decode(self.raw(int(index)))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def decode(self, rec: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __getstate__(self):
        return {"paths": self.paths, "_source": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.paths)} shards)"


class RegionSource(_ShardSource):
    """Region records -> dict(image uint8 [S,S,3], slide_id, x, y, level, read_px, mpp, region_px,
    tissue_fraction, region_index).

    The record's `index` (position within its slide) is returned as `region_index`, leaving the
    key `index` to pipelines that tag elements with their global position.
    """

    kind, schema = "regions", records.REGION_SCHEMA

    def decode(self, rec):
        return dict(image=records.decode_jpeg(rec["image_jpeg"]), slide_id=rec["slide_id"],
                    x=np.int64(rec["x"]), y=np.int64(rec["y"]), level=np.int32(rec["level"]),
                    read_px=np.int32(rec["read_px"]), mpp=np.float32(rec["mpp"]),
                    region_px=np.int32(rec["region_px"]),
                    tissue_fraction=np.float32(rec["tissue_fraction"]),
                    region_index=np.int32(rec["index"]))


class PatchSource(_ShardSource):
    """Patch records -> dict(image uint8 [P,P,3], slide_id, x, y, region_x, region_y, row, col,
    mpp, tissue_fraction)."""

    kind, schema = "patches", records.PATCH_SCHEMA

    def decode(self, rec):
        return dict(image=records.decode_jpeg(rec["image_jpeg"]), slide_id=rec["slide_id"],
                    x=np.int64(rec["x"]), y=np.int64(rec["y"]), region_x=np.int64(rec["region_x"]),
                    region_y=np.int64(rec["region_y"]), row=np.int32(rec["row"]),
                    col=np.int32(rec["col"]), mpp=np.float32(rec["mpp"]),
                    tissue_fraction=np.float32(rec["tissue_fraction"]))


class FeatureSource(_ShardSource):
    """Feature records -> dict(features float32 [R*C,384] (or [R,C,384] with as_grid=True),
    grid int32 [2], slide_id, x, y)."""

    kind, schema = "features", records.FEATURE_SCHEMA

    def __init__(self, paths, as_grid: bool = False):
        super().__init__(paths)
        self.as_grid = as_grid

    def __getstate__(self):
        return {**super().__getstate__(), "as_grid": self.as_grid}

    def decode(self, rec):
        feats = records.decode_features(rec)  # [R*C, D] float32, token i*C+j = grid row i, col j
        rows, cols = rec["grid"]
        if self.as_grid:
            feats = feats.reshape(rows, cols, feats.shape[-1])  # [R*C,D] -> [R,C,D] (row-major)
        return dict(features=feats, grid=np.asarray([rows, cols], np.int32),
                    slide_id=rec["slide_id"], x=np.int64(rec["x"]), y=np.int64(rec["y"]))

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
