"""hipt-profile: how fast each HIPT stage runs on the current devices.

    hipt-profile --config configs/profile.py[:runlocal] [--config.json=out.json] [--config.trace_dir=DIR]
    hipt-profile --plan --devices 8 --hbm 80GB[,40GB] [--fsdp 1] [--sections stage1,stage2,hipt4k]
    hipt-profile --calibrate --config configs/profile.py   # this machine's CPU minibatch sizes

--plan: per-device memory plans of the full-size updates and extraction for N devices without
the hardware (hipt_jax.memory_plan); on CPU the command re-executes itself with N fake devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N). No --config needed; with one, the plan
takes its hipt4k region_px/arch256/arch4k and pretrain_vit*.config_arg (not its measurement
batches), and says under the table what it planned. Plan flags without --plan, and --plan with
--calibrate, are refused.
--calibrate: times the candidate ViT-256 minibatches of the region program (and, for the enabled
pretraining sections, the samples per microbatch of the update), each with XLA:CPU's dots on
YNNPACK and on Eigen, and stores the fastest pair for this machine (hipt_jax.models.minibatch),
which "auto" then uses: the region program, hipt-extract and the patch-feature extractor (and
the pretraining update) compile with the calibrated minibatch and dot backend.

What it measures: hipt_jax.profiler (run_profile). Shared flags (hipt_jax.cli.flags): --seed
(sets config.seed), --compute-dtype (sets config.dtype, the models' compute dtype),
--no-progress (accepted for uniformity; the profiler draws no progress bars). The batch
sizes are per measurement, not per device, so --batch-per-device is not accepted. Exit
codes: 0 ok, 2 bad usage or input.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

from hipt_jax import outputs
from hipt_jax.cli import flags

PROG = "hipt-profile"

_I = flags.int_at_least
CONFIG_RANGES = {
    "repeats": _I(1), "seed": _I(0), "matmul.n": _I(1), "matmul.repeats": _I(1), "vit256.batch": _I(1),
    "hipt4k.region_px": flags.int_multiple_of(256, 256), "hipt4k.batch": _I(1), "hipt4k.patch_batch": _I(0),
    "pretrain_vit256.global_batch": _I(1), "pretrain_vit4k.global_batch": _I(1),
    "loader.num_records": _I(1), "loader.batches": _I(1), "loader.num_workers": _I(0),
}


# --config.json from before "written_by": its keys
_own_report = outputs.json_written_by(PROG, {"backend", "device_kind", "rows"})


def _own_plan(path: str) -> bool:
    """An earlier --plan_json: a list of plan rows (hipt_jax.memory_plan.plan_section)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return isinstance(data, list) and all(isinstance(r, dict) and {"name", "hbm"} <= set(r) for r in data)


def _config_file() -> Optional[str]:
    """The --config file (without its :ARG): an input, never to be written over."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    spec = config_flags.get_config_filename(absl_flags.FLAGS["config"]) or ""
    return spec.partition(":")[0] or None  # FILE:ARG names FILE


def _run_plan() -> int:
    from absl import flags as absl_flags

    from hipt_jax import memory_plan, outputs
    from hipt_jax.outputs import write_json

    f = absl_flags.FLAGS
    if f.calibrate:
        raise flags.UsageError("--plan and --calibrate: give one (the plan compiles for other devices, the "
                               "calibration times this machine)")
    if f.devices < 1:
        raise flags.UsageError("--plan needs --devices N (N >= 1)")
    sizes = _plan_sizes(f)
    if f.plan_json:
        flags.check_output_file(f.plan_json)
        outputs.check_target(f.plan_json, writer=PROG, is_own=_own_plan)
    try:
        hbms = [memory_plan.parse_bytes(h) for h in f.hbm]
    except ValueError as e:
        raise flags.UsageError(str(e)) from None
    rows = memory_plan.run_plan(f.devices, hbms, fsdp=f.fsdp, sections=f.sections, tiny=f.tiny,
                                search=f.search, compute_dtype=f["compute-dtype"].value, **sizes)
    print(memory_plan.format_plan(rows), flush=True)
    print("(XLA:CPU buffer assignment of the SPMD program, per device: an estimate of an "
          "accelerator's; params/optimizer/inputs are exact)")
    if f.plan_json:
        write_json(f.plan_json, rows, indent=1)
        print(f"wrote {f.plan_json}")
    return flags.EXIT_OK


def _plan_sizes(f) -> dict:
    """What --plan takes from --config (when given): the region program's region side and
    architectures, and the pretraining configs' ARG (configs/pretrain_vit*.py:ARG, which sets the
    global batch the plan targets). The profile's measurement batches are not the plan's.
    --config.hipt4k.region_px=2048 was ignored with exit 0 (the plan was for 4096)."""
    if f["config"].value is None:
        return {}
    if f.tiny:
        raise flags.UsageError("--tiny and --config: give one (--tiny plans the sizes of "
                               "configs/profile.py:runlocal)")
    cfg = f["config"].value
    flags.check_config(cfg, CONFIG_RANGES)
    return dict(region_px=int(cfg.hipt4k.region_px),
                archs=dict(arch256=cfg.hipt4k.arch256, arch4k=cfg.hipt4k.arch4k),
                stage_args={1: cfg.pretrain_vit256.config_arg, 2: cfg.pretrain_vit4k.config_arg})


PLAN_ONLY = ("devices", "hbm", "fsdp", "sections", "tiny", "search", "plan_json")


def _check_plan_flags() -> None:
    """Flags of --plan given without it were ignored with exit 0 (`--devices 8 --hbm 40GB`
    profiled this machine's one CPU)."""
    from absl import flags as absl_flags

    given = [n for n in PLAN_ONLY if absl_flags.FLAGS[n].present]
    if given:
        raise flags.UsageError(f"{', '.join('--' + n for n in given)}: options of --plan, which was not given "
                               "(add --plan for a memory plan)")


def _run_calibrate(cfg) -> int:
    from hipt_jax.profiler import calibrate

    for line in calibrate(cfg):
        print(line, flush=True)
    return flags.EXIT_OK


def _run() -> int:
    import jax
    from absl import flags as absl_flags

    from hipt_jax import distributed, outputs
    from hipt_jax.outputs import write_json
    from hipt_jax.profiler import format_table, run_profile

    if absl_flags.FLAGS.plan:
        return _run_plan()
    _check_plan_flags()
    cfg = flags.absl_config(PROG, {"seed": "seed", "compute-dtype": "dtype"})
    if absl_flags.FLAGS.calibrate:
        flags.check_config(cfg, CONFIG_RANGES)
        return _run_calibrate(cfg)
    flags.check_config(cfg, CONFIG_RANGES)
    for path in (cfg.json and os.path.dirname(os.path.abspath(cfg.json)), cfg.trace_dir):
        if path:
            flags.check_output_dir(path)
    if cfg.json:
        outputs.check_target(cfg.json, writer=PROG, inputs={"--config": _config_file()}, is_own=_own_report)
    distributed.initialize()
    flags.report_devices(PROG)
    cfg.dtype = flags.compute_dtype_name(cfg.dtype)  # auto -> this backend's dtype
    report = run_profile(cfg)
    if jax.process_index() == 0:
        print(format_table(report), flush=True)
        if cfg.json:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
            # "written_by" tells a rerun's output check the file is hipt-profile's own
            write_json(cfg.json, dict(report, written_by=PROG), indent=1)
            print(f"wrote {cfg.json}")
        if cfg.trace_dir:
            print(f"traces in {cfg.trace_dir} (tensorboard --logdir {cfg.trace_dir})")
    return flags.EXIT_OK


def main(argv: Optional[list[str]] = None) -> None:
    from absl import flags as absl_flags
    from ml_collections import config_flags

    if "config" not in absl_flags.FLAGS:
        config_flags.DEFINE_config_file(
            "config", None, "config file: configs/profile.py; :SWITCHES after it, comma-separated: runlocal "
            "(tiny models: CPU seconds), bf16 (bfloat16 compute)", lock_config=True)
    flags.define_absl_shared_flags(seed=True, compute_dtype=True)
    if "plan" not in absl_flags.FLAGS:
        absl_flags.DEFINE_bool("plan", False, "per-device memory plans for --devices N (no execution)")
        absl_flags.DEFINE_integer("devices", 0, "--plan: number of devices of the mesh")
        absl_flags.DEFINE_list("hbm", ["80GB"], "--plan: memory per device, one or more (80GB,40GB)")
        absl_flags.DEFINE_integer("fsdp", 1, "--plan: size of the mesh's fsdp axis (data = devices / fsdp)",
                                  lower_bound=1)
        absl_flags.DEFINE_list("sections", ["stage1", "stage2", "hipt4k"], "--plan: programs to plan")
        absl_flags.DEFINE_bool("tiny", False, "--plan: tiny archs (a quick check of the command)")
        absl_flags.DEFINE_bool("search", True, "--plan: search the largest per-device batch that fits")
        absl_flags.DEFINE_string("plan_json", "", "--plan: also write the rows here")
        absl_flags.DEFINE_bool("calibrate", False, "measure this machine's CPU minibatch sizes and store them")
    _fake_devices_for_plan(sys.argv if argv is None else argv, reexec=argv is None)
    flags.absl_main(PROG, _run, argv, devices_at_start=False, doc=__doc__,  # after jax.distributed starts
                    override_example="--config.hipt4k.region_px=2048")


def _requested_devices(argv: list[str]) -> int:
    """N of --devices N / --devices=N when --plan is given, else 0 (before flag parsing)."""
    if not any(a in ("--plan", "--plan=true", "--plan=True") for a in argv):
        return 0
    for i, a in enumerate(argv):
        if a.startswith("--devices="):
            value = a.split("=", 1)[1]
        elif a == "--devices" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        return int(value) if value.isdigit() else 0
    return 0


def _fake_devices_for_plan(argv: list[str], reexec: bool) -> None:
    """--plan --devices N on CPU: N fake host devices. XLA reads the flag when its CPU client is
    created, so the command re-executes itself with it set (or, called in-process before any
    device was used, sets it in place)."""
    n = _requested_devices(argv)
    flag = f"--xla_force_host_platform_device_count={n}"
    if n <= 1 or flag in os.environ.get("XLA_FLAGS", ""):
        return
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
    env.setdefault("JAX_PLATFORMS", "cpu")
    if reexec:
        os.execve(sys.executable, [sys.executable, "-m", "hipt_jax.cli.profile", *argv[1:]], env)
    os.environ.update(XLA_FLAGS=env["XLA_FLAGS"], JAX_PLATFORMS=env["JAX_PLATFORMS"])


if __name__ == "__main__":
    main()
