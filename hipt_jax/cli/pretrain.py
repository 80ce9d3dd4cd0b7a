"""``hipt-pretrain``: DINO pretraining from an ml_collections config.

    hipt-pretrain --config configs/pretrain_vit256.py:runlocal --workdir /tmp/run \
        --config.data.path=/tmp/patches --config.optim.lr=1e-4

Re-running the same command resumes from the latest checkpoint in --workdir. Multi-host:
start the same command on every host (SLURM / TPU pods are detected; otherwise pass
--config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I). The trainer is hipt_jax.pretrain.trainer.train.

Shared flags (hipt_jax.cli.flags): --no-progress, --seed (sets config.seed), --compute-dtype
(sets config.compute_dtype). There is no per-device batch field (the config sets
global_batch), so --batch-per-device is not accepted. Exit codes: 0 ok, 1 the loss became
non-finite (the last good checkpoint is kept), 2 bad usage or input.
"""
from __future__ import annotations

from typing import Optional

from hipt_jax.cli import flags

PROG = "hipt-pretrain"


def _run() -> int:
    from absl import flags as absl_flags
    from absl import logging

    config = flags.absl_config(PROG, {"seed": "seed", "compute-dtype": "compute_dtype"})
    if not absl_flags.FLAGS.workdir:
        raise flags.UsageError("--workdir is required")
    # Orbax logs every checkpoint step at INFO; keep the console for our progress lines.
    if logging.get_verbosity() == logging.INFO and not absl_flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from hipt_jax import distributed

    distributed.initialize(config.distributed)
    from hipt_jax.pretrain.trainer import train

    with flags.progress(flags.absl_progress()):
        train(config, absl_flags.FLAGS.workdir)
    return flags.EXIT_OK


def define_flags() -> None:
    """Define this command's absl flags (once per process); parse with absl's FLAGS(argv)."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    if "config" not in absl_flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "pretraining config file[:arg]", lock_config=True)
        absl_flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, export)")
    flags.define_absl_shared_flags(seed=True, compute_dtype=True)


def main(argv: Optional[list[str]] = None) -> None:
    define_flags()
    flags.absl_main(PROG, _run, argv)


if __name__ == "__main__":
    main()
