"""`hipt-extract`: region shards -> per-slide HIPT embeddings, at cohort scale.

    hipt-extract --vit256 CKPT256 --vit4k CKPT4K --shards PREP_OUT --out EMB_DIR

Input: the output folder of `hipt-prep regions` (PREP_OUT/regions/<slide_id>.array_record, one
region record per 4096 px region, schema data_prep.shards.REGION). When `hipt-prep features` already
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
local devices on the mesh's data axis, so the same code runs on one CPU or eight accelerators.
Several processes (hipt_jax.distributed) take disjoint slides. Resumable: a slide's .npz is
written under a temporary name and renamed when complete, and slides whose .npz exists are
skipped. The work is done by the extraction engine (hipt_jax.extraction); this module is the
command line.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from data_prep.shards import MANIFEST
from hipt_jax.extraction import ExtractError, extract_cohort
from hipt_jax.models.hipt4k import DEFAULT_PATCH_BATCH


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
