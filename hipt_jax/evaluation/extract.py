"""`hipt-extract`: region shards -> per-slide HIPT embeddings, at cohort scale.

    hipt-extract --vit256 CKPT256 --vit4k CKPT4K --shards PREP_OUT --out EMB_DIR

Input: the output folder of `hipt-prep regions` (PREP_OUT/regions/<slide_id>.array_record, one
region record per 4096 px region, schema data_prep.records). When `hipt-prep features` already
wrote PREP_OUT/features/<slide_id>.array_record, those ViT-256 features are reused and only the
cheap ViT-4K runs (pass --features DIR when they live elsewhere).

Output, per slide, EMB_DIR/slides/<slide_id>.npz with
    features_cls256  [M, R*C, 384]  ViT-256 CLS of every 256 px patch (row-major), the
                                    input of HIPT-LGP (float32, or float16 with --store-dtype)
    features_cls4k   [M, 192]       ViT-4K CLS of every region
    slide_embedding  [192]          mean of features_cls4k over the regions (KNN input)
    coords           [M, 2]         (x, y) level-0 top-left corner of each region
and EMB_DIR/manifest.json listing every slide with its region count, status and the run's
parameters.

Regions are batched (``--batch-per-device`` per local device) and the batch is split over all
local devices on the mesh's data axis (hipt_jax.sharding), so the same code runs on one CPU or
eight accelerators. Several processes (hipt_jax.distributed) take disjoint slides. Resumable: a
slide's .npz is written under a temporary name and renamed when complete, and slides whose .npz
exists are skipped. JPEG decoding runs in a thread pool one batch ahead of the device.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from typing import Any, Iterator, Optional

import jax
import numpy as np
from tqdm import tqdm

from data_prep import records
from hipt_jax import sharding
from hipt_jax.models.hipt4k import DEFAULT_PATCH_BATCH

SHARD_EXT = ".array_record"
MANIFEST = "manifest.json"


class ExtractError(Exception):
    """Bad input for extraction (the message names the file and the problem)."""


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------
def _kind_dir(root: str, kind: str) -> str:
    sub = os.path.join(root, kind)
    return sub if os.path.isdir(sub) else root


def list_slides(shards: str) -> list[str]:
    """Slide ids with a region shard under ``shards`` (PREP_OUT or PREP_OUT/regions)."""
    folder = _kind_dir(shards, "regions")
    if not os.path.isdir(folder):
        raise ExtractError(f"{shards}: no such folder")
    ids = sorted(f[: -len(SHARD_EXT)] for f in os.listdir(folder) if f.endswith(SHARD_EXT))
    if not ids:
        raise ExtractError(f"{shards}: no region shards (*{SHARD_EXT}); run `hipt-prep regions` first")
    return ids


def read_records(path: str) -> list[dict]:
    """Decoded record maps of one shard, in order (a slide's shard fits in host memory)."""
    from array_record.python import array_record_module

    reader = None
    try:
        reader = array_record_module.ArrayRecordReader(path)
        return [records.unpack(raw) for raw in reader.read_all()]
    except (RuntimeError, ValueError, OSError) as e:  # array_record raises RuntimeError on bad files
        raise ExtractError(f"{path}: not a readable shard of records ({e})") from None
    finally:
        if reader is not None:
            try:
                reader.close()
            except RuntimeError:
                pass


def _feature_shard(features_dir: Optional[str], slide_id: str) -> Optional[str]:
    if not features_dir:
        return None
    path = os.path.join(_kind_dir(features_dir, "features"), slide_id + SHARD_EXT)
    return path if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------
class Extractor:
    """The HIPT4K forward (crop, ViT-256, regrid, ViT-4K) jitted once per region shape with the
    batch split over the local devices' data axis; ViT-4K alone for precomputed features."""

    def __init__(self, model, batch_per_device: int = 1, devices=None):
        from hipt_jax.models.archs import build_vit
        from hipt_jax.models.hipt4k import region_forward

        if model.params4k is None:
            raise ExtractError("extraction needs a ViT-4K (--vit4k)")
        self.model = model
        self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices or jax.local_devices())
        self.batch = batch_per_device * self.mesh.size
        self._data = sharding.batch_sharding(self.mesh)
        repl = sharding.replicated(self.mesh)
        self.params256 = jax.device_put(model.params256, repl)
        self.params4k = jax.device_put(model.params4k, repl)

        def full(p256, p4k, regions_u8):
            out = region_forward(p256, p4k, regions_u8, config256=model.config256,
                                 config4k=model.config4k, patch_batch=model.patch_batch,
                                 dtype=model.dtype)
            return out["features_cls256"], out["features_cls4k"]

        vit4k = build_vit(model.config4k, dtype=model.dtype)

        def only4k(p4k, grids):
            cls, _ = vit4k.apply(p4k, grids)
            return cls.astype(np.float32)

        self._full = jax.jit(full, in_shardings=(repl, repl, self._data), out_shardings=self._data)
        self._only4k = jax.jit(only4k, in_shardings=(repl, self._data), out_shardings=self._data)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        """Pad the batch axis to the fixed batch size (one compiled shape per region size)."""
        if len(x) == self.batch:
            return x
        return np.concatenate([x, np.zeros((self.batch - len(x),) + x.shape[1:], x.dtype)])

    def regions(self, images_u8: np.ndarray):
        """uint8 [b,H,W,3] (b <= batch) -> async (cls256 [batch,R*C,384], cls4k [batch,192])."""
        return self._full(self.params256, self.params4k, jax.device_put(self._pad(images_u8), self._data))

    def grids(self, grids: np.ndarray):
        """[b,R,C,384] precomputed ViT-256 features -> async cls4k [batch,192]."""
        return self._only4k(self.params4k, jax.device_put(self._pad(grids.astype(np.float32)), self._data))


# ---------------------------------------------------------------------------------------------
# One slide
# ---------------------------------------------------------------------------------------------
def _batches(items: list, size: int, key) -> Iterator[list]:
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
    return np.stack([records.decode_jpeg(r["image_jpeg"]) for r in batch])  # [b,H,W,3] uint8


def embed_slide(extractor: Extractor, region_shard: str, feature_shard: Optional[str],
                pool: concurrent.futures.Executor, progress: Optional[tqdm] = None) -> dict[str, np.ndarray]:
    """All regions of one slide -> the arrays stored in its .npz (see module docstring)."""
    recs = read_records(region_shard)
    if not recs:
        raise ExtractError(f"{region_shard}: shard has no region records")
    bad = [r.get("schema") for r in recs if r.get("schema") != records.REGION_SCHEMA]
    if bad:
        raise ExtractError(f"{region_shard}: records of schema {bad[0]!r}, expected {records.REGION_SCHEMA!r}")
    coords = np.array([[r["x"], r["y"]] for r in recs], np.int64)
    cls256, cls4k = [], []
    if feature_shard is not None:
        feats = {(f["x"], f["y"]): f for f in read_records(feature_shard)}
        missing = [tuple(c) for c in coords if tuple(c) not in feats]
        if missing:
            raise ExtractError(f"{feature_shard}: no features for region(s) at {missing[:3]}")
        ordered = [feats[tuple(c)] for c in coords]
        for batch in _batches(ordered, extractor.batch, key=lambda f: tuple(f["grid"])):
            rows, cols = batch[0]["grid"]
            # [b,R*C,384] -> [b,R,C,384]: row-major grid, token i*C+j is patch (i, j).
            f256 = np.stack([records.decode_features(f) for f in batch])
            out4k = extractor.grids(f256.reshape(len(batch), rows, cols, -1))
            cls256.append(f256)
            cls4k.append(np.asarray(out4k)[: len(batch)])
            if progress is not None:
                progress.update(len(batch))
    else:
        batches = list(_batches(recs, extractor.batch, key=lambda r: r["region_px"]))
        # Decode batch i+1 on the host while the device runs batch i.
        pending = pool.submit(_decode, batches[0])
        for i, batch in enumerate(batches):
            images = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(_decode, batches[i + 1])
            out256, out4k = extractor.regions(images)
            cls256.append(np.asarray(out256)[: len(batch)])
            cls4k.append(np.asarray(out4k)[: len(batch)])
            if progress is not None:
                progress.update(len(batch))
    if len({c.shape[1:] for c in cls256}) > 1:
        raise ExtractError(f"{region_shard}: regions of different sizes in one slide")
    cls4k_all = np.concatenate(cls4k).astype(np.float32)
    return {
        "features_cls256": np.concatenate(cls256),
        "features_cls4k": cls4k_all,
        "slide_embedding": cls4k_all.mean(axis=0),
        "coords": coords,
    }


def _save_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def slide_path(out_dir: str, slide_id: str) -> str:
    return os.path.join(out_dir, "slides", slide_id + ".npz")


# ---------------------------------------------------------------------------------------------
# Cohort
# ---------------------------------------------------------------------------------------------
def extract_cohort(model, shards: str, out_dir: str, *, features_dir: Optional[str] = None,
                   batch_per_device: int = 1, store_dtype: str = "float32",
                   params: Optional[dict] = None, show_progress: bool = True,
                   extractor: Optional[Extractor] = None) -> dict:
    """Embed every slide of ``shards`` that has no .npz in ``out_dir`` yet; returns the manifest.

    ``model`` is a hipt_jax.HIPT4K with a ViT-4K. In a multi-process run each process takes
    slides i with i % process_count == process_index; process 0 writes the manifest.
    Pass a prebuilt ``extractor`` to reuse its compiled functions across calls.
    """
    slide_ids = list_slides(shards)
    features_dir = features_dir if features_dir is not None else shards
    os.makedirs(os.path.join(out_dir, "slides"), exist_ok=True)
    mine = slide_ids[jax.process_index()::jax.process_count()]
    todo = [s for s in mine if not os.path.isfile(slide_path(out_dir, s))]
    extractor = extractor or Extractor(model, batch_per_device)
    region_dir = _kind_dir(shards, "regions")
    errors: dict[str, str] = {}
    n_regions = 0
    t0 = time.time()
    bar = tqdm(total=None, unit="region", desc="extract", disable=not show_progress, dynamic_ncols=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for slide_id in todo:
            bar.set_postfix_str(slide_id)
            try:
                arrays = embed_slide(extractor, os.path.join(region_dir, slide_id + SHARD_EXT),
                                     _feature_shard(features_dir, slide_id), pool, bar)
            except (ExtractError, ValueError) as e:
                errors[slide_id] = str(e)
                continue
            arrays["features_cls256"] = arrays["features_cls256"].astype(store_dtype)
            _save_npz_atomic(slide_path(out_dir, slide_id), arrays)
            n_regions += len(arrays["coords"])
    bar.close()
    seconds = time.time() - t0
    manifest = write_manifest(out_dir, slide_ids, errors, dict(params or {}, store_dtype=store_dtype,
                                                                 batch=extractor.batch))
    manifest["run"] = {"regions": n_regions, "seconds": round(seconds, 3),
                       "regions_per_s": round(n_regions / seconds, 4) if seconds > 0 else None}
    return manifest


def write_manifest(out_dir: str, slide_ids: list[str], errors: dict[str, str], params: dict) -> dict:
    """manifest.json: per slide {file, num_regions, status[, error]} + parameters."""
    slides = {}
    for s in slide_ids:
        path = slide_path(out_dir, s)
        if os.path.isfile(path):
            with np.load(path) as z:
                slides[s] = {"file": os.path.relpath(path, out_dir), "status": "done",
                             "num_regions": int(z["coords"].shape[0])}
        elif s in errors:
            slides[s] = {"status": "failed", "error": errors[s]}
        else:
            slides[s] = {"status": "pending"}
    manifest = {"schema": "hipt.embeddings.v1", "params": params, "slides": slides}
    if jax.process_index() == 0:
        _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def load_slide(out_dir: str, slide_id: str) -> dict[str, np.ndarray]:
    """The arrays of one extracted slide (features_cls256 as float32)."""
    path = slide_path(out_dir, slide_id)
    if not os.path.isfile(path):
        raise ExtractError(f"{path}: slide {slide_id!r} was not extracted")
    with np.load(path) as z:
        out = {k: z[k] for k in z.files}
    out["features_cls256"] = out["features_cls256"].astype(np.float32)
    return out


def load_slide_embeddings(out_dir: str) -> dict[str, np.ndarray]:
    """slide_id -> slide embedding [192] for every extracted slide under ``out_dir``."""
    folder = os.path.join(out_dir, "slides")
    if not os.path.isdir(folder):
        raise ExtractError(f"{out_dir}: no slides/ folder; run hipt-extract first")
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".npz") and ".tmp-" not in f:
            with np.load(os.path.join(folder, f)) as z:
                out[f[:-4]] = np.asarray(z["slide_embedding"], np.float32)
    if not out:
        raise ExtractError(f"{folder}: no extracted slides")
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hipt-extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--vit256", help="ViT-256 checkpoint (Orbax dir from hipt-convert, or .pth)")
    p.add_argument("--vit4k", help="ViT-4K checkpoint (Orbax dir or .pth)")
    p.add_argument("--random-init", choices=["full", "tiny"],
                   help="random weights instead of checkpoints (smoke tests only)")
    p.add_argument("--shards", required=True, help="hipt-prep output folder (with regions/)")
    p.add_argument("--features", default=None,
                   help="folder of precomputed ViT-256 feature shards (default: SHARDS/features if present)")
    p.add_argument("--out", required=True, help="output folder (slides/*.npz + manifest.json)")
    p.add_argument("--batch-per-device", type=int, default=1, help="regions per device per step")
    p.add_argument("--patch-batch", type=int, default=DEFAULT_PATCH_BATCH, help="ViT-256 patches per minibatch")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--store-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the stored [M,R*C,384] features")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from hipt_jax import distributed

    distributed.initialize()
    import jax.numpy as jnp

    from hipt_jax.models.hipt4k import HIPT4K

    dtype = jnp.bfloat16 if args.compute_dtype == "bfloat16" else jnp.float32
    try:
        if args.random_init:
            model = HIPT4K.random_init(seed=0, tiny=args.random_init == "tiny",
                                       patch_batch=args.patch_batch, dtype=dtype)
        elif args.vit256 and args.vit4k:
            model = HIPT4K.from_checkpoints(vit256=args.vit256, vit4k=args.vit4k,
                                            patch_batch=args.patch_batch, dtype=dtype)
        else:
            raise ExtractError("give --vit256 and --vit4k checkpoints (or --random-init for a smoke test)")
        params = {"vit256": args.vit256, "vit4k": args.vit4k, "random_init": args.random_init,
                  "shards": os.path.abspath(args.shards), "compute_dtype": args.compute_dtype}
        manifest = extract_cohort(model, args.shards, args.out, features_dir=args.features,
                                  batch_per_device=args.batch_per_device, store_dtype=args.store_dtype,
                                  params=params, show_progress=not args.no_progress)
    except (ExtractError, ValueError, FileNotFoundError) as e:
        print(f"hipt-extract: error: {e}", file=sys.stderr)
        return 2
    failed = {s: v["error"] for s, v in manifest["slides"].items() if v["status"] == "failed"}
    for s, err in failed.items():
        print(f"hipt-extract: slide {s} failed: {err}", file=sys.stderr)
    run = manifest["run"]
    print(f"hipt-extract: {run['regions']} regions in {run['seconds']:.1f} s "
          f"({run['regions_per_s']} regions/s); {len(manifest['slides']) - len(failed)} slides ok, "
          f"{len(failed)} failed -> {os.path.join(args.out, MANIFEST)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
