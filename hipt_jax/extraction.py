"""The extraction engine: region shards -> ViT-256 / ViT-4K features, on every local device.

One `Extractor` runs the HIPT4K region forward (crop, ViT-256 over the 256 px patches, regrid,
ViT-4K) jitted once per region shape, with each batch of regions split over the local devices'
``data`` mesh axis (hipt_jax.sharding), so the same code runs on one CPU or eight accelerators.
It writes the two products of the pipeline:

- per-region feature shards (`hipt-prep features`): `Extractor.write_feature_shard` turns the
  records of one region shard into FEATURE records ([R*C, 384] ViT-256 CLS per region, stored as
  float16 or float32), the same numbers as ``HIPT4K(...)(region)["features_cls256"]``. A model
  without a ViT-4K is enough.
- per-slide bags (`hipt-extract`): `extract_cohort` embeds every slide of a hipt-prep output
  folder into OUT/slides/<slide_id>.npz (data_prep.bags) and writes OUT/manifest.json. When
  feature shards of a slide exist already, only the cheap ViT-4K runs on them.

JPEG decoding runs in a thread one batch ahead of the device. Regions of different sizes never
share a batch; the last batch of a run is zero-padded to the fixed batch size (one compiled
shape per region size).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import time
from typing import Callable, Iterable, Iterator, Optional

import jax
import numpy as np
from tqdm import tqdm

from data_prep import bags, shards
from hipt_jax import provenance, sharding

PATCH = 256  # pixels per ViT-256 patch
EMBEDDINGS_SCHEMA = "hipt.embeddings.v1"
VERSION_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "array-record", "hipt-jax")


class ExtractError(ValueError):
    """Bad input for extraction (the message names the file and the problem)."""


# ---------------------------------------------------------------------------------------------
# Host side: batching and decoding
# ---------------------------------------------------------------------------------------------
def batches_by_key(items: Iterable, size: int, key: Callable) -> Iterator[list]:
    """Consecutive runs of at most ``size`` items with equal ``key`` (a batch has one shape)."""
    run: list = []
    for item in items:
        if run and (len(run) == size or key(item) != key(run[0])):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _decode(batch: list[dict]) -> np.ndarray:
    return np.stack([shards.decode_jpeg(r["image_jpeg"]) for r in batch])  # [b,H,W,3] uint8


def _prefetch_decoded(batches: Iterable[list[dict]], pool: concurrent.futures.Executor
                      ) -> Iterator[tuple[list[dict], np.ndarray]]:
    """(batch of region records, decoded images) with the next batch decoding on ``pool``
    while the caller runs the device on this one."""
    pending = None
    for batch in batches:
        upcoming = (batch, pool.submit(_decode, batch))
        if pending is not None:
            yield pending[0], pending[1].result()
        pending = upcoming
    if pending is not None:
        yield pending[0], pending[1].result()


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
class Extractor:
    """A HIPT4K model's forward jitted once per region shape with the batch split over the
    local devices' data axis; ViT-4K alone for precomputed ViT-256 features.

    ``batch_per_device`` regions per device make one device batch (``self.batch``).
    """

    def __init__(self, model, batch_per_device: int = 1, devices=None):
        from hipt_jax.models.archs import build_vit
        from hipt_jax.models.hipt4k import region_forward

        self.model = model
        self.has_vit4k = model.params4k is not None
        self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices or jax.local_devices())
        self.batch = max(1, int(batch_per_device)) * self.mesh.size
        self._data = sharding.batch_sharding(self.mesh)
        repl = sharding.replicated(self.mesh)
        self.params256 = jax.device_put(model.params256, repl)
        self.params4k = jax.device_put(model.params4k, repl) if self.has_vit4k else None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)

        def full(p256, p4k, regions_u8):
            out = region_forward(p256, p4k, regions_u8, config256=model.config256,
                                 config4k=model.config4k, patch_batch=model.patch_batch,
                                 dtype=model.dtype)
            return out["features_cls256"], out.get("features_cls4k")

        self._full = jax.jit(full, in_shardings=(repl, repl, self._data), out_shardings=self._data)
        if self.has_vit4k:
            vit4k = build_vit(model.config4k, dtype=model.dtype)

            def only4k(p4k, grids):
                cls, _ = vit4k.apply(p4k, grids)
                return cls.astype(np.float32)

            self._only4k = jax.jit(only4k, in_shardings=(repl, self._data), out_shardings=self._data)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        """Pad the batch axis to the fixed batch size (one compiled shape per region size)."""
        if len(x) == self.batch:
            return x
        return np.concatenate([x, np.zeros((self.batch - len(x),) + x.shape[1:], x.dtype)])

    def regions(self, images_u8: np.ndarray):
        """uint8 [b,H,W,3] (b <= batch) -> async (cls256 [batch,R*C,384], cls4k [batch,192] or
        None without a ViT-4K)."""
        return self._full(self.params256, self.params4k, jax.device_put(self._pad(images_u8), self._data))

    def grids(self, grids: np.ndarray):
        """[b,R,C,384] precomputed ViT-256 features -> async cls4k [batch,192]."""
        self._require_vit4k()
        return self._only4k(self.params4k, jax.device_put(self._pad(grids.astype(np.float32)), self._data))

    def _require_vit4k(self) -> None:
        if not self.has_vit4k:
            raise ExtractError("extraction needs a ViT-4K (--vit4k)")

    def _region_batches(self, records: Iterable[dict]) -> Iterator[tuple[list[dict], np.ndarray, tuple]]:
        """(region records, decoded images [b,H,W,3], device outputs cut to b) per device batch."""
        batches = batches_by_key(records, self.batch, key=lambda r: r["region_px"])
        for batch, images in _prefetch_decoded(batches, self._pool):
            out256, out4k = self.regions(images)
            cls4k = None if out4k is None else np.asarray(out4k)[: len(batch)]
            yield batch, images, (np.asarray(out256)[: len(batch)], cls4k)

    # -------------------------------------------------------------- per-region feature shards
    def write_feature_shard(self, region_records: Iterable[dict], writer,
                            store_dtype: str = "float16") -> dict:
        """Region records -> one FEATURE record each, in order, written to ``writer``."""
        n = 0
        for batch, images, (cls256, _) in self._region_batches(region_records):
            for rec, img, f in zip(batch, images, cls256):
                grid = (img.shape[0] // PATCH, img.shape[1] // PATCH)  # the model center-crops to this grid
                writer.write(shards.encode_feature(
                    f, dtype=store_dtype, grid=grid, slide_id=rec["slide_id"], x=rec["x"],
                    y=rec["y"], mpp=rec["mpp"], region_px=rec["region_px"]))
                n += 1
        return dict(n_records=n)

    # ----------------------------------------------------------------------- per-slide bags
    def _embed_features(self, feature_shard: str, coords: np.ndarray, progress) -> tuple[list, list]:
        feats = {(f["x"], f["y"]): f for f in shards.read_records(feature_shard, shards.FEATURE)}
        missing = [tuple(c) for c in coords if tuple(c) not in feats]
        if missing:
            raise ExtractError(f"{feature_shard}: no features for region(s) at {missing[:3]}")
        ordered = [feats[tuple(c)] for c in coords]
        cls256, cls4k = [], []
        for batch in batches_by_key(ordered, self.batch, key=lambda f: tuple(f["grid"])):
            rows, cols = batch[0]["grid"]
            # [b,R*C,384] -> [b,R,C,384]: row-major grid, token i*C+j is patch (i, j).
            f256 = np.stack([shards.decode_features(f) for f in batch])
            out4k = self.grids(f256.reshape(len(batch), rows, cols, -1))
            cls256.append(f256)
            cls4k.append(np.asarray(out4k)[: len(batch)])
            progress.update(len(batch))
        return cls256, cls4k

    def _embed_regions(self, records: list[dict], progress) -> tuple[list, list]:
        cls256, cls4k = [], []
        for batch, _, (out256, out4k) in self._region_batches(records):
            cls256.append(out256)
            cls4k.append(out4k)
            progress.update(len(batch))
        return cls256, cls4k

    def embed_slide(self, region_shard: str, feature_shard: Optional[str] = None,
                    progress: Optional[tqdm] = None) -> dict[str, np.ndarray]:
        """All regions of one slide -> the arrays of its bag (see data_prep.bags)."""
        self._require_vit4k()
        recs = shards.read_records(region_shard, shards.REGION)
        if not recs:
            raise ExtractError(f"{region_shard}: shard has no region records")
        coords = np.array([[r["x"], r["y"]] for r in recs], np.int64)
        progress = progress if progress is not None else tqdm(disable=True)
        if feature_shard is not None:
            cls256, cls4k = self._embed_features(feature_shard, coords, progress)
        else:
            cls256, cls4k = self._embed_regions(recs, progress)
        if len({c.shape[1:] for c in cls256}) > 1:
            raise ExtractError(f"{region_shard}: regions of different sizes in one slide")
        cls4k_all = np.concatenate(cls4k).astype(np.float32)
        return {
            "features_cls256": np.concatenate(cls256),
            "features_cls4k": cls4k_all,
            "slide_embedding": cls4k_all.mean(axis=0),
            "coords": coords,
        }


# ---------------------------------------------------------------------------------------------
# Cohort -> bags
# ---------------------------------------------------------------------------------------------
def _existing_feature_shard(features_dir: Optional[str], slide_id: str) -> Optional[str]:
    if not features_dir:
        return None
    path = shards.find_slide_shard(features_dir, shards.FEATURE, slide_id)
    return path if os.path.isfile(path) else None


def _feature_manifest(features_dir: str) -> Optional[str]:
    """The hipt-prep manifest.json of a features folder (OUT or OUT/features), if any."""
    for folder in (features_dir, os.path.dirname(os.path.abspath(features_dir))):
        path = os.path.join(folder, shards.MANIFEST)
        if os.path.isfile(path):
            return path
    return None


def check_feature_model(features_dir: Optional[str], vit256_id: Optional[str]) -> None:
    """Precomputed feature shards must come from the requested ViT-256 (``vit256_id``: the
    content hash or random-init identity of provenance.model_fingerprint); ExtractError
    naming the folder otherwise. A folder without feature shards is not checked."""
    if not features_dir or vit256_id is None:
        return
    folder = shards.kind_folder(features_dir, shards.FEATURE)
    if not os.path.isdir(folder) or not glob_shards(folder):
        return
    manifest = _feature_manifest(features_dir)
    made_by = None
    if manifest is not None:
        try:
            with open(manifest) as f:
                params = json.load(f).get("params") or {}
        except (OSError, ValueError, AttributeError):
            params = {}
        made_by = params.get("vit256_id")
    if made_by is None:
        raise ExtractError(f"{features_dir}: precomputed features do not record which ViT-256 made them "
                           "(re-run hipt-prep features, or omit --features)")
    if made_by != vit256_id:
        raise ExtractError(f"{features_dir}: precomputed features were made by another ViT-256 "
                           f"(vit256: {made_by[:16]} -> {vit256_id[:16]}); use matching features or omit --features")


def glob_shards(folder: str) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(shards.SHARD_EXT)]


def extract_cohort(model, shards_dir: str, out_dir: str, *, features_dir: Optional[str] = None,
                   batch_per_device: int = 1, store_dtype: str = "float32",
                   params: Optional[dict] = None, show_progress: bool = True,
                   extractor: Optional[Extractor] = None, fingerprint: Optional[dict] = None,
                   overwrite: bool = False, resume_anyway: bool = False) -> dict:
    """Embed every slide of ``shards_dir`` that has no bag in ``out_dir`` yet; returns the manifest.

    ``model`` is a hipt_jax.HIPT4K with a ViT-4K. In a multi-process run each process takes
    slides i with i % process_count == process_index; process 0 writes the manifest.
    Pass a prebuilt ``extractor`` to reuse its compiled functions across calls.
    ``fingerprint`` (provenance.model_fingerprint + parameters): bags already in ``out_dir``
    are reused only when it matches the folder's (``overwrite`` / ``resume_anyway``: see
    hipt_jax.provenance); its "vit256" entry is checked against precomputed features.
    """
    region_shards = shards.list_slide_shards(shards_dir, shards.REGION)
    slide_ids = list(region_shards)
    features_dir = features_dir if features_dir is not None else shards_dir
    if fingerprint is not None:
        check_feature_model(features_dir, fingerprint.get("vit256"))
        fingerprint = dict(fingerprint, shards=provenance.params_hash(os.path.join(shards_dir, shards.MANIFEST)),
                           store_dtype=store_dtype)
        if jax.process_index() == 0:  # process 0 checks and writes the fingerprint
            provenance.check(out_dir, fingerprint, outputs=(bags.SLIDES, shards.MANIFEST),
                             overwrite=overwrite, resume_anyway=resume_anyway, what="embeddings folder")
    os.makedirs(os.path.join(out_dir, bags.SLIDES), exist_ok=True)
    mine = slide_ids[jax.process_index()::jax.process_count()]
    done = bags.list_bags(out_dir)
    todo = [s for s in mine if s not in done]
    extractor = extractor or Extractor(model, batch_per_device)
    errors: dict[str, str] = {}
    n_regions = 0
    t0 = time.time()
    bar = tqdm(total=None, unit="region", desc="extract", disable=not show_progress, dynamic_ncols=True)
    for slide_id in todo:
        bar.set_postfix_str(slide_id)
        try:
            arrays = extractor.embed_slide(region_shards[slide_id],
                                           _existing_feature_shard(features_dir, slide_id), bar)
        except ValueError as e:  # ExtractError, ShardError, bad pixels: the slide fails, the run goes on
            errors[slide_id] = str(e)
            continue
        arrays["features_cls256"] = arrays["features_cls256"].astype(store_dtype)
        try:
            bags.write_bag(out_dir, slide_id, arrays)
        except OSError as e:  # disk full, quota, I/O error: this slide fails, nothing partial is kept
            errors[slide_id] = f"{bags.bag_path(out_dir, slide_id)}: write failed ({e.strerror or e})"
            continue
        n_regions += len(arrays["coords"])
    bar.close()
    seconds = time.time() - t0
    manifest = shards.write_run_manifest(
        out_dir, schema=EMBEDDINGS_SCHEMA, items=bags.manifest_items(out_dir, slide_ids, errors),
        params=dict(params or {}, store_dtype=store_dtype, batch=extractor.batch),
        versions=shards.package_versions(VERSION_PACKAGES), items_key="slides",
        write=jax.process_index() == 0)
    manifest["run"] = {"regions": n_regions, "seconds": round(seconds, 3),
                       "regions_per_s": round(n_regions / seconds, 4) if seconds > 0 else None}
    return manifest
