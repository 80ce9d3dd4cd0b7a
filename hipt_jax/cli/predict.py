"""`hipt-predict`: apply every fold of a finished hipt-finetune run to new slides.

    hipt-predict --run WORKDIR --embeddings EMB --out preds.csv

What it writes: hipt_jax.finetune.predict (per-fold and ensemble class probabilities or risk per
slide, attention over regions in OUT_attention/). Exit codes: 0 ok, 1 some slides could not be
scored (unreadable, empty or non-finite bags, or bags unlike the ones the run was trained on: named
on stderr, left out of the CSV), 2 bad usage or input.
"""
from __future__ import annotations

import sys

from hipt_jax.cli import flags

PROG = "hipt-predict"


def build_parser() -> flags.Parser:
    p = flags.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="hipt-finetune workdir (fold_k/checkpoint, results.json)")
    p.add_argument("--embeddings", required=True, help="hipt-extract output folder of the slides to score")
    p.add_argument("--out", required=True, help="CSV of predictions (attention goes to OUT_attention/)")
    flags.add_progress_flag(p)
    return p


def _run(args) -> int:
    from absl import logging

    from hipt_jax.finetune.predict import predict_run

    flags.check_output_file(args.out)
    logging.set_verbosity(logging.WARNING)
    with flags.progress(not args.no_progress):
        result = predict_run(args.run, args.embeddings, args.out, show_progress=not args.no_progress)
    print(f"{result['n_slides']} slide(s) x {result['folds']} fold(s) -> {result['out']} "
          f"(attention: {result['attention_dir']})")
    return flags.report_failed(PROG, result["failed_slides"])


main = flags.command(PROG, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
