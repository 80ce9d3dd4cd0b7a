"""hipt-heatmap: hierarchical attention heatmaps of a region, or a slide-level region-score map.

Region mode (the reference's hierarchical maps: ranked last-block CLS attention of both levels):
    hipt-heatmap --vit256 ckpt/vit256 --vit4k ckpt/vit4k --slide S.svs --x 0 --y 0 --out DIR
    hipt-heatmap --random-init tiny --image region.png --out DIR   # demo weights

Slide mode (one score per region painted over the slide):
    hipt-heatmap --slide S.svs --lgp runs/lgp/fold_0/checkpoint --embeddings EMB --out DIR
        (HIPT-LGP attention-pooling weights of the slide's regions; EMB = hipt-extract output)
    hipt-heatmap --slide S.svs --vitwsi runs/vitwsi/export --embeddings EMB --out DIR
        (stage-3 ViT-WSI CLS attention over the regions; --vitwsi stored: the bag's attention_wsi)
    hipt-heatmap --slide S.svs --region-scores scores.npz --out DIR
        (any scores: npz with coords [M,2] level-0 x,y; scores [M]; region_px: level-0 side)

Exit codes: 0 ok, 2 bad usage or input (hipt_jax.cli.flags).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from hipt_jax.cli import flags

PROG = "hipt-heatmap"


def _parse_shifts(text: str) -> tuple[int, ...]:
    text = text.strip()
    if text in ("", "none"):
        return ()
    try:
        shifts = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shifts must be comma-separated integers, got {text!r}") from None
    if any(s < 1 for s in shifts):
        raise argparse.ArgumentTypeError(f"shifts must be positive pixel offsets, got {text!r}")
    return shifts


def _scale(text: str) -> int:
    """--scale divides the 16 x 16 attention tokens of a patch: checked here, not after the first
    forward pass (minutes of CPU with real weights) with a message naming neither flag."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value not in (1, 2, 4, 8, 16):
        raise argparse.ArgumentTypeError(f"expected 1, 2, 4, 8 or 16 (it must divide the 16 attention tokens "
                                         f"of a 256 px patch), got {text!r}")
    return value


def check_shifts(args, region_shape) -> None:
    """Before the model loads: every --shifts256 (and, with a ViT-4K, --shifts) value is a
    multiple of --scale and smaller than the centre-cropped region (compute_region_heatmaps
    refused them only after loading the weights, blaming a default the user never gave)."""
    from hipt_jax.models.hipt4k import center_crop_box

    _, _, crop_h, crop_w = center_crop_box(*region_shape[:2])
    with4k = bool(args.vit4k) or args.random_init != "none"
    for flag, shifts in (("--shifts256", args.shifts256), ("--shifts", args.shifts if with4k else ())):
        for shift in shifts:
            if shift % args.scale or shift >= min(crop_h, crop_w):
                given = flag.lstrip("-") in getattr(args, "given", ())  # dest names of the flags given
                raise flags.UsageError(
                    f"{flag} {','.join(map(str, shifts))}{'' if given else ' (the default)'}: {shift} px must be a "
                    f"multiple of --scale {args.scale} and smaller than the {crop_h} x {crop_w} px region; "
                    f"give other {flag} (or {flag} none)")


def _cmap(text: str) -> str:
    import matplotlib

    if text not in matplotlib.colormaps:
        raise argparse.ArgumentTypeError(f"unknown matplotlib colormap {text!r} (e.g. coolwarm, jet, viridis)")
    return text


def _file_name(text: str) -> str:
    """--name is a file name prefix, never a path."""
    if not text.strip() or "/" in text or "\\" in text or text.strip() in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain file name prefix (no path separators)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_region_source_flags(p, required=False, xy_default=None)
    flags.add_region_flags(p)
    # Region mode needs weights; slide mode (--lgp / --region-scores) does not.
    flags.add_model_flags(p, vit4k_help="ViT-4K checkpoint (optional: without it only 256-level maps)",
                          required=False)
    flags.add_compute_flags(p, patch_batch=True)
    out = p.add_argument_group("maps")
    out.add_argument("--out", required=True, type=flags.path_arg, help="output directory")
    out.add_argument("--name", type=_file_name, default=None, help="file name prefix (default: from the input)")
    out.add_argument("--scale", type=_scale, default=4, help="output = region px / scale (1, 2, 4, 8, 16)")
    out.add_argument("--alpha", type=flags.float_in(0.0, 1.0, low_open=False), default=0.5)
    out.add_argument("--cmap", type=_cmap, default="coolwarm")
    out.add_argument("--shifts", type=_parse_shifts, default=(128, 256, 384),
                     help="4K-level smoothing shifts in px, comma-separated, or 'none'")
    out.add_argument("--shifts256", type=_parse_shifts, default=(128,),
                     help="256-level smoothing shifts in px, or 'none'")
    out.add_argument("--blends", choices=("all", "diagonal", "none"), default="all")
    out.add_argument("--blend-weighting", choices=("official", "equal", "coverage"), default="official",
                     help="official: the reference's module functions, (n4k*s4k + 2*n256*s256)/(n4k + 2*n256) "
                          "with n the evaluations per pixel; equal: plain mean of the two maps; "
                          "coverage: (n4k*s4k + n256*s256)/(n4k + n256)")
    out.add_argument("--region-scores", type=flags.path_arg, help="slide mode: npz with coords, scores, region_px")
    out.add_argument("--lgp", type=flags.path_arg,
                     help="slide mode: trained HIPT-LGP checkpoint (hipt-finetune fold_k/checkpoint)")
    out.add_argument("--embeddings", type=flags.path_arg,
                     help="slide mode with --lgp/--vitwsi: hipt-extract output (slides/<id>.npz)")
    out.add_argument("--vitwsi", type=flags.path_arg,
                     help="slide mode: stage-3 ViT-WSI export (its CLS attention over the "
                          "regions), or 'stored' for the bag's attention_wsi (hipt-extract --vitwsi)")
    out.add_argument("--thumb-px", type=flags.int_at_least(64), default=2048, help="slide mode: longest side of the picture")
    flags.add_progress_flag(p)
    return p


def run_region(args) -> dict:
    from hipt_jax.heatmap.region import compute_region_heatmaps
    from hipt_jax.heatmap.render import write_region_heatmaps

    region = flags.read_region(args)
    name = output_name(args, slide_mode=False)
    if args.random_init == "none" and not args.vit256:
        raise flags.UsageError("give --vit256 CHECKPOINT (and usually --vit4k), or --random-init tiny|full")
    check_shifts(args, region.shape)
    model = flags.load_hipt4k(args)
    t0 = time.perf_counter()
    maps = compute_region_heatmaps(model, region, scale=args.scale, shifts256=args.shifts256,
                                   shifts4k=args.shifts, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    mark_unfinished(args.out, name, input_of(args))
    written = write_region_heatmaps(maps, args.out, name, alpha=args.alpha, cmap=args.cmap,
                                    blends=args.blends, blend_weighting=args.blend_weighting)
    _remove_stale_maps(args.out, name, written, listed_outputs(args.out, name))
    n_files = sum(len(v) for v in written.values())
    print(f"{n_files} files in {args.out} ({time.perf_counter() - t0:.1f} s); "
          f"contact sheet: {written['contact_sheet'][0]}")
    return written


def _remove_stale_maps(out: str, name: str, written: dict, listed: set) -> None:
    """Maps an earlier run wrote under the same name (other heads, blends, shifts) would sit
    beside this run's and read as its own: remove the ones this run did not write, but only
    those the earlier run's listing names (``listed``: basenames). A file of the user's that
    merely matched the pattern (case12_4k_head9.png) was deleted without a word."""
    import glob

    keep = {os.path.abspath(p) for paths in written.values() for p in paths}
    for pattern in ("_256_head*.png", "_4k_head*.png", "_blend_4k*_256*.png"):
        for path in glob.glob(os.path.join(glob.escape(out), glob.escape(name) + pattern)):
            if os.path.abspath(path) not in keep and os.path.basename(path) in listed:
                os.remove(path)


def _file_scores(path: str, slide_dims: tuple[int, int]):
    """coords [N,2] (level-0 x, y), scores [N], region_px of a --region-scores npz, checked
    against each other and against the slide (W, H) they are painted on."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    need = "need an npz with coords [N,2], scores [N] and region_px"
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("a single array")
        coords, scores, region_px = np.asarray(data["coords"]), np.asarray(data["scores"]), float(data["region_px"])
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise ValueError(f"{path}: {need} ({e})") from None
    if coords.ndim != 2 or coords.shape[1:] != (2,) or scores.ndim != 1 or len(scores) != len(coords):
        raise ValueError(f"{path}: {need}; it holds coords {list(coords.shape)} and scores {list(scores.shape)}")
    if not (np.isfinite(region_px) and region_px > 0):
        raise ValueError(f"{path}: region_px={region_px}: expected a positive region side in level-0 pixels")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{path}: {int(np.sum(~np.isfinite(scores)))} score(s) are NaN or infinite")
    bad = ~np.isfinite(coords).all(axis=1) | (coords != np.round(coords)).any(axis=1) if coords.size else []
    if np.any(bad):  # 0-1 fractions or another level's scaled positions would paint the wrong place
        raise ValueError(f"{path}: {int(np.sum(bad))} of {len(coords)} coordinate pair(s) are not whole level-0 "
                         f"pixels, e.g. {coords[bad][0].tolist()}: expected each region's top-left corner in "
                         "level-0 pixels")
    width, height = slide_dims
    off = (coords[:, 0] >= width) | (coords[:, 1] >= height) | (coords + region_px <= 0).any(axis=1)
    if off.any():
        raise ValueError(f"{path}: {int(off.sum())} of {len(coords)} region(s) lie outside the slide "
                         f"({width} x {height} px at level 0), e.g. at {coords[off][0].tolist()}: "
                         "scores of another slide?")
    return coords, scores, region_px


def _lgp_scores(args, slide):
    """HIPT-LGP pooling weights of this slide's regions, from hipt-extract's per-slide npz."""
    from data_prep import bags
    from data_prep.shards import safe_slide_id
    from hipt_jax.heatmap.slide import lgp_region_attention

    if not args.embeddings:
        raise ValueError("--lgp needs --embeddings (the hipt-extract output with slides/<id>.npz)")
    slide_id = safe_slide_id(os.path.splitext(os.path.basename(args.slide))[0])  # as hipt-prep names it
    bag = bags.read_bag(args.embeddings, slide_id)  # BagError (a ValueError) when not extracted
    if "coords" not in bag:  # an official .pt bag holds features only
        raise ValueError(f"{bags.find_bag(args.embeddings, slide_id)}: bag has no region coordinates "
                         "(use an npz or h5 bag)")
    feats, coords = bag["features_cls256"], bag["coords"]
    check_bag_slide(args.slide, slide, bags.find_bag(args.embeddings, slide_id), args.embeddings, slide_id)
    read_px = _bag_read_px(args, slide, bags.find_bag(args.embeddings, slide_id))
    return coords, lgp_region_attention(args.lgp, feats), read_px


def _bag_read_px(args, slide, bag_path: str) -> float:
    """Level-0 side of the bag's regions: as the bag records it (hipt-extract writes it with
    the coordinates), checked against --size / --target-mpp when they are given; computed from
    them for bags without the record. A 512 px cohort painted with the default 4096 drew each
    region as a 4096 px square."""
    from data_prep import bags, slide_io

    mpp = slide_io.slide_mpp(slide, args.assume_mpp, args.slide)
    asked = slide_io.region_geometry(slide, mpp, args.size, args.target_mpp).read_px
    recorded = bags.read_coords_attrs(bag_path).get("patch_size_level0")
    if not recorded:
        return asked
    given = {"size", "target_mpp"} & set(getattr(args, "given", ()))
    if given and int(recorded) != int(asked):
        raise ValueError(f"{bag_path}: its regions are {int(recorded)} px at level 0, but "
                         f"{' / '.join('--' + g.replace('_', '-') for g in sorted(given))} ask for "
                         f"{int(asked)}: leave them out to use the bag's")
    return float(recorded)


def _slide_record(bag_path: str, embeddings: str, slide_id: str) -> tuple[dict, str]:
    """What the bag's records say about the slide it was made from, and where: {"bytes": file
    size, "dims": (level-0 width, height)} (either may be missing). hipt-extract --slides records
    the slide file beside the bag (<bag>.source); a bag made from region shards names its shard,
    and the hipt-prep folder the embeddings manifest names has the slide's record (its status:
    size and level-0 size); TRIDENT/CLAM coordinates may carry level0_width/level0_height."""
    import json

    from data_prep import bags, shards

    source = bags.read_source(bag_path) or {}
    if isinstance(source.get("slide"), dict):
        return {"bytes": source["slide"].get("bytes")}, bag_path + bags.SOURCE_EXT
    prep = (shards.read_prep_manifest(embeddings).get("params") or {}).get("shards") if source.get("shard") else None
    if prep:
        item = (shards.read_prep_manifest(prep).get("items") or {}).get(slide_id)
        where = os.path.join(prep, shards.MANIFEST)
        if not isinstance(item, dict):  # a manifest not yet rebuilt: the slide's own status file
            where = shards.item_status_path(prep, slide_id)
            try:
                with open(where) as f:
                    item = json.load(f)
            except (OSError, ValueError):
                item = None
        if isinstance(item, dict):
            dims = (item.get("width"), item.get("height"))
            return {"bytes": (item.get("source") or {}).get("bytes"),
                    "dims": dims if None not in dims else None}, where
    attrs = bags.read_coords_attrs(bag_path)
    if attrs.get("level0_width") and attrs.get("level0_height"):
        return {"dims": (attrs["level0_width"], attrs["level0_height"])}, bag_path
    return {}, ""


def check_bag_slide(slide_path: str, slide, bag_path: str, embeddings: str, slide_id: str) -> None:
    """The bag is found by the slide's file name alone: another slide of the same name (a
    re-scan, another cohort's file) got this bag's scores painted on it with exit 0. ValueError
    naming both when the slide differs from what the bag's records say about its own slide
    (file size, level-0 size); nothing to compare when nothing was recorded."""
    recorded, where = _slide_record(bag_path, embeddings, slide_id)
    differences = []
    size = os.path.getsize(slide_path) if os.path.isfile(slide_path) else None
    if recorded.get("bytes") is not None and size is not None and int(recorded["bytes"]) != size:
        differences.append(f"{int(recorded['bytes']):,} bytes when extracted, {size:,} now")
    if recorded.get("dims") and tuple(int(v) for v in recorded["dims"]) != tuple(slide.dimensions):
        w, h = (int(v) for v in recorded["dims"])
        differences.append(f"level 0 {w} x {h} px when extracted, {slide.dimensions[0]} x {slide.dimensions[1]} now")
    if differences:
        raise ValueError(f"{slide_path}: is not the slide {bag_path} was made from ({'; '.join(differences)}; "
                         f"recorded in {where}): give the slide the bag was extracted from")


def _vitwsi_scores(args, slide):
    """Stage-3 CLS attention over this slide's regions (hipt_jax.wsi.wsi_attention)."""
    from data_prep import bags
    from data_prep.shards import safe_slide_id
    from hipt_jax.wsi import wsi_attention

    if not args.embeddings:
        raise ValueError("--vitwsi needs --embeddings (the hipt-extract output with slides/<id>.npz)")
    slide_id = safe_slide_id(os.path.splitext(os.path.basename(args.slide))[0])  # as hipt-prep names it
    bag = bags.find_bag(args.embeddings, slide_id)
    if bag is None:
        raise ValueError(f"{args.embeddings}: slide {slide_id!r} was not extracted")
    check_bag_slide(args.slide, slide, bag, args.embeddings, slide_id)
    coords, scores = wsi_attention(bag, None if args.vitwsi == "stored" else args.vitwsi)
    return coords, scores, _bag_read_px(args, slide, bag)


def run_slide(args) -> tuple[dict, str]:
    from hipt_jax.heatmap.render import save_png, with_legend
    from hipt_jax.heatmap.slide import slide_attention_map

    if not args.slide:
        raise ValueError("slide mode needs --slide (the picture the scores are painted on)")
    slide = flags.open_slide(args.slide, image_hint="slide mode paints on a whole-slide image (a region image "
                                                    "goes to region mode: --image with region weights)")
    if args.lgp:
        coords, region_scores, region_px = _lgp_scores(args, slide)
    elif args.vitwsi:
        coords, region_scores, region_px = _vitwsi_scores(args, slide)
    else:
        coords, region_scores, region_px = _file_scores(args.region_scores, slide.dimensions)
    if len(region_scores) == 0:  # painted the plain thumbnail as an "attention map", exit 0
        source = args.region_scores or f"{args.embeddings} (slide {os.path.basename(args.slide)})"
        raise ValueError(f"{source}: no regions to paint (0 scores)")
    from data_prep.slide_io import read_thumbnail

    thumb = read_thumbnail(slide, args.thumb_px)
    downsample = slide.dimensions[0] / thumb.shape[1]  # level-0 px per thumbnail px
    painted, meaning = _slide_values(args.region_scores or args.embeddings, region_scores)
    picture, _ = slide_attention_map(thumb, downsample, coords, region_px, painted,
                                     alpha=args.alpha, cmap=args.cmap)
    picture = with_legend(picture, args.cmap, meaning)  # below the thumbnail: its pixels unchanged
    os.makedirs(args.out, exist_ok=True)
    name = output_name(args, slide_mode=True)
    mark_unfinished(args.out, name, input_of(args))
    path = save_png(os.path.join(args.out, f"{name}_slide_attention.png"), picture)
    scores_path = _save_region_scores(os.path.join(args.out, f"{name}_region_scores.npz"), coords,
                                      region_scores, region_px)
    print(f"slide map of {len(region_scores)} region scores ({args.cmap}: {meaning}): {path}; scores: {scores_path}")
    return {"slide": [path], "scores": [scores_path]}, meaning


SLIDE_LEGEND = "percentile rank within the slide's regions"
# Scores whose spread is below this share of their magnitude (or below NEAR_CONSTANT_ABS) are one
# value: their ranks would stretch float noise ([0]*8 + [1e-12]) to the full colour range.
NEAR_CONSTANT_REL, NEAR_CONSTANT_ABS = 1e-6, 1e-9


def _slide_values(source: str, scores: np.ndarray) -> tuple[np.ndarray, str]:
    """(scores to paint, what their colours mean). Near-constant scores are painted as one
    value (the middle colour), said on stderr and in the legend."""
    scores = np.asarray(scores, np.float64)
    spread = float(scores.max() - scores.min())
    if len(scores) > 1 and spread <= max(NEAR_CONSTANT_REL * float(np.abs(scores).max()), NEAR_CONSTANT_ABS):
        print(f"{source}: note: the {len(scores)} scores are (nearly) constant (range {spread:.3g}): "
              "painted in one colour", file=sys.stderr)
        return np.zeros_like(scores), f"all scores equal (range {spread:.3g}): one colour"
    return scores, SLIDE_LEGEND


def _save_region_scores(path: str, coords, scores, region_px: float) -> str:
    """The painted scores as numbers: coords [M,2] (level-0 x, y), scores [M], region_px (the
    --region-scores input format) and grid [rows, columns] of the slide's region grid (row 0 /
    column 0 = the top / left region; NaN where the slide has no region). No grid, said on
    stderr, when the regions do not lie one per cell on a grid of region_px (``_grid_problem``):
    overlapping CLAM/TRIDENT coordinates wrote one score per cell, the later over the earlier."""
    from hipt_jax.models.vitwsi import grid_cells
    from hipt_jax.outputs import atomic_path

    coords = np.asarray(coords).reshape(-1, 2)
    scores = np.asarray(scores, np.float32).reshape(-1)
    arrays = dict(coords=coords, scores=scores, region_px=float(region_px))
    step = int(round(region_px))
    problem = _grid_problem(coords, step)
    if problem:
        print(f"{path}: no grid array: {problem}; coords and scores hold every region", file=sys.stderr)
    else:
        cells = grid_cells(coords, step)  # [M,(row, column)]
        grid = np.full(tuple(cells.max(axis=0) + 1) if len(cells) else (0, 0), np.nan, np.float32)
        grid[cells[:, 0], cells[:, 1]] = scores
        arrays["grid"] = grid
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return path


def _grid_problem(coords: np.ndarray, step: int) -> str:
    """Why the regions do not form a grid of ``step`` px with one region per cell ("" if they
    do): corners not whole steps apart (within 1 px), or two regions in one cell."""
    if not len(coords):
        return ""
    offset = (np.asarray(coords, np.float64) - np.min(coords, axis=0)) / step  # [M,2] in steps
    off = np.any(np.abs(offset - np.rint(offset)) * step > 1, axis=1)
    if off.any():
        return (f"{int(off.sum())} of {len(coords)} region corners are not whole {step} px steps from the "
                f"others (e.g. {np.asarray(coords)[off][0].tolist()}): overlapping or off-grid regions")
    cells = np.rint(offset).astype(np.int64)
    shared = len(cells) - len(np.unique(cells, axis=0))
    if shared:
        return f"{shared} region(s) share a {step} px grid cell with another (duplicate coordinates)"
    return ""


# What a run writes into --out, as patterns of its --name (hipt_jax.heatmap.render, run_slide).
REGION_OUTPUTS = ("{name}_region.png", "{name}_256_head*.png", "{name}_4k_head*.png", "{name}_blend_4k*_256*.png",
                  "{name}_contact_sheet.png", "{name}_legend.png", "{name}_scores.npz")
SLIDE_OUTPUTS = ("{name}_slide_attention.png", "{name}_region_scores.npz")
LISTING = "heatmap_outputs.json"
# Pairs of files every run of a --name writes (region mode, slide mode): the runs of a version
# whose listing named only its last run are recognised by them (_earlier_outputs).
SIGNATURES = (("{name}_scores.npz", "{name}_contact_sheet.png"),
              ("{name}_slide_attention.png", "{name}_region_scores.npz"))
EARLIER = "earlier"  # in the listing: outputs of a version from before "by_name" (_earlier_outputs)
UNFINISHED = "unfinished"  # in the listing: --names whose run was stopped while writing (mark_unfinished)
INPUTS = "inputs"  # in the listing: --name -> the input file its last run read (name and size)


def output_name(args, *, slide_mode: bool) -> str:
    """--name, else from the input: the image's stem, the slide's (slide mode), or the slide's
    with the region's position."""
    if args.name:
        return args.name
    if args.image and not slide_mode:
        return os.path.splitext(os.path.basename(args.image))[0]
    stem = os.path.splitext(os.path.basename(args.slide or ""))[0]
    return stem if slide_mode else f"{stem}_x{args.x}_y{args.y}"


def _paths(value) -> bool:
    return isinstance(value, list) and all(isinstance(p, str) for p in value)


def _own_listing(path: str) -> bool:
    """An earlier heatmap_outputs.json: kinds of maps -> lists of paths (the last run's), and
    "by_name": --name -> the files the last run of that name wrote (absent in older listings);
    "colors": what the colours mean."""
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        return False
    by_name, earlier = data.get("by_name", {}), data.get(EARLIER, {})
    return isinstance(by_name, dict) and all(_paths(v) for v in by_name.values()) and \
        isinstance(earlier, dict) and all(_paths(v) for v in earlier.values()) and all(
            _paths(v) for k, v in data.items() if k not in ("by_name", "colors", EARLIER, INPUTS))  # UNFINISHED: names


def _read_listing(out: str) -> dict:
    """The earlier heatmap_outputs.json of --out ({} when there is none or it is not ours)."""
    import json

    path = os.path.join(out, LISTING)
    try:
        if _own_listing(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    except (OSError, ValueError):
        pass
    return {}


def _of_name(filename: str, name: str) -> bool:
    """Whether ``filename`` is named like an output of ``name`` (region or slide mode)."""
    import fnmatch
    import glob

    return any(fnmatch.fnmatchcase(filename, t.format(name=glob.escape(name)))
               for t in REGION_OUTPUTS + SLIDE_OUTPUTS)


def _earlier_outputs(out: str, data: dict) -> dict:
    """Outputs of a hipt-heatmap from before "by_name", whose listing named only its last run's
    files (basenames): "listed", those files; "recognised", the files of its other runs, told by
    their --name's pair of SIGNATURES still being there. Read from the folder while its listing
    is the old one; the first newer run keeps them in the listing (EARLIER), so a run of another
    --name does not forget them (re-rendering an old map was refused as not ours)."""
    if "by_name" in data:
        return {k: set(data.get(EARLIER, {}).get(k, ())) for k in ("listed", "recognised")}
    listed = {os.path.basename(p) for k, v in data.items() if k != "colors" for p in v}
    files = set(os.listdir(out)) if data and os.path.isdir(out) else set()
    names = _signed_names(files)
    return {"listed": listed, "recognised": {f for f in files - listed if any(_of_name(f, n) for n in names)}}


def _signed_names(files: set) -> set:
    """The --names whose pair of SIGNATURES is among ``files``."""
    names = set()
    for first, second in SIGNATURES:
        suffix = first.format(name="")
        names |= {f[:-len(suffix)] for f in files
                  if f.endswith(suffix) and second.format(name=f[:-len(suffix)]) in files}
    return names


def listed_outputs(out: str, name: str) -> set:
    """Basenames of the files earlier runs of this --name wrote into --out that a listing names:
    what a rerun may replace or remove as stale."""
    data = _read_listing(out)
    return set(data.get("by_name", {}).get(name, ())) | {
        f for f in _earlier_outputs(out, data)["listed"] if _of_name(f, name)} | _unfinished_outputs(out, data, name)


def _unfinished_outputs(out: str, data: dict, name: str) -> set:
    """Every file named like an output of ``name`` when a run of that name was stopped while
    writing (its listing was never written): before it wrote, check_targets had refused any
    such file that was not a listed output, so they are all runs' of this name."""
    if name not in data.get(UNFINISHED, ()) or not os.path.isdir(out):
        return set()
    return {f for f in os.listdir(out) if _of_name(f, name)}


def mark_unfinished(out: str, name: str, source: dict) -> None:
    """Just before a run writes its maps: record in the listing that ``name`` is being written,
    so that files of a run stopped half-way (Ctrl-C, SIGKILL, a full disk) are replaced by its
    rerun; they were refused as the user's, and the killed job could not be rerun."""
    _write_listing(out, name, None, None, source)


def input_of(args) -> dict:
    """What the listing records of a run's input (--image or --slide): its file name and size."""
    from data_prep.shards import input_identity

    return input_identity(args.image or args.slide)


def _check_same_input(args, name: str) -> None:
    """A name taken from the input's file name (no --name) whose maps in --out were made from
    another file of that name (a/s1.svs, then b/s1.svs): they were replaced, exit 0."""
    recorded = _read_listing(args.out).get(INPUTS, {}).get(name)
    here = input_of(args)
    if args.name is None and isinstance(recorded, dict) and recorded != here:
        raise flags.UsageError(
            f"{args.out}: holds the maps {name}_* of another input file named {recorded.get('name')} "
            f"({recorded.get('bytes')} bytes; this run's {args.image or args.slide} has {here['bytes']}): "
            "another slide with the same file name? give --name, or another --out")


def own_outputs(out: str, name: str) -> set:
    """``listed_outputs`` and the files of this --name's runs by a version whose listing did not
    name them (recognised by SIGNATURES): a rerun may replace those, but never removes them."""
    return listed_outputs(out, name) | {
        f for f in _earlier_outputs(out, _read_listing(out))["recognised"] if _of_name(f, name)}


def write_listing(out: str, name: str, written: dict, colors: dict, source: dict | None = None) -> None:
    """heatmap_outputs.json: this run's files by kind (as before), what the colours mean, for
    every --name the files its last run wrote (what a rerun may replace or remove), and the
    outputs of an older version no name claims yet (EARLIER), while they exist."""
    import glob

    _write_listing(out, name, written, colors, source)
    for tmp in glob.glob(os.path.join(glob.escape(out), glob.escape(name) + "_*.tmp-*")):
        os.remove(tmp)  # a stopped run's temporary files (outputs.atomic_path)


def _write_listing(out: str, name: str, written: dict | None, colors: dict | None, source: dict | None) -> None:
    """write_listing, or with ``written`` None mark_unfinished (the last run's files and
    colours kept as they are)."""
    from hipt_jax.outputs import write_json

    data = _read_listing(out)
    earlier = _earlier_outputs(out, data)
    by_name = dict(data.get("by_name", {}))
    unfinished = set(data.get(UNFINISHED, ()))
    if written is None:
        unfinished.add(name)
        record = {k: v for k, v in data.items() if k not in ("by_name", EARLIER, UNFINISHED, INPUTS)}
        taken = set(by_name.get(name, ()))
    else:
        unfinished.discard(name)
        by_name[name] = sorted(os.path.basename(p) for paths in written.values() for p in paths)
        record = dict(written, colors=colors)
        taken = set(by_name[name])
    record["by_name"] = by_name
    inputs = dict(data.get(INPUTS) or {}, **({name: source} if source is not None else {}))
    if inputs:
        record[INPUTS] = inputs
    if unfinished:
        record[UNFINISHED] = sorted(unfinished)
    left = {k: sorted(f for f in v if f not in taken and os.path.exists(os.path.join(out, f)))
            for k, v in earlier.items()}
    if any(left.values()):
        record[EARLIER] = left
    write_json(os.path.join(out, LISTING), record, indent=1)


def check_targets(args, *, slide_mode: bool) -> None:
    """Before any work: no file this run writes (or removes as an earlier run's stale map) may be
    one of its inputs (an image in the --out folder named like a map of this --name: the region
    copy replaced the input image, exit 0), nor sit in a folder another command manages
    (hipt_jax.outputs.check_target)."""
    import fnmatch
    import glob

    from hipt_jax import outputs

    name = output_name(args, slide_mode=slide_mode)
    _check_same_input(args, name)
    templates = SLIDE_OUTPUTS if slide_mode else REGION_OUTPUTS
    patterns = [t.format(name=glob.escape(name)) for t in templates] + [LISTING]
    inputs = {"--image": args.image, "--slide": args.slide, "--region-scores": args.region_scores,
              "--vit256": args.vit256, "--vit4k": args.vit4k, "--lgp": args.lgp}
    out = os.path.realpath(args.out)
    # Slide mode re-rendered from its own NAME_region_scores.npz (another alpha or colormap):
    # the scores are read in full before the same scores are written back (atomically).
    if slide_mode and args.region_scores and os.path.realpath(args.region_scores) == os.path.realpath(
            os.path.join(args.out, SLIDE_OUTPUTS[1].format(name=name))):
        inputs = {k: v for k, v in inputs.items() if k != "--region-scores"}
    for flag, given in inputs.items():
        if given and os.path.realpath(os.path.dirname(os.path.abspath(given))) == out and \
                any(fnmatch.fnmatchcase(os.path.basename(given), p) for p in patterns):
            raise flags.UsageError(f"{given}: is an input ({flag}) and this run writes a file of that name in "
                                   f"{args.out}; choose another --out or --name")
    outputs.check_target(os.path.join(args.out, LISTING), writer=PROG, inputs=inputs, is_own=_own_listing)
    # A file named like a map of this --name is replaced (or, a head/blend map, removed as stale)
    # only when an earlier run's listing names it: anything else is the user's and is refused.
    listed = own_outputs(args.out, name)
    is_own = lambda path: os.path.basename(path) in listed  # noqa: E731
    for template in templates:
        targets = sorted(glob.glob(os.path.join(glob.escape(args.out), template.format(name=glob.escape(name))))) \
            if "*" in template else [os.path.join(args.out, template.format(name=name))]
        for target in targets:
            outputs.check_target(target, writer=PROG, inputs=inputs, is_own=is_own, bag_folders=[args.embeddings])


def check_mode(args) -> None:
    """One map per run: slide mode takes one source of region scores and no region weights or
    region position (they were ignored with exit 0). UsageError naming the conflict."""
    sources = [f for f in ("region_scores", "lgp", "vitwsi") if getattr(args, f)]
    if len(sources) > 1:
        raise flags.UsageError(f"{' and '.join('--' + f.replace('_', '-') for f in sources)}: slide mode paints "
                               "one source of region scores; give one")
    if not sources:
        if args.slide and (args.x is None or args.y is None):  # a (0, 0) default painted the slide's corner
            raise flags.UsageError("--slide needs --x and --y (level-0 top-left of the region to map); "
                                   "for a whole-slide map give --lgp, --vitwsi or --region-scores")
        return
    given = set(getattr(args, "given", ()))
    region_only = [f for f in ("vit256", "vit4k", "random_init", "image", "x", "y", "scale", "shifts", "shifts256",
                               "blends", "blend_weighting", "allow_upsample") if f in given]
    if region_only:
        raise flags.UsageError(f"{', '.join('--' + f.replace('_', '-') for f in region_only)}: options of region "
                               f"mode, not used by slide mode (--{sources[0].replace('_', '-')})")


def colors_meaning(cmap: str, slide_mode: bool, meaning: str = "") -> dict:
    """What the colours of the maps mean (heatmap_outputs.json "colors", as the colour bars say)."""
    from hipt_jax.heatmap.render import REGION_LEGEND

    return {"cmap": cmap, "value": meaning or (SLIDE_LEGEND if slide_mode else REGION_LEGEND),
            "low": 0.0, "high": 1.0, "reads": f"{cmap} from its low end (0) to its high end (1): low -> high"}


def _run(args) -> int:
    check_mode(args)
    flags.check_output_dir(args.out)
    slide_mode = bool(args.region_scores or args.lgp or args.vitwsi)
    check_targets(args, slide_mode=slide_mode)
    written, meaning = run_slide(args) if slide_mode else (run_region(args), "")
    write_listing(args.out, output_name(args, slide_mode=slide_mode), written,
                  colors_meaning(args.cmap, slide_mode, meaning), input_of(args))
    return flags.EXIT_OK


main = flags.command(PROG, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
