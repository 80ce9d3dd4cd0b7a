"""Data sources of the two stages and the Grain pipeline that feeds the trainer.

Sources are plain random-access objects (``__len__``, ``__getitem__ -> dict``):
- ``PngFolderSource``: a folder (recursively) of RGB image patches (.png/.jpg), the stage-1
  format the reference used; records {"image": uint8 [H,W,3]}.
- ``FeatureFolderSource``: a folder of .npy / .pt files each holding one region's [256,384]
  ViT-256 features, the stage-2 format the reference used; records {"features": [256,384]}.
- ``BagRegionSource``: per-slide bags (hipt-extract output, TRIDENT/CLAM .h5 or the official
  [M,256,384] .pt region bags; data_prep.bags), one record per region, data.kind "bags".
- ``hipt_jax.data.sources.PatchSource`` / ``FeatureSource``: ArrayRecord shards written by
  ``hipt-prep`` (same record keys), selected with data.kind "patch_shards" / "feature_shards".

Sample order. The trainer consumes a global stream of samples; sample ``g`` is record
``shuffle_epoch(g // n)[g % n]`` (a fresh permutation every epoch, Grain's index shuffle).
Global step s uses samples s*G .. s*G+G-1 (G = global batch); process p of P loads the
contiguous slice s*G + p*L .. s*G + p*L + L-1 (L = G / P), which is exactly its block of the
batch-sharded global array. Hence the global batch, and every augmentation (seeded by g), is
identical for any number of hosts or loader workers.
"""
from __future__ import annotations

import glob
import os
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from data_prep import bags
from hipt_jax.pretrain.augment import FeatureMultiCrop, ImageMultiCrop, RegionMultiCrop

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
FEATURE_EXTS = (".npy", ".pt")


def _list_files(folder: str, exts: tuple[str, ...], what: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a folder ({what} expected)")
    files = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if p.lower().endswith(exts))
    if not files:
        raise FileNotFoundError(f"{folder}: no {what} files ({', '.join(exts)}) found")
    return files


class PngFolderSource:
    """Stage 1: every image file under ``folder`` is one patch."""

    def __init__(self, folder: str):
        self.files = _list_files(folder, IMAGE_EXTS, "image")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[int(index)]
        try:
            with Image.open(path) as img:
                return {"image": np.asarray(img.convert("RGB"), np.uint8)}
        except OSError as e:
            raise ValueError(f"{path}: cannot read image ({e})") from None


class FeatureFolderSource:
    """Stage 2: every .npy / .pt file under ``folder`` is one region's [N,F] feature matrix."""

    def __init__(self, folder: str, expect_shape=(256, 384)):
        self.files = _list_files(folder, FEATURE_EXTS, "feature")
        self.expect_shape = tuple(expect_shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[int(index)]
        try:
            if path.endswith(".pt"):
                import torch  # only for the reference's .pt files
                feats = torch.load(path, map_location="cpu", weights_only=True).numpy()
            else:
                feats = bags.load_npy(path)  # thread-safe: Grain reads from several threads
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"{path}: cannot read features ({type(e).__name__}: {e})") from None
        feats = np.asarray(feats, np.float32)
        if feats.shape != self.expect_shape:
            raise ValueError(f"{path}: features have shape {feats.shape}, "
                             f"expected {self.expect_shape}")
        return {"features": feats}


class BagRegionSource:
    """Stage 2 from per-slide bags: record i is one region's features_cls256 [R*C,384] of a bag
    under ``folder`` (its slides/ folder or the folder itself; any bag format)."""

    def __init__(self, folder: str, expect_shape=(256, 384)):
        found = bags.list_bags(folder)
        if not found:
            raise FileNotFoundError(f"{folder}: no bags (slides/*.npz|h5|pt or *.npz|h5|pt) found")
        self.files = list(found.values())
        counts = [bags.num_regions(p) for p in self.files]
        self._starts = np.cumsum([0] + counts)  # record i lives in file searchsorted(starts, i)
        self.expect_shape = tuple(expect_shape)
        self._cache: tuple[str, np.ndarray] | None = None  # last bag read (records come in runs)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _features(self, path: str) -> np.ndarray:
        # Grain calls __getitem__ from several threads: read the cache once into a local, so a
        # bag another thread stores meanwhile is never returned for this path.
        cached = self._cache
        if cached is None or cached[0] != path:
            feats = bags.read_bag_file(path, ("features_cls256",))["features_cls256"]
            cached = (path, np.asarray(feats, np.float32))  # [M,R*C,384]
            self._cache = cached
        return cached[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        file = int(np.searchsorted(self._starts, int(index), side="right")) - 1
        path = self.files[file]
        feats = self._features(path)[int(index) - int(self._starts[file])]
        if feats.shape != self.expect_shape:
            raise ValueError(f"{path}: region features have shape {feats.shape}, "
                             f"expected {self.expect_shape}")
        return {"features": feats}


SLIDE_FEATURES = ("cls4k", "mean256_cls4k")


def folder_of(files: list[str]) -> str:
    return os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])


class SlideBagSource:
    """Stage 3 (ViT-WSI): one record per slide bag under ``folder`` (hipt-extract output, any
    bag format): {"features" [M,F], "cells" [M,2] (row, column) on the slide's region grid}.

    ``feature``: "cls4k" (features_cls4k [M,192]) or "mean256_cls4k" ([M,576]: the mean of the
    region's ViT-256 CLS next to its CLS-4K). Cells come from the bag's level-0 corners divided
    by its patch_size_level0 (inferred from the corners when the bag does not say).
    """

    def __init__(self, folder: str, feature: str = "cls4k"):
        if feature not in SLIDE_FEATURES:
            raise ValueError(f"data.feature {feature!r}: expected one of {SLIDE_FEATURES}")
        found = bags.list_bags(folder)
        if not found:
            raise FileNotFoundError(f"{folder}: no bags (slides/*.npz|h5|pt or *.npz|h5|pt) found")
        self.slide_ids, self.files, self.feature = list(found), list(found.values()), feature
        self.in_features: int | None = None  # the model's input width, once check_width saw it

    def __len__(self) -> int:
        return len(self.files)

    def max_regions(self) -> int:
        return max(bags.num_regions(p) for p in self.files)

    def check_width(self, in_features: int) -> None:
        """Every bag's region embeddings are ``in_features`` wide (the model's input), checked
        before training: a bag made by another ViT-4K (or another feature kind) failed deep in
        Grain's batching ("Expected all input elements to have the same structure"), naming no
        bag. Reads each bag's CLS-4K (small); the CLS-256 part of "mean256_cls4k" is checked as
        each slide is read."""
        cls256 = 384 if self.feature == "mean256_cls4k" else 0  # the ViT-256 CLS beside it
        expected = int(in_features) - cls256
        wrong = []
        for path in self.files:
            shape = bags.read_bag_file(path, ("features_cls4k",))["features_cls4k"].shape
            if len(shape) != 2 or shape[1] != expected:
                wrong.append((path, shape[-1] if len(shape) == 2 else shape))
        widths = {w for _, w in wrong if isinstance(w, int)}
        if wrong and len(wrong) == len(self.files) and len(widths) == 1:
            # every bag agrees: the model is what is off (e.g. mean256_cls4k with the 192-wide
            # default model: "expected -192" said nothing useful); name the width to set
            width = cls256 + widths.pop()
            raise ValueError(
                f"{folder_of(self.files)}: data.feature={self.feature} gives region embeddings "
                f"{f'{cls256} (CLS-256) + {width - cls256} (CLS-4K) = ' if cls256 else ''}{width} wide, "
                f"the model takes {in_features}: set --config.model.in_features={width}")
        if wrong:
            listed = ", ".join(f"{p} ({w})" for p, w in wrong[:3]) + (" ..." if len(wrong) > 3 else "")
            raise ValueError(
                f"{len(wrong)} of {len(self.files)} bags have CLS-4K region embeddings of another width "
                f"than the model's {expected}{f' (+ {cls256} CLS-256 = {in_features})' if cls256 else ''}: "
                f"{listed}; use bags of one ViT-4K, or a model (config.model) of their width")
        self.in_features = int(in_features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from hipt_jax.models.vitwsi import grid_cells
        path = self.files[int(index)]
        keys = ("features_cls4k", "coords") + (("features_cls256",) if self.feature != "cls4k" else ())
        a = bags.read_bag_file(path, keys)
        feats = np.asarray(a["features_cls4k"], np.float32)
        if self.feature == "mean256_cls4k":
            # [M,R*C,384] -> [M,384], next to [M,192] -> [M,576]
            feats = np.concatenate([np.asarray(a["features_cls256"], np.float32).mean(axis=1), feats], 1)
        if self.in_features is not None and feats.shape[1] != self.in_features:
            raise ValueError(f"{path}: region embeddings ({self.feature}) are {feats.shape[1]} wide, "
                             f"the model takes {self.in_features}")
        if len(feats) == 0 or len(a["coords"]) != len(feats):
            raise ValueError(f"{path}: {len(feats)} region embeddings but {len(a['coords'])} "
                             "coordinates (a slide needs >= 1 region, one corner each)")
        step = bags.read_coords_attrs(path).get("patch_size_level0")
        return {"features": feats, "cells": grid_cells(a["coords"], step)}


def make_source(data_config: ml_collections.ConfigDict):
    """The source named by data.kind at data.path."""
    kind, path = data_config.kind, data_config.path
    if not path:
        raise ValueError("config.data.path is empty: set --config.data.path=FOLDER")
    if kind == "png_folder":
        return PngFolderSource(path)
    if kind == "feature_folder":
        return FeatureFolderSource(path, expect_shape=(data_config.grid[0] * data_config.grid[1],
                                                       data_config.in_features))
    if kind == "bags":
        return BagRegionSource(path, expect_shape=(data_config.grid[0] * data_config.grid[1],
                                                   data_config.in_features))
    if kind == "slide_bags":
        return SlideBagSource(path, data_config.get("feature", "cls4k"))
    if kind == "patch_shards":
        from hipt_jax.data.sources import PatchSource
        return PatchSource(path)
    if kind == "feature_shards":
        from hipt_jax.data.sources import FeatureSource
        return FeatureSource(path)
    raise ValueError(f"unknown data.kind {kind!r}: png_folder, feature_folder, bags, "
                     "patch_shards, feature_shards, slide_bags")


def describe_source(source) -> str:
    """What a source is made of, for messages: "0 records in 2 patch shard(s)", "3 files"."""
    paths = getattr(source, "paths", None)
    if paths is not None:  # hipt-prep shards (data_prep.shards.RecordSource)
        return f"{len(source)} records in {len(paths)} {source.kind.name} shard(s)"
    return f"{len(source)} samples in {len(getattr(source, 'files', []))} file(s)"


CHECKED_SHARDS = 256


def check_source(config: ml_collections.ConfigDict, source) -> list[str]:
    """Start-up check of hipt-prep shards, before the model is built (ValueError naming the
    shard; returns notes to print). Reads the first record of each shard: their kind (a shard
    folder of the other stage failed on the first sample drawn, after model init, naming no
    file), stage 2's feature grid and width against config.data (a 4x4 grid of 1024 px regions
    failed as "cannot reshape array of size 6144 into shape (16,16,384)"), and stage 1's patch
    size (the ViT-256 recipe is 256 px patches at 20x; 512 px ones trained without a word).
    A cohort has one shard per slide: past ``CHECKED_SHARDS`` shards, that many spread evenly
    over the listing are read (each read decodes a chunk; ten thousand on a network filesystem
    would hold every start and resume for minutes); a shard of another kind that this skips is
    still refused by its schema when its first record is drawn."""
    from data_prep import shards

    paths = getattr(source, "paths", None)
    if paths is None or not hasattr(source, "kind"):
        return []
    source._records()
    firsts = [(path, int(start)) for path, start, end in zip(paths, source._starts, source._starts[1:])
              if end > start]  # empty shards hold no first record
    if len(firsts) > CHECKED_SHARDS:
        firsts = [firsts[round(i * (len(firsts) - 1) / (CHECKED_SHARDS - 1))] for i in range(CHECKED_SHARDS)]
    sizes: dict[int, str] = {}
    for path, index in firsts:
        record = shards.unpack(source._records()[index], f"{path}: record 0")
        if record["schema"] != source.kind.schema:
            held = next((k for k in shards.KINDS.values() if k.schema == record["schema"]), None)
            if held is None:
                raise shards.ShardError(f"{path}: record 0 has schema {record['schema']!r}, expected "
                                        f"{source.kind.schema!r}")
            raise shards.ShardError(shards.wrong_kind(path, held, source.kind))
        if source.kind is shards.FEATURE:
            check_feature_grid(path, record, config.data)
        elif source.kind is shards.PATCH:
            sizes.setdefault(int(record["patch_px"]), path)
    return patch_size_notes(sizes)


def check_feature_grid(path: str, record: dict, data_config: ml_collections.ConfigDict) -> None:
    """A feature record's grid and width are config.data.grid and in_features, or ValueError
    naming the shard, both layouts and the way on."""
    grid, want = tuple(int(g) for g in record["grid"]), tuple(int(g) for g in data_config.grid)
    if grid != want:
        region = record.get("region_px")
        raise ValueError(
            f"{path}: its features are {grid[0]}x{grid[1]} grids (regions of {region} px), config.data.grid "
            f"is {want}: set --config.data.grid=({grid[0]},{grid[1]}) with crops that fit it "
            f"(--config.crops.global_size/local_size <= {min(grid)}), or use features of "
            f"{want[0] * 256} px regions (hipt-prep regions --region {want[0] * 256}, then hipt-prep features)")
    width = int(record["shape"][1])
    if width != int(data_config.in_features):
        raise ValueError(f"{path}: its features are {width} wide, config.data.in_features is "
                         f"{data_config.in_features}: set --config.data.in_features={width} "
                         "(and a model of that width), or features of the ViT-256 (384)")


def patch_size_notes(sizes: dict[int, str]) -> list[str]:
    """A note when stage-1 patch shards (patch size -> a shard of that size) are not all 256 px."""
    if set(sizes) <= {256}:
        return []
    if len(sizes) > 1:
        listed = ", ".join(f"{px} px ({path})" for px, path in sorted(sizes.items()))
        found = f"the patch shards mix patch sizes: {listed}"
    else:
        (px, path), = sizes.items()
        found = f"the patch shards hold {px} px patches ({path})"
    return [f"{found}; the ViT-256 recipe expects 256 px patches at 20x (hipt-prep patches --patch 256); "
            "crops are taken from whatever size is given"]


def source_record(source, steps_per_epoch: int) -> dict:
    """What a checkpoint keeps of its data source: its length, a cheap identity of its listing
    (file or shard names and per-shard record counts, hashed) and the steps per epoch. A resume
    compares it: deleting a damaged image and resuming is the expected path, but it reshuffles
    the epoch and may move the epoch-based phases, which should not be silent."""
    import hashlib

    names = [str(p) for p in (getattr(source, "paths", None) or getattr(source, "files", None) or [])]
    root = os.path.commonpath(names) if len(names) > 1 else os.path.dirname(names[0]) if names else ""
    counts = getattr(source, "_starts", None)
    counts = [] if counts is None else np.diff(counts).tolist()
    listing = "\n".join(os.path.relpath(n, root) if root else n for n in names) + "\n" + repr(counts)
    return {"samples": int(len(source)), "files": len(names), "steps_per_epoch": int(steps_per_epoch),
            "listing": hashlib.sha256(listing.encode()).hexdigest()}


def source_changes(saved: dict, now: dict, config: ml_collections.ConfigDict) -> str | None:
    """One line saying how the data source changed since a checkpoint and what that moves, or
    None when it did not (or the checkpoint recorded nothing)."""
    if not isinstance(saved, dict) or "samples" not in saved:
        return None
    if saved.get("samples") == now["samples"] and saved.get("listing") == now["listing"]:
        return None
    what = (f"{saved['samples']} -> {now['samples']} samples" if saved["samples"] != now["samples"]
            else f"{now['samples']} samples, another listing")
    moves = ["the sample order from the restored step on (another permutation of this epoch: "
             "some samples are seen again, others not this epoch)"]
    old_spe, new_spe = int(saved.get("steps_per_epoch", 0)), now["steps_per_epoch"]
    if old_spe and old_spe != new_spe:
        freeze = config.optim.freeze_last_layer_epochs
        moves.append(f"steps per epoch {old_spe} -> {new_spe} (last-layer freeze until step "
                     f"{freeze * old_spe} -> {freeze * new_spe}; teacher-temperature epochs move too)")
    return f"{config.data.path} changed since the checkpoint: {what}; this changes " + " and ".join(moves)


def resolve_config(config: ml_collections.ConfigDict, source) -> ml_collections.ConfigDict:
    """``config`` with its data-dependent fields decided for ``source``: stage 3's
    crops.global_tokens = -1 becomes the bucket length of the cohort's largest slide, so a global
    view can always hold every region it keeps. Other stages: ``config`` unchanged. Stage 3 also
    checks that every bag fits the model's input width (``SlideBagSource.check_width``)."""
    if config.stage == 3 and isinstance(source, SlideBagSource):
        source.check_width(config.model.in_features)
    if config.stage != 3 or config.crops.global_tokens > 0:
        return config
    from hipt_jax.models.lgp import bucket_length
    config = ml_collections.ConfigDict(config.to_dict())
    config.crops.global_tokens = bucket_length(source.max_regions())
    return config


def make_augment(config: ml_collections.ConfigDict) -> grain.transforms.Map:
    crops = config.crops
    if config.stage == 3:
        return RegionMultiCrop(config.seed, crops.global_tokens, crops.n_local, crops.local_size,
                               crops.region_dropout, crops.noise_std, tuple(crops.global_scale))
    if config.stage == 1:
        return ImageMultiCrop(config.seed, crops.global_size, crops.local_size, crops.n_local,
                              tuple(crops.global_scale), tuple(crops.local_scale))
    return FeatureMultiCrop(config.seed, crops.global_size, crops.local_size, crops.n_local,
                            tuple(config.data.grid))


class ProcessSliceDataset(grain.MapDataset):
    """Element i of this process's stream = global sample g (see the module docstring),
    returned as {"index": g, **record}."""

    def __init__(self, parent: grain.MapDataset, *, global_batch: int, process_index: int,
                 process_count: int, num_steps: int):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the "
                             f"{process_count} processes")
        self._global_batch = global_batch
        self._local_batch = global_batch // process_count
        self._offset = process_index * self._local_batch
        self._length = num_steps * self._local_batch

    def __len__(self) -> int:
        return self._length

    def global_index(self, index: int) -> int:
        step, j = divmod(int(index), self._local_batch)
        return step * self._global_batch + self._offset + j

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        g = self.global_index(index)
        return {"index": g, **self._parent[g]}

    def __str__(self) -> str:
        return "ProcessSliceDataset"


def make_iterator(config: ml_collections.ConfigDict, source, *, process_index: int,
                  process_count: int, num_steps: int):
    """Checkpointable Grain iterator of per-process batches (dicts of numpy, leading dim L).

    Augmentation runs in ``config.data.num_workers`` worker processes (0 = in this process).
    """
    records = grain.MapDataset.source(source).shuffle(seed=config.seed)
    ds = ProcessSliceDataset(records, global_batch=config.global_batch,
                             process_index=process_index, process_count=process_count,
                             num_steps=num_steps)
    # Batch BEFORE leaving the MapDataset world: each element is then one whole per-process
    # batch, and loader workers split the stream by batches, so the batch composition does
    # not depend on the number of workers.
    local_batch = config.global_batch // process_count
    ds = ds.map(make_augment(config)).batch(local_batch, drop_remainder=True)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data.read_threads,
                                                 prefetch_buffer_size=config.data.prefetch))
    if config.data.num_workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # Grain workers read absl flags (notebooks, tests)
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.data.num_workers, per_worker_buffer_size=2),
            worker_init_fn=die_with_parent)
    return iter(it_ds)


def close_iterator(iterator) -> None:
    """Stop ``make_iterator``'s loader workers and free the shared memory of its batches.

    With workers, each batch arrives in a shared-memory block that Grain unlinks on a
    background thread when the array is freed. The last batches are freed just before the
    process exits, too late for that thread, and Python's resource tracker then printed
    "There appear to be N leaked shared_memory objects" at the end of every run (it unlinked
    them itself). Freed batches are collected here and their deletions waited for."""
    import gc

    iterator.close()
    gc.collect()  # batches in reference cycles (tracebacks, generators) are freed now
    try:
        from grain._src.python.ipc import shared_memory_array
        pool = shared_memory_array.SharedMemoryArray._del_thread_pool
    except (ImportError, AttributeError):  # another Grain layout: only the warning comes back
        return
    if pool is not None:
        pool.apply(int)  # one thread, first in first out: returns after every deletion queued before


def loader_state(step: int, num_workers: int) -> dict:
    """The state of ``make_iterator``'s iterator once it has yielded ``step`` batches, in the
    layout of a loader with ``num_workers`` workers (grain 0.2's: a plain iterator's
    {"next_index"}, or mp_prefetch's round robin over the workers, worker w yielding batches
    w, w + N, ...). Batch i is the same whatever the worker count (the module docstring), so a
    run resumed with another data.num_workers (or process count) continues at the same sample
    from this state; tests check it against the states Grain itself saves."""
    step, n = int(step), int(num_workers)
    if n <= 0:
        return {"next_index": step}
    return {"next_index_in_cycle": step % n, "next_index_in_datasets": n,
            "iterators_in_use_indices": list(range(n)),
            "iterators_in_use_states": [{"next_index": (step - w + n - 1) // n} for w in range(n)],
            "exhausted": [0] * n, "future_states": {}}


def saved_loader_workers(state: dict) -> int | None:
    """The worker count a saved loader state was written with (see ``loader_state``); None when
    the layout is not one of those."""
    if not isinstance(state, dict):
        return None
    if "next_index" in state:
        return 0
    workers = state.get("iterators_in_use_states")
    return len(workers) if isinstance(workers, list) else None


def die_with_parent(worker_index: int = 0, worker_count: int = 0, poll_s: float = 1.0) -> None:
    """Grain worker init: the worker exits when the process that started it is gone. A trainer
    killed with kill -9 runs no cleanup, and its loader workers (~250 MB each) were left running
    under pid 1. A daemon thread polls the parent pid: Linux's prctl(PR_SET_PDEATHSIG) would
    fire when the parent's *thread* that started the worker ends, and Grain starts workers from
    its prefetch threads, which it stops and restarts (set_state), killing healthy workers."""
    import multiprocessing
    import threading
    import time

    # The pid multiprocessing started us from: the trainer may have died before this runs.
    started_by = multiprocessing.parent_process()
    parent = started_by.pid if started_by is not None else os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)  # reparented: the trainer died without closing its loader

    threading.Thread(target=watch, name="hipt-parent-watch", daemon=True).start()
