"""ViT minibatch sizes chosen from the machine, not tuned once for one CPU.

Two quantities depend on the CPU's caches: the ViT-256 minibatch inside the HIPT4K region
program (``patch_batch``) and the samples per pretraining microbatch. Both are resolved here:

1. A calibration, when one was measured on this machine for this model: a short timing of the
   candidate sizes (``calibrate``), stored in ``$XDG_CACHE_HOME/hipt_jax/minibatch.json``
   (default ~/.cache) under a key of the machine (CPU model, cores, cache sizes, jax version,
   XLA_FLAGS) and the model (arch dims, dtype, what is run). ``hipt-profile --calibrate`` and
   the benchmarks write it.
2. Otherwise the cache rule: the largest power of two ``b`` whose working set fits in the
   caches the process can use, ``b * bytes_per_sample <= L2 (all our cores) + L3 (every L3
   instance our cores share)``, at least 1. ``bytes_per_sample`` is one transformer block's
   live activations for one sample (``block_bytes``; summed over
   the crops of one sample for a training step).

The calibration also chooses how XLA:CPU computes each program's dots (``DOT_BACKENDS``):
through YNNPACK (XLA's default) or its own Eigen GEMMs. Which is faster
depends on the CPU and on the program: on a 2-core AMD EPYC the forward-only region program
ran 1.26x faster with Eigen while a training step ran 30% slower, so it is measured per machine
and model, never assumed. Without a calibration XLA's default stays.

An explicit value (flag or config field) always wins. On GPU/TPU there is no cache to fit:
callers use the whole batch there, and no CPU compile option applies.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import platform
import sys
import time
from typing import Callable, Iterable, Optional

MAX_PATCH_BATCH = 256  # a 4096 px region has 256 patches: the reference's single minibatch

# How XLA:CPU lowers dots, as per-program compile options (``jax.jit(compiler_options=...)``).
# "ynnpack": XLA's default (dots and their fusions through YNNPACK); "eigen": the YNNPACK
# fusions off, dots on XLA's Eigen GEMMs.
DOT_BACKENDS = {"ynnpack": {}, "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""}}


# ------------------------------------------------------------------------------ the machine
def _size_bytes(text: str) -> int:
    """'32768K' / '1M' / '512' (sysfs cache sizes) -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG") or 0) * scale


def _cpu_list(text: str) -> set[int]:
    """'0-3,8' -> {0,1,2,3,8}."""
    out: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name plus its generation: cloud CPUs often report a bare "AMD EPYC" or
    "Intel Xeon Processor" for several generations, whose best minibatch and dot backend differ,
    so the family/model/stepping numbers and the widest vector ISA are part of the name (and so
    of the calibration key): 'AMD EPYC (family 26 model 2 stepping 1, avx512)'."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    generation = " ".join(f"{label} {fields[key]}" for key, label in
                          (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"))
                          if fields.get(key))
    flags = set(fields.get("flags", "").split())
    isa = next((tag for tag, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2"))
                if flag in flags), "")
    extra = ", ".join(filter(None, (generation, isa)))
    return f"{name} ({extra})" if extra else name


def cpu_info(sysfs: str = "/sys/devices/system/cpu") -> dict:
    """{"model", "cores" (usable by this process), "l1d", "l2", "l3" (bytes visible to those
    cores: per-core caches summed over our cores, shared caches counted once per instance)}."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    totals = {"l1d": 0, "l2": 0, "l3": 0}
    seen = set()
    for core in cores:
        for index in glob.glob(os.path.join(sysfs, f"cpu{core}", "cache", "index*")):
            try:
                level = int(open(os.path.join(index, "level")).read())
                kind = open(os.path.join(index, "type")).read().strip()
                size = _size_bytes(open(os.path.join(index, "size")).read())
                shared = frozenset(_cpu_list(open(os.path.join(index, "shared_cpu_list")).read()) or {core})
            except (OSError, ValueError):
                continue
            name = {1: "l1d", 2: "l2", 3: "l3"}.get(level)
            if name is None or kind == "Instruction" or (level, shared) in seen:
                continue
            seen.add((level, shared))
            totals[name] += size
    return {"model": _cpu_model(), "cores": len(cores), **totals}


def cache_budget(info: Optional[dict] = None) -> int:
    """Bytes a minibatch's working set may take: L2 + L3 as seen by this process (1 MiB when
    the caches cannot be read, so the rule still gives a small minibatch)."""
    info = info or cpu_info()
    return max(info["l2"] + info["l3"], 1 << 20)


# ------------------------------------------------------------------------------ the rule
def block_bytes(tokens: int, width: int, mlp_dim: int, heads: int, dtype_bytes: int = 4) -> int:
    """Live activations of one transformer block for one sample, the larger of its two phases:
    attention (residual, norm, q, k, v, output: 6 x width per token, plus the heads' tokens^2
    score matrices) and MLP (residual, norm, output: 3 x width, plus the mlp_dim hidden layer)."""
    attention = tokens * 6 * width + heads * tokens * tokens
    mlp = tokens * (3 * width + mlp_dim)
    return dtype_bytes * max(attention, mlp)


def fit_power_of_two(bytes_per_sample: int, budget: int, max_batch: int) -> int:
    """Largest power of two b <= max_batch with b * bytes_per_sample <= budget (at least 1)."""
    b = 1
    while b * 2 <= max_batch and (b * 2) * bytes_per_sample <= budget:
        b *= 2
    return b


# ------------------------------------------------------------------------------ calibration
def cache_file() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hipt_jax", "minibatch.json")


def machine_key(info: Optional[dict] = None) -> str:
    import jax

    info = info or cpu_info()
    return (f"{info['model']}|{info['cores']} cores|L2 {info['l2']}|L3 {info['l3']}|jax {jax.__version__}"
            f"|{os.environ.get('XLA_FLAGS', '')}")


_WARNED: set = set()  # unreadable files and entries already named (once per process)


def _read_cache(keep_aside: bool = False) -> dict:
    """The calibrations stored on this machine; {} when there are none or the file cannot be
    read (named once on stderr). ``keep_aside`` (before a calibration replaces the file): an
    unreadable file is renamed, not overwritten, so the calibrations of other machines and
    models it may hold (a hand edit gone wrong) can be recovered."""
    path = cache_file()
    try:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict):
            return data
        problem = f"expected a JSON object, found {type(data).__name__}"
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        problem = e.strerror if isinstance(e, OSError) and e.strerror else f"invalid JSON ({e})"
    if keep_aside:
        aside = f"{path}.unreadable-{int(time.time())}"
        try:
            os.replace(path, aside)
            print(f"warning: {path}: {problem}; kept aside as {aside}, a new calibration file is started",
                  file=sys.stderr)
        except OSError as e:
            print(f"warning: {path}: {problem}, and it could not be kept aside ({e})", file=sys.stderr)
    elif path not in _WARNED:
        _WARNED.add(path)
        print(f"warning: {path}: {problem}; its calibrations are ignored (the cache rule decides)",
              file=sys.stderr)
    return {}


def _entry(model_key: str, info: Optional[dict]) -> Optional[dict]:
    """The stored calibration of ``model_key`` on this machine, or None; an entry that is not
    a positive whole size (a hand-edited or truncated file) is ignored with a warning, so the
    rule decides instead of a crash or a nonsense minibatch."""
    machine = _read_cache().get(machine_key(info), {})
    entry = machine.get(model_key) if isinstance(machine, dict) else None
    if entry is None:
        return None
    best = entry.get("best") if isinstance(entry, dict) else None
    if isinstance(best, bool) or not isinstance(best, int) or best < 1:
        problem = "expected a positive whole size"
    # The other fields are used too: a wrong type there (a list as dot_backend) crashed the run.
    elif not isinstance(entry.get("dot_backend", ""), str) or not isinstance(entry.get("s_per_sample", {}), dict):
        problem = "dot_backend must be a name and s_per_sample an object"
    else:
        return entry
    if (cache_file(), model_key) not in _WARNED:  # said once, not for every field looked up
        _WARNED.add((cache_file(), model_key))
        logging.getLogger(__name__).warning("ignoring the calibration of %s in %s: %s, got %r",
                                            model_key, cache_file(), problem, entry)
    return None


def calibrated(model_key: str, info: Optional[dict] = None) -> Optional[int]:
    """The size calibrated for ``model_key`` on this machine (or on the one ``info`` describes), or None."""
    entry = _entry(model_key, info)
    return int(entry["best"]) if entry else None


def calibrated_dot_backend(model_key: str, info: Optional[dict] = None) -> Optional[str]:
    """The dot backend (a ``DOT_BACKENDS`` name) calibrated for ``model_key`` on this machine, or
    None (no calibration, or one that timed only XLA's default)."""
    entry = _entry(model_key, info)
    backend = entry.get("dot_backend") if entry else None
    return backend if backend in DOT_BACKENDS else None


def calibration_timings(model_key: str, info: Optional[dict] = None) -> Optional[dict]:
    """Seconds per sample of every candidate the stored calibration timed, or None."""
    entry = _entry(model_key, info)
    return entry.get("s_per_sample") if entry else None


def user_sets_dot_backend() -> bool:
    """XLA_FLAGS already says how to lower dots: the user's choice, never overridden."""
    return any(f"xla_cpu_{name}" in os.environ.get("XLA_FLAGS", "")
               for name in ("experimental_ynn_fusion_type", "use_xnnpack", "use_onednn"))


def cpu_compiler_options(model_key: str, backend: Optional[str] = "auto") -> dict:
    """``jax.jit`` compiler options for the program ``model_key`` names: the calibrated dot
    backend on a CPU ("auto"), or the named one; {} on GPU/TPU, without a calibration, or when
    XLA_FLAGS already chooses."""
    import jax

    if backend is None or jax.default_backend() != "cpu" or user_sets_dot_backend():
        return {}
    if backend == "auto":
        backend = calibrated_dot_backend(model_key) or "ynnpack"
    if backend not in DOT_BACKENDS:
        raise ValueError(f"unknown dot backend {backend!r}: expected 'auto' or one of {sorted(DOT_BACKENDS)}")
    return dict(DOT_BACKENDS[backend])


def dot_backends_to_try() -> tuple:
    """The ``DOT_BACKENDS`` names a calibration (or a peak probe) should time here: all of them on
    a CPU, none on GPU/TPU or when XLA_FLAGS already chooses."""
    import jax

    if jax.default_backend() != "cpu" or user_sets_dot_backend():
        return ()
    return tuple(DOT_BACKENDS)


def dot_backend_name(compiler_options: dict) -> str:
    """The ``DOT_BACKENDS`` name of a program's CPU compile options ("ynnpack": XLA's default)."""
    if not compiler_options and user_sets_dot_backend():
        return "as XLA_FLAGS says"
    return next((name for name, opts in DOT_BACKENDS.items() if opts == dict(compiler_options or {})), "custom")


def _time_pairs(model_key: str, pairs: list, seconds_per_sample: Callable[..., float]) -> dict:
    """{"backend/size" (or "size"): seconds per sample} over ``pairs``, with a progress bar: a
    full-size calibration is a compile and a few steps per pair, up to an hour on a 2-core CPU."""
    from tqdm import tqdm

    timings = {}
    bar = tqdm(pairs, desc=f"calibrating {model_key.split('|')[0]}", unit="setting", file=sys.stderr,
               disable=None)  # None: no bar when stderr is not a terminal (logs, CI)
    for name, b in bar:
        label = f"{name}/{b}" if name else str(b)
        bar.set_postfix_str(f"timing {label}")
        timings[label] = float(seconds_per_sample(b, name) if name else seconds_per_sample(b))
        if bar.disable:  # a log still says where the minutes go, one line per setting
            print(f"calibrating {model_key}: {label}: {timings[label]:.4g} s per sample", file=sys.stderr, flush=True)
    return timings


def calibrate(model_key: str, candidates: Iterable[int], seconds_per_sample: Callable[..., float],
              dot_backends: Optional[Iterable[str]] = None) -> int:
    """Time every candidate (``seconds_per_sample(b)``: compile, warm up and time the program at
    size b), store the fastest for this machine and model, and return it. With ``dot_backends``
    every (size, backend) pair is timed (``seconds_per_sample(b, backend)``) and the backend
    of the fastest pair is stored beside its size (``calibrated_dot_backend``)."""
    backends = [None] if dot_backends is None else list(dot_backends)
    unknown = [b for b in backends if b is not None and b not in DOT_BACKENDS]
    if unknown:
        raise ValueError(f"unknown dot backend(s) {unknown}: expected some of {sorted(DOT_BACKENDS)}")
    timings = _time_pairs(model_key, [(name, int(b)) for name in backends for b in candidates], seconds_per_sample)
    best_key = min(timings, key=timings.get)
    if dot_backends is None:
        record = {"best": int(best_key), "s_per_sample": timings}
    else:
        name, _, size = best_key.partition("/")
        record = {"best": int(size), "dot_backend": name, "s_per_sample": timings}
    best = record["best"]
    # Whatever the file held, the minutes of timing above are stored (a machine entry that was
    # not an object made this raise after the whole run) and returned.
    data = _read_cache(keep_aside=True)
    if not isinstance(data.get(machine_key()), dict):
        data[machine_key()] = {}
    data[machine_key()][model_key] = record
    path = cache_file()
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        print(f"warning: {path}: the calibration could not be stored ({e})", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return best


# ------------------------------------------------------------------------------ the two sizes
def patch_batch_key(config256, dtype_bytes: int) -> str:
    return (f"patch_batch|w{config256.width} d{config256.depth} h{config256.num_heads} "
            f"m{config256.mlp_dim} p{config256.patch_size}|{8 * dtype_bytes}bit")


def region_patch_batch(config256, dtype_bytes: int = 4, info: Optional[dict] = None) -> int:
    """ViT-256 minibatch of the region program: calibrated value, else the cache rule."""
    found = calibrated(patch_batch_key(config256, dtype_bytes), info)
    if found:
        return found
    tokens = (256 // config256.patch_size) ** 2 + 1
    ws = block_bytes(tokens, config256.width, config256.mlp_dim, config256.num_heads, dtype_bytes)
    return fit_power_of_two(ws, cache_budget(info), MAX_PATCH_BATCH)


def _crop_tokens(config) -> tuple[int, int]:
    """Tokens (CLS included) of one global and one local crop. Stages 1-2 cut square pixel or
    feature crops into patches; stage 3's views are windows of region tokens (a global view
    padded to ``global_tokens``, a local one ``local_size`` x ``local_size`` regions)."""
    m, c = config.model, config.crops
    if config.get("stage", 1) == 3:
        return c.global_tokens + 1, c.local_size ** 2 + 1
    return (c.global_size // m.patch_size) ** 2 + 1, (c.local_size // m.patch_size) ** 2 + 1


def microbatch_key(config) -> str:
    m, c = config.model, config.crops
    g, loc = _crop_tokens(config)
    return (f"pretrain|stage{config.stage}|w{m.width} d{m.depth} h{m.num_heads} m{m.mlp_dim} "
            f"|crops {g}/{loc}x{c.n_local} tokens")


def training_bytes_per_sample(config) -> int:
    """One DINO sample's working set in a block: its 2 global + n_local local crops."""
    m, c = config.model, config.crops
    g, loc = _crop_tokens(config)

    def per_crop(tokens):
        return block_bytes(tokens, m.width, m.mlp_dim, m.num_heads)

    return 2 * per_crop(g) + c.n_local * per_crop(loc)


def samples_per_microbatch(config, per_device_batch: int, info: Optional[dict] = None) -> int:
    """Samples per device in one pretraining microbatch: calibrated value, else the cache rule."""
    found = calibrated(microbatch_key(config), info)
    if found:
        return min(found, per_device_batch)
    return fit_power_of_two(training_bytes_per_sample(config), cache_budget(info), per_device_batch)
