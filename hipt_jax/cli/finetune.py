r"""`hipt-finetune`: HIPT-LGP subtyping or survival with k-fold cross-validation.

    hipt-finetune --config configs/lgp_subtyping.py --workdir runs/x \
        --config.data.embeddings=EMB --config.data.labels=labels.csv [--config.data.splits=DIR]

What it trains and writes: hipt_jax.finetune.main (run). Shared flags (hipt_jax.cli.flags):
--no-progress, --seed (sets config.seed), --compute-dtype (sets config.compute_dtype); the
LGP configs have no per-device batch field, so that flag is not accepted. Exit codes: 0 ok, 1 some slides' feature files
could not be read (skipped, named under "failed_slides" in WORKDIR/results.json), 2 bad usage
or input.
"""
from __future__ import annotations

from typing import Optional

from hipt_jax.cli import flags

PROG = "hipt-finetune"

# Every numeric field the run uses, with its valid range (checked before any work).
_I, _F = flags.int_at_least, flags.float_in
CONFIG_RANGES = {
    "seed": _I(0), "model.dropout": _F(0.0, 1.0, low_open=False, high_open=True), "model.n_classes": _I(-1),
    "optim.lr": _F(0.0, 10.0), "optim.weight_decay": _F(0.0, 10.0, low_open=False), "optim.epochs": _I(1),
    "train.accumulate_steps": _I(1), "train.alpha_surv": _F(0.0, 1.0, low_open=False), "train.n_bins": _I(2),
}


def check_splits_spec(splits: str) -> None:
    """A ``kfold:K[:val=F]`` spec must be well formed before any work (a split folder is
    checked when it is read)."""
    if not splits.startswith("kfold:"):
        return
    from hipt_jax.evaluation.cohort import CohortError, parse_kfold

    try:
        kfold = parse_kfold(splits)
    except CohortError as e:
        raise flags.UsageError(f"config.data.splits={e}") from None
    if kfold is None or kfold[0] < 2:
        raise flags.UsageError(f"config.data.splits={splits!r}: expected kfold:K or kfold:K:val=F "
                               "with an integer K >= 2 and 0 <= F < 1")


def _run() -> int:
    from absl import flags as absl_flags
    from absl import logging

    from hipt_jax.finetune.main import run

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = flags.absl_config(PROG, {"seed": "seed", "compute-dtype": "compute_dtype"})
    flags.check_config(config, CONFIG_RANGES)
    check_splits_spec(str(config.data.splits))
    if not absl_flags.FLAGS.workdir:
        raise flags.UsageError("--workdir is required")
    flags.check_output_dir(absl_flags.FLAGS.workdir)
    with flags.progress(flags.absl_progress()):
        results = run(config, absl_flags.FLAGS.workdir, show_progress=flags.absl_progress(),
                      overwrite=absl_flags.FLAGS.overwrite,
                      resume_anyway=absl_flags.FLAGS["resume-anyway"].value)
    return flags.report_failed(PROG, results["failed_slides"])


def main(argv: Optional[list[str]] = None) -> None:
    from absl import flags as absl_flags
    from ml_collections import config_flags

    if "config" not in absl_flags.FLAGS:
        config_flags.DEFINE_config_file(
            "config", None, "config file: configs/lgp_subtyping.py or configs/lgp_survival.py; :runlocal "
            "after it: tiny model, 3 epochs, 3 folds")
        absl_flags.DEFINE_string("workdir", None, "output folder (checkpoints, results, plots)")
        absl_flags.mark_flags_as_required(["config", "workdir"])
    flags.define_absl_shared_flags(seed=True, compute_dtype=True, reuse=True)
    flags.absl_main(PROG, _run, argv, doc=__doc__)


if __name__ == "__main__":
    main()
