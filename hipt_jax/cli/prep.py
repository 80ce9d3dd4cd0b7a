"""`hipt-prep` (also `python -m hipt_jax.cli.prep`): slides -> region, patch and feature shards.

    hipt-prep regions  --slides DIR_OR_CSV --out OUT [--target-mpp 0.5] [--region 4096] [--workers N]
                       [--runner pool|DirectRunner|DataflowRunner|FlinkRunner|SparkRunner] [beam flags]
    hipt-prep coords   --slides DIR_OR_CSV --out OUT [same selection flags]   # h5 coordinates, no pixels
    hipt-prep patches  --regions OUT --out OUT_PATCHES [--patch 256] [--min-tissue 0.5]
    hipt-prep features --regions OUT --out OUT_FEATS --vit256 CKPT [--store-dtype float16] [--batch-per-device 2]
    hipt-prep tfds     --kind regions|patches|features --shards OUT --data-dir TFDS_DIR [--redo]

Exit code (hipt_jax.cli.flags): 0 when every slide/shard succeeded, 1 when some failed (named
in OUT/manifest.json), 2 for bad command-line input.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

from data_prep.runner import InputError, check_beam_args
from hipt_jax.cli import flags

RUNNERS = ("pool", "DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner",
           "PortableRunner", "PrismRunner")
JPEG_QUALITY = flags.int_at_least(1, 100)
SATURATION = flags.int_at_least(0, 255)  # HSV saturation, 8 bit
MIN_MASK_PX_PER_REGION = 8  # tissue-mask px along a region side: fractions in steps of 1/64 at worst


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=flags.int_at_least(1), default=max(1, (os.cpu_count() or 1)),
                   help="process-pool size (runner 'pool')")
    p.add_argument("--runner", default="pool", choices=RUNNERS,
                   help="'pool' (local processes, default) or an Apache Beam runner; unknown flags "
                        "are passed to Beam's PipelineOptions")
    p.add_argument("--beam-arg", action="append", default=[], metavar="FLAG",
                   help="flag for Beam that clashes with ours, e.g. --beam-arg=--region=europe-west1")
    p.add_argument("--redo", action="store_true", help="redo finished items too")
    flags.add_progress_flag(p)


def _add_selection_flags(r: argparse.ArgumentParser) -> None:
    """Which regions of which slides: shared by `regions` and `coords` (one selection)."""
    r.add_argument("--slides", required=True, type=flags.path_arg,
                   help="folder of slides (recursive), CSV with path[,slide_id], or one slide file")
    r.add_argument("--out", required=True, type=flags.path_arg)
    flags.add_region_flags(r, size_flag="--region", mpp_tolerance=True)
    r.add_argument("--allow-upsample", action="store_true",
                   help="accept slides coarser than --target-mpp (their regions are upsampled)")
    r.add_argument("--min-tissue", type=flags.float_in(0.0, 1.0, low_open=False), default=0.1, help="minimum tissue fraction of a kept region")
    r.add_argument("--mask-px", type=flags.int_at_least(1), default=16, help="target px per tissue-mask px")
    r.add_argument("--min-saturation", type=SATURATION, default=15, help="floor of the Otsu saturation threshold")
    r.add_argument("--median-blur", type=flags.int_at_least(0), default=7)
    r.add_argument("--close-px", type=flags.int_at_least(0), default=4)
    r.add_argument("--min-tissue-area", type=flags.int_at_least(0), default=256 * 256, help="target px^2")
    r.add_argument("--min-hole-area", type=flags.int_at_least(0), default=256 * 256, help="target px^2")
    a = r.add_argument_group("annotations (QuPath GeoJSON, one <slide_id>.geojson per slide)")
    a.add_argument("--annotations", default=None, type=flags.path_arg, metavar="DIR",
                   help="keep only regions inside the slide's inclusion polygons, drop those mostly "
                        "inside its exclusion polygons")
    a.add_argument("--include-classes", default="",
                   help="comma-separated classification names of inclusion polygons (default: every "
                        "polygon not excluded)")
    a.add_argument("--exclude-classes", default="Exclude,Ignore",
                   help="comma-separated classification names of exclusion polygons")
    a.add_argument("--annotation-overlap", type=flags.float_in(0.0, 1.0), default=0.5,
                   help="fraction of a region that must lie inside inclusions (or, to drop it, exclusions)")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: unknown (Beam) flags must never be taken for abbreviations of ours.
    ap = flags.Parser(prog="hipt-prep", description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)

    r = sub.add_parser("regions", help="slides -> tissue masks -> region shards")
    _add_selection_flags(r)
    r.add_argument("--jpeg-quality", type=JPEG_QUALITY, default=90)
    r.add_argument("--codec", default="jpeg", choices=("jpeg", "png"),
                   help="region image codec: jpeg (--jpeg-quality) or png (lossless, larger)")
    _add_run_flags(r)

    c = sub.add_parser("coords", help="slides -> tissue masks -> CLAM/TRIDENT h5 region coordinates (no pixels)")
    _add_selection_flags(c)
    _add_run_flags(c)

    p = sub.add_parser("patches", help="region shards -> 256 px patch shards (stage-1 pretraining)")
    p.add_argument("--regions", required=True, type=flags.path_arg, help="output folder of `hipt-prep regions`")
    p.add_argument("--out", required=True, type=flags.path_arg)
    p.add_argument("--patch", type=flags.int_at_least(16), default=256)
    p.add_argument("--min-tissue", type=flags.float_in(0.0, 1.0, low_open=False), default=0.0,
                   help="drop patches whose non-background fraction is below this (0 = keep all)")
    p.add_argument("--background-saturation", type=SATURATION, default=20,
                   help="pixels with HSV saturation <= this count as background")
    p.add_argument("--jpeg-quality", type=JPEG_QUALITY, default=90)
    _add_run_flags(p)

    f = sub.add_parser("features", help="region shards -> [R*C,384] ViT-256 feature shards")
    f.add_argument("--regions", required=True, type=flags.path_arg, help="output folder of `hipt-prep regions`")
    f.add_argument("--out", required=True, type=flags.path_arg)
    flags.add_model_flags(f, vit4k=False)
    flags.add_storage_flags(f, choices=("float16", "float32"), default="float16", deprecated_dtype=True)
    flags.add_compute_flags(f, compute_dtype=False, batch_per_device=1, batch_help="regions per forward pass")
    f.add_argument("--redo", action="store_true")
    flags.add_progress_flag(f)

    t = sub.add_parser("tfds", help="register existing shards as a TFDS dataset (array_record)")
    t.add_argument("--kind", required=True, choices=("regions", "patches", "features"))
    t.add_argument("--shards", required=True, type=flags.path_arg,
                   help="output folder of the matching hipt-prep command")
    t.add_argument("--data-dir", required=True, type=flags.path_arg, help="TFDS data_dir to build into")
    t.add_argument("--redo", action="store_true",
                   help="rebuild the dataset when --data-dir holds one built from other or changed shards")
    return ap


def _selection_params(args) -> dict:
    """RegionParams fields shared by `regions` and `coords`."""
    from data_prep.tissue import TissueParams

    if args.region < 256 or args.region % 256:
        raise InputError(f"--region {args.region}: must be a positive multiple of 256")
    if args.mask_px * MIN_MASK_PX_PER_REGION > args.region:
        # A region of a few mask pixels has no measurable tissue fraction: --mask-px 512 with
        # --region 512 kept an arbitrary set of regions (blank ones too), exit 0.
        raise InputError(f"--mask-px {args.mask_px}: tissue-mask pixels of {args.mask_px} px leave "
                         f"{args.region} px regions {args.region / args.mask_px:g} mask px a side, too coarse "
                         f"to measure their tissue fraction; use at most {args.region // MIN_MASK_PX_PER_REGION}")
    if args.annotations and not os.path.isdir(args.annotations):
        raise InputError(f"--annotations {args.annotations}: not a folder")
    tissue = TissueParams(mask_px=args.mask_px, median_blur=args.median_blur,
                          min_saturation=args.min_saturation, close_px=args.close_px,
                          min_tissue_area=args.min_tissue_area, min_hole_area=args.min_hole_area)
    extra = {}
    if args.annotations:  # only recorded when used, so older output folders stay compatible
        extra = dict(annotations=os.path.abspath(args.annotations),
                     include_classes=args.include_classes, exclude_classes=args.exclude_classes,
                     annotation_overlap=args.annotation_overlap)
    if args.allow_upsample:
        extra["allow_upsample"] = True
    return dict(target_mpp=args.target_mpp, region_px=args.region,
                mpp_tolerance=args.mpp_tolerance, assume_mpp=args.assume_mpp,
                min_tissue_fraction=args.min_tissue, tissue=tissue, **extra)


def _regions(args, beam_args) -> int:
    from data_prep.runner import prepare_regions

    extra = dict(codec="png") if args.codec == "png" else {}
    manifest = prepare_regions(
        args.slides, args.out, workers=args.workers, runner=args.runner, beam_args=beam_args,
        redo=args.redo, jpeg_quality=args.jpeg_quality, **extra, **_selection_params(args))
    return _report(manifest, os.path.abspath(args.out))


def _coords(args, beam_args) -> int:
    from data_prep.runner import prepare_coords

    manifest = prepare_coords(args.slides, args.out, workers=args.workers, runner=args.runner,
                              beam_args=beam_args, redo=args.redo, **_selection_params(args))
    return _report(manifest, os.path.abspath(args.out))


def _patches(args, beam_args) -> int:
    from data_prep.patches import PatchParams, process_region_shard
    from data_prep.runner import run_items
    from data_prep.shards import REGION, list_slide_shards, region_shard_identity

    params = PatchParams(patch_px=args.patch, min_tissue_fraction=args.min_tissue,
                         background_saturation=args.background_saturation,
                         jpeg_quality=args.jpeg_quality)
    src = os.path.abspath(args.regions)
    ids = list(list_slide_shards(src, REGION))
    _check_patch_divides(src, args.patch)
    out = os.path.abspath(args.out)
    manifest = run_items(process_region_shard, ids, ids, out, "patches",
                         dict(dataclasses.asdict(params), regions=src), (src, out, params),
                         workers=args.workers, runner=args.runner, beam_args=beam_args, redo=args.redo,
                         source_of=functools.partial(region_shard_identity, src), drop_orphans=True)
    return _report(manifest, out)


def _check_patch_divides(regions_dir: str, patch: int) -> None:
    """--patch must cut the regions into whole patches: 300 px in 512 px regions kept one patch
    per region and dropped the rest without a word. The region side as hipt-prep recorded it."""
    from data_prep.shards import read_prep_manifest

    try:
        region_px = int(read_prep_manifest(regions_dir)["params"]["region_px"])
    except (KeyError, TypeError, ValueError):
        return  # a folder of region shards without hipt-prep's manifest: nothing recorded to check
    if region_px % patch:
        raise InputError(f"--patch {patch}: does not divide the {region_px} px regions of {regions_dir} "
                         f"({region_px % patch} px of every region row and column would be dropped); "
                         f"use a divisor of {region_px}")


def _features(args) -> int:
    from data_prep.patches import derive_shard
    from data_prep.runner import run_items
    from data_prep.shards import REGION, list_slide_shards, region_shard_identity
    from hipt_jax.extraction import Extractor
    from hipt_jax.models.hipt4k import HIPT4K

    src = os.path.abspath(args.regions)
    ids = list(list_slide_shards(src, REGION))
    out = os.path.abspath(args.out)
    random_init, tiny = args.random_init != "none", args.random_init == "tiny"
    try:  # load weights once, before any shard: a bad checkpoint fails fast
        model = (HIPT4K.random_init(seed=args.seed, tiny=tiny, with_vit4k=False) if random_init
                 else HIPT4K.from_checkpoints(vit256=args.vit256, vit4k=None))
    except Exception as e:
        raise InputError(f"cannot load ViT-256 weights from {args.vit256}: {type(e).__name__}: {e}") from None
    extractor = Extractor(model, batch_per_device=args.batch_per_device)
    write_features = functools.partial(extractor.write_feature_shard, store_dtype=args.store_dtype)
    from hipt_jax import provenance

    params = dict(regions=src, vit256=args.vit256 and os.path.abspath(args.vit256),
                  random_init=random_init, tiny=tiny, dtype=args.store_dtype,
                  vit256_id=provenance.model_fingerprint(args.vit256, None, args.random_init, args.seed)["vit256"])
    # JAX already spreads each batch over every core/accelerator of the host: one process.
    manifest = run_items(derive_shard, ids, ids, out, "features", params,
                         (src, out, "features", write_features), workers=1, runner="pool",
                         redo=args.redo, source_of=functools.partial(region_shard_identity, src),
                         drop_orphans=True)
    return _report(manifest, out)


def _tfds(args) -> int:
    from data_prep.tfds_builders import ShardsChanged, build_tfds

    try:
        builder = build_tfds(args.kind, os.path.abspath(args.shards), os.path.abspath(args.data_dir),
                             redo=args.redo)
    except (ShardsChanged, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    how = "reused (built from the same shards)" if builder.hipt_reused else "built"
    print(f"TFDS dataset {builder.info.full_name} in {args.data_dir}, {how}: "
          + ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items()))
    return 0


def _report(manifest: dict, out: str) -> int:
    counts = manifest["counts"]
    failed = {k: v.get("error") for k, v in manifest["items"].items() if v.get("status") != "done"}
    print(f"{manifest['kind']}: {counts.get('done', 0)} done, {len(failed)} failed, "
          f"{manifest['n_records']} records -> {out}")
    return flags.report_failed(f"hipt-prep {manifest['kind']}", failed)


def _estimate_bytes(args) -> int:
    """Free space a hipt-prep run needs, checked before any work (an estimate, not a bound):
    regions: half the slides' bytes (JPEG regions of the tissue at 20x from mostly 40x slides);
    patches: the region shards' bytes (the same pixels re-cut); features: [256, 384] per region
    in --store-dtype; coords, tfds: the minimum."""
    import glob as glob_lib

    def total(paths) -> int:
        return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))

    need = 0
    if args.command == "regions" and os.path.isdir(args.slides):
        need = total(os.path.join(r, f) for r, _, fs in os.walk(args.slides) for f in fs) // 2
    elif args.command in ("patches", "features"):
        regions = glob_lib.glob(os.path.join(args.regions, "**", "*.array_record"), recursive=True)
        if args.command == "patches":
            need = total(regions)
        else:
            try:
                with open(os.path.join(args.regions, "manifest.json")) as f:
                    n = int(json.load(f).get("n_records") or 0)
            except (OSError, ValueError, TypeError, AttributeError):
                n = 0
            need = n * 256 * 384 * (2 if args.store_dtype == "float16" else 4)
    return max(flags.MIN_FREE_BYTES, need)


def main(argv=None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    runner = getattr(args, "runner", "pool")
    extra = list(extra) + list(getattr(args, "beam_arg", []))
    if extra and args.command == "tfds":  # build_tfds(..., beam_runner=...) from Python runs on Beam
        ap.error(f"unrecognized arguments: {' '.join(extra)} (hipt-prep tfds builds locally and takes no "
                 "--runner or Beam flags; from Python, data_prep.tfds_builders.build_tfds(..., beam_runner=...))")
    tokens = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if runner != "pool" and any(t == "--workers" or t.startswith("--workers=") for t in tokens):
        ap.error(f"--workers sizes the process pool (--runner pool), not {runner}'s workers (it was ignored); "
                 "DirectRunner: --direct_running_mode=multi_processing --direct_num_workers=N")
    if extra and (runner == "pool" or args.command == "features"):
        ap.error(f"unrecognized arguments: {' '.join(extra)} (only Beam runners take extra flags)")
    if extra:
        try:
            check_beam_args(extra)
        except InputError as e:
            ap.error(str(e))
    with flags.progress(not getattr(args, "no_progress", False)):
        return flags.run_command(f"hipt-prep {args.command}", lambda: _run(args, extra),
                                 exit_on_stop=argv is None)  # argv None: the command line


def _run(args, extra) -> int:
    out = getattr(args, "out", None) or getattr(args, "data_dir", None)
    if out:
        flags.check_output_dir(out, _estimate_bytes(args))
    if args.command == "regions":
        return _regions(args, extra)
    if args.command == "coords":
        return _coords(args, extra)
    if args.command == "patches":
        return _patches(args, extra)
    if args.command == "features":
        return _features(args)
    return _tfds(args)


if __name__ == "__main__":
    sys.exit(main())
