"""hipt-profile: how fast each HIPT stage runs on the current devices.

    hipt-profile --config configs/profile.py[:runlocal] [--config.json=out.json] [--config.trace_dir=DIR]

What it measures: hipt_jax.profiler (run_profile). Shared flags (hipt_jax.cli.flags): --seed
(sets config.seed), --compute-dtype (sets config.dtype, the models' compute dtype),
--no-progress (accepted for uniformity; the profiler draws no progress bars). The batch
sizes are per measurement, not per device, so --batch-per-device is not accepted. Exit
codes: 0 ok, 2 bad usage or input.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from hipt_jax.cli import flags

PROG = "hipt-profile"

_I = flags.int_at_least
CONFIG_RANGES = {
    "repeats": _I(1), "seed": _I(0), "matmul.n": _I(1), "matmul.repeats": _I(1), "vit256.batch": _I(1),
    "hipt4k.region_px": _I(256), "hipt4k.batch": _I(1), "hipt4k.patch_batch": _I(1),
    "pretrain_vit256.global_batch": _I(1), "pretrain_vit4k.global_batch": _I(1),
    "loader.num_records": _I(1), "loader.batches": _I(1), "loader.num_workers": _I(0),
}


def _run() -> int:
    import jax

    from hipt_jax import distributed
    from hipt_jax.profiler import format_table, run_profile

    cfg = flags.absl_config(PROG, {"seed": "seed", "compute-dtype": "dtype"})
    flags.check_config(cfg, CONFIG_RANGES)
    for path in (cfg.json and os.path.dirname(os.path.abspath(cfg.json)), cfg.trace_dir):
        if path:
            flags.check_output_dir(path)
    distributed.initialize()
    flags.report_devices(PROG)
    cfg.dtype = flags.compute_dtype_name(cfg.dtype)  # auto -> this backend's dtype
    report = run_profile(cfg)
    if jax.process_index() == 0:
        print(format_table(report), flush=True)
        if cfg.json:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
            with open(cfg.json, "w") as f:
                json.dump(report, f, indent=1)
            print(f"wrote {cfg.json}")
        if cfg.trace_dir:
            print(f"traces in {cfg.trace_dir} (tensorboard --logdir {cfg.trace_dir})")
    return flags.EXIT_OK


def main(argv: Optional[list[str]] = None) -> None:
    from absl import flags as absl_flags
    from ml_collections import config_flags

    if "config" not in absl_flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "profile config file[:runlocal]", lock_config=True)
    flags.define_absl_shared_flags(seed=True, compute_dtype=True)
    flags.absl_main(PROG, _run, argv, devices_at_start=False)  # after jax.distributed starts


if __name__ == "__main__":
    main()
