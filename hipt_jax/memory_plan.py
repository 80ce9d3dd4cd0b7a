"""Per-device memory plans without the hardware (``hipt-profile --plan``).

The full-size stage-1 and stage-2 DINO updates and the HIPT4K region program are lowered and
compiled for a mesh of N devices (on CPU: N fake host devices, XLA_FLAGS=
--xla_force_host_platform_device_count=N) from abstract shapes only (jax.eval_shape and
jit(...).lower(...).compile(); nothing is executed). XLA's buffer assignment of the compiled
SPMD program is per device, so it reads directly as:

- parameters and optimizer state: counted from the sharded state (bytes of each leaf's shard);
- inputs: the per-device batch; activations/temporaries: XLA's temp buffers;
- total = arguments + outputs not aliased to a donated argument + temporaries.

A plan compiled by XLA:CPU is an estimate of an accelerator's: the sharding, parameter and
optimizer bytes are exact, the temporaries depend on the backend's fusion and layout choices.
Attention is compiled as GPUs and TPUs run it (``jax.nn.dot_product_attention``), not in the
heads-first form CPUs get (``vit.accelerator_attention``).
The largest per-device batch that fits is found from a few compiles (the line through the two
probes that bracket it predicts it, to within 1/8); beyond it, a batch needs
``ceil(batch / largest)`` microbatches (hipt_jax.pretrain.trainer accumulates them).
"""
from __future__ import annotations

import math
import re
import sys
import time
from typing import Optional

import jax
import numpy as np

from hipt_jax.models.vit import accelerator_attention

GIB = 2**30

# What a plan covers: (name, per-device batch is regions for extraction, images for the updates)
SECTIONS = ("stage1", "stage2", "hipt4k")


def parse_bytes(text: str) -> int:
    """'80GB' / '40GiB' / '16G' / '512MB' / '1024B' -> bytes (GB and GiB both read as 2**30: HBM
    sizes are quoted in binary units). A bare number is refused (`--hbm 80` read as 80 bytes
    planned every row "NO"), and so is a size of 0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"--hbm {text!r}: expected a size such as 80GB, 40GB, 16GiB")
    if not m.group(2) and not m.group(3):
        raise ValueError(f"--hbm {text!r}: no unit ({text.strip()}GB?); give one, e.g. 80GB, 16GiB, 512MB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"--hbm {text!r}: the memory per device must be more than 0 bytes")
    return size


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs under its NamedShardings."""
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, sh in zip(leaves, shs))


def _xla_bytes(compiled) -> dict:
    m = compiled.memory_analysis()
    args, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes,
                              m.alias_size_in_bytes, m.temp_size_in_bytes)
    return {"arguments": args, "outputs": out, "aliased": alias, "temp": temp,
            "total": args + max(out - alias, 0) + temp}


# ------------------------------------------------------------------------------ the programs
def pretrain_plan(config, mesh, per_device_batch: int, microbatches: int = 1) -> dict:
    """Compile one DINO update (abstract shapes only) -> per-device bytes."""
    with accelerator_attention():  # the attention GPUs and TPUs run, not the CPU lowering
        return _pretrain_plan(config, mesh, per_device_batch, microbatches)


def _pretrain_plan(config, mesh, per_device_batch: int, microbatches: int) -> dict:
    from hipt_jax import sharding as shd
    from hipt_jax.pretrain import trainer

    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    config.global_batch = per_device_batch * mesh.size
    config.microbatches = microbatches
    rules = tuple(tuple(r) for r in config.sharding_rules)
    abstract = jax.eval_shape(lambda r: trainer.create_state(config, r), jax.random.key(0))
    state_sh = shd.param_shardings(abstract, mesh, rules)
    batch_sh = shd.batch_sharding(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
             for k, v in trainer.dummy_batch(config, config.global_batch).items()}
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
    update = trainer.jit_update(config, mesh, state_sh, freeze_last_layer_steps=0)
    compiled = update.lower(state, batch, jax.random.key(1)).compile()
    params = shard_bytes([abstract["student"], abstract["teacher"]], [state_sh["student"], state_sh["teacher"]])
    opt = shard_bytes(abstract["opt"], state_sh["opt"])
    inputs = shard_bytes(list(batch.values()), [batch_sh] * len(batch))
    return {"params": params, "optimizer": opt, "inputs": inputs, **_xla_bytes(compiled)}


def hipt4k_plan(mesh, per_device_batch: int, region_px: int = 4096, patch_batch: int = 256,
                arch256: str = "vit256", arch4k: str = "vit4k") -> dict:
    """Compile the HIPT4K region program as the extractor runs it (params replicated, regions
    split over the devices) -> per-device bytes."""
    with accelerator_attention():  # the attention GPUs and TPUs run, not the CPU lowering
        return _hipt4k_plan(mesh, per_device_batch, region_px, patch_batch, arch256, arch4k)


def _hipt4k_plan(mesh, per_device_batch: int, region_px: int, patch_batch: int, arch256: str,
                 arch4k: str) -> dict:
    import functools

    from hipt_jax import sharding as shd
    from hipt_jax.models.archs import build_vit, dummy_input, get_arch
    from hipt_jax.models.hipt4k import region_forward

    c256, c4k = get_arch(arch256), get_arch(arch4k)
    p256 = jax.eval_shape(build_vit(c256).init, jax.random.PRNGKey(0), dummy_input(c256))
    p4k = jax.eval_shape(build_vit(c4k).init, jax.random.PRNGKey(0), dummy_input(c4k))
    repl, data = shd.replicated(mesh), shd.batch_sharding(mesh)
    fn = functools.partial(region_forward, config256=c256, config4k=c4k, patch_batch=patch_batch,
                           batch_shards=mesh.size)
    regions = jax.ShapeDtypeStruct((per_device_batch * mesh.size, region_px, region_px, 3), np.uint8,
                                   sharding=data)
    jitted = jax.jit(lambda a, b, r: fn(a, b, r)["features_cls4k"], in_shardings=(repl, repl, data),
                     out_shardings=data)
    compiled = jitted.lower(p256, p4k, regions).compile()
    params = shard_bytes([p256, p4k], [jax.tree.map(lambda _: repl, p256), jax.tree.map(lambda _: repl, p4k)])
    inputs = math.prod(regions.shape) // mesh.size
    return {"params": params, "optimizer": 0, "inputs": inputs, **_xla_bytes(compiled)}


# ------------------------------------------------------------------------------ the search
def largest_fitting(plan_at, hbm: int, start: int = 1, limit: int = 4096) -> tuple[int, Optional[dict]]:
    """Largest per-device batch b <= limit with plan_at(b)["total"] <= hbm (0 when even
    ``start`` does not fit), to within 1/8 (a fitting b whose b + b/8 is known not to fit).
    Each probe is a full compile, so probes are predicted, not bisected: XLA's buffers grow
    about linearly with the batch, and the line through the two probes that bracket the
    answer (through ``start`` and ``2 * start`` at first) says where the total reaches
    ``hbm``. A prediction that fits is followed by one at least just above it (b + b/16), one
    that does not by one at most low enough to end the search if it fits (hi - hi/9): on a
    straight line either closes the bracket. Buffer assignment has steps (layouts, padding),
    so every prediction is clamped inside the bracket and the bracket shrinks with every probe.
    -> (b, its plan)."""
    def total(b):
        return plan_at(b)["total"]

    def crossing(a, b):  # where the line through probes a < b reaches hbm (None: not rising)
        ta, tb = total(a), total(b)
        return None if tb <= ta else a + int((hbm - ta) * (b - a) / (tb - ta))

    if total(start) > hbm:
        return 0, None
    lo, hi = start, limit + 1  # lo fits; hi does not (limit + 1: not probed)
    guess = min(limit, 2 * start)
    while guess > lo:
        if total(guess) <= hbm:
            lo, low_side = guess, True
        else:
            hi, low_side = guess, False
        if hi - lo <= max(1, lo // 8) or lo >= limit:
            break
        line = crossing(lo, hi) if hi <= limit else crossing(start, lo) if lo > start else None
        guess = hi - 1 if line is None else line
        if low_side:  # the last probe fitted: the next one at least just above it
            guess = max(guess, lo + max(1, lo // 16))
        else:  # it did not: the next one at most low enough to close the bracket if it fits
            guess = min(guess, _closing(hi))
        guess = min(max(guess, lo + 1), hi - 1)
    return lo, plan_at(lo)


def _closing(hi: int) -> int:
    """Smallest b with hi - b <= b // 8: a fitting probe there ends the search."""
    b = hi - 1
    while b > 1 and hi - (b - 1) <= (b - 1) // 8:
        b -= 1
    return b


def microbatches_needed(per_device_batch: int, largest: int) -> Optional[int]:
    """Smallest count n dividing the batch with batch / n <= largest (None: nothing fits)."""
    if largest <= 0:
        return None
    for n in range(1, per_device_batch + 1):
        if per_device_batch % n == 0 and per_device_batch // n <= largest:
            return n
    return None


def plan_section(name: str, mesh, hbm: int, *, target_batch: int, search: bool = True,
                 stage_config=None, region_px: int = 4096, limit: int = 4096, memo: Optional[dict] = None,
                 tiny: bool = False, archs: Optional[dict] = None) -> dict:
    """One row: the plan at the target (paper) per-device batch, fits or not, the largest batch
    that fits and the microbatches the target needs beyond it. ``memo`` (batch -> plan) lets
    rows of other HBM sizes reuse the compiles."""
    memo = {} if memo is None else memo
    archs = archs or (dict(arch256="vit256_tiny", arch4k="vit4k_tiny") if tiny else {})

    def plan_at(b):
        if b not in memo:
            start = time.perf_counter()
            memo[b] = (hipt4k_plan(mesh, b, region_px=region_px, **archs) if name == "hipt4k"
                       else pretrain_plan(stage_config, mesh, b))
            # each probe is a full compile (minutes at full size): say what it found
            print(f"plan {name}: {b}/device on {mesh.size} devices -> {memo[b]['total'] / GIB:.2f} GiB per "
                  f"device (compiled in {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        return memo[b]

    row = {"name": name, "devices": mesh.size, "mesh": dict(mesh.shape), "hbm": hbm,
           "target_per_device": target_batch, "plan": plan_at(target_batch)}
    row["fits"] = row["plan"]["total"] <= hbm
    if search:
        largest, _ = largest_fitting(plan_at, hbm, limit=limit)
        row["largest_per_device"] = largest
        row["microbatches"] = 1 if row["fits"] else (
            None if name == "hipt4k" else microbatches_needed(target_batch, largest))
    return row


def format_plan(rows: list[dict]) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    cols = ["program", "devices", "batch/dev", "params GiB", "opt GiB", "inputs GiB", "temp GiB",
            "total GiB", "HBM GiB", "fits", "largest batch/dev", "microbatches"]
    table = []
    for r in rows:
        p = r["plan"]
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
        table.append([r["name"], f"{r['devices']} ({mesh})", str(r["target_per_device"]), gib(p["params"]),
                      gib(p["optimizer"]), gib(p["inputs"]), gib(p["temp"]), gib(p["total"]), gib(r["hbm"]),
                      "yes" if r["fits"] else "NO", str(r.get("largest_per_device", "")),
                      "" if r.get("microbatches") is None else str(r["microbatches"])])
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    setups = dict.fromkeys(f"{r['name']}: {r['setup']}" for r in rows if r.get("setup"))
    notes = dict.fromkeys(f"{r['name']}: {r['note']}" for r in rows if r.get("note"))
    return "\n".join(lines + ["planned " + s for s in setups] + ["note: " + n for n in notes])


# ------------------------------------------------------------------------------ the command
def split_global_batch(global_batch: int, devices: int) -> tuple[int, str]:
    """(per-device batch, note): the trainer refuses a global batch the devices do not divide
    (hipt_jax.pretrain.trainer: "not divisible by the N devices"), so a plan of 256 over 3
    devices is made for the nearest global batch that splits (255 = 3 x 85), and the note says
    so; the note is empty when the config's batch splits as it is."""
    low = global_batch // devices
    if global_batch % devices == 0:
        return low, ""
    per_device = max(1, low if low and global_batch - low * devices <= (low + 1) * devices - global_batch
                     else low + 1)
    return per_device, (f"the configured global batch {global_batch} does not split over {devices} devices "
                        f"(the trainer refuses it): planned {per_device * devices} = {devices} x {per_device}, "
                        f"the nearest that runs (config.global_batch={per_device * devices})")


def _stage_config(stage: int, tiny: bool, fsdp: int, compute_dtype: Optional[str] = None,
                  config_arg: Optional[str] = None):
    import importlib

    module = importlib.import_module("configs.pretrain_vit256" if stage == 1 else "configs.pretrain_vit4k")
    config = module.get_config(("runlocal" if tiny else "") if config_arg is None else config_arg)
    config.mesh.fsdp = fsdp
    if compute_dtype:
        config.compute_dtype = compute_dtype
    return config


def _setup(name: str, config, config_arg: Optional[str], tiny: bool, region_px: int, archs: dict) -> str:
    """What a row planned, in words (printed under the table)."""
    if name == "hipt4k":
        return f"{region_px} px regions, {archs['arch256']} + {archs['arch4k']}"
    arg = ("runlocal" if tiny else "") if config_arg is None else config_arg
    module = "pretrain_vit256" if name == "stage1" else "pretrain_vit4k"
    return f"configs/{module}.py{':' + arg if arg else ''}, global batch {config.global_batch}"


def run_plan(devices: int, hbms: list[int], *, fsdp: int = 1, sections=SECTIONS, tiny: bool = False,
             search: bool = True, region_px: Optional[int] = None, compute_dtype: Optional[str] = None,
             archs: Optional[dict] = None, stage_args: Optional[dict] = None) -> list[dict]:
    """Rows for every (section, HBM size) on a mesh of ``devices`` devices (data x fsdp).
    The per-device target batch is the configs' global batch (the paper's) over the devices
    (the nearest batch that splits when they do not divide it: ``split_global_batch``);
    extraction: 1 region per device. Plans are compiled once per batch size and shared by
    the HBM sizes. ``region_px``, ``archs`` (arch256/arch4k of the region program) and
    ``stage_args`` ({1: ARG, 2: ARG} of configs/pretrain_vit*.py) default to the full-size
    ones (``tiny``: the tiny ones); each row's "setup" says what was planned."""
    from hipt_jax import sharding as shd

    have = jax.devices()
    if len(have) < devices:
        raise ValueError(f"--devices {devices}: JAX sees {len(have)} device(s); on CPU run with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} (hipt-profile --plan sets it)")
    if fsdp < 1:
        raise ValueError(f"--fsdp {fsdp}: must be >= 1")
    if devices % fsdp:
        raise ValueError(f"--fsdp {fsdp} does not divide --devices {devices}")
    mesh = shd.make_mesh({"data": devices // fsdp, "fsdp": fsdp}, have[:devices])
    region_px = region_px or (512 if tiny else 4096)
    archs = archs or (dict(arch256="vit256_tiny", arch4k="vit4k_tiny") if tiny
                      else dict(arch256="vit256", arch4k="vit4k"))
    stage_args = stage_args or {}
    rows = []
    for name in sections:
        if name not in SECTIONS:
            raise ValueError(f"unknown plan section {name!r}: expected one of {', '.join(SECTIONS)}")
        stage = 1 if name == "stage1" else 2
        config = None if name == "hipt4k" else _stage_config(stage, tiny, fsdp, compute_dtype,
                                                                  stage_args.get(stage))
        target, note = (1, "") if name == "hipt4k" else split_global_batch(config.global_batch, devices)
        memo: dict = {}
        for hbm in hbms:
            row = plan_section(name, mesh, hbm, target_batch=target, search=search, stage_config=config,
                               region_px=region_px, memo=memo, archs=archs, limit=64 if tiny else 4096)
            rows.append(dict(row, global_batch=target * devices, note=note,
                             setup=_setup(name, config, stage_args.get(stage), tiny, region_px, archs)))
    return rows
