"""How fast each HIPT stage runs on the current devices (the library of `hipt-profile`, whose
command line is hipt_jax/cli/profile.py).

    hipt-profile --config configs/profile.py[:runlocal] [--config.json=out.json] [--config.trace_dir=DIR]

Measures, on whatever ``jax.devices()`` is:
- the device's matmul peak (best of a few square fp32/bf16 matmuls): the denominator of MFU;
- ViT-256 patches/s (forward, a batch of 256 px patches);
- HIPT4K regions/s: the whole jitted region path (crop, normalize, ViT-256 over patch
  minibatches, regrid, ViT-4K) on one 4096 px region;
- one DINO update step of each pretraining stage (images/s), from configs/pretrain_*.py;
- the pretraining loaders (Grain + augmentation) in crops/s, against what a step consumes.
For each: compile time, best (and median) step time over ``repeats`` timed runs after a
warm-up, FLOPs, achieved FLOP/s and MFU (achieved / measured matmul peak), and memory (XLA's
buffer plan of the compiled program; per-device allocator peak where the backend reports it;
process peak RSS).

FLOP counts: the ViTs are counted analytically (2 FLOPs per multiply-add of every matmul:
patch embedding / phi, qkv, attention scores and values, projection, MLP), so HIPT4K on a 4096
region is ~3,146 GFLOP (>99.9% in ViT-256); XLA's cost analysis counts one iteration of the
patch minibatch loop only, so it is not used there. Update steps use XLA's cost analysis of the
compiled step (no loops inside), which includes the backward pass and the optimizer.

Timing is the same as benchmarks/bench_inference.py's: jit, one warm-up call, then the best
of ``repeats`` calls each ended by ``block_until_ready`` on the outputs (the median is reported
too); the matmul peak is the best n x n fp32 matmul (n = 2048 by default, as there).
"""
from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


# ------------------------------------------------------------------------------ FLOPs
def vit_forward_flops(config, rows: int, cols: int) -> float:
    """Analytic forward FLOPs of one ViT input with a rows x cols token grid (+ CLS)."""
    n = rows * cols + 1
    d, mlp, depth = config.width, config.mlp_dim, config.depth
    if config.stem == "pixels":
        stem = 2.0 * rows * cols * (config.patch_size**2 * config.in_features) * d
    else:
        stem = 2.0 * rows * cols * config.in_features * d
    per_block = (2.0 * n * d * 3 * d      # qkv
                 + 2.0 * 2 * n * n * d    # q.k^T and attn.v, all heads
                 + 2.0 * n * d * d        # output projection
                 + 2.0 * 2 * n * d * mlp)  # fc1 + fc2
    return stem + depth * per_block


def hipt4k_region_flops(config256, config4k, height: int, width: int) -> float:
    """Analytic FLOPs of HIPT4K on one H x W region (after the crop to multiples of 256)."""
    rows, cols = height // 256, width // 256
    per_patch = vit_forward_flops(config256, 16, 16)
    total = rows * cols * per_patch
    if config4k is not None:
        total += vit_forward_flops(config4k, rows, cols)
    return total


def xla_flops(compiled) -> float | None:
    """FLOPs from XLA's cost analysis of a compiled program (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        flops = float(cost.get("flops", 0.0))
        return flops if flops > 0 else None
    except Exception:  # backends without cost analysis
        return None


def region_xla_flops(params256, params4k, config256, config4k, region_px: int, dtype=jnp.float32,
                     batch: int = 1) -> float | None:
    """Executed FLOPs of one region of the HIPT4K region program (XLA cost analysis), per region.

    The program runs its ViT-256 minibatches in a ``lax.map`` loop and XLA's cost analysis
    counts a loop body once, so the looped program itself reports 1/n_chunks of its work.
    Compile (never run) the same arithmetic with every patch in one minibatch instead."""
    import functools

    from hipt_jax.models.hipt4k import region_forward

    n_patches = batch * (region_px // 256) ** 2
    fn = jax.jit(functools.partial(region_forward, config256=config256, config4k=config4k,
                                   patch_batch=max(1, n_patches), dtype=dtype))
    regions = jax.ShapeDtypeStruct((batch, region_px, region_px, 3), jnp.uint8)
    flops = xla_flops(fn.lower(params256, params4k, regions).compile())
    return None if flops is None else flops / batch


def update_flops(config, mesh, state_shardings, args, **overrides) -> float | None:
    """FLOPs of the DINO update on the whole batch (``microbatches=1``; ``overrides`` set
    other config fields). XLA's cost analysis counts a lax.scan body once, so a microbatched
    program undercounts; its arithmetic is this one's. ``args``: (state, batch, rng), which
    may be donated later but not yet."""
    from hipt_jax.pretrain import trainer

    whole = config.copy_and_resolve_references()
    whole.microbatches = 1
    whole.update(overrides)
    update = trainer.jit_update(whole, mesh, state_shardings, freeze_last_layer_steps=0)
    return xla_flops(update.lower(*args).compile())


# ------------------------------------------------------------------------------ timing
def _block(tree) -> None:
    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def compile_and_time(fn: Callable, args: tuple, repeats: int, *, carry: Callable | None = None,
                     trace_dir: str = "", name: str = "") -> dict:
    """jit-compile ``fn`` for ``args`` (timed), warm up once, then time ``repeats`` calls.

    ``carry(args, outputs) -> args`` feeds outputs back in (for donated train states).
    Returns compile_s, step_s (the best time: fairest on a shared machine, and what
    benchmarks/bench_inference.py reports), median_s, all times, the compiled program.
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile() if not hasattr(fn, "lower") else fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(*args)
    _block(out)
    if carry is not None:
        args = carry(args, out)
    times = []
    for i in range(repeats):
        tracing = trace_dir and i == repeats - 1
        if tracing:
            jax.profiler.start_trace(os.path.join(trace_dir, name or "step"))
        t0 = time.perf_counter()
        out = compiled(*args)
        _block(out)
        times.append(time.perf_counter() - t0)
        if tracing:
            jax.profiler.stop_trace()
        if carry is not None:
            args = carry(args, out)
    return {"compile_s": compile_s, "step_s": min(times), "median_s": statistics.median(times),
            "times": times, "compiled": compiled}


def memory_report(compiled) -> dict:
    """XLA's buffer plan of a compiled program plus the allocator peak where reported (the
    ``*_mb`` figures are MiB, 2**20 bytes)."""
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    report = {}
    try:
        m = compiled.memory_analysis()
        report.update(arguments_mb=mb(m.argument_size_in_bytes), outputs_mb=mb(m.output_size_in_bytes),
                      temp_mb=mb(m.temp_size_in_bytes))
    except Exception:
        pass
    # GPU/TPU allocators report a per-device peak (the max over this host's devices is shown);
    # CPU reports nothing, and XLA's plan above is the per-device figure (arguments are sharded).
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    if peaks:
        report["device_peak_mb"] = mb(max(peaks))
    report["process_peak_rss_mb"] = mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return report


def matmul_peak(n: int, dtype, repeats: int) -> float:
    """Best FLOP/s of an n x n x n matmul on the default device (the MFU denominator)."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    res = compile_and_time(lambda x, y: x @ y, (a, b), repeats)
    return 2.0 * n**3 / min(res["times"])


def _row(name: str, unit: str, items: float, res: dict, flops: float | None, peak: float,
         flops_source: str, **extra) -> dict:
    step = res["step_s"]
    row = {"name": name, "unit": unit, "items_per_step": items, "throughput": items / step,
           "step_s": step, "median_s": res["median_s"], "compile_s": res["compile_s"],
           "gflop_per_step": None, "gflop_s": None,
           "mfu": None, "flops_source": flops_source, "memory": memory_report(res["compiled"])}
    if flops:
        row.update(gflop_per_step=flops / 1e9, gflop_s=flops / step / 1e9, mfu=flops / step / peak)
    row.update(extra)
    return row


# ------------------------------------------------------------------------------ sections
def _dtype(name: str):
    from hipt_jax.models.precision import resolve_dtype

    return resolve_dtype(name)


def profile_vit256(cfg, peak: float, trace_dir: str = "") -> dict:
    from hipt_jax.models.archs import build_vit, dummy_input, get_arch

    arch = get_arch(cfg.vit256.arch)
    model = build_vit(arch, dtype=_dtype(cfg.dtype))
    params = jax.jit(model.init)(jax.random.PRNGKey(cfg.seed), dummy_input(arch))
    x = jax.random.normal(jax.random.PRNGKey(1), (cfg.vit256.batch, 256, 256, 3), jnp.float32)
    res = compile_and_time(lambda p, im: model.apply(p, im)[0], (params, x), cfg.repeats,
                           trace_dir=trace_dir, name="vit256")
    flops = cfg.vit256.batch * vit_forward_flops(arch, 16, 16)
    return _row("ViT-256 forward", "patches/s", cfg.vit256.batch, res, flops, peak, "analytic",
                arch=cfg.vit256.arch, batch=cfg.vit256.batch)


def hipt4k_forward(cfg):
    """The HIPT4K region path exactly as HIPT4K.embed_batch runs it (jitted with the same CPU
    compile options): (fn, params, config256, config4k, patch_batch)."""
    import functools

    from hipt_jax.models.archs import build_vit, dummy_input, get_arch
    from hipt_jax.models.hipt4k import auto_patch_batch, region_compiler_options, region_forward

    c256, c4k = get_arch(cfg.hipt4k.arch256), get_arch(cfg.hipt4k.arch4k)
    k256, k4k = jax.random.split(jax.random.PRNGKey(cfg.seed))
    p256 = jax.jit(build_vit(c256).init)(k256, dummy_input(c256))
    p4k = jax.jit(build_vit(c4k).init)(k4k, dummy_input(c4k))
    patch_batch = auto_patch_batch(cfg.hipt4k.patch_batch or None, c256, _dtype(cfg.dtype))  # 0: auto
    fn = jax.jit(functools.partial(region_forward, config256=c256, config4k=c4k, patch_batch=patch_batch,
                                   dtype=_dtype(cfg.dtype)),
                 compiler_options=region_compiler_options(c256, _dtype(cfg.dtype)))
    return fn, (p256, p4k), c256, c4k, patch_batch


def profile_hipt4k(cfg, peak: float, trace_dir: str = "") -> dict:
    fn, (p256, p4k), c256, c4k, patch_batch = hipt4k_forward(cfg)
    side, batch = cfg.hipt4k.region_px, cfg.hipt4k.batch
    regions = jax.device_put(np.random.default_rng(cfg.seed).integers(0, 256, (batch, side, side, 3), np.uint8))
    res = compile_and_time(fn, (p256, p4k, regions), cfg.repeats, trace_dir=trace_dir, name="hipt4k")
    flops = batch * hipt4k_region_flops(c256, c4k, side, side)
    return _row("HIPT4K region", "regions/s", batch, res, flops, peak, "analytic",
                region_px=side, patch_batch=patch_batch, s_per_region=res["step_s"] / batch)


def pretrain_config(stage: int, section):
    import importlib

    module = importlib.import_module("configs.pretrain_vit256" if stage == 1 else "configs.pretrain_vit4k")
    config = module.get_config(section.config_arg)
    config.global_batch = section.global_batch
    return config


def profile_pretrain(stage: int, cfg, peak: float, trace_dir: str = "") -> dict:
    from hipt_jax import sharding as shd
    from hipt_jax.pretrain import trainer

    section = cfg.pretrain_vit256 if stage == 1 else cfg.pretrain_vit4k
    config = pretrain_config(stage, section)
    mesh = shd.make_mesh(dict(config.mesh))
    if config.global_batch % mesh.size:
        raise ValueError(f"global_batch {config.global_batch} is not divisible by {mesh.size} devices")
    state, state_sh = trainer.init_sharded_state(config, mesh, jax.random.key(cfg.seed))
    update = trainer.jit_update(config, mesh, state_sh, freeze_last_layer_steps=0)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    batch = shd.global_batch(trainer.dummy_batch(config, config.global_batch), shd.batch_sharding(mesh, rules))
    if stage == 1:  # zero images give degenerate softmaxes; timing does not care, but be realistic
        rng = np.random.default_rng(cfg.seed)
        batch = {k: (jax.device_put(rng.integers(0, 256, v.shape, np.uint8), v.sharding) if v.dtype == jnp.uint8
                     else v) for k, v in batch.items()}
    step_rng = jax.random.key(1)
    n_micro = trainer.resolve_microbatches(config, mesh)
    # Counted before the timed steps donate the state.
    flops = update_flops(config, mesh, state_sh, (state, batch, step_rng)) if n_micro > 1 else None
    res = compile_and_time(update, (state, batch, step_rng), cfg.repeats, trace_dir=trace_dir,
                           name=f"pretrain_stage{stage}",
                           carry=lambda args, out: (out[0], args[1], args[2]))
    crops = config.global_batch * (trainer.N_GLOBAL + config.crops.n_local)
    name = "DINO step ViT-256 (stage 1)" if stage == 1 else "DINO step ViT-4K (stage 2)"
    fed = {"state": trainer.init_sharded_state(config, mesh, jax.random.key(cfg.seed))[0]}

    def fed_step(device_batch):  # the update on a fresh state (the timed one was donated)
        fed["state"], metrics = update(fed["state"], device_batch, step_rng)
        return metrics

    batch_sh = shd.batch_sharding(mesh, rules)
    feed = {"step": fed_step, "put": lambda local: shd.global_batch(local, batch_sh)}
    flops = flops or xla_flops(res["compiled"])
    return _row(name, "images/s", config.global_batch, res, flops, peak, "xla",
                global_batch=config.global_batch, crops_per_step=crops, devices=mesh.size,
                microbatches=n_micro, feed=feed,
                arch=config.model.arch + ("" if config.model.depth in (12, 6) else "-tiny"))


def _loader_data(stage: int, folder: str, n: int, config) -> None:
    """n records in the reference formats from the real slide: PNG patches / .npy feature grids."""
    from PIL import Image

    if stage == 1:
        from data_prep.synth import real_tissue_pixels

        tissue = real_tissue_pixels(True)
        rng = np.random.default_rng(0)
        for i in range(n):
            y = rng.integers(0, tissue.shape[0] - 256)
            x = rng.integers(0, tissue.shape[1] - 256)
            Image.fromarray(np.ascontiguousarray(tissue[y : y + 256, x : x + 256])).save(os.path.join(folder, f"{i}.png"))
    else:
        shape = (config.data.grid[0] * config.data.grid[1], config.data.in_features)
        rng = np.random.default_rng(0)
        for i in range(n):
            np.save(os.path.join(folder, f"{i}.npy"), rng.normal(size=shape).astype(np.float32))


def profile_loader(stage: int, cfg, step_row: dict | None) -> dict:
    from hipt_jax.pretrain import data as data_lib
    from hipt_jax.pretrain import trainer

    section = cfg.pretrain_vit256 if stage == 1 else cfg.pretrain_vit4k
    config = pretrain_config(stage, section)
    # Both measurements read the records: they stay inside the folder's lifetime.
    with tempfile.TemporaryDirectory() as folder:
        _loader_data(stage, folder, cfg.loader.num_records, config)
        config.data.path = folder
        config.data.num_workers = cfg.loader.num_workers
        source = data_lib.make_source(config.data)
        batches = cfg.loader.batches
        iterator = data_lib.make_iterator(config, source, process_index=0, process_count=1,
                                          num_steps=batches + 1)
        t0 = time.perf_counter()
        next(iterator)  # worker start-up and first batch
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        step = (time.perf_counter() - t0) / batches
        data_lib.close_iterator(iterator)  # stops the loader's worker processes
        crops = config.global_batch * (trainer.N_GLOBAL + config.crops.n_local)
        row = {"name": f"loader stage {stage}", "unit": "crops/s", "items_per_step": crops,
               "throughput": crops / step, "step_s": step, "compile_s": first,
               "gflop_per_step": None, "gflop_s": None, "mfu": None, "flops_source": None,
               "memory": {}, "num_workers": cfg.loader.num_workers}
        if step_row is not None:
            # > 1: the loader outruns the update step (it is not the bottleneck).
            row["loader_over_step"] = step_row["step_s"] / step
            feed = step_row.get("feed")
            if feed is not None:  # the update fed by this loader, as the trainer runs it
                iterator = data_lib.make_iterator(config, source, process_index=0,
                                                  process_count=1, num_steps=batches + 1)
                next(iterator)  # worker start-up is not a step
                fed = (next(iterator) for _ in range(batches))
                row["host_wait_share"] = host_wait_share(feed["step"], fed, feed["put"],
                                                         step_row["step_s"])
                fed = None
                data_lib.close_iterator(iterator)
    return row


def host_wait_share(step, batches, put, device_step_s: float) -> float:
    """Share of a fed training loop's wall time in which the device waits for the host:
    ``1 - n * device_step_s / wall`` for n steps run on batches from ``batches`` (prefetched
    to the device two ahead, as the trainers do), clipped to [0, 1]. ``device_step_s`` is the
    step's time on device-resident inputs (compile_and_time)."""
    from hipt_jax.prefetch import prefetch_to_device

    n, out = 0, None
    t0 = time.perf_counter()
    for batch in prefetch_to_device(batches, put):
        out = step(batch)
        n += 1
    jax.block_until_ready(out)
    wall = time.perf_counter() - t0
    return min(1.0, max(0.0, 1.0 - n * device_step_s / wall)) if n else 0.0


# ------------------------------------------------------------------------------ report
def run_profile(cfg) -> dict:
    """All enabled sections -> {"device": ..., "matmul_peak_gflop_s": ..., "rows": [...]}."""
    devices = jax.devices()
    peak = matmul_peak(cfg.matmul.n, _dtype(cfg.dtype), cfg.matmul.repeats)
    report = {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
              "devices": len(devices), "processes": jax.process_count(), "dtype": cfg.dtype,
              "matmul_peak_gflop_s": peak / 1e9, "matmul_n": cfg.matmul.n, "rows": []}
    rows = report["rows"]
    trace = cfg.trace_dir
    if cfg.vit256.enabled:
        rows.append(profile_vit256(cfg, peak, trace))
    if cfg.hipt4k.enabled:
        rows.append(profile_hipt4k(cfg, peak, trace))
    steps = {}
    for stage, section in ((1, cfg.pretrain_vit256), (2, cfg.pretrain_vit4k)):
        if section.enabled:
            steps[stage] = profile_pretrain(stage, cfg, peak, trace)
            rows.append(steps[stage])
    if cfg.loader.enabled:
        for stage in (1, 2):
            rows.append(profile_loader(stage, cfg, steps.get(stage)))
    for row in rows:
        row.pop("compiled", None)
        row.pop("feed", None)
    return report


def format_table(report: dict) -> str:
    head = (f"device: {report['devices']} x {report['device_kind']} ({report['backend']}), "
            f"{report['processes']} process(es), {report['dtype']}; measured matmul peak "
            f"{report['matmul_peak_gflop_s']:.1f} GFLOP/s (n={report['matmul_n']})")
    cols = ["stage", "throughput", "step s", "compile s", "GFLOP/step", "GFLOP/s", "MFU", "memory MiB"]
    lines = [head, ""]
    table = []
    for r in report["rows"]:
        mem = r["memory"]
        mem_txt = (f"temp {mem['temp_mb']:.0f} + args {mem['arguments_mb']:.0f}" if "temp_mb" in mem else "")
        if "device_peak_mb" in mem:
            mem_txt += f", peak {mem['device_peak_mb']:.0f}"
        table.append([
            r["name"], f"{r['throughput']:.3g} {r['unit']}", f"{r['step_s']:.4g}", f"{r['compile_s']:.2f}",
            "" if r["gflop_per_step"] is None else f"{r['gflop_per_step']:.4g}",
            "" if r["gflop_s"] is None else f"{r['gflop_s']:.1f}",
            _mfu_text(r["mfu"]),
            mem_txt + (f"  (loader/step {r['loader_over_step']:.2f}x)" if "loader_over_step" in r else "")
            + (f"  (device waits for host {100 * r['host_wait_share']:.0f}% of the step)"
               if "host_wait_share" in r else ""),
        ])
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    if any(r["mfu"] is not None and r["mfu"] > 1.0 for r in report["rows"]):
        lines.append(f"n/a*: MFU above 100% is not meaningful: the n={report['matmul_n']} matmul probe measured "
                     "less than this device's peak (raise --config.matmul.n, e.g. 2048)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines.append(f"\nprocess peak RSS {rss:.0f} MiB (all sections)")
    return "\n".join(lines)


def _mfu_text(mfu) -> str:
    """MFU as a percentage; above 100% the peak probe was too small to reach the device's peak
    (runlocal's n=512 printed 159%): flagged instead of printed."""
    if mfu is None:
        return ""
    return "n/a*" if mfu > 1.0 else f"{100 * mfu:.0f}%"


# ------------------------------------------------------------------------------ calibration
def _model_label(name: str, model) -> str:
    """What a calibration line was measured on. Results are stored per model shape, so a
    calibration of the runlocal tiny models leaves the full-size ones uncalibrated: say so."""
    shape = f"width {model.width}, depth {model.depth}"
    if "tiny" in name or "runlocal" in name:
        return (f"the runlocal tiny model ({shape}; the full-size models are not calibrated by this "
                "run)")
    return f"the model of {shape}"


def calibrate(cfg) -> list[str]:
    """``hipt-profile --calibrate``: measure this machine's CPU minibatch sizes for the enabled
    sections and store them (hipt_jax.models.minibatch); returns one line per result."""
    from hipt_jax import sharding as shd
    from hipt_jax.models import minibatch
    from hipt_jax.models.archs import get_arch
    from hipt_jax.models.hipt4k import calibrate_patch_batch
    from hipt_jax.pretrain import trainer

    lines = []
    if cfg.hipt4k.enabled:
        arch256, dtype = get_arch(cfg.hipt4k.arch256), _dtype(cfg.dtype)
        best = calibrate_patch_batch(arch256, dtype, repeats=cfg.repeats)
        key = minibatch.patch_batch_key(arch256, jnp.dtype(dtype).itemsize)
        backend = minibatch.calibrated_dot_backend(key) or "XLA's default (not calibrated)"
        lines.append(f"HIPT4K patch_batch for {_model_label(cfg.hipt4k.arch256, arch256)}: {best}, dots: "
                     f"{backend} (stored in {minibatch.cache_file()})")
    for stage, section in ((1, cfg.pretrain_vit256), (2, cfg.pretrain_vit4k)):
        if not section.enabled:
            continue
        config = pretrain_config(stage, section)
        mesh = shd.make_mesh(dict(config.mesh))
        per_device = config.global_batch // mesh.size
        rules = tuple(tuple(r) for r in config.sharding_rules)

        def seconds_per_sample(samples: int, backend: str = "ynnpack") -> float:
            config.microbatches = per_device // samples
            state, state_sh = trainer.init_sharded_state(config, mesh, jax.random.key(cfg.seed))
            batch = shd.global_batch(trainer.dummy_batch(config, config.global_batch),
                                     shd.batch_sharding(mesh, rules))
            update = trainer.jit_update(config, mesh, state_sh, freeze_last_layer_steps=0,
                                        dot_backend=backend)
            res = compile_and_time(update, (state, batch, jax.random.key(1)), cfg.repeats,
                                   carry=lambda args, out: (out[0], args[1], args[2]))
            return res["step_s"] / config.global_batch

        candidates = [s for s in (1, 2, 4, 8, 16, 32) if s <= per_device and per_device % s == 0]
        key = minibatch.microbatch_key(config)
        best = minibatch.calibrate(key, candidates, seconds_per_sample,
                                   dot_backends=minibatch.dot_backends_to_try() or None)
        lines.append(f"pretraining stage {stage} for {_model_label(section.config_arg, config.model)}: {best} "
                     "sample(s) per device per microbatch, dots: "
                     f"{minibatch.calibrated_dot_backend(key) or 'XLA default (not calibrated)'}")
    return lines
