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
  folder into OUT/slides/<slide_id>.<npz|h5|pt> (data_prep.bags) and writes OUT/manifest.json
  from every process's status file (OUT/status/process_<i>.json). When
  feature shards of a slide exist already, only the cheap ViT-4K runs on them.
- the same bags without region shards (`hipt-extract --slides --coords`):
  `extract_cohort_direct` reads each region at the coordinates of a CLAM/TRIDENT h5 file straight
  from the slide (threaded reads, one batch ahead of the device; no JPEG).

JPEG decoding runs in a thread one batch ahead of the device. Regions of different sizes never
share a batch; the last batch of a run is zero-padded to the fixed batch size (one compiled
shape per region size).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import sys
import time
from typing import Callable, Iterable, Iterator, Optional

import jax
import numpy as np
from tqdm import tqdm

from data_prep import bags, shards
from hipt_jax import distributed, provenance, sharding
from hipt_jax.outputs import OutputWriteError, write_failed
from hipt_jax.prefetch import prefetch_to_device

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
                                 dtype=model.dtype, batch_shards=self.mesh.size)
            return out["features_cls256"], out.get("features_cls4k")

        self._full = jax.jit(full, in_shardings=(repl, repl, self._data), out_shardings=self._data,
                             compiler_options=model.compiler_options)
        if self.has_vit4k:
            vit4k = build_vit(model.config4k, dtype=model.dtype)

            def only4k(p4k, grids):
                cls, _ = vit4k.apply(p4k, grids)
                return cls.astype(np.float32)

            self._only4k = jax.jit(only4k, in_shardings=(repl, self._data), out_shardings=self._data,
                                   compiler_options=model.compiler_options)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        """Pad the batch axis to the fixed batch size (one compiled shape per region size)."""
        if len(x) == self.batch:
            return x
        return np.concatenate([x, np.zeros((self.batch - len(x),) + x.shape[1:], x.dtype)])

    def regions(self, images_u8: np.ndarray):
        """uint8 [b,H,W,3] (b <= batch) -> async (cls256 [batch,R*C,384], cls4k [batch,192] or
        None without a ViT-4K)."""
        return self._full(self.params256, self.params4k, self._put(images_u8))

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
        return self.pipelined(_prefetch_decoded(batches, self._pool))

    def pipelined(self, batches: Iterable[tuple]) -> Iterator[tuple]:
        """(key, images [b,H,W,3]) pairs -> (key, images, host outputs cut to b), with two
        batches on their way to the devices and batch i+1 dispatched before batch i's results
        are read (the host writes i while the device runs i+1)."""
        on_device = prefetch_to_device(batches, lambda bi: (bi, self._put(bi[1])))
        running = None  # the batch dispatched last: its results are read after the next dispatch
        for (batch, images), regions in on_device:
            dispatched = (batch, images, self._full(self.params256, self.params4k, regions))
            if running is not None:
                yield self._fetched(*running)
            running = dispatched
        if running is not None:
            yield self._fetched(*running)

    def _put(self, images_u8: np.ndarray):
        """Padded uint8 batch -> its (asynchronous) copy on the devices' data axis."""
        return jax.device_put(self._pad(images_u8), self._data)

    @staticmethod
    def _fetched(batch, images, outputs):
        """(records, images, host outputs cut to the real batch) of a dispatched batch."""
        out256, out4k = outputs
        cls4k = None if out4k is None else np.asarray(out4k)[: len(batch)]
        return batch, images, (np.asarray(out256)[: len(batch)], cls4k)

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
        return self.embed_slide_bag(region_shard, feature_shard, progress)[0]

    def embed_slide_bag(self, region_shard: str, feature_shard: Optional[str] = None,
                        progress: Optional[tqdm] = None) -> tuple[dict[str, np.ndarray], dict]:
        """All regions of one slide -> (the arrays of its bag, its coordinate attributes)."""
        recs = shards.read_records(region_shard, shards.REGION)
        if not recs:
            raise ExtractError(f"{region_shard}: shard has no region records")
        return self.embed_records(recs, region_shard, feature_shard, progress), coords_attrs(recs)

    def embed_records(self, recs: list[dict], source: str, feature_shard: Optional[str] = None,
                      progress: Optional[tqdm] = None) -> dict[str, np.ndarray]:
        """Region records (image_jpeg, x, y, region_px) of one slide -> its bag arrays;
        ``source`` names the input in error messages."""
        self._require_vit4k()
        coords = np.array([[r["x"], r["y"]] for r in recs], np.int64)
        progress = progress if progress is not None else tqdm(disable=True)
        if feature_shard is not None:
            cls256, cls4k = self._embed_features(feature_shard, coords, progress)
        else:
            cls256, cls4k = self._embed_regions(recs, progress)
        if len({c.shape[1:] for c in cls256}) > 1:
            raise ExtractError(f"{source}: regions of different sizes in one slide")
        cls4k_all = np.concatenate(cls4k).astype(np.float32)
        return {
            "features_cls256": np.concatenate(cls256),
            "features_cls4k": cls4k_all,
            "slide_embedding": cls4k_all.mean(axis=0),
            "coords": coords,
        }


def coords_attrs(recs: list[dict]) -> dict:
    """The TRIDENT/CLAM coordinate attributes of one slide's regions (magnification = 10 / mpp,
    the usual 0.5 um/px = 20x convention)."""
    r = recs[0]
    level0_mpp = float(r["mpp"]) * float(r["region_px"]) / float(r["read_px"])  # um per level-0 px
    return {"patch_size": int(r["region_px"]), "patch_size_level0": int(r["read_px"]),
            "level0_magnification": round(10.0 / level0_mpp, 3),
            "target_magnification": round(10.0 / float(r["mpp"]), 3),
            "overlap": 0, "name": str(r["slide_id"]), "mpp": float(r["mpp"])}


# ---------------------------------------------------------------------------------------------
# Cohort -> bags
# ---------------------------------------------------------------------------------------------
def _existing_feature_shard(features_dir: Optional[str], slide_id: str,
                            region_shard: Optional[str] = None) -> Optional[str]:
    """The slide's precomputed ViT-256 feature shard, if there is one. Features made from
    another version of the slide's region shard (the slide was replaced and hipt-prep regions
    redone, features not) are refused: they would give the old slide's embedding."""
    if not features_dir:
        return None
    path = shards.find_slide_shard(features_dir, shards.FEATURE, slide_id)
    if not os.path.isfile(path):
        return None
    if region_shard is not None:
        made_from = (_read_json(shards.shard_status_path(path)).get("source") or {}).get("sha256")
        now = _read_json(shards.shard_status_path(region_shard)).get("sha256")
        if made_from and now and made_from != now:
            raise ExtractError(f"{path}: made from another version of {region_shard} (its region shard "
                               "changed since); rerun hipt-prep features, or omit --features")
    return path


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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


def check_provenance(out_dir: str, fingerprint: Optional[dict], *, overwrite: bool = False,
                     resume_anyway: bool = False, inputs: Optional[dict[str, str]] = None) -> None:
    """Bags already in ``out_dir`` are reused only when ``fingerprint`` matches the folder's
    (``overwrite`` / ``resume_anyway``: see hipt_jax.provenance). Process 0 checks and writes
    it; the others wait, so no process starts on a folder that is about to be cleared. First
    every process must hold process 0's fingerprint (the one recorded), input and output
    (``cross_process_fields``): a process given another model copy, seed, format, cohort or
    --out would write its share of the slides with it, or elsewhere."""
    if fingerprint is not None:
        try:
            distributed.check_same_everywhere(lambda: cross_process_fields(fingerprint, out_dir, inputs or {}))
        finally:
            distributed.drop_output_token(out_dir)
    if fingerprint is not None and jax.process_index() == 0:
        provenance.check(out_dir, fingerprint, outputs=(bags.SLIDES, shards.MANIFEST),
                         overwrite=overwrite, resume_anyway=resume_anyway, what="embeddings folder")
    _barrier("hipt-extract provenance")


def cross_process_fields(fingerprint: dict, out_dir: str, inputs: dict[str, str]) -> dict:
    """The fingerprint, the identity of the input files (slide id -> region shard or slide
    file: provenance.files_identity, so hosts may mount the cohort at different paths, while
    another cohort made with the same hipt-prep parameters differs) and the output folder by
    identity (distributed.output_identity: every process writes its bags there, whatever path
    its host mounts it at)."""
    return dict(fingerprint, inputs=provenance.files_identity(inputs), out=distributed.output_identity(out_dir))


STATUS = "status"  # OUT/status/process_<i>.json: one process's slides of the last run


def _status_path(out_dir: str, process: int) -> str:
    return os.path.join(out_dir, STATUS, f"process_{process:05d}.json")


def write_process_status(out_dir: str, process: int, slides: dict[str, dict], run: dict) -> None:
    """This process's own record of its slides: {slide_id: {status, error?}} and run figures."""
    with _written(_status_path(out_dir, process)):
        os.makedirs(os.path.join(out_dir, STATUS), exist_ok=True)
        shards.write_json_atomic(_status_path(out_dir, process),
                                 {"process": process, "slides": slides, "run": run})


@contextlib.contextmanager
def _written(path: str) -> Iterator[None]:
    """A run's own record written after its bags (a full disk): exit 1 naming the file, not the
    bad-input exit 2 a bare OSError maps to; the bags are kept and a rerun skips them."""
    try:
        yield
    except OSError as e:
        if isinstance(e, OutputWriteError):
            raise
        raise write_failed(e.filename or path, e) from None


def merge_process_status(out_dir: str, process_count: int) -> tuple[dict[str, str], list[dict]]:
    """(slide_id -> error of every failed slide, per-process run figures) from the status files
    of processes 0..process_count-1 (files of an earlier run with more processes are ignored)."""
    import json

    errors: dict[str, str] = {}
    runs = []
    for p in range(process_count):
        path = _status_path(out_dir, p)
        if not os.path.isfile(path):
            raise ExtractError(f"{path}: process {p} wrote no status (did it crash?)")
        with open(path) as f:
            status = json.load(f)
        errors.update({s: v["error"] for s, v in status["slides"].items() if v["status"] == "failed"})
        runs.append(status["run"])
    return errors, runs


def _barrier(name: str) -> None:
    """Wait until every process got here (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _intact(bag: str) -> bool:
    """False (and a line on stderr) when a finished bag's bytes no longer match its checksum,
    or when a bag this command wrote (it has a .source record) has lost its checksum and does
    not read: without a checksum there is nothing to verify, and such a bag (a kill between
    an older release's checksum removal and the bag's rename) was kept, failing every reader."""
    try:
        bags.verify_bag(bag)
        if bags.read_source(bag) is not None and not os.path.exists(bags.checksum_path(bag)):
            bags.read_bag_file(bag)
        return True
    except bags.BagError as e:
        print(f"hipt-extract: redoing {e}", file=sys.stderr)
        return False


def _unchanged(slide_id: str, bag: str, source: dict) -> bool:
    """False (and a line on stderr) when a finished bag was made from other input than the
    slide's input now (a region shard redone by hipt-prep, another slide under the same id);
    bags without a record (made before it was kept) count as unchanged."""
    recorded = bags.read_source(bag)
    if recorded is None or recorded == source:
        return True
    print(f"hipt-extract: redoing {slide_id}: its input changed since {bag} was made "
          f"({recorded} -> {source})", file=sys.stderr)
    for stale in (bag, bags.checksum_path(bag), bag + bags.SOURCE_EXT):  # never left to be read
        if os.path.exists(stale):
            os.remove(stale)
    return False


def _made_by(fingerprint: Optional[dict], region_px, target_mpp) -> Optional[dict]:
    """The extraction identity every bag of this run carries and the manifest records
    (data_prep.bags.check_extraction): the weights as the fingerprint names them (content hash
    or random init), the region size and resolution. None without a fingerprint."""
    if fingerprint is None:
        return None
    return {"vit256": fingerprint.get("vit256"), "vit4k": fingerprint.get("vit4k"),
            "region_px": region_px, "target_mpp": target_mpp}


def _same_extraction(bag: str, made_by: Optional[dict]) -> bool:
    """False (and a line on stderr) when a finished bag records another extraction than this
    run in what readers refuse (region size, resolution, random init: a bag copied in from
    another folder); bags without a record, and bags of other checkpoint files (the same
    weights, perhaps: --resume-anyway after a re-conversion), are kept."""
    recorded = bags.extraction_of(bag) if made_by else None
    refused = bags.extraction_difference(recorded, made_by)[0] if recorded else []
    if refused:
        print(f"hipt-extract: redoing {bag}: made by another extraction ({'; '.join(refused)})", file=sys.stderr)
    return not refused


def _extract_slides(out_dir: str, slide_ids: list[str], embed_one, *, extractor: Extractor,
                    fmt: str, store_dtype: str, params: dict, show_progress: bool,
                    source_of: Callable[[str], dict] = lambda slide_id: {},
                    made_by: Optional[dict] = None, name_of: Callable[[str], str] = str) -> dict:
    """The per-slide loop shared by the shard path and the direct path.

    ``embed_one(slide_id, progress) -> (arrays, coordinate attributes)`` embeds one slide. In a
    multi-process run each process takes slides i with i % process_count == process_index and
    writes its own status file (OUT/status/process_<i>.json); after a barrier every process
    merges all of them, so the manifest (written by process 0) has every slide's status,
    including other processes' failures. A slide whose bag already exists is not redone.
    Every bag written carries ``made_by`` (``_made_by``), which the manifest records too.
    Each slide is embedded under a crash record (data_prep.crash_record): a slide whose reading
    crashed an earlier run (a segfault in OpenSlide on a damaged file) fails, named by
    ``name_of(slide_id)``, instead of being read again and ending this run as well.
    """
    from data_prep import crash_record
    from data_prep.slide_io import SlideError

    os.makedirs(os.path.join(out_dir, bags.SLIDES), exist_ok=True)
    mine = slide_ids[jax.process_index()::jax.process_count()]
    # Damaged bags and bags made from other input are redone.
    mine_set = set(mine)
    _check_one_format(out_dir, fmt)
    done = {s: p for s, p in bags.list_bags(out_dir).items()
            if s in mine_set and _intact(p) and _unchanged(s, p, source_of(s)) and _same_extraction(p, made_by)}
    status: dict[str, dict] = {s: {"status": "done"} for s in mine if s in done}
    n_regions = 0
    t0 = time.time()
    bar = tqdm(total=None, unit="region", desc="extract", disable=not show_progress, dynamic_ncols=True)
    status_dir = os.path.join(out_dir, STATUS)
    for slide_id in (s for s in mine if s not in done):
        bar.set_postfix_str(slide_id)
        try:
            source = source_of(slide_id)
            crash = crash_record.earlier(status_dir, slide_id, source)
            if crash is not None and crash.blames_slide:  # reading it would kill this run too
                raise ExtractError(crash_record.failure(name_of(slide_id), crash))
            if crash is not None:
                print(f"hipt-extract: {crash_record.retrying(slide_id, crash)}", file=sys.stderr)
            with crash_record.watch(status_dir, slide_id, source):
                arrays, attrs = embed_one(slide_id, bar)
            arrays["features_cls256"] = arrays["features_cls256"].astype(store_dtype)
            bags.write_source(bags.write_bag(out_dir, slide_id, arrays, fmt, attrs=attrs, made_by=made_by), source)
        except (ValueError, SlideError) as e:  # ExtractError, ShardError, BagError, bad pixels:
            status[slide_id] = {"status": "failed", "error": str(e)}  # the slide fails, the run goes on
            continue
        except OSError as e:  # disk full, quota, I/O error: this slide fails, nothing partial is kept
            status[slide_id] = {"status": "failed", "error": f"{bags.bag_path(out_dir, slide_id, fmt)}: "
                                                             f"write failed ({e.strerror or e})"}
            continue
        status[slide_id] = {"status": "done"}
        n_regions += len(arrays["coords"])
    bar.close()
    seconds = time.time() - t0
    write_process_status(out_dir, jax.process_index(), status,
                         {"regions": n_regions, "seconds": round(seconds, 3)})
    _barrier("hipt-extract status")  # every process's status file is on disk past this line
    errors, runs = merge_process_status(out_dir, jax.process_count())
    with _written(os.path.join(out_dir, shards.MANIFEST)):
        manifest = shards.write_run_manifest(
            out_dir, schema=EMBEDDINGS_SCHEMA, items=bags.manifest_items(out_dir, slide_ids, errors),
            params=dict(params, store_dtype=store_dtype, batch=extractor.batch, format=fmt,
                        processes=jax.process_count(), **({"extraction": made_by} if made_by else {})),
            versions=shards.package_versions(VERSION_PACKAGES), items_key="slides",
            write=jax.process_index() == 0)
    total = sum(r["regions"] for r in runs)
    wall = max(r["seconds"] for r in runs)
    manifest["run"] = {"regions": total, "seconds": round(wall, 3),
                       "regions_per_s": round(total / wall, 4) if wall > 0 else None}
    _barrier("hipt-extract manifest")  # no process leaves before the manifest is written
    return manifest


def _say_prep_failures(shards_dir: str, region_shards: dict) -> tuple[list[str], list[str]]:
    """Slides hipt-prep could not cut have no shard, so nothing here would mention them.
    Returns (the slides it recorded as done whose shard is gone (an incomplete copy of the prep
    folder): they fail here rather than vanish from the cohort; the slides it recorded as
    failed)."""
    items = shards.read_prep_manifest(shards_dir).get("items") or {}
    if not isinstance(items, dict):
        return [], []
    lost = sorted(sid for sid, it in items.items()
                  if isinstance(it, dict) and it.get("status") == "done" and sid not in region_shards)
    missing = sorted(sid for sid, it in items.items()
                     if isinstance(it, dict) and it.get("status") != "done" and sid not in region_shards)
    if missing:
        print(f"hipt-extract: {len(missing)} slide(s) failed in hipt-prep and have no region shard "
              f"(reasons in {os.path.join(shards_dir, shards.MANIFEST)}): {missing[:5]}"
              + (" ..." if len(missing) > 5 else ""), file=sys.stderr)
    return lost, missing


def _check_records_are_of(slide_id: str, region_shard: str, attrs: dict) -> None:
    """ExtractError when a shard's records are of another slide than its file name says (hipt-prep
    names each shard after the slide in its records): a shard copied or renamed beside the
    original would give the same slide a second bag under another id, which an evaluation may
    put in train and test at once. Compared in NFC: HFS+ lists file names decomposed (NFD)."""
    import unicodedata

    if unicodedata.normalize("NFC", attrs["name"]) != unicodedata.normalize("NFC", slide_id):
        raise ExtractError(f"{region_shard}: its regions are of slide {attrs['name']!r}, not {slide_id!r} as the "
                           f"file is named: a copy or renamed shard? remove it, or redo the slide with hipt-prep "
                           f"under the id {slide_id!r}")


def _check_cut_as_recorded(region_shard: str, attrs: dict, cut: dict, manifest: str) -> None:
    """ExtractError when a slide's regions (``attrs``: coords_attrs of its records) are not of
    the size and resolution the prep folder's manifest records (``cut``: its params), e.g. a
    shard copied in from another hipt-prep run: its bag would be labelled with the folder's
    region size and resolution, and scored beside the others as if it had them. Checked on the
    records, which are what the bag is made of (a shard's status file can be copied with it)."""
    got, want = [], []
    if cut.get("region_px") is not None and attrs["patch_size"] != int(cut["region_px"]):
        got.append(f"of {attrs['patch_size']} px")
        want.append(f"{cut['region_px']} px")
    target, tolerance = cut.get("target_mpp"), cut.get("mpp_tolerance") or 0.0
    # hipt-prep snaps the read scale to an integer level-0 factor within mpp_tolerance, and
    # rounds the level-0 extent to whole pixels (half a pixel of the region side): a region's
    # mpp may differ from the target by that much, not more.
    slack = float(target or 0) * (float(tolerance) + 1.0 / attrs["patch_size"])
    if target and abs(attrs["mpp"] - float(target)) > slack:
        got.append(f"at {attrs['mpp']:g} um/px")
        want.append(f"{target} um/px")
    if got:
        raise ExtractError(f"{region_shard}: regions {' '.join(got)}, but {manifest} records {' and '.join(want)} "
                           "for this folder: a shard of another hipt-prep run? move it to that run's folder, "
                           "or redo the slide with this folder's hipt-prep command")


def _check_one_format(out_dir: str, fmt: str) -> None:
    """ExtractError when ``out_dir`` holds bags of another format than this run writes (reached
    with --resume-anyway past the fingerprint's format): its bags would count as done and the
    run would report them as ok without writing one file in the format asked for."""
    ext = bags.FORMATS[fmt].ext
    other = sorted({os.path.splitext(p)[1] for p in bags.list_bags(out_dir).values()} - {ext})
    if other:
        raise ExtractError(f"{out_dir}: holds {'/'.join(other)} bags and this run writes {ext}; one "
                           "folder holds one format (a new --out, or --overwrite to redo it)")


def _drop_stale_bags(out_dir: str, failed: list[str], shards_dir: str) -> None:
    """Remove the bags of slides that failed in hipt-prep (a rerun found the slide file damaged
    or changed and removed its shard): every reader lists the bag folder, so the bag of the old
    shard would go on being scored as current. Bags of slides the prep folder does not mention
    stay (one embeddings folder may gather several prep folders). Process 0 removes, named."""
    if jax.process_index() == 0 and os.path.isdir(out_dir):
        for slide_id in failed:
            path = bags.find_bag(out_dir, slide_id)
            if path is not None:
                bags.remove_bag(path)
                print(f"hipt-extract: {slide_id}: failed in hipt-prep, so its region shard is gone; "
                      f"the bag made from the old shard ({path}) is removed", file=sys.stderr)
    _barrier("hipt-extract stale bags")


def extract_cohort(model, shards_dir: str, out_dir: str, *, features_dir: Optional[str] = None,
                   batch_per_device: int = 1, store_dtype: str = "float32",
                   params: Optional[dict] = None, show_progress: bool = True,
                   extractor: Optional[Extractor] = None, fmt: str = bags.DEFAULT_FORMAT,
                   fingerprint: Optional[dict] = None, overwrite: bool = False,
                   resume_anyway: bool = False) -> dict:
    """Embed every slide of ``shards_dir`` that has no bag in ``out_dir`` yet; returns the manifest.

    ``model`` is a hipt_jax.HIPT4K with a ViT-4K; ``fmt`` the bag format (npz, h5, pt).
    Multi-process runs: see ``_extract_slides``. Pass a prebuilt ``extractor`` to reuse its
    compiled functions across calls. ``fingerprint`` (provenance.model_fingerprint +
    parameters): see ``check_provenance``; its "vit256" entry is checked against precomputed
    features.
    """
    bags.check_format(fmt)  # before any work: an unknown format or .pt without torch
    region_shards = shards.list_slide_shards(shards_dir, shards.REGION)
    lost, failed = _say_prep_failures(shards_dir, region_shards)
    features_dir = features_dir if features_dir is not None else shards_dir
    if fingerprint is not None:
        check_feature_model(features_dir, fingerprint.get("vit256"))
        fingerprint = dict(fingerprint, shards=provenance.params_hash(os.path.join(shards_dir, shards.MANIFEST)),
                           store_dtype=store_dtype, format=fmt)
    check_provenance(out_dir, fingerprint, overwrite=overwrite, resume_anyway=resume_anyway, inputs=region_shards)
    _drop_stale_bags(out_dir, failed, shards_dir)
    extractor = extractor or Extractor(model, batch_per_device)

    cut = shards.read_prep_manifest(shards_dir).get("params") or {}

    def embed_one(slide_id, bar):
        if slide_id not in region_shards:
            raise ExtractError(f"{shards.shard_path(shards_dir, shards.REGION, slide_id)}: region shard missing "
                               f"(hipt-prep recorded {slide_id} as done in {os.path.join(shards_dir, shards.MANIFEST)})")
        arrays, attrs = extractor.embed_slide_bag(region_shards[slide_id],
                                                  _existing_feature_shard(features_dir, slide_id,
                                                                          region_shards[slide_id]), bar)
        _check_records_are_of(slide_id, region_shards[slide_id], attrs)
        _check_cut_as_recorded(region_shards[slide_id], attrs, cut, os.path.join(shards_dir, shards.MANIFEST))
        return arrays, attrs

    def source_of(slide_id):  # the shard's checksum as hipt-prep recorded it (no re-hash)
        if slide_id not in region_shards:  # lost: embed_one names it
            return {}
        path = region_shards[slide_id]
        sha = _read_json(shards.shard_status_path(path)).get("sha256")
        return {"shard": os.path.basename(path), "sha256": sha or f"{os.path.getsize(path)} bytes"}

    return _extract_slides(out_dir, list(region_shards) + lost, embed_one, extractor=extractor, fmt=fmt,
                           store_dtype=store_dtype, params=dict(params or {}),
                           show_progress=show_progress, source_of=source_of,
                           made_by=_made_by(fingerprint, cut.get("region_px"), cut.get("target_mpp")))


# ---------------------------------------------------------------------------------------------
# Direct path: coordinates + slides -> bags, regions read from the slide (no JPEG round trip)
# ---------------------------------------------------------------------------------------------
def _read_batch(slide, coords: np.ndarray, geom, readers: concurrent.futures.Executor) -> np.ndarray:
    """Regions at level-0 (x, y) rows of ``coords`` -> uint8 [b,S,S,3], read on ``readers``
    (OpenSlide handles are safe for concurrent reads; the C decoders release the GIL)."""
    from data_prep.slide_io import read_region_geometry

    futures = [readers.submit(read_region_geometry, slide, int(x), int(y), geom) for x, y in coords]
    return np.stack([f.result() for f in futures])


def _prefetch_read(slide, coords: np.ndarray, geom, batch: int, readers, pool
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(coords [b,2], images [b,S,S,3]) per batch, the next batch reading while the caller
    runs the device on this one."""
    pending = None
    for i in range(0, len(coords), batch):
        chunk = coords[i:i + batch]
        upcoming = (chunk, pool.submit(_read_batch, slide, chunk, geom, readers))
        if pending is not None:
            yield pending[0], pending[1].result()
        pending = upcoming
    if pending is not None:
        yield pending[0], pending[1].result()


def embed_slide_direct(extractor: Extractor, slide, coords: np.ndarray, geom, *, readers: int = 4,
                       progress: Optional[tqdm] = None) -> dict[str, np.ndarray]:
    """One open slide's regions at ``coords`` (level-0 top-left, [N,2]) read at ``geom`` (a
    data_prep.slide_io.RegionGeometry) -> the arrays of its bag, as ``Extractor.embed_slide``."""
    from data_prep.slide_io import colour_counts, colourless_problem

    extractor._require_vit4k()
    progress = progress if progress is not None else tqdm(disable=True)
    cls256, cls4k = [], []
    colour = np.zeros(2, np.int64)  # hipt-prep's tissue mask refuses a colourless slide; CLAM/TRIDENT
    name = getattr(slide, "_filename", None) or "slide"  # coordinates come without that check
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, readers)) as read_pool:
        batches = _prefetch_read(slide, coords, geom, extractor.batch, read_pool, extractor._pool)
        for chunk, images, (out256, out4k) in extractor.pipelined(batches):
            colour += colour_counts(images, step=16)
            cls256.append(out256)
            cls4k.append(out4k)
            progress.update(len(chunk))
    grey = colourless_problem(colour, name)  # judged over every region (one may be black ink)
    if grey:
        raise ExtractError(grey)
    cls4k_all = np.concatenate(cls4k).astype(np.float32)
    return {"features_cls256": np.concatenate(cls256), "features_cls4k": cls4k_all,
            "slide_embedding": cls4k_all.mean(axis=0), "coords": np.asarray(coords, np.int64)}


def _recorded_slide_size(coords_file, slide) -> tuple[Optional[tuple[int, int]], tuple[int, int]]:
    """(size the coordinate file records for its slide, this slide's size at the same level);
    None when it records none: level0_width/height (TRIDENT, hipt-prep coords) or CLAM's
    level_dim at its patch_level."""
    a = coords_file.attrs
    if "level0_width" in a and "level0_height" in a:
        return (int(a["level0_width"]), int(a["level0_height"])), tuple(slide.dimensions)
    if "level_dim" in a and "patch_level" in a and 0 <= int(a["patch_level"]) < len(slide.level_dimensions):
        dims = [int(v) for v in np.ravel(a["level_dim"])[:2]]
        return (dims[0], dims[1]), tuple(slide.level_dimensions[int(a["patch_level"])])
    return None, tuple(slide.dimensions)


def _direct_geometry(slide, path: str, coords_file, *, target_mpp: float, region_px: int,
                     assume_mpp: Optional[float], mpp_tolerance: float, allow_upsample: bool):
    """RegionGeometry of a slide for the direct path, checked against its coordinate file."""
    from data_prep import coords as coords_io
    from data_prep import slide_io

    made_at = coords_file.attrs.get("hipt_slide_mpp")  # hipt-prep coords: the slide's mpp it used
    assumed = made_at is not None and "assumed" in str(coords_file.attrs.get("hipt_mpp_source", ""))
    try:
        mpp, source = slide_io.resolve_mpp(slide, assume_mpp, path)
    except slide_io.SlideError as e:
        if assumed:  # the value the coordinates were cut with is known: name it
            raise ExtractError(f"{e}; its coordinate file {coords_file.path} was made with --assume-mpp "
                               f"{float(made_at):g}") from None
        raise
    slide_io.check_upsample(mpp, target_mpp, mpp_tolerance, allow_upsample, path)
    geom = slide_io.region_geometry(slide, mpp, region_px, target_mpp, mpp_tolerance)
    extent = coords_io.coords_file_extent(coords_file, slide.level_downsamples)
    if extent is not None and abs(extent - geom.read_px) > 0.02 * geom.read_px:
        if made_at is not None and abs(float(made_at) - mpp) > 0.01 * mpp:  # not --size/--target-mpp
            raise ExtractError(
                f"{coords_file.path}: coordinates are for {extent} px level-0 regions of {path} read at "
                f"{float(made_at):g} um/px{' (assumed)' if assumed else ''}, but this run reads it at {mpp:g} um/px "
                f"({source}{': --assume-mpp' if source == 'assumed' else ''}); give --assume-mpp "
                f"{float(made_at):g}" + (" as hipt-prep coords did" if assumed else ", or redo the coordinates"))
        raise ExtractError(f"{coords_file.path}: coordinates are for {extent} px level-0 regions, but "
                           f"{region_px} px at {target_mpp} um/px reads {geom.read_px} level-0 px of "
                           f"{path}; give matching --size/--target-mpp")
    if len(coords_file.coords) == 0:
        raise ExtractError(f"{coords_file.path}: no coordinates")
    width, height = slide.dimensions
    made_for, here = _recorded_slide_size(coords_file, slide)
    if made_for is not None and made_for != here:
        # The slide a coordinate file was made on (TRIDENT, HIPT-JAX: level 0; CLAM: its
        # patch_level): another size is another slide, even when every coordinate falls inside
        raise ExtractError(f"{coords_file.path}: made for a {made_for[0]} x {made_for[1]} px slide, "
                           f"but {path} is {here[0]} x {here[1]} px there: coordinates of another slide?")
    xy = np.asarray(coords_file.coords)
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if outside.any():
        raise ExtractError(f"{coords_file.path}: {int(outside.sum())} of {len(xy)} regions start outside "
                           f"{path} ({width} x {height} level-0 px; e.g. {tuple(int(v) for v in xy[outside][0])}): "
                           "coordinates made for another slide?")
    return geom, mpp, source


def extract_cohort_direct(model, slides: dict[str, str], coords_dir: str, out_dir: str, *,
                          target_mpp: float = 0.5, region_px: int = 4096,
                          assume_mpp: Optional[float] = None, mpp_tolerance: float = 0.1,
                          allow_upsample: bool = False, readers: int = 4,
                          batch_per_device: int = 1, store_dtype: str = "float32",
                          params: Optional[dict] = None, show_progress: bool = True,
                          extractor: Optional[Extractor] = None,
                          fmt: str = bags.DEFAULT_FORMAT, fingerprint: Optional[dict] = None,
                          overwrite: bool = False, resume_anyway: bool = False) -> dict:
    """`hipt-extract --slides S --coords C`: every slide of ``slides`` (slide_id -> path) with a
    coordinate file in C (HIPT-JAX `hipt-prep coords`, TRIDENT or CLAM h5) ->
    OUT/slides/<slide_id>.<fmt>, each region read straight from the slide at ``target_mpp``;
    returns the manifest.

    Slides are matched to coordinate files by id (``<id>_patches.h5`` or ``<id>.h5``); a slide
    without one fails (named in the manifest). Multi-process runs: see ``_extract_slides``.
    """
    from data_prep import coords as coords_io
    from data_prep import slide_io

    bags.check_format(fmt)
    files = coords_io.find_coords_files(coords_dir, exclude=(out_dir,))  # --out may sit inside it
    orphans = sorted(set(files) - set(slides))
    if orphans and jax.process_index() == 0:  # a slide folder that lost files, or the wrong one
        print(f"hipt-extract: {len(orphans)} coordinate file(s) in {coords_dir} match no slide of --slides "
              f"(not extracted): {', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''}", file=sys.stderr)
    if fingerprint is not None:
        fingerprint = dict(fingerprint, store_dtype=store_dtype, format=fmt, target_mpp=target_mpp,
                           region_px=region_px, assume_mpp=assume_mpp,
                           coords=provenance.config_hash({sid: shards.file_sha256(path)
                                                          for sid, path in files.items()}))
    check_provenance(out_dir, fingerprint, overwrite=overwrite, resume_anyway=resume_anyway, inputs=slides)
    extractor = extractor or Extractor(model, batch_per_device)

    def embed_one(slide_id, bar):
        path = slides[slide_id]
        if slide_id not in files:
            raise ExtractError(f"{path}: no coordinate file {slide_id}_patches.h5 in {coords_dir}")
        coords_io.verify_coords(files[slide_id])
        cf = coords_io.read_coords(files[slide_id])
        slide = slide_io.open_slide(path)
        try:
            geom, mpp, _ = _direct_geometry(slide, path, cf, target_mpp=target_mpp,
                                            region_px=region_px, assume_mpp=assume_mpp,
                                            mpp_tolerance=mpp_tolerance, allow_upsample=allow_upsample)
            arrays = embed_slide_direct(extractor, slide, cf.coords, geom, readers=readers, progress=bar)
        finally:
            slide.close()
        attrs = {"patch_size": int(region_px), "patch_size_level0": int(geom.read_px),
                 "level0_magnification": round(10.0 / mpp, 3),
                 "target_magnification": round(10.0 / geom.mpp, 3), "overlap": 0,
                 "name": slide_id, "mpp": float(geom.mpp)}
        return arrays, attrs

    def source_of(slide_id):  # the slide file and its coordinate file
        coords_sha = shards.file_sha256(files[slide_id]) if slide_id in files else None
        return {"slide": shards.input_identity(slides[slide_id]), "coords_sha256": coords_sha}

    return _extract_slides(out_dir, sorted(slides), embed_one, extractor=extractor, fmt=fmt,
                           store_dtype=store_dtype, params=dict(params or {}, direct=True),
                           show_progress=show_progress, source_of=source_of,
                           made_by=_made_by(fingerprint, region_px, target_mpp), name_of=slides.__getitem__)
