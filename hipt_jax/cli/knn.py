"""`hipt-knn`: self-supervised slide KNN evaluation on mean CLS-4K embeddings.

    hipt-knn --embeddings EMB --labels labels.csv --splits DIR_OR_kfold:10 [--out results.json]
    hipt-knn ... --embedding cls4k_mean,cls256_mean,mean256_cls4k [--label-fraction 0.1] [--plot]

--embedding (hipt_jax.evaluation.slide_embeddings): one name, a comma list or "all"; several
run on the same folds and print one table (row per embedding and protocol); the JSON keeps the
first one's result at the top level and every one under "baselines".

The protocols and metrics: hipt_jax.evaluation.knn_eval. Exit codes: 0 ok, 1 some slide files
could not be read (skipped, named under "failed_slides" in the results JSON), 2 bad usage or
input.
"""
from __future__ import annotations

import argparse
import os
import sys

from hipt_jax import outputs
from hipt_jax.cli import flags

PROG = "hipt-knn"


def build_parser() -> flags.Parser:
    p = flags.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--embeddings", required=True, type=flags.path_arg,
                   help="hipt-extract output folder, or a folder of bags (.npz, TRIDENT/CLAM .h5, official .pt)")
    p.add_argument("--labels", required=True, type=flags.path_arg,
                   help="labels CSV (slide_id + a label column; extra columns ignored)")
    p.add_argument("--splits", default="kfold:10", type=flags.path_arg, help="folder of splits_{i}.csv or kfold:K")
    p.add_argument("--seed", type=flags.int_at_least(0), default=0, help="seed of the generated k-fold")
    p.add_argument("--k", type=flags.int_at_least(1), default=None,
                   help="k of the paper protocol (default 5, capped at the smallest training set)")
    p.add_argument("--k-dino", type=flags.int_at_least(1), default=None,
                   help="k of DINO's protocol (default 20, capped at the smallest training set)")
    p.add_argument("--temperature", type=flags.float_in(0.0, 100.0), default=0.07)
    p.add_argument("--fit-on", choices=["train", "train+val"], default="train")
    p.add_argument("--out", default=None, type=flags.path_arg,
                   help="JSON output (default: EMBEDDINGS/knn_results.json)")
    p.add_argument("--label-column", default="label", help="CSV column holding the class (e.g. oncotree_code)")
    p.add_argument("--classes", default=None, type=_class_list,
                   help="comma-separated classes to keep, in this order (e.g. IDC,ILC); other rows dropped")
    p.add_argument("--label-frac", "--label-fraction", dest="label_frac", type=_fraction, default=1.0,
                   help="seeded per-class patient-level fraction of each training part, 0.25 or 25%% "
                        "(test unchanged)")
    p.add_argument("--save-splits", default=None, type=flags.path_arg, metavar="DIR",
                   help="write the folds used as CLAM split files DIR/splits_{i}.csv")
    p.add_argument("--allow-leaky-splits", action="store_true",
                   help="accept split files that put one patient in two parts (warned and recorded; "
                        "e.g. the official slide-level HIPT BRCA splits); refused by default")
    p.add_argument("--embedding", default="cls4k_mean",
                   help="cls4k_mean (default), cls256_mean, mean256_cls4k, wsi (stage 3: after hipt-extract "
                        "--vitwsi), a comma list, or all (all but wsi)")
    p.add_argument("--plot", action="store_true",
                   help="embedding map (t-SNE/UMAP) and confusion matrices next to --out")
    flags.add_progress_flag(p)
    return p


def _class_list(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated class names, got {text!r}")
    return names


def _fraction(text: str) -> float:
    try:
        value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _names(text: str) -> list[str]:
    from hipt_jax.evaluation import slide_embeddings

    names = slide_embeddings.names_for_all() if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        slide_embeddings.check_name(n)
    return names


def _run(args) -> int:
    flags.check_output_file(args.out or os.path.join(args.embeddings, "knn_results.json"))
    _check_targets(args)
    with flags.progress(not args.no_progress):
        return _evaluate(args)


# results files from before "written_by": their keys
_own_results = outputs.json_written_by(PROG, {"folds_source", "missing_slides", "embedding"})


def _check_targets(args) -> None:
    """--out (and the --save-splits folder) must not replace the labels, a split file, another
    command's files or anything hipt-knn did not write, nor be named like a bag among the bags
    (hipt_jax.outputs.check_target)."""
    import glob


    split_files = (glob.glob(os.path.join(glob.escape(args.splits), "splits_*.csv"))
                   if os.path.isdir(args.splits) else [])
    outputs.check_target(args.out or os.path.join(args.embeddings, "knn_results.json"), writer=PROG,
                         inputs={"--labels": args.labels, "--splits": split_files}, is_own=_own_results,
                         bag_folders=[args.embeddings])
    if args.save_splits:  # the files are compared once the folds are known (knn_eval.save_clam_splits)
        outputs.check_outside_managed(os.path.join(args.save_splits, "splits_0.csv"))
        outputs.check_not_among_bags(args.save_splits, [args.embeddings])  # EMB/folds.h5: read as a bag


def _evaluate(args) -> int:
    from hipt_jax.evaluation import knn_eval
    from hipt_jax.evaluation.knn_eval import format_table, run
    from hipt_jax.outputs import write_json

    results = {name: run(args.embeddings, args.labels, args.splits, seed=args.seed, k_paper=args.k,
                         k_dino=args.k_dino, temperature=args.temperature, fit_on=args.fit_on,
                         label_column=args.label_column, classes=args.classes, label_frac=args.label_frac,
                         save_splits=args.save_splits, allow_leaky_splits=args.allow_leaky_splits,
                         embedding=name)
               for name in _names(args.embedding)}
    out = args.out or os.path.join(args.embeddings, "knn_results.json")
    if args.plot:
        # The cohort the evaluation used: same label column and class list (class order and
        # dropped classes), so the plots' class indices match the results'.
        coh = knn_eval.cohort_lib.read_labels_csv(args.labels, label_column=args.label_column,
                                                  classes=args.classes)
        stem = os.path.splitext(out)[0]
        for name, r in results.items():
            r["plots"] = knn_eval.write_plots(r, coh, os.path.dirname(os.path.abspath(out)),
                                              f"{os.path.basename(stem)}_{name}", args.seed)
    table = knn_eval.baseline_table(results)
    for r in results.values():
        r.pop("_embeddings")
    result = dict(next(iter(results.values())))
    if len(results) > 1:
        result["baselines"] = results
        result["baseline_table"] = table
    result["written_by"] = PROG  # tells a rerun's --out check this file is hipt-knn's own
    write_json(out, result, indent=1)
    if result.get("unlabelled_slides"):
        print(f"{PROG}: {len(result['unlabelled_slides'])} slide(s) in {args.embeddings} have no row in "
              f"{args.labels} (not evaluated): {result['unlabelled_slides'][:5]}", file=sys.stderr)
    if result["missing_slides"]:
        print(f"{PROG}: {len(result['missing_slides'])} labelled slide(s) have no embedding "
              f"(skipped): {result['missing_slides'][:5]}", file=sys.stderr)
    for cls, n in sorted(result["dropped_by_class"].items()):
        print(f"{PROG}: dropped {n} row(s) of class {cls!r} (not in --classes)", file=sys.stderr)
    if result["skipped_split_ids"]:
        ids = result["skipped_split_ids"]
        print(f"{PROG}: {len(ids)} split id(s) not in the labels CSV (skipped): {ids[:10]}", file=sys.stderr)
    for warning in result["fold_warnings"]:  # the same folds for every embedding: said once
        print(f"{PROG}: {warning}", file=sys.stderr)
    if result.get("k_note"):
        print(f"{PROG}: {result['k_note']}", file=sys.stderr)
    if result["leaky_patients"]:
        n = sum(len(v) for v in result["leaky_patients"].values())
        print(f"{PROG}: WARNING: {n} patient(s) appear in two parts of a fold (--allow-leaky-splits; "
              "listed under leaky_patients in the results)", file=sys.stderr)
    print(f"{PROG}: {result['folds_source']}, label fraction {result['label_frac']}", file=sys.stderr)
    print(result["baseline_table"] if len(results) > 1 else format_table(result))
    print(f"-> {out}")
    return flags.report_failed(PROG, result["failed_slides"])


main = flags.command(PROG, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
