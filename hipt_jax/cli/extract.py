"""`hipt-extract`: region shards -> per-slide HIPT embeddings, at cohort scale.

    hipt-extract --vit256 CKPT256 --vit4k CKPT4K --shards PREP_OUT --out EMB_DIR
    hipt-extract --random-init tiny --shards PREP_OUT --out EMB_DIR            # smoke test

What it computes and writes: hipt_jax.extraction (extract_cohort). Exit codes: 0 every
slide done, 1 some slides failed (named in EMB_DIR/manifest.json), 2 bad usage or input.
"""
from __future__ import annotations

import os
import sys

from hipt_jax.cli import flags

PROG = "hipt-extract"


def build_parser() -> flags.Parser:
    p = flags.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    flags.add_model_flags(p)
    p.add_argument("--shards", required=True, help="hipt-prep output folder (with regions/)")
    p.add_argument("--features", default=None,
                   help="folder of precomputed ViT-256 feature shards (default: SHARDS/features if present)")
    p.add_argument("--out", required=True, help="output folder (slides/*.npz + manifest.json)")
    flags.add_compute_flags(p, batch_per_device=1, patch_batch=True)
    flags.add_storage_flags(p, choices=("float32", "float16"), default="float32")
    flags.add_progress_flag(p)
    flags.add_reuse_flags(p)
    return p


def _run(args) -> int:
    import jax

    from data_prep.shards import MANIFEST
    from hipt_jax import distributed, provenance, workdir_lock
    from hipt_jax.extraction import check_feature_model, extract_cohort

    flags.check_output_dir(args.out, _estimate_bytes(args.shards, args.store_dtype))
    fingerprint = dict(provenance.model_fingerprint(args.vit256, args.vit4k, args.random_init, args.seed),
                       compute_dtype=args.compute_dtype)
    check_feature_model(args.features if args.features is not None else args.shards, fingerprint["vit256"])
    distributed.initialize()
    model = flags.load_hipt4k(args, need_vit4k=True)
    params = {"vit256": args.vit256, "vit4k": args.vit4k,
              "random_init": None if args.random_init == "none" else args.random_init,
              "shards": os.path.abspath(args.shards), "compute_dtype": args.compute_dtype}
    with workdir_lock.hold(args.out, enabled=jax.process_index() == 0):
        manifest = extract_cohort(model, args.shards, args.out, features_dir=args.features,
                                  batch_per_device=args.batch_per_device, store_dtype=args.store_dtype,
                                  params=params, show_progress=not args.no_progress,
                                  fingerprint=fingerprint, overwrite=args.overwrite,
                                  resume_anyway=args.resume_anyway)
    failed = {s: v["error"] for s, v in manifest["slides"].items() if v["status"] == "failed"}
    run = manifest["run"]
    print(f"{PROG}: {run['regions']} regions in {run['seconds']:.1f} s "
          f"({run['regions_per_s']} regions/s); {len(manifest['slides']) - len(failed)} slides ok, "
          f"{len(failed)} failed -> {os.path.join(args.out, MANIFEST)}")
    return flags.report_failed(PROG, failed)


def _estimate_bytes(shards_dir: str, store_dtype: str) -> int:
    """Bags of every region the shards' manifest counts: [256, 384] ViT-256 features in
    ``store_dtype`` + 1 KiB per region (CLS-4K, coordinates, zip overhead)."""
    import json

    try:
        with open(os.path.join(shards_dir, "manifest.json")) as f:
            n_regions = int(json.load(f).get("n_records") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        n_regions = 0
    per_region = 256 * 384 * (2 if store_dtype == "float16" else 4) + 1024
    return max(flags.MIN_FREE_BYTES, n_regions * per_region)


main = flags.command(PROG, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
