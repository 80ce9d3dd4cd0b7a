"""`hipt-extract`: region shards -> per-slide HIPT embeddings, at cohort scale.

    hipt-extract --vit256 CKPT256 --vit4k CKPT4K --shards PREP_OUT --out EMB_DIR
    hipt-extract --random-init tiny --shards PREP_OUT --out EMB_DIR            # smoke test
    hipt-extract ... --format h5        # TRIDENT/CLAM h5 bags (or pt: official HIPT .pt bags)
    hipt-extract --vit256 A --vit4k B --slides SLIDES --coords COORDS --out EMB_DIR  # direct reads
    hipt-extract --vitwsi STAGE3_EXPORT --out EMB_DIR   # add slide_embedding_wsi to existing bags
    hipt-extract ... --shards PREP_OUT --out EMB_DIR --vitwsi STAGE3_EXPORT   # both in one go

With --slides/--coords (coordinate files of `hipt-prep coords`, TRIDENT or CLAM) each region is
read straight from the slide at --target-mpp: no region shards, no JPEG.

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
    flags.add_model_flags(p, required=False)
    p.add_argument("--vitwsi", default=None, type=flags.path_arg,
                   help="stage-3 ViT-WSI export (hipt-pretrain configs/pretrain_vitwsi.py): add "
                        "slide_embedding_wsi and attention_wsi to every bag; alone (no --shards/"
                        "--slides) it runs over the bags already in --out")
    p.add_argument("--shards", default=None, type=flags.path_arg,
                   help="hipt-prep regions output folder (with regions/)")
    d = p.add_argument_group("direct reads (instead of --shards)")
    d.add_argument("--slides", default=None, type=flags.path_arg,
                   help="folder of slides (recursive), CSV with path[,slide_id], or one slide file")
    d.add_argument("--coords", default=None, type=flags.path_arg,
                   help="folder of h5 coordinate files (hipt-prep coords, TRIDENT or CLAM), searched recursively")
    d.add_argument("--allow-upsample", action="store_true", help="accept slides coarser than --target-mpp")
    d.add_argument("--readers", type=flags.int_at_least(1, 256), default=4, help="threads reading regions from the slide")
    flags.add_region_flags(p, mpp_tolerance=True)
    p.add_argument("--features", default=None, type=flags.path_arg,
                   help="folder of precomputed ViT-256 feature shards (default: SHARDS/features if present)")
    p.add_argument("--out", required=True, type=flags.path_arg,
                   help="output folder (slides/<id>.<format> + manifest.json)")
    p.add_argument("--format", choices=("npz", "h5", "pt"), default="npz",
                   help="bag format: npz (all arrays), h5 (TRIDENT/CLAM layout: features + coords "
                        "with attributes), pt (official HIPT region bag [M,256,384]; needs torch)")

    def _check_source(parser, args):
        direct = args.slides is not None or args.coords is not None
        if direct and (args.slides is None or args.coords is None):
            parser.error("--slides and --coords go together")
        if args.vitwsi and not direct and args.shards is None:
            return  # the stage-3 pass alone, over --out's bags
        if direct == (args.shards is not None):
            parser.error("give either --shards or --slides with --coords")
        if args.random_init == "none" and not args.vit256:
            parser.error("give --vit256 CHECKPOINT (and usually --vit4k), or --random-init tiny|full")
    p.finish(_check_source)
    flags.add_compute_flags(p, batch_per_device=1, patch_batch=True)
    flags.add_storage_flags(p, choices=("float32", "float16"), default="float32")
    flags.add_progress_flag(p)
    flags.add_reuse_flags(p)
    return p


def _run(args) -> int:
    if args.vitwsi and args.shards is None and args.slides is None:
        return _vitwsi(args)
    code = _run_extract(args)
    return max(code, _vitwsi(args)) if args.vitwsi else code


def _vitwsi(args) -> int:
    """The stage-3 pass: slide_embedding_wsi (+ attention_wsi) into every bag of --out."""
    from hipt_jax.wsi import add_wsi_embeddings

    failed = add_wsi_embeddings(args.out, args.vitwsi, show_progress=not args.no_progress)
    print(f"{PROG}: ViT-WSI slide embeddings added to the bags in {args.out}")
    return flags.report_failed(PROG, failed)


def _check_shards_folder(args) -> None:
    """--shards is hipt-prep's --out folder (not its regions/ subfolder), and region flags that
    would be ignored (the shards fix the region size and mpp) must not disagree with it."""
    import glob
    import json

    from data_prep.shards import REGION, read_prep_manifest

    if not os.path.isdir(os.path.join(args.shards, REGION.folder)) and glob.glob(os.path.join(args.shards, "*.array_record")):
        raise flags.UsageError(f"{args.shards}: holds the shards themselves; give the hipt-prep --out folder "
                               f"that contains {REGION.folder}/ ({os.path.dirname(os.path.abspath(args.shards))})")
    made = read_prep_manifest(args.shards).get("params") or {}
    for flag, key in (("size", "region_px"), ("target_mpp", "target_mpp")):
        given, cut = getattr(args, flag), made.get(key)
        if flag in getattr(args, "given", ()) and cut is not None and given != cut:
            raise flags.UsageError(
                f"--{flag.replace('_', '-')} {given}: the region shards in {args.shards} were cut by hipt-prep "
                f"with {key}={cut}; region flags apply to direct reads (--slides --coords) only")


def _run_extract(args) -> int:
    import jax

    from data_prep.shards import MANIFEST
    from hipt_jax import distributed, provenance, workdir_lock
    from hipt_jax.extraction import check_feature_model

    flags.check_output_dir(args.out, _estimate_bytes(args.shards, args.store_dtype) if args.shards else 0)
    distributed.initialize()
    flags.report_devices(PROG)
    args.compute_dtype = flags.compute_dtype_name(args.compute_dtype)  # "auto" -> what this backend computes in
    fingerprint = dict(provenance.model_fingerprint(args.vit256, args.vit4k, args.random_init, args.seed),
                       compute_dtype=args.compute_dtype)
    if args.shards:
        _check_shards_folder(args)
        check_feature_model(args.features if args.features is not None else args.shards, fingerprint["vit256"])
    model = flags.load_hipt4k(args, need_vit4k=True)
    params = {"vit256": args.vit256, "vit4k": args.vit4k,
              "random_init": None if args.random_init == "none" else args.random_init,
              "shards": args.shards and os.path.abspath(args.shards), "compute_dtype": args.compute_dtype}
    with workdir_lock.hold(args.out, enabled=jax.process_index() == 0):
        manifest = _extract(args, model, params, fingerprint)
    failed = {s: v["error"] for s, v in manifest["slides"].items() if v["status"] == "failed"}
    n_done = sum(v["status"] == "done" for v in manifest["slides"].values())
    print(summary_line(manifest["run"], n_done, failed, os.path.join(args.out, MANIFEST)))
    return flags.report_failed(PROG, failed)


def summary_line(run: dict, n_done: int, failed: dict, manifest: str) -> str:
    """The run's last line. A rerun that finds every slide done says so: "0 regions in 0.0 s
    (0.0 regions/s)" read like an extraction that found nothing to do in the slides."""
    if run["regions"] == 0 and not failed:
        return f"{PROG}: {n_done} slide(s) already done, nothing to extract -> {manifest}"
    return (f"{PROG}: {run['regions']} regions in {run['seconds']:.1f} s ({run['regions_per_s']} regions/s); "
            f"{n_done} slides ok, {len(failed)} failed -> {manifest}")


def _extract(args, model, params: dict, fingerprint: dict) -> dict:
    """The shard path (--shards) or the direct path (--slides with --coords)."""
    from hipt_jax.extraction import extract_cohort, extract_cohort_direct

    common = dict(batch_per_device=args.batch_per_device, store_dtype=args.store_dtype,
                  show_progress=not args.no_progress, fmt=args.format, fingerprint=fingerprint,
                  overwrite=args.overwrite, resume_anyway=args.resume_anyway)
    if args.coords is None:
        return extract_cohort(model, args.shards, args.out, features_dir=args.features, params=params,
                              **common)
    from data_prep.runner import find_slide_files

    slides = {t.slide_id: t.path for t in find_slide_files(args.slides)}
    params.update(shards=None, slides=os.path.abspath(args.slides), coords=os.path.abspath(args.coords),
                  target_mpp=args.target_mpp, size=args.size, assume_mpp=args.assume_mpp)
    return extract_cohort_direct(
        model, slides, args.coords, args.out, target_mpp=args.target_mpp, region_px=args.size,
        assume_mpp=args.assume_mpp, mpp_tolerance=args.mpp_tolerance, allow_upsample=args.allow_upsample,
        readers=args.readers, params=params, **common)


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


main = flags.command(PROG, build_parser, _run, devices_at_start=False)  # after jax.distributed


if __name__ == "__main__":
    sys.exit(main())
