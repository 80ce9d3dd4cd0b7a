"""``hipt-pretrain``: DINO pretraining from an ml_collections config.

    hipt-pretrain --config configs/pretrain_vit256.py:runlocal --workdir /tmp/run \
        --config.data.path=/tmp/patches --config.optim.lr=1e-4

Re-running the same command resumes from the latest checkpoint in --workdir. Multi-host:
start the same command on every host (SLURM / TPU pods are detected; otherwise pass
--config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "pretraining config file[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, export)")


def _run(argv):
    del argv
    config = _CONFIG.value
    if config is None or not _WORKDIR.value:
        sys.exit("hipt-pretrain: --config and --workdir are required")
    # Orbax logs every checkpoint step at INFO; keep the console for our progress lines.
    if logging.get_verbosity() == logging.INFO and not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from hipt_jax import distributed
    distributed.initialize(config.distributed)

    from hipt_jax.pretrain.trainer import NonFiniteLossError, train
    try:
        train(config, _WORKDIR.value)
    except (FileNotFoundError, ValueError, NonFiniteLossError) as e:
        sys.exit(f"hipt-pretrain: {e}")


def main():
    app.run(_run)


if __name__ == "__main__":
    main()
