"""One on-disk format for every saved model: ``save(path, ...)`` and ``load(path)``.

A saved model is a directory::

    DIR/arch.json   {"format": "hipt-jax-model", "version": 1, "kind": "vit" | "hipt_lgp",
                     "arch": "vit256", "config": {...}, "has_head": false, "meta": {...}}
    DIR/state/      Orbax checkpoint of {"params": <Flax params>, ["head": <DINO head>]}

``kind`` says which module ``config`` rebuilds:
    vit       a ViT backbone (vit256 / vit4k and their tiny stand-ins): hipt-convert output and
              the teacher hipt-pretrain exports (those keep the DINO head, has_head true)
    hipt_lgp  a trained HIPT-LGP (hipt-finetune's fold_k/checkpoint): n_classes, local ViT-4K
              architecture, widths, dropout, freeze flag and task
    mil       a trained slide baseline (hipt_jax.models.mil: mean_pool, abmil, clam_sb)
``load`` rebuilds the module from arch.json alone and checks every parameter against it, so
nothing is guessed from array shapes. Directories written before the kinds existed (arch.json
with "format": "hipt-jax-backbone") load as kind "vit".

Everything a user can get wrong ends in a one-line ``CheckpointError`` naming the file and the
problem (missing or unexpected keys, shape mismatches, wrong kind or architecture, a damaged
state). ``load_backbone`` is the helper the region and slide models use: a directory of kind
"vit" or a released ``.pth`` (converted in memory by ``torch_io``; needs torch).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from hipt_jax.models import lgp, mil
from hipt_jax.models.archs import ARCHITECTURES, build_vit, dummy_input, get_arch

FORMAT = "hipt-jax-model"
VERSION = 1
LEGACY_FORMATS = {"hipt-jax-backbone": "vit"}  # format name -> kind, for directories of older releases
ARCH_FILE = "arch.json"
STATE_DIR = "state"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and problem."""


# ---------------------------------------------------------------------------------------------
# Kinds: how an arch config becomes a module, and what to feed its init
# ---------------------------------------------------------------------------------------------
class _Kind(NamedTuple):
    build: Callable[..., nn.Module]                     # (config, **run-time options) -> module
    example: Callable[[ml_collections.ConfigDict], tuple]  # config -> init inputs
    arch_name: Callable[[ml_collections.ConfigDict], str]  # config -> readable name in arch.json


def _vit_name(config: ml_collections.ConfigDict) -> str:
    for name, make in ARCHITECTURES.items():
        if make().to_dict() == config.to_dict():
            return name
    return config.arch


KINDS = {
    "vit": _Kind(build_vit, lambda c: (dummy_input(c),), lambda c: c.arch),
    "hipt_lgp": _Kind(lgp.build_lgp, lgp.example_input, lambda c: "hipt_lgp"),
    "mil": _Kind(mil.build_mil, mil.example_input, lambda c: c.name),  # hipt-finetune baselines
}


class Loaded(NamedTuple):
    """What ``load`` returns. ``params`` is the Flax "params" collection (host arrays)."""

    params: Any
    kind: str
    config: ml_collections.ConfigDict
    head: Optional[dict]
    meta: dict

    @property
    def variables(self) -> dict:
        return {"params": self.params}

    def module(self, **options) -> nn.Module:
        """The Flax module rebuilt from arch.json (``options``: run-time choices such as dtype)."""
        return KINDS[self.kind].build(self.config, **options)


# ---------------------------------------------------------------------------------------------
# Checking a tree against what the architecture expects
# ---------------------------------------------------------------------------------------------
def flatten(tree, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if hasattr(value, "items") and not hasattr(value, "shape"):
            out.update(flatten(dict(value), path))
        else:
            out[path] = value
    return out


def short_list(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def shape_problems(expected: dict[str, tuple], got: dict[str, tuple]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches between two {name: shape} maps."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [f"{k} {got[k]} != {expected[k]}" for k in sorted(expected)
                  if k in got and got[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {short_list(mismatched)}")
    return problems


def expected_param_shapes(kind: str, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """"params/..." path -> shape of every parameter the architecture has (no weights built)."""
    spec = KINDS[kind]
    shapes = jax.eval_shape(spec.build(config).init, jax.random.PRNGKey(0), *spec.example(config))
    return {k: tuple(v.shape) for k, v in flatten({"params": shapes["params"]}).items()}


def check_params(params, kind: str, config: ml_collections.ConfigDict, source: str) -> None:
    """Raise a one-line CheckpointError unless ``params`` has exactly the architecture's layout."""
    got = {k: tuple(v.shape) for k, v in flatten({"params": params}).items()}
    problems = shape_problems(expected_param_shapes(kind, config), got)
    if problems:
        raise CheckpointError(f"{source}: params do not match the {KINDS[kind].arch_name(config)} "
                              "architecture: " + "; ".join(problems))


def _as_config(arch_config, kind: str, source: str) -> ml_collections.ConfigDict:
    if kind not in KINDS:
        raise CheckpointError(f"{source}: unknown model kind {kind!r}; known: {sorted(KINDS)}")
    config = ml_collections.ConfigDict(dict(arch_config))
    if kind == "hipt_lgp":
        _check_lgp_local(config, source)
    return config


def _check_lgp_local(config: ml_collections.ConfigDict, source: str) -> None:
    """The stored local ViT-4K architecture must be the registered one the name stands for
    (head counts, for one, leave no trace in the parameter shapes)."""
    try:
        registered = get_arch(config.local_arch).to_dict()
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{source}: HIPT-LGP local architecture: {e}") from None
    if "local" in config and config.local.to_dict() != registered:
        raise CheckpointError(f"{source}: HIPT-LGP local architecture {config.local.to_dict()} differs "
                              f"from the registered {config.local_arch} {registered}")


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def save(path: str, params, kind: str, arch_config, meta: Optional[dict] = None,
         head: Optional[dict] = None, overwrite: bool = False) -> str:
    """Write ``params`` (the Flax "params" collection), an optional DINO ``head`` tree and
    ``meta`` (any JSON-able dict: source file, training step ...) as DIR/arch.json + DIR/state.

    ``params`` is checked against ``arch_config`` first. ``path`` must not exist or be an empty
    directory, unless ``overwrite`` (then a previous save there is replaced). Returns the
    absolute directory.
    """
    import numpy as np
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    config = _as_config(arch_config, kind, path)
    check_params(params, kind, config, path)
    if overwrite and os.path.isdir(path):
        shutil.rmtree(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CheckpointError(f"{path}: already exists and is not an empty directory")
    os.makedirs(path, exist_ok=True)
    tree = {"params": jax.tree.map(np.asarray, dict(params))}
    if head is not None:
        tree["head"] = jax.tree.map(np.asarray, dict(head))
    try:
        with quiet_write_failures(), ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(path, STATE_DIR), tree)
        info = {
            "format": FORMAT, "version": VERSION, "kind": kind, "arch": KINDS[kind].arch_name(config),
            "config": config.to_dict(), "has_head": head is not None, "meta": meta or {},
            "state_sha256": state_sha256(os.path.join(path, STATE_DIR)),
            "params_sha256": params_sha256(tree["params"], kind, config),
        }
        if kind == "vit":
            info["name"] = _vit_name(config)
        with open(os.path.join(path, ARCH_FILE), "w") as f:  # last: it makes the folder a model
            json.dump(info, f, indent=2, sort_keys=True)
    except BaseException as e:
        # The folder was empty: what a failed save left there (Orbax's *-tmp folders, a cut
        # arch.json) would refuse every later save to it.
        remove_settled(lambda: [os.path.join(path, name) for name in os.listdir(path)] if os.path.isdir(path) else [])
        failure = write_failure(e) if isinstance(e, Exception) else None
        if failure is None:
            raise
        # Orbax raises a full disk as ValueError("RESOURCE_EXHAUSTED ..."): as an OSError naming
        # the folder, so callers report it as a failed write (exit 1), not as bad input.
        raise OSError(failure.errno, failure.strerror, path) from None
    return path


# ---------------------------------------------------------------------------------------------
# Orbax's failed writes (a full disk)
# ---------------------------------------------------------------------------------------------
_WRITE_FAILURE_WORDS = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded", "File too large")


SETTLE_S = 0.5  # see remove_settled
SETTLE_LIMIT_S = 10.0


def remove_settled(entries: Callable[[], list[str]]) -> None:
    """Remove the files and folders ``entries()`` lists until none comes back for SETTLE_S
    (at most SETTLE_LIMIT_S). When an Orbax save fails, the exception reaches us while
    TensorStore's other writes are still in flight: they recreate the folders they write into
    after a plain removal, and their callbacks into Orbax's closed event loops print tracebacks
    past the command's last line, up to the interpreter's exit."""
    deadline = time.monotonic() + SETTLE_LIMIT_S
    quiet_since = time.monotonic()
    while True:
        found = entries()
        for entry in found:
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(entry)
        now = time.monotonic()
        if found:
            quiet_since = now
        if now - quiet_since >= SETTLE_S or now >= deadline:
            return
        time.sleep(0.05)


def write_failure(error: BaseException) -> Optional[OSError]:
    """``error`` as an OSError (errno and the OS's words) when it is a failure to write files,
    None when it is anything else. Orbax and TensorStore raise a full disk as ValueError or
    RuntimeError whose text carries the OS error: 'RESOURCE_EXHAUSTED: Error writing ... No space
    left on device [os_error_code='28']'."""
    if isinstance(error, OSError):
        return error
    if not isinstance(error, (ValueError, RuntimeError)):
        return None
    text = str(error)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        number = int(code.group(1))
    elif any(w in text for w in _WRITE_FAILURE_WORDS):
        number = errno.ENOSPC
    else:
        return None
    return OSError(number, os.strerror(number))


class _DropWriteFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.levelno >= logging.ERROR and (
            (error is not None and write_failure(error) is not None)
            or any(w in record.getMessage() for w in _WRITE_FAILURE_WORDS)))


def _drop_closed_loop_callbacks(hook):
    def unraisable(info):
        if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed":
            return
        hook(info)
    unraisable.drops_closed_loop_callbacks = True
    return unraisable


@contextlib.contextmanager
def quiet_write_failures() -> Iterator[None]:
    """While Orbax writes. When a write fails (a full disk), each of Orbax's writer threads logs
    the same error with its traceback (tens of them), and TensorStore's callbacks into the
    event loops Orbax has closed print "Event loop is closed" tracebacks (hundreds, until the
    process ends). The failure itself reaches the caller as an exception, reported in one line:
    these repeats of it are dropped, so that line is what the user reads (and the last one).
    Other log records and unraisable errors pass through."""
    logger = logging.getLogger("absl")  # Orbax logs through absl
    dropper = _DropWriteFailures()
    logger.addFilter(dropper)
    if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
        # Kept after the block: the callbacks keep coming after the exception is raised.
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


def state_sha256(state_dir: str) -> str:
    """SHA-256 over the files of an Orbax state directory (relative path + bytes, sorted):
    recorded in arch.json at save, checked at load, so damaged bytes are never loaded."""
    import hashlib

    h = hashlib.sha256()
    for root, dirs, files in os.walk(state_dir):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, state_dir).encode() + b"\0")
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def params_sha256(params, kind: str, config: ml_collections.ConfigDict) -> str:
    """SHA-256 of what the weights are: the kind, the architecture and every parameter's name,
    dtype, shape and values (not the head, not the files). Two saves of the same weights (the
    same .pth converted twice, elsewhere) share it, where the state files differ (Orbax writes
    times and ids): outputs record it as the weights that made them (hipt_jax.provenance)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(json.dumps({"kind": kind, "config": config.to_dict()}, sort_keys=True).encode())
    for name, leaf in sorted(flatten(params).items()):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def verify_state(path: str, info: dict) -> None:
    """CheckpointError when the state's bytes differ from the checksum in arch.json (saves
    made before checksums existed have none and are not checked)."""
    expected = info.get("state_sha256")
    state = os.path.join(path, STATE_DIR)
    if expected and os.path.isdir(state) and state_sha256(state) != expected:
        raise CheckpointError(f"{state}: damaged checkpoint (checksum does not match {ARCH_FILE})")


# What hipt-pretrain keeps in its run directory (hipt_jax.pretrain.trainer: CHECKSUMS, checkpoints/).
PRETRAIN_RUN_FILES = ("checkpoint_checksums.json", "checkpoints")


def pretrain_run_of(path: str) -> str | None:
    """The hipt-pretrain run directory ``path`` is (WORKDIR) or holds a training checkpoint of
    (WORKDIR/checkpoints/STEP), else None: given as a model, the user meant WORKDIR/export."""
    path = os.path.normpath(path)
    for run in (path, os.path.dirname(os.path.dirname(path))):
        if all(os.path.exists(os.path.join(run, name)) for name in PRETRAIN_RUN_FILES) and (
                run == path or os.path.basename(os.path.dirname(path)) == "checkpoints"):
            return run
    return None


def read_arch(path: str) -> dict:
    """The arch.json of a saved model directory, validated; legacy formats get their "kind"."""
    arch_file = os.path.join(path, ARCH_FILE)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        with open(arch_file) as f:
            info = json.load(f)
    except FileNotFoundError:
        bare = os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))
        run = pretrain_run_of(path)
        hint = (f" (a hipt-pretrain {'run directory' if run == os.path.normpath(path) else 'training checkpoint'}: "
                f"its model is the run's export, {os.path.join(run, 'export')}"
                f"{'' if os.path.isdir(os.path.join(run, 'export')) else ', written when the run finishes'})"
                if run else " (bare Orbax params from an older hipt-finetune: re-run it)" if bare else "")
        raise CheckpointError(f"{path}: no {ARCH_FILE} (not a hipt-jax checkpoint directory){hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{arch_file}: invalid JSON ({e})") from None
    if not isinstance(info, dict) or "config" not in info:
        raise CheckpointError(f"{arch_file}: not a {FORMAT} description")
    if info.get("format") in LEGACY_FORMATS:
        info = dict(info, kind=LEGACY_FORMATS[info["format"]])
    elif info.get("format") != FORMAT:
        raise CheckpointError(f"{arch_file}: not a {FORMAT} description (format {info.get('format')!r})")
    elif int(info.get("version", 0)) > VERSION:
        raise CheckpointError(f"{arch_file}: format version {info['version']} is newer than this "
                              f"hipt-jax reads ({VERSION})")
    return info


def _restore_state(path: str, has_head: bool) -> dict:
    import orbax.checkpoint as ocp

    state = os.path.join(path, STATE_DIR)
    if not os.path.isdir(state):
        raise CheckpointError(f"{path}: missing {STATE_DIR}/ (incomplete save?)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(state)
    except Exception as e:  # Orbax raises many types for a damaged directory
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{state}: cannot restore Orbax checkpoint ({msg})") from None
    if not isinstance(tree, dict) or "params" not in tree:
        raise CheckpointError(f"{state}: no params in the Orbax checkpoint")
    if has_head != ("head" in tree):
        raise CheckpointError(f"{state}: arch.json says has_head={has_head} but the state "
                              f"{'has' if 'head' in tree else 'has no'} DINO head")
    return tree


def load(path: str, kind: Optional[str] = None) -> Loaded:
    """DIR -> Loaded(params, kind, config, head or None, meta), every parameter checked against
    the architecture in arch.json. ``kind`` (optional) turns another kind into a CheckpointError."""
    path = os.path.abspath(os.fspath(path))
    info = read_arch(path)
    found = info.get("kind")
    if kind is not None and found != kind:
        raise CheckpointError(f"{path}: is a {found} checkpoint, expected {kind}")
    config = _as_config(info["config"], found, path)
    verify_state(path, info)
    tree = _restore_state(path, bool(info.get("has_head")))
    check_params(tree["params"], found, config, path)
    return Loaded(tree["params"], found, config, tree.get("head"), dict(info.get("meta") or {}))


def load_backbone(path: str, expect_arch: Optional[str] = None) -> tuple[dict, ml_collections.ConfigDict]:
    """A saved ViT directory or a released .pth (teacher) -> (variables, config), on device.

    ``expect_arch`` ("vit256" or "vit4k") turns a file of the other architecture into a clear
    CheckpointError instead of a shape error deep inside the model.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        loaded = load(path, kind="vit")
        variables, config = loaded.variables, loaded.config
    else:
        from hipt_jax.models import torch_io  # .pth only: torch_io needs this module's errors

        variables, config, _, _ = torch_io.load_reference_backbone(path)
    if expect_arch is not None and config.arch != get_arch(expect_arch).arch:
        raise CheckpointError(f"{path}: is a {config.arch} checkpoint, expected {get_arch(expect_arch).arch}")
    # On device once, so jitted calls do not copy the weights from host memory every time.
    return jax.tree.map(jnp.asarray, variables), config
