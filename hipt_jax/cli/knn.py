"""`hipt-knn`: self-supervised slide KNN evaluation on mean CLS-4K embeddings.

    hipt-knn --embeddings EMB --labels labels.csv --splits DIR_OR_kfold:10 [--out results.json]

The protocols and metrics: hipt_jax.evaluation.knn_eval. Exit codes: 0 ok, 1 some slide files
could not be read (skipped, named under "failed_slides" in the results JSON), 2 bad usage or
input.
"""
from __future__ import annotations

import json
import os
import sys

from hipt_jax.cli import flags

PROG = "hipt-knn"


def build_parser() -> flags.Parser:
    p = flags.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--embeddings", required=True, help="hipt-extract output folder")
    p.add_argument("--labels", required=True, help="CSV with slide_id,label")
    p.add_argument("--splits", default="kfold:10", help="folder of splits_{i}.csv or kfold:K")
    p.add_argument("--seed", type=flags.int_at_least(0), default=0, help="seed of the generated k-fold")
    p.add_argument("--k", type=flags.int_at_least(1), default=5, help="k of the paper protocol")
    p.add_argument("--k-dino", type=flags.int_at_least(1), default=None,
                   help="k of DINO's protocol (default 20, capped at the smallest training set)")
    p.add_argument("--temperature", type=flags.float_in(0.0, 100.0), default=0.07)
    p.add_argument("--fit-on", choices=["train", "train+val"], default="train")
    p.add_argument("--out", default=None, help="JSON output (default: EMBEDDINGS/knn_results.json)")
    return p


def _run(args) -> int:
    from hipt_jax.evaluation.knn_eval import format_table, run

    flags.check_output_file(args.out or os.path.join(args.embeddings, "knn_results.json"))
    result = run(args.embeddings, args.labels, args.splits, seed=args.seed, k_paper=args.k,
                 k_dino=args.k_dino, temperature=args.temperature, fit_on=args.fit_on)
    out = args.out or os.path.join(args.embeddings, "knn_results.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    if result["missing_slides"]:
        print(f"{PROG}: {len(result['missing_slides'])} labelled slide(s) have no embedding "
              f"(skipped): {result['missing_slides'][:5]}", file=sys.stderr)
    print(format_table(result))
    print(f"-> {out}")
    return flags.report_failed(PROG, result["failed_slides"])


main = flags.command(PROG, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
