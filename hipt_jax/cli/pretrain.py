r"""``hipt-pretrain``: DINO pretraining from an ml_collections config.

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

# Every numeric field the run uses, with its valid range (checked before any work).
_I, _F = flags.int_at_least, flags.float_in
CONFIG_RANGES = {
    "seed": _I(0), "global_batch": _I(1), "total_steps": _I(1), "stop_at_step": _I(-1),
    "microbatches": _I(-1), "log_every": _I(1), "drop_path_rate": _F(0.0, 1.0, low_open=False, high_open=True),
    "student_temp": _F(0.0, 100.0), "center_momentum": _F(0.0, 1.0, low_open=False),
    "head.out_dim": _I(1), "head.hidden_dim": _I(1), "head.bottleneck_dim": _I(1),
    "optim.lr": _F(0.0, 10.0), "optim.min_lr": _F(0.0, 10.0, low_open=False), "optim.warmup_steps": _I(0),
    "optim.weight_decay": _F(0.0, 10.0, low_open=False), "optim.weight_decay_end": _F(0.0, 10.0, low_open=False),
    "optim.clip_grad": _F(0.0, 1e9, low_open=False), "optim.freeze_last_layer_epochs": _I(0),
    "optim.b1": _F(0.0, 1.0, low_open=False, high_open=True), "optim.b2": _F(0.0, 1.0, low_open=False, high_open=True),
    "optim.eps": _F(0.0, 1.0), "teacher.momentum": _F(0.0, 1.0, low_open=False),
    "teacher.temp": _F(0.0, 100.0), "teacher.warmup_temp": _F(0.0, 100.0), "teacher.warmup_temp_epochs": _I(0),
    "crops.global_size": _I(1), "crops.local_size": _I(1), "crops.n_local": _I(0),
    "data.num_workers": _I(0), "data.read_threads": _I(1), "data.prefetch": _I(1),
    "data.samples_per_epoch": flags.auto_or_int_at_least(1),
    "microbatches": flags.auto_or_int_at_least(1),
    "model.depth": _I(1), "model.width": _I(1), "model.num_heads": _I(1), "model.mlp_dim": _I(1),
    "model.patch_size": _I(1),
    "checkpoint.every_steps": _I(1), "checkpoint.keep": _I(1),
    # mesh axis sizes (-1: the devices left over); fsdp=0 was a ZeroDivisionError traceback
    "mesh.data": flags.auto_or_int_at_least(1), "mesh.fsdp": flags.auto_or_int_at_least(1),
}
# Stage 3 (ViT-WSI) views are windows of regions, not pixel or grid crops.
STAGE3_RANGES = {
    **{k: v for k, v in CONFIG_RANGES.items() if k != "crops.global_size"},
    "crops.global_tokens": _I(-1), "crops.region_dropout": _F(0.0, 1.0, low_open=False, high_open=True),
    "crops.noise_std": _F(0.0, 100.0, low_open=False),
}


def _run() -> int:
    from absl import flags as absl_flags
    from absl import logging

    config = flags.absl_config(PROG, {"seed": "seed", "compute-dtype": "compute_dtype"})
    if not absl_flags.FLAGS.workdir:
        raise flags.UsageError("--workdir is required")
    flags.check_config(config, STAGE3_RANGES if config.get("stage") == 3 else CONFIG_RANGES)
    check_views_and_model(config)
    flags.check_output_dir(absl_flags.FLAGS.workdir, _estimate_bytes(config))
    # Orbax logs every checkpoint step at INFO; keep the console for our progress lines.
    if logging.get_verbosity() == logging.INFO and not absl_flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from hipt_jax import distributed

    distributed.initialize(config.distributed)
    flags.report_devices(PROG)
    config.compute_dtype = flags.compute_dtype_name(config.compute_dtype)  # auto -> what this backend computes in
    from hipt_jax.pretrain.trainer import train

    with flags.progress(flags.absl_progress()):
        train(config, absl_flags.FLAGS.workdir, overwrite=absl_flags.FLAGS.overwrite,
              resume_anyway=absl_flags.FLAGS["resume-anyway"].value)
    return flags.EXIT_OK


# Fields that hold a pair, with its form: an override with one number (--config.data.grid=4)
# became a 1-tuple and failed later with an IndexError traceback.
PAIR_FIELDS = {"data.grid": ("(rows, cols)", int), "crops.global_scale": ("(low, high)", float),
               "crops.local_scale": ("(low, high)", float)}


def check_pairs(config) -> None:
    """Every PAIR_FIELDS field the config has is two numbers of its type. UsageError naming the
    field and the form, e.g. config.data.grid=(4,): expected (rows, cols), e.g. (4,4)."""
    for path, (form, kind) in PAIR_FIELDS.items():
        section, _, field = path.partition(".")
        if section not in config or field not in config[section]:
            continue
        value = config[section][field]
        items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if len(items) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and
                                   (kind is float or float(v).is_integer()) for v in items):
            continue
        example = f"({items[0]},{items[0]})" if kind is int and len(items) == 1 else \
            ("(16,16)" if kind is int else "(0.4,1.0)")
        raise flags.UsageError(f"config.{path}={value!r}: expected a pair {form}, e.g. "
                               f"--config.{path}='{example}'")


def check_views_and_model(config) -> None:
    """What single ranges cannot say, before any work: heads divide the width; stage-1 crops are
    whole patches and their scale ranges ordered; stage-2 windows fit the grid; the
    normalization exists. UsageError naming the field."""
    from hipt_jax.pretrain.augment import MEAN_STD

    model, crops, stage = config.model, config.crops, config.get("stage")
    check_pairs(config)
    check_arch(config)
    if model.width % model.num_heads:
        raise flags.UsageError(f"config.model.num_heads={model.num_heads}: must divide config.model.width={model.width}")
    if stage == 3:
        return
    for name in ("global_size", "local_size"):
        size = crops[name]
        if stage == 1 and size % model.patch_size:
            raise flags.UsageError(f"config.crops.{name}={size}: must be a multiple of the patch size "
                                   f"(config.model.patch_size={model.patch_size})")
        grid = tuple(config.data.grid)
        if stage == 2 and size > min(grid):
            raise flags.UsageError(f"config.crops.{name}={size}: a window of the {grid[0]}x{grid[1]} feature "
                                   "grid (config.data.grid) cannot be larger than it")
    if stage == 1:
        for name in ("global_scale", "local_scale"):
            scale = tuple(crops[name])
            if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise flags.UsageError(f"config.crops.{name}={scale}: expected (low, high) with "
                                       "0 < low <= high <= 1 (fractions of the image area)")
        if config.data.norm not in MEAN_STD:
            raise flags.UsageError(f"config.data.norm={config.data.norm!r}: expected one of {sorted(MEAN_STD)}")


# What each stage trains: the arch label its export gets and the stem that reads its data.
STAGE_MODELS = {1: ("vit256", "pixels"), 2: ("vit4k", "features"), 3: ("vitwsi", "regions")}


def check_arch(config) -> None:
    """config.model.arch agrees with the stage's stem (and RGB input for pixels): the export is
    labelled by arch, and hipt-embed/extract/convert load it by that label; a pixel ViT labelled
    vit4k trained fine and failed downstream with a Flax shape traceback. UsageError naming
    the fields."""
    stage = config.get("stage")
    if stage not in STAGE_MODELS:
        return
    arch, stem = STAGE_MODELS[stage]
    model = config.model
    wrong = [f"config.model.{name}={value!r}" for name, value, want
             in (("arch", model.get("arch"), arch), ("stem", model.get("stem"), stem)) if value != want]
    if stem == "pixels" and model.get("in_features") != 3:
        wrong.append(f"config.model.in_features={model.get('in_features')!r}")
    if wrong:
        rgb = ", model.in_features=3 (RGB)" if stem == "pixels" else ""
        raise flags.UsageError(
            f"{', '.join(wrong)}: stage {stage} trains a {arch} (model.arch={arch!r}, model.stem={stem!r}{rgb}); "
            "its export is labelled by model.arch, which hipt-embed/extract/convert load it by: "
            "leave these fields as the config sets them")


def _estimate_bytes(config) -> int:
    """Free space the run needs: its kept checkpoints (+1 being written), each holding student,
    teacher and two Adam moments of backbone + DINO head in float32. For ViT-256 this gives
    ~0.70 GB per checkpoint, the size of the released vit256_small_dino.pth (0.70 GB)."""
    try:
        m, h = config.model, config.head
        backbone = m.depth * (4 * m.width * m.width + 2 * m.width * m.mlp_dim)
        head = (m.width * h.hidden_dim + h.hidden_dim ** 2 + h.hidden_dim * h.bottleneck_dim
                + h.bottleneck_dim * h.out_dim)
        keep = int(config.checkpoint.get("keep", 3))
        return max(flags.MIN_FREE_BYTES, 4 * 4 * (backbone + head) * (keep + 1))
    except (AttributeError, KeyError, TypeError):
        return flags.MIN_FREE_BYTES


def define_flags() -> None:
    """Define this command's absl flags (once per process); parse with absl's FLAGS(argv)."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    if "config" not in absl_flags.FLAGS:
        config_flags.DEFINE_config_file(
            "config", None, "config file: configs/pretrain_vit256.py (stage 1), pretrain_vit4k.py (stage 2) "
            "or pretrain_vitwsi.py (stage 3); :SWITCHES after it, comma-separated: runlocal (tiny model, "
            "few steps: CPU seconds), bf16 (bfloat16 compute)", lock_config=True)
        absl_flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, export)")
    flags.define_absl_shared_flags(seed=True, compute_dtype=True, reuse=True)


def main(argv: Optional[list[str]] = None) -> None:
    define_flags()
    flags.absl_main(PROG, _run, argv, devices_at_start=False, doc=__doc__)  # after jax.distributed starts


if __name__ == "__main__":
    main()
