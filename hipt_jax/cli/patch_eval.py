"""`hipt-patch-eval`: KNN and linear-probe evaluation of a ViT-256 backbone on labelled tiles.

    hipt-patch-eval --vit256 ckpt/vit256 --tiles CRC-100K/ --out runs/crc [--label-fraction 0.1] [--plot]
    hipt-patch-eval --random-init tiny --tiles tiles.csv --out /tmp/pe       # pipeline check

--tiles: DIR/<class>/*.png, DIR/train/<class> + DIR/test/<class> (+ val), or a CSV of
path,label[,split] (hipt_jax.evaluation.tiles). Tiles are resized (shorter side) and
center-cropped to --size px (224, the paper's probes). Writes OUT/patch_eval.json and
OUT/patch_eval.md (table), OUT/features_cache/ and with --plot OUT/embedding_map.png and
OUT/confusion_<split>_<method>.png. Every tile is checked to decode before any feature is
computed: unreadable tiles are all listed in OUT/unreadable_tiles.txt and the run refused.
Exit codes: 0 ok, 2 bad usage or input.
"""
from __future__ import annotations

import contextlib
import os
import sys

from hipt_jax import outputs
from hipt_jax.cli import flags

PROG = "hipt-patch-eval"


def _fraction(text: str) -> float:
    value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    if not 0 < value <= 1:
        raise ValueError
    return value


def build_parser() -> flags.Parser:
    p = flags.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", required=True, type=flags.path_arg, help="tile folder (ImageFolder or train/test) or CSV")
    p.add_argument("--out", required=True, type=flags.path_arg, help="output folder")
    flags.add_model_flags(p, vit4k=False)
    flags.add_compute_flags(p, batch_per_device=32, batch_help="tiles per device per step")
    flags.add_progress_flag(p)
    p.add_argument("--size", type=flags.int_at_least(16, 4096), default=224, help="tile side after resize + center crop (default 224)")
    p.add_argument("--norm", choices=["half", "imagenet"], default="half",
                   help="input normalization: 0.5/0.5 (HIPT_4K inference) or ImageNet statistics")
    p.add_argument("--label-fraction", type=_fraction, default=1.0, metavar="F",
                   help="fraction of TRAIN labels kept per class: 0.01, 0.1, 1 (or 1%%, 10%%, 100%%)")
    p.add_argument("--test-fraction", type=flags.float_in(0.0, 1.0, high_open=True), default=0.3,
                   help="test part of a dataset without splits (seeded, stratified)")
    p.add_argument("--cache", default=None, type=flags.path_arg,
                   help="feature cache folder (default OUT/features_cache)")
    p.add_argument("--plot", action="store_true", help="embedding map (t-SNE/UMAP) and confusion matrices")
    return p


# patch_eval.json from before "written_by": its keys
_own_json = outputs.json_written_by(PROG, {"tiles", "norm", "label_fraction"})


def _check_targets(args) -> None:
    """OUT/patch_eval.json and .md replace only an earlier run's, and never sit inside a folder
    another command manages (hipt_jax.outputs.check_target)."""

    inputs = {"--tiles": args.tiles, "--vit256": args.vit256}
    json_path = os.path.join(args.out, "patch_eval.json")
    outputs.check_target(json_path, writer=PROG, inputs=inputs, is_own=_own_json)
    # the table is the JSON's companion: ours when the JSON beside it is
    outputs.check_target(os.path.join(args.out, "patch_eval.md"), writer=PROG, inputs=inputs,
                         is_own=lambda path: os.path.isfile(json_path) and _own_json(json_path))


def _check_outside_tiles(args) -> None:
    """--out and --cache may not lie inside a --tiles folder: the next run would read this run's
    pictures (--plot) as the tiles of a class named after the folder, and score that."""
    if not os.path.isdir(args.tiles):
        return  # a CSV names its tiles; nothing beside it is scanned
    tiles = os.path.realpath(args.tiles)
    for flag, folder in (("--out", args.out), ("--cache", args.cache)):
        if folder and os.path.commonpath([tiles, os.path.realpath(folder)]) == tiles:
            raise flags.UsageError(f"{flag} {folder}: lies inside the --tiles folder {args.tiles} (a "
                                   "later run would read its files as tiles); choose a folder outside it")


UNREADABLE = "unreadable_tiles.txt"


@contextlib.contextmanager
def _unreadable_listed(out: str):
    """Unreadable tiles refuse the run before any feature is computed (skipping them would
    change the dataset being scored); all of them are listed in OUT/unreadable_tiles.txt, the
    error line names the first few and that file."""
    from hipt_jax.evaluation.patch_features import UnreadableTilesError
    from hipt_jax.outputs import write_text

    listed = os.path.join(out, UNREADABLE)
    try:
        yield
    except UnreadableTilesError as e:
        write_text(listed, "".join(f"{p}\t{r}\n" for p, r in e.bad))
        raise flags.UsageError(f"{e}; all {len(e.bad)} listed in {listed}: fix or remove them") from None
    if os.path.isfile(listed):  # an earlier run's list, no longer true
        os.remove(listed)


def _run(args) -> int:
    from hipt_jax.evaluation import patch_eval
    from hipt_jax.evaluation.patch_features import cached_features
    from hipt_jax.evaluation.tiles import read_tiles
    from hipt_jax.outputs import write_json, write_text

    _check_outside_tiles(args)
    flags.check_output_dir(args.out)
    if args.cache:
        flags.check_output_dir(args.cache)
    _check_targets(args)
    tiles = read_tiles(args.tiles, test_fraction=args.test_fraction, seed=args.seed,
                       label_fraction=args.label_fraction)
    if args.vit256 and not os.path.exists(args.vit256):
        raise flags.UsageError(f"{args.vit256}: no such checkpoint")
    os.makedirs(args.out, exist_ok=True)
    with flags.progress(not args.no_progress), _unreadable_listed(args.out):
        feats, info = cached_features(
            tiles.paths, checkpoint=args.vit256, random_init=args.random_init, seed=args.seed,
            size=args.size, norm=args.norm, batch_per_device=args.batch_per_device,
            dtype=flags.compute_dtype(args), cache_dir=args.cache or os.path.join(args.out, "features_cache"),
            progress=not args.no_progress)
    result = patch_eval.evaluate_features(feats, tiles.labels, tiles.splits, tiles.class_names, seed=args.seed)
    result.update(tiles=args.tiles, label_fraction=args.label_fraction, size=args.size, norm=args.norm,
                  model=args.vit256 or f"random-init {args.random_init} (seed {args.seed})", **info)
    table = patch_eval.format_table(result)
    if args.plot:
        result["plots"] = patch_eval.write_plots(result, feats, tiles.labels, tiles.splits, args.out, args.seed)
    result["written_by"] = PROG  # tells a rerun's output check this file is hipt-patch-eval's own
    write_json(os.path.join(args.out, "patch_eval.json"), result, indent=1)
    write_text(os.path.join(args.out, "patch_eval.md"), table + "\n")
    print(table)
    print(f"-> {os.path.join(args.out, 'patch_eval.json')}"
          f"{' (features from cache)' if info['cache_hit'] else ''}")
    return flags.EXIT_OK


main = flags.command(PROG, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
