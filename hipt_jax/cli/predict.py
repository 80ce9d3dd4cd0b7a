"""`hipt-predict`: apply every fold of a finished hipt-finetune run to new slides.

    hipt-predict --run WORKDIR --embeddings EMB --out preds.csv

What it writes: hipt_jax.finetune.predict (per-fold and ensemble class probabilities or risk per
slide, attention over regions in OUT_attention/). Exit codes: 0 ok, 1 some slides could not be
scored (unreadable, empty or non-finite bags, or bags unlike the ones the run was trained on: named
on stderr, left out of the CSV), 2 bad usage or input.
"""
from __future__ import annotations

import os
import sys

from hipt_jax.cli import flags

PROG = "hipt-predict"


def build_parser() -> flags.Parser:
    p = flags.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=flags.path_arg,
                   help="hipt-finetune workdir (fold_k/checkpoint, results.json)")
    p.add_argument("--embeddings", required=True, type=flags.path_arg,
                   help="hipt-extract output folder of the slides to score")
    p.add_argument("--out", required=True, type=flags.path_arg,
                   help="CSV of predictions (attention goes to OUT_attention/)")
    flags.add_progress_flag(p)
    return p


def _run(args) -> int:
    from absl import logging

    from hipt_jax.finetune.predict import predict_run

    flags.check_output_file(args.out)
    _check_targets(args)
    logging.set_verbosity(logging.WARNING)
    with flags.progress(not args.no_progress):
        result = predict_run(args.run, args.embeddings, args.out, show_progress=not args.no_progress)
    print(f"{result['n_slides']} slide(s) x {result['folds']} fold(s) -> {result['out']} "
          f"(attention: {result['attention_dir']})")
    return flags.report_failed(PROG, result["failed_slides"])


def _own_csv(path: str) -> bool:
    """An earlier hipt-predict CSV: slide_id, then fold/ensemble columns only."""
    import csv

    from hipt_jax.finetune.predict import SEEN_COLUMN

    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return header[:1] == ["slide_id"] and all(h.startswith(("fold", "ensemble_")) or h == SEEN_COLUMN
                                              for h in header[1:])


def _own_attention_dir(path: str) -> bool:
    """An earlier OUT_attention/ folder: .npz maps only, at least one of them hipt-predict's. Its
    stale maps are deleted on every run, so a folder of anything else must not be taken."""
    import numpy as np

    names = [n for n in os.listdir(path) if not n.startswith(".") and ".tmp-" not in n]
    if not all(n.endswith(".npz") and os.path.isfile(os.path.join(path, n)) for n in names):
        return False
    for name in names:
        try:
            with np.load(os.path.join(path, name)) as data:
                if "attention_mean" in data.files:
                    return True
        except (OSError, ValueError, EOFError):
            continue  # an empty or damaged map: the run replaces or removes it
    return not names


def _check_targets(args) -> None:
    """Neither the CSV nor its attention folder may replace an input, another command's files
    or anything hipt-predict did not write (hipt_jax.outputs.check_target)."""
    from hipt_jax import outputs

    inputs = {"--run": args.run, "--embeddings": args.embeddings}
    outputs.check_target(args.out, writer=PROG, inputs=inputs, is_own=_own_csv, bag_folders=[args.embeddings])
    outputs.check_target(os.path.splitext(args.out)[0] + "_attention", writer=PROG, inputs=inputs,
                         is_own=_own_attention_dir, bag_folders=[args.embeddings])


main = flags.command(PROG, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
