"""The DINO trainer: one jitted update and the loop around it.

Reading order:
1. ``create_state``: the train state is ONE pytree
   {"student", "teacher", "opt", "center", "step"} (teacher = copy of the student at init).
2. ``make_update``: the pure update ``(state, batch, rng) -> (state, metrics)``:
   teacher forward on the global crops, student forward on all crops, DINO loss, gradients,
   clipping, AdamW (last layer frozen during the first epoch), EMA teacher, center update.
3. ``train``: mesh + shardings, data iterator, Orbax checkpoint manager (train state and Grain
   iterator state saved together, async, keep-N, automatic resume from the workdir), the loop
   with console/TensorBoard logging, a stop on non-finite loss, and the teacher export.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hipt_jax import interrupts
from hipt_jax import sharding as shd
from hipt_jax.prefetch import prefetch_to_device
from hipt_jax.pretrain import data as data_lib
from hipt_jax.pretrain import optimizer
from hipt_jax.pretrain.augment import normalize_images, region_dummy_batch, region_views_of_batch
from hipt_jax.pretrain.head import (LAST_LAYER, MultiCropDINO, build_model, head_for_export,
                                    head_from_checkpoint, last_layer_input_grad,
                                    last_layer_logits, last_layer_weight_grad, logits_dot,
                                    weight_norm, weight_norm_grad)
from hipt_jax.pretrain.loss import dino_loss, update_center
from hipt_jax.pretrain.schedules import all_schedules, check_lengths

N_GLOBAL = 2  # DINO's teacher sees the 2 global crops


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------------------ 1. train state
def dummy_batch(config: ml_collections.ConfigDict, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero batch with the shapes the pipeline produces (images uint8, features float32)."""
    crops = config.crops
    if config.stage == 3:  # slides of regions: padded sets + cells + key masks
        return region_dummy_batch(config, batch, N_GLOBAL)
    if config.stage == 1:
        g = np.zeros((batch, N_GLOBAL, crops.global_size, crops.global_size, 3), np.uint8)
        loc = np.zeros((batch, crops.n_local, crops.local_size, crops.local_size, 3), np.uint8)
    else:
        f = config.data.in_features
        g = np.zeros((batch, N_GLOBAL, crops.global_size, crops.global_size, f), np.float32)
        loc = np.zeros((batch, crops.n_local, crops.local_size, crops.local_size, f), np.float32)
    return {"index": np.zeros((batch,), np.int64), "global": g, "local": loc}


def create_state(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Fresh train state (fp32 params); the teacher starts as a copy of the student.

    One jitted program: called eagerly (a notebook, a test) the init would otherwise dispatch
    and compile each of its hundreds of small ops one by one; inside another jit or
    ``eval_shape`` it is inlined."""
    return jax.jit(lambda r: _fresh_state(config, r))(rng)


def _fresh_state(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    model = build_model(config, student=False)
    views = _prepare_views(dummy_batch(config), config)
    params = model.init(rng, views["global"], views["local"])["params"]
    return {
        "student": params,
        "teacher": jax.tree.map(jnp.copy, params),
        "opt": optimizer.init(params),
        "center": jnp.zeros((1, config.head.out_dim), jnp.float32),
        "step": jnp.zeros((), jnp.int32),
    }


def _prepare_views(batch: dict, config: ml_collections.ConfigDict) -> dict:
    """Stage 1 crops arrive as uint8 and are normalized here, on device."""
    if config.stage == 1:
        return {k: normalize_images(batch[k], config.data.norm) for k in ("global", "local")}
    if config.stage == 3:
        return region_views_of_batch(batch)
    return {k: batch[k].astype(jnp.float32) for k in ("global", "local")}


# ------------------------------------------------------------------------------ 2. the update
def _microbatches(x: jnp.ndarray, n: int) -> jnp.ndarray:
    """[B, ...] -> [n, B/n, ...] with STRIDED chunks (chunk i = samples i, i+n, ...): the batch
    axis stays the major, device-sharded one, so every chunk is spread over all devices."""
    # [B,...] -> [B/n, n, ...] -> [n, B/n, ...]
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)


def resolve_microbatches(config: ml_collections.ConfigDict, mesh) -> int:
    """``config.microbatches``, with -1 ("auto") decided for the mesh: on CPU as many chunks
    as leave the samples per device that hipt_jax.models.minibatch picks for this machine
    (a calibration stored for it, else the rule from its cache sizes); 1 on GPU/TPU, whose
    whole per-device batch is what keeps the matmul units busy."""
    from hipt_jax.models import minibatch

    n = int(config.get("microbatches", 1))
    batch = config.global_batch
    if n == -1:
        if mesh.devices.flat[0].platform != "cpu":
            return 1
        per_device = max(1, batch // mesh.size)
        n = max(1, per_device // minibatch.samples_per_microbatch(config, per_device))
        while batch % (n * mesh.size):  # largest count <= n that splits evenly over devices
            n -= 1
        return n
    if n < 1 or batch % n or (batch // n) % mesh.size:
        raise ValueError(f"config.microbatches={n}: expected -1 (auto) or a count that divides "
                         f"global_batch {batch} into chunks divisible by the {mesh.size} devices")
    return n


def _without_last_layer(params: dict) -> dict:
    """The student tree without head/last_layer (a shallow copy; leaves are shared)."""
    head = {k: v for k, v in params["head"].items() if k != LAST_LAYER}
    return {**params, "head": head}


def make_loss_and_grads(config: ml_collections.ConfigDict, microbatches: int = 1):
    """``loss_and_grads(state, views, sched, rng) -> (loss, student grads, teacher logits)``,
    the DINO loss and gradients of one batch (see its docstring); ``microbatches = n > 1``
    runs teacher and student over the batch in n sequential chunks and averages their
    gradients (the same math: ``resolve_microbatches`` picks n)."""
    student_model = build_model(config, student=True)
    teacher_model = build_model(config, student=False)
    dtype = student_model.dtype
    n_micro = int(microbatches)

    def chunk_grads(state: dict, head_w: dict, views: dict, sched, rng):
        """One (micro)batch up to the head's last layer, which is applied here by hand with
        the effective weights in ``head_w`` so that its weight gradient z^T g can be formed
        once over all chunks afterwards. Returns (loss, grads of every other student
        parameter, teacher logits, bottleneck z, d loss / d logits, logits_dot)."""
        # Teacher: global crops only, no gradient, no stochastic depth.
        z_teacher = teacher_model.apply({"params": state["teacher"]}, views["global"],
                                        method=MultiCropDINO.bottleneck)
        teacher_logits = jax.lax.stop_gradient(
            last_layer_logits(z_teacher, head_w["teacher"], dtype))

        def student_z(params):  # every student parameter but the last layer's
            return student_model.apply(
                {"params": params}, views["global"], views["local"], train=True,
                rngs={"dropout": rng}, method=MultiCropDINO.bottleneck)

        z, pullback = jax.vjp(student_z, _without_last_layer(state["student"]))  # z [b,V,256]

        def loss_of_logits(logits):
            return dino_loss(logits, teacher_logits, state["center"], n_global=N_GLOBAL,
                             teacher_temp=sched["teacher_temp"], student_temp=config.student_temp)

        logits = last_layer_logits(z, head_w["student"], dtype)
        loss, g_logits = jax.value_and_grad(loss_of_logits)(logits)
        (grads,) = pullback(last_layer_input_grad(g_logits, head_w["student"], dtype))
        return loss, grads, teacher_logits, z, g_logits, logits_dot(g_logits, logits)

    def loss_and_grads(state, views, sched, rng):
        """(mean loss, mean grads, teacher logits) over ``n_micro`` chunks of the batch.

        n > 1: the chunks run one after another in a lax.scan with their gradients summed;
        the math is the same as one whole-batch pass (the center is fixed during a step and
        the loss is a per-sample mean; stochastic depth draws differ), but each chunk's
        activations stay in cache: on CPU this is much faster, and on accelerators it bounds
        activation memory. Either way the head's last layer (16.8M weights at out_dim 65536)
        is normalized once per step and its weight gradient is one matmul over every crop of
        the batch: XLA:CPU runs that [256, rows] @ [rows, 65536] product at a fraction of its
        speed when rows are one chunk's crops, and a per-chunk weight-norm chain rule and
        gradient sum would each be a pass over the whole weight. The price: the logits'
        gradient of the whole batch ([B, V, out_dim] fp32, 168 MB at B=64) is kept until that
        matmul, as a whole-batch step keeps it anyway; chunking still divides the backbone's
        activation memory, which is the larger part."""
        v_student = state["student"]["head"][LAST_LAYER]["weight_v"]
        w_student, r_student = weight_norm(v_student)
        w_teacher, _ = weight_norm(state["teacher"]["head"][LAST_LAYER]["weight_v"])
        head_w = {"student": w_student, "teacher": w_teacher}
        if n_micro == 1:
            loss, grads, t_logits, z, g_logits, s_dot = chunk_grads(state, head_w, views, sched, rng)
        else:
            chunks = jax.tree.map(lambda v: _microbatches(v, n_micro), views)

            def body(carry, xs):
                i, chunk = xs
                loss, grads, t_logits, z, g_logits, s_dot = chunk_grads(
                    state, head_w, chunk, sched, jax.random.fold_in(rng, i))
                g_sum, l_sum, s_sum = carry
                return ((jax.tree.map(jnp.add, g_sum, grads), l_sum + loss, s_sum + s_dot),
                        (t_logits, z, g_logits))

            zeros = jax.tree.map(jnp.zeros_like, _without_last_layer(state["student"]))
            # t_logits [n, B/n, G, K]: the center needs only the mean over all teacher rows,
            # which update_center takes over every leading axis (no reshape of the sharded
            # sample axis); z and g_logits keep their [n, B/n, V, .] layout the same way.
            carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros_like(r_student[0]))
            (grads, loss, s_dot), (t_logits, z, g_logits) = jax.lax.scan(
                body, carry, (jnp.arange(n_micro), chunks))
        w_grad = last_layer_weight_grad(z, g_logits, dtype)
        grads["head"][LAST_LAYER] = {
            "weight_v": weight_norm_grad(w_student, r_student, w_grad, s_dot).astype(v_student.dtype)}
        scale = 1.0 / n_micro
        return loss * scale, jax.tree.map(lambda g: g * scale, grads), t_logits

    return loss_and_grads


def make_update(config: ml_collections.ConfigDict, freeze_last_layer_steps: int,
                microbatches: int = 1, steps_per_epoch: int = 1):
    """The pure DINO update (to be jitted by the caller with shardings and donation).
    ``microbatches = n > 1`` (see ``resolve_microbatches`` and ``make_loss_and_grads``) runs
    teacher and student over the batch in n sequential chunks and averages their gradients."""
    loss_and_grads = make_loss_and_grads(config, microbatches)

    def update(state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
        step = state["step"]
        sched = all_schedules(step, config, steps_per_epoch)
        views = _prepare_views(batch, config)
        step_rng = jax.random.fold_in(rng, step)
        loss, grads, teacher_logits = loss_and_grads(state, views, sched, step_rng)
        o = config.optim
        student, opt = optimizer.update(
            grads, state["opt"], state["student"], lr=sched["lr"], weight_decay=sched["wd"],
            freeze_last_layer=step < freeze_last_layer_steps, clip_grad=o.clip_grad,
            global_norm=o.global_norm, b1=o.b1, b2=o.b2, eps=o.eps)
        m = sched["momentum"]
        teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state["teacher"], student)
        new_state = {
            "student": student, "teacher": teacher, "opt": opt,
            "center": update_center(state["center"], teacher_logits, config.center_momentum),
            "step": step + 1,
        }
        return new_state, {"loss": loss, **sched}

    return update


def update_compiler_options(config, mesh, dot_backend: Optional[str] = "auto") -> dict:
    """XLA:CPU compile options of the update: the dot backend calibrated for this model with its
    microbatch (``hipt-profile --calibrate``; XLA's default without one) or the one named;
    {} on GPU/TPU (hipt_jax.models.minibatch.cpu_compiler_options)."""
    from hipt_jax.models import minibatch

    if mesh.devices.flat[0].platform != "cpu":
        return {}
    return minibatch.cpu_compiler_options(minibatch.microbatch_key(config), dot_backend)


def jit_update(config, mesh, state_shardings, freeze_last_layer_steps: int,
               steps_per_epoch: int = 1, dot_backend: Optional[str] = "auto"):
    """jax.jit of the update: explicit in/out shardings, the state donated; on a CPU the dot
    backend calibrated for this machine and model (``dot_backend``: "auto", or a name of
    hipt_jax.models.minibatch.DOT_BACKENDS)."""
    rules = tuple(tuple(r) for r in config.sharding_rules)
    batch_sh = shd.batch_sharding(mesh, rules)
    rep = shd.replicated(mesh)
    batch_shardings = {k: batch_sh for k in dummy_batch(config)}
    update = make_update(config, freeze_last_layer_steps, resolve_microbatches(config, mesh),
                         steps_per_epoch)
    return jax.jit(update,
                   in_shardings=(state_shardings, batch_shardings, rep),
                   out_shardings=(state_shardings, rep), donate_argnums=(0,),
                   compiler_options=update_compiler_options(config, mesh, dot_backend))


def init_sharded_state(config, mesh, rng):
    """Create the state directly in its shardings (FSDP params never exist unsharded)."""
    rules = tuple(tuple(r) for r in config.sharding_rules)
    abstract = jax.eval_shape(lambda r: create_state(config, r), rng)
    state_sh = shd.param_shardings(abstract, mesh, rules)
    state = jax.jit(lambda r: create_state(config, r), out_shardings=state_sh)(rng)
    return state, state_sh


# ------------------------------------------------------------------------------ 3. the loop
def _steps_per_epoch(config, source) -> int:
    if len(source) == 0:  # Grain's shuffle would divide by it, deep in the first batch
        raise ValueError(f"{config.data.path}: 0 samples ({data_lib.describe_source(source)})")
    n = config.data.samples_per_epoch if config.data.samples_per_epoch > 0 else len(source)
    if len(source) < config.global_batch and jax.process_index() == 0:
        # allowed (a smoke test), but every batch repeats samples: say so rather than train quietly
        print(f"hipt-pretrain: note: {config.data.path} holds {len(source)} sample(s), fewer than one global "
              f"batch of {config.global_batch}: every batch repeats samples", file=sys.stderr)
    return max(1, n // config.global_batch)


def _warm_start(state, config):
    """Load a converted backbone (+ its DINO head when present) into student and teacher.

    Returns the state with numpy params (host copies, any sharding); the caller device_puts it.
    """
    variables, _, head = _load_backbone_and_head(config.warm_start, config.model.arch)
    backbone = _checked_replace(state["student"]["vit"], variables["params"], "backbone")
    state = dict(state)
    if head is not None:
        head = head_from_checkpoint(head, config.warm_start)
        check_head_dims(head, config)
        head = _checked_replace(state["student"]["head"], head, "DINO head")
        state["student"] = {"vit": backbone, "head": head}
        state["teacher"] = jax.tree.map(np.copy, state["student"])
    else:
        logging.warning("%s has no DINO head: the head starts from random init",
                        config.warm_start)
        # The random heads of student and teacher are already equal (distinct buffers).
        state["student"] = {"vit": backbone, "head": state["student"]["head"]}
        state["teacher"] = {"vit": jax.tree.map(np.copy, backbone),
                            "head": state["teacher"]["head"]}
    return state


def _load_backbone_and_head(path, arch):
    """(variables, arch config, head tree or None) from a converted dir or a reference .pth."""
    from hipt_jax.models import checkpoint, torch_io
    if os.path.isdir(path):
        loaded = checkpoint.load(path, kind="vit")
        variables, arch_config, head = loaded.variables, loaded.config, loaded.head
    else:
        variables, arch_config, head, _ = torch_io.load_reference_backbone(path, keep_head=True)
    if arch_config.arch != arch:
        raise ValueError(f"{path}: is a {arch_config.arch} checkpoint, this run trains {arch}")
    return variables, arch_config, head


# The config fields of the DINO head and where a head tree holds each: (layer, kernel axis 1).
HEAD_FIELDS = (("hidden_dim", "mlp_0", "kernel"), ("bottleneck_dim", "mlp_4", "kernel"),
               ("out_dim", LAST_LAYER, "weight_v"))


def head_dims(head: dict) -> dict:
    """{hidden_dim, bottleneck_dim, out_dim} of a DINO head tree (the fields it can read)."""
    dims = {}
    for field, layer, leaf in HEAD_FIELDS:
        shape = np.shape(head.get(layer, {}).get(leaf)) if isinstance(head.get(layer), dict) else ()
        if len(shape) == 2:
            dims[field] = int(shape[1])
    return dims


def check_head_dims(head: dict, config) -> None:
    """A warm-start head of other sizes than config.head: ValueError naming both and the fields
    to set (the converted official head is 2048/256/65536, runlocal's 64/32/512; "layout/shapes
    differ" said neither)."""
    found, want = head_dims(head), {field: int(config.head[field]) for field, _, _ in HEAD_FIELDS}
    differ = [field for field in want if field in found and found[field] != want[field]]
    if differ:
        sizes = lambda dims: ", ".join(f"{f} {dims[f]}" for f in want if f in dims)  # noqa: E731
        raise ValueError(
            f"warm start: {config.warm_start}: its DINO head is {sizes(found)}, the config's is {sizes(want)}: "
            f"set {' '.join(f'--config.head.{f}={found[f]}' for f in differ)}")


def _checked_replace(ours, theirs, what):
    """``theirs`` as fp32 numpy, after checking it has exactly the layout of ``ours``."""
    ours_shapes = jax.tree.map(lambda x: tuple(x.shape), ours)
    theirs_shapes = jax.tree.map(lambda x: tuple(np.shape(x)), theirs)
    if ours_shapes != theirs_shapes:
        raise ValueError(f"warm start: {what} layout/shapes differ from the config's model")
    return jax.tree.map(lambda x: np.asarray(x, np.float32), theirs)


# Where an export is written before it is renamed into place: one name for every process
# (Orbax's multi-host save writes one folder together), so not outputs.atomic_path's per-pid one.
EXPORT_PARTIAL = ".partial"


def _check_previous_export(path: str) -> None:
    """What may be replaced at ``path``: a finished export of hipt-pretrain (its arch.json says
    so), or the debris of an export that was killed (Orbax's state folders and no arch.json:
    releases before exports were renamed into place wrote into ``path`` itself). Anything else
    there is not ours: refused. A killed export of this release (``path + EXPORT_PARTIAL``) is
    removed."""
    from hipt_jax.models.checkpoint import ARCH_FILE, STATE_DIR

    if os.path.isdir(path + EXPORT_PARTIAL):
        shutil.rmtree(path + EXPORT_PARTIAL)
    if not os.path.isdir(path) or not os.listdir(path):
        return
    arch_file = os.path.join(path, ARCH_FILE)
    if os.path.isfile(arch_file):
        try:
            with open(arch_file) as f:
                source = json.load(f).get("meta", {}).get("source")
        except (OSError, ValueError, AttributeError):
            source = None
        if source != "hipt-pretrain":
            raise ValueError(f"{path}: holds a checkpoint not written by hipt-pretrain; "
                             "refusing to overwrite it (set config.export_dir)")
    elif all(name == STATE_DIR or name.startswith(STATE_DIR + ".orbax-checkpoint-tmp") for name in os.listdir(path)):
        print(f"hipt-pretrain: {path}: an unfinished export (no {ARCH_FILE}: the run writing it was "
              "stopped); replacing it", file=sys.stderr, flush=True)
    else:
        raise ValueError(f"{path}: exists and is not an export of hipt-pretrain (no {ARCH_FILE}); "
                         "refusing to overwrite it (set config.export_dir)")


def export_teacher(state, config, path: str, meta: dict | None = None) -> str:
    """Save the teacher backbone (and its DINO head) as a model of kind "vit", as hipt-convert.

    A previous export of hipt-pretrain at ``path`` is replaced; anything else there is an error.
    The export is written at ``path + EXPORT_PARTIAL`` and renamed to ``path`` when whole: a run
    killed while exporting leaves no half export at ``path`` (its rerun removes the partial
    one), and a failed write (a full disk) keeps the previous export.
    """
    from hipt_jax.models.checkpoint import save
    from hipt_jax.outputs import OutputWriteError, write_failed

    path = os.path.abspath(path)
    partial = path + EXPORT_PARTIAL
    main = jax.process_index() == 0
    if main:
        _check_previous_export(path)
    if jax.process_count() > 1:
        # Every process takes part in Orbax's save; none may start before the partial one is gone.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("hipt-pretrain export")
    if jax.process_count() > 1:
        # FSDP-sharded leaves live on several hosts: gather full copies everywhere.
        from jax.experimental import multihost_utils
        teacher = multihost_utils.process_allgather(state["teacher"], tiled=True)
    else:
        teacher = jax.device_get(state["teacher"])
    meta = dict(meta or {})
    meta.update(source="hipt-pretrain", stage=int(config.stage), step=int(state["step"]))
    try:
        save(partial, teacher["vit"], "vit", config.model, meta=meta, head=head_for_export(teacher["head"]))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("hipt-pretrain export written")
        if main:
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(partial, path)
    except BaseException as e:
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputWriteError):
            raise write_failed(path, e) from None
        raise
    return path


class _Logger:
    """Console progress + TensorBoard + metrics.jsonl (process 0 only)."""

    def __init__(self, workdir, config, total_steps, active, resumed_step: Optional[int] = None):
        self.active, self.config, self.total = active, config, total_steps
        self.writer = None
        self.jsonl = None
        if active:
            from tensorboardX import SummaryWriter
            # A resumed run's new event file starts with a purge at the restored step: TensorBoard
            # drops what the stopped run logged past it (those steps are logged again), as
            # metrics.jsonl is cut back.
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resumed_step)
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.t0, self.step0 = time.time(), None

    def log(self, step: int, metrics: dict, crops_per_step: int):
        if not self.active:
            return
        if self.step0 is None:
            self.t0, self.step0 = time.time(), step
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if step % self.config.log_every and step != self.total - 1:
            return
        done = step - self.step0
        rate = done / max(time.time() - self.t0, 1e-9)
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        speed = ""
        if rate > 0:  # the run's first logged step has no speed yet: "0.00 steps/s, ETA nan min"
            self.writer.add_scalar("perf/steps_per_s", rate, step)
            speed = (f"  {rate:.2f} steps/s  {rate * self.config.global_batch:.1f} img/s "
                     f"({rate * crops_per_step:.0f} crops/s)  ETA {(self.total - 1 - step) / rate / 60:.1f} min")
        print(f"step {step:>7d}/{self.total}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.3g}  "
              f"wd {metrics['wd']:.3g}  mom {metrics['momentum']:.5f}  "
              f"t_temp {metrics['teacher_temp']:.3f}{speed}", flush=True)

    def flush(self, timeout_s: float = 5.0):
        """At every checkpoint: what a killed run logged up to its checkpoint is on disk.
        tensorboardX's flush() writes only what its writer thread has already taken from its
        queue (the last events stayed in memory until flush_secs, 120 s, and a kill -9 lost
        them): the queue is drained first (bounded wait), then the file flushed."""
        if not self.active:
            return
        events = getattr(getattr(self.writer.file_writer, "event_writer", None), "_event_queue", None)
        deadline = time.time() + timeout_s
        while events is not None and not events.empty() and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(0.02)  # the thread may hold the last event it took: let it write it
        self.writer.flush()

    def close(self):
        if self.active:
            self.writer.close()
            self.jsonl.close()


def _checkpoint_manager(workdir, config):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep, enable_async_checkpointing=config.checkpoint.use_async,
        create=True, cleanup_tmp_directories=True)  # the unfinished save of a killed run
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=options, item_names=("state", "data", "source"))


CHECKSUMS = "checkpoint_checksums.json"  # step -> SHA-256 of checkpoints/<step>/ (written when final)


def _checksums_path(workdir: str) -> str:
    return os.path.join(workdir, CHECKSUMS)


def _read_checksums(workdir: str) -> dict:
    """{step: SHA-256} recorded for the run's checkpoints; {} when none was recorded yet.

    A record that exists but cannot be read is refused (CheckpointRestoreError), not taken as
    empty: an empty record verifies nothing, so a damaged checkpoint would be resumed, exported,
    and then re-hashed as good by the next save, all with exit 0."""
    path = _checksums_path(workdir)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or text
        problem = e.strerror if isinstance(e, OSError) and e.strerror else f"invalid JSON ({e})"
        raise CheckpointRestoreError(_checksums_refusal(path, problem)) from None
    if not isinstance(data, dict):
        raise CheckpointRestoreError(_checksums_refusal(path, f"expected an object, found {type(data).__name__}"))
    sums = {}
    for key, value in data.items():
        if not (key.isdigit() and isinstance(value, str) and len(value) == 64):
            raise CheckpointRestoreError(_checksums_refusal(
                path, f"entry {key!r}: {value!r} is not a step number -> SHA-256"))
        sums[int(key)] = value
    return sums


def _checksums_refusal(path: str, problem: str) -> str:
    return (f"{path}: {problem}; the checkpoints cannot be verified against it. Remove the file to "
            "resume without verification (the next checkpoint save records fresh checksums), "
            "or use --overwrite to start over")


def _record_checksums(manager, workdir: str) -> None:
    """Hash every finished checkpoint that has no checksum yet; drop those Orbax deleted."""
    from hipt_jax import provenance

    steps = set(manager.all_steps())
    # With no checkpoint there is nothing to verify: an unreadable old record is just replaced.
    sums = _read_checksums(workdir) if steps else {}
    sums = {k: v for k, v in sums.items() if k in steps}
    for step in steps - set(sums):
        sums[step] = provenance.content_hash(os.path.join(workdir, "checkpoints", str(step)))
    from hipt_jax.outputs import write_json

    write_json(_checksums_path(workdir), {str(k): v for k, v in sorted(sums.items())}, indent=1)


@contextlib.contextmanager
def _checkpoint_writes(workdir: str):
    """Around Orbax's checkpoint saves: a failed write (a full disk; Orbax raises it as
    ValueError "RESOURCE_EXHAUSTED ...", or when an async save is waited for) becomes one
    OutputWriteError naming the checkpoint, exit 1, and the unfinished checkpoint folder is
    removed: it holds the space the rerun's free-space check needs. Earlier checkpoints stay."""
    from hipt_jax.models import checkpoint
    from hipt_jax.outputs import OutputWriteError, write_failed

    try:
        with checkpoint.quiet_write_failures():
            yield
    except Exception as e:
        failure = checkpoint.write_failure(e)
        if failure is None or isinstance(e, OutputWriteError):
            raise
        folder = os.path.join(workdir, "checkpoints")
        pattern = os.path.join(glob.escape(folder), "*.orbax-checkpoint-tmp*")
        unfinished = sorted(glob.glob(pattern))
        checkpoint.remove_settled(lambda: glob.glob(pattern))
        named = unfinished[0].split(".orbax-checkpoint-tmp")[0] if unfinished else folder
        raise write_failed(named, failure) from None


def _finish_checkpoints(manager, workdir: str, is_main: bool, failing: bool) -> None:
    """Wait for the save in flight, record its checksum, close the manager. When the run is
    already failing or stopping (``failing``), an error here is a consequence of the first
    (Orbax's event loops closed by a failed save), dropped so that one is reported."""
    try:
        with _checkpoint_writes(workdir):
            try:
                manager.wait_until_finished()
            except BaseException:
                with contextlib.suppress(Exception):  # the wait's error is the one to report
                    manager.close()
                raise
            manager.close()
        if is_main:
            _record_checksums(manager, workdir)
    except Exception:
        if not failing:
            raise


def _restore_newest(manager, workdir: str, state, iterator, is_main: bool, num_workers: int = 0):
    """(step, state) of the newest checkpoint that verifies and restores, or (None, state)
    when there is none. A checkpoint whose bytes do not match its recorded checksum, or whose
    train state Orbax cannot restore, is skipped with a message naming it; the one used is named.

    The data loader's position is part of the checkpoint, but it is not damage when it does not
    restore: batch i is the same for any worker or process count (pretrain.data), so a loader
    state saved with another ``data.num_workers`` (another layout), or one that fails to load,
    is replaced by the position re-derived from the step (data.loader_state), said in one line."""
    import grain
    import orbax.checkpoint as ocp

    from hipt_jax import provenance

    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None, state
    sums = _read_checksums(workdir)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    skipped = []
    for step in steps:
        path = os.path.join(workdir, "checkpoints", str(step))
        if step in sums and provenance.content_hash(path) != sums[step]:
            skipped.append(f"{path} (checksum mismatch)")
            continue
        saved_workers = data_lib.saved_loader_workers(_saved_loader_state(path))
        loader_note = None
        if saved_workers is not None and saved_workers != num_workers:
            loader_note = (f"its loader state was saved with data.num_workers={saved_workers}, this run "
                           f"uses {num_workers}")
            items = {}
        else:
            items = {"data": grain.checkpoint.CheckpointRestore(iterator)}
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), **items))
        except Exception as e:  # noqa: BLE001 -- the train state or the loader state is damaged
            try:  # the train state alone: when it restores, only the loader state was at fault
                restored = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract)))
            except Exception:  # noqa: BLE001 -- any damage: try the next older checkpoint
                changed = _model_changes(manager, step, abstract)  # the failed restore told Orbax the layout
                skipped.append(f"{path} ({f'made for another model: {changed}' if changed else type(e).__name__})")
                continue
            loader_note = f"its loader state does not restore ({type(e).__name__}: {_first_line(e)})"
        if loader_note is not None and iterator is not None:
            iterator.set_state(data_lib.loader_state(step, num_workers))
        if is_main:
            for bad in skipped:
                print(f"warning: checkpoint {bad} does not restore; skipped", file=sys.stderr, flush=True)
            if step not in sums:  # e.g. killed between a save and its checksum being recorded
                print(f"warning: checkpoint {path} has no recorded checksum in {_checksums_path(workdir)}: "
                      "resumed without verifying its bytes", file=sys.stderr, flush=True)
            if loader_note is not None:
                print(f"hipt-pretrain: note: {path}: {loader_note}; the data position is re-derived from "
                      f"step {step} (the sample order does not depend on the worker count)",
                      file=sys.stderr, flush=True)
            print(f"resumed from {path}" + (" (newest checkpoint that restores)" if skipped else ""), flush=True)
        return step, restored["state"]
    raise CheckpointRestoreError(f"{workdir}/checkpoints: no checkpoint restores ({'; '.join(skipped)}); "
                                 "use --overwrite to start over")


def _saved_loader_state(path: str):
    """This process's Grain iterator state in checkpoint ``path`` (data/process_I-of-N.json),
    or None when it is missing or unreadable (the restore then says what is wrong)."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    try:
        with open(os.path.join(path, "data", name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _saved_source(workdir: str, step: int):
    """The data source record (data.source_record) checkpoint ``step`` was saved with; None for
    checkpoints of older releases, which did not keep one."""
    try:
        with open(os.path.join(workdir, "checkpoints", str(step), "source", "metadata")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _model_changes(manager, step: int, abstract, limit: int = 3) -> str:
    """How checkpoint ``step``'s train state differs in layout from this config's (``abstract``):
    "student.backbone.x saved (384, 64), now (96, 64); ... (N arrays)", or "" when it does not
    or its metadata cannot be read. A run resumed with --resume-anyway after a change of
    model.width said only "(ValueError)" for every checkpoint, naming no array."""
    try:
        saved = {_dotted(p): tuple(getattr(v, "shape", ()) or ())
                 for p, v in jax.tree_util.tree_flatten_with_path(manager.item_metadata(step)["state"])[0]}
    except Exception:  # noqa: BLE001 -- damaged metadata: the caller names the error instead
        return ""
    if not saved:  # no metadata of the state item (Orbax returns None for it): nothing to compare
        return ""
    now = {_dotted(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    now = dict(sorted(now.items(), key=lambda kv: kv[0].startswith("opt.")))  # the models' arrays first
    changes = [f"{k} saved {saved[k]}, now {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    changes += [f"{k} not saved" for k in now if k not in saved]
    changes += [f"{k} saved, not in this config" for k in saved if k not in now]
    if not changes:
        return ""
    more = f"; ... ({len(changes)} arrays)" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else ""


class CheckpointRestoreError(ValueError):
    """Every checkpoint of a run directory is damaged (the message names them)."""


def _truncate_metrics(path: str, step: int) -> None:
    """Keep the lines of metrics.jsonl for steps < ``step`` (what the restored state has seen),
    so a resumed run does not repeat lines; a torn last line is dropped too."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


# Config fields that do not change what is trained (how long this invocation runs, logging,
# checkpoint cadence, loader parallelism, device layout): a resumed run may change them.
RUN_CONTROL_FIELDS = ("stop_at_step", "log_every", "checkpoint", "export_dir", "distributed", "mesh",
                      "microbatches", "data.num_workers", "data.read_threads", "data.prefetch")
RUN_OUTPUTS = ("checkpoints", "export", "tensorboard", "metrics.jsonl", CHECKSUMS)


def _config_without(config: ml_collections.ConfigDict, fields: tuple[str, ...]) -> dict:
    """The config as a dict without ``fields`` ("name", "section.name", "a.b.name")."""
    data = config.to_dict()
    for field in fields:
        *sections, name = field.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return data


def hashed_config(config: ml_collections.ConfigDict) -> dict:
    """The config without its run-control fields: what the checkpoints depend on."""
    return _config_without(config, RUN_CONTROL_FIELDS)


def data_identities(config: ml_collections.ConfigDict) -> dict:
    """DATA_LOCATION_FIELDS -> what each holds (provenance.data_identity: names relative to the
    data folder, sizes, sampled bytes; None for an empty field). A listing of the data folder
    each: ``train`` takes it once for the cross-process check and the run record alike."""
    from hipt_jax import provenance

    return {field: provenance.data_identity(str(_field(config, field) or "") or None)
            for field in DATA_LOCATION_FIELDS}


def fingerprint(config: ml_collections.ConfigDict, identities: Optional[dict] = None) -> dict:
    """What a run directory's checkpoints depend on: the config without its run-control fields
    and data locations, each data location both where it resolves (links followed) and what it
    holds (``identities``, from ``data_identities`` when not given), and the content of the
    warm-start checkpoint. ``reconcile_record`` accepts a resume whose data matches the record
    by either (see there)."""
    from hipt_jax import provenance

    identities = data_identities(config) if identities is None else identities
    return {"config": provenance.config_hash(_config_without(config, RUN_CONTROL_FIELDS + DATA_LOCATION_FIELDS)),
            "data": {field: {"path": _resolved(str(_field(config, field) or "")), "content": identities[field]}
                     for field in DATA_LOCATION_FIELDS},
            "warm_start": provenance.weights_identity(config.warm_start or None)}


def _resolved(path: str) -> str:
    """A data path as it resolves here (links followed), or as written when it names nothing."""
    return os.path.realpath(path) if path and os.path.exists(path) else path


def _field(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for name in dotted.split("."):
        node = node.get(name) if node is not None else None
    return node


def _recorded_by_path(config: ml_collections.ConfigDict) -> dict:
    """The fingerprint run directories recorded before data entered by content as well (the
    config hash with data.path in it, and data.path as it resolved)."""
    from hipt_jax import provenance

    return {"config": provenance.config_hash(hashed_config(config)), "data_path": _resolved(str(config.data.path)),
            "warm_start": provenance.weights_identity(config.warm_start or None)}


def _same_data(old: object, now: dict) -> bool:
    """Every data location of the record is where this run's resolves, or holds what it holds:
    the same folder with an image deleted (the checkpoint's data record warns of it), or a copy
    of the data elsewhere (staged to a node's local disk). Both differ: other data."""
    if not isinstance(old, dict) or set(old) != set(now):
        return False
    return all(isinstance(old[f], dict) and (old[f].get("path") == now[f]["path"]
                                             or old[f].get("content") == now[f]["content"]) for f in now)


def reconcile_record(workdir: str, config: ml_collections.ConfigDict, now: dict, details: dict) -> None:
    """Rewrite ``workdir``'s provenance record as ``now`` when it differs only where a resume is
    expected to go on: data that moved (same content, another path) or was edited in place
    (same path), or a record made before data were recorded by content that matches by path.
    Anything else is left for provenance.check to refuse."""
    from hipt_jax import provenance

    old = provenance.read(workdir)
    norm = provenance.normalized(now)
    if not isinstance(old, dict) or old == norm:
        return
    if "data_path" in old:
        same = old == provenance.normalized(_recorded_by_path(config))
    else:
        same = (all(old.get(k) == norm[k] for k in norm if k != "data")
                and set(old) == set(norm) and _same_data(old.get("data"), norm["data"]))
    if same:
        provenance.write(workdir, now, dict(provenance.read_details(workdir), **details))


# Settings a host may tune for its own cores and network; every other config field must be
# alike on every process of a run (see cross_process_fields).
HOST_LOCAL_FIELDS = ("distributed", "data.num_workers", "data.read_threads", "data.prefetch")


# Config fields that locate input data: compared across processes by what they hold
# (provenance.data_identity), since each host may mount the data at its own path.
DATA_LOCATION_FIELDS = ("data.path", "eval.knn.path", "eval.knn.labels")


def cross_process_fields(config: ml_collections.ConfigDict, workdir: str,
                         identities: Optional[dict] = None) -> dict:
    """What every process of a multi-process run must agree on: the whole config but its
    host-local fields, the warm-start checkpoint by content (each host may hold its own copy),
    the data by what it holds (DATA_LOCATION_FIELDS: /mnt/a on one host and /data/a on another
    is one dataset; another dataset at the same path is not) and the workdir by identity
    (distributed.output_identity): the output every process writes, so two processes writing
    two folders are refused, one folder at two mount points is not. Only process
    0's config is recorded in the provenance, yet every process trains and checkpoints with its
    own: a seed, schedule, stop step or checkpoint cadence that differs on one host trains
    something else or hangs in a collective."""
    from hipt_jax import distributed, provenance

    data = _config_without(config, HOST_LOCAL_FIELDS)
    data["warm_start"] = provenance.weights_identity(config.warm_start or None)
    identities = data_identities(config) if identities is None else identities
    for field in DATA_LOCATION_FIELDS:
        *sections, name = field.split(".")
        node = data
        for section in sections:
            node = node.get(section, {})
        if name in node:
            node[name] = identities[field]
    return {"config": data, "workdir": distributed.output_identity(workdir)}


def fetch_metrics(pending: list) -> list[tuple[int, dict]]:
    """ONE device-to-host transfer for the metrics of every pending step -> [(step, floats)]."""
    if not pending:
        return []
    steps, trees = zip(*pending)
    host = jax.device_get(list(trees))
    return [(s, {k: float(v) for k, v in m.items()}) for s, m in zip(steps, host)]


def _fetch_due(step: int, stop: int, config, knn_monitor) -> bool:
    """Metrics are fetched on logging steps and before a KNN evaluation (which logs after
    them and may export the teacher); the checkpoint boundary fetches on its own."""
    logged = step - 1  # the step whose update just ran
    return (logged % config.log_every == 0 or step == stop
            or (knn_monitor is not None and step % knn_monitor.cfg.every_steps == 0))


def _check_and_log(fetched: list, workdir: str, logger, crops_per_step: int) -> dict:
    """Stop on the first non-finite loss; log every fetched step in order. -> last metrics."""
    metrics = {}
    for step, metrics in fetched:
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"non-finite loss {metrics['loss']} at step {step}; stopping. The last good "
                f"checkpoint is kept in {workdir}/checkpoints (lower optim.lr or use fp32?)")
        logger.log(step, metrics, crops_per_step)
    return metrics


def train(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
          resume_anyway: bool = False) -> dict:
    """Run (or resume) pretraining in ``workdir``; returns the last step's metrics.

    The workdir is locked for the run (a second run fails at once naming the holder), and
    resumed only when its provenance (config hash, warm start) matches (``overwrite`` /
    ``resume_anyway``: hipt_jax.provenance). Raises NonFiniteLossError (after closing the
    checkpoint manager, so the last good checkpoint stays) when the loss stops being finite.
    """
    from hipt_jax import distributed, provenance, workdir_lock

    # One listing of each data folder for both uses (a tile folder can hold millions of files).
    identities = functools.cache(lambda: data_identities(config))
    try:
        distributed.check_same_everywhere(lambda: cross_process_fields(config, workdir, identities()))
    finally:
        distributed.drop_output_token(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    with workdir_lock.hold(workdir, enabled=is_main):
        record, outcome = _read_record(workdir), None
        if is_main:
            now = fingerprint(config, identities())
            details = {"config": hashed_config(config), "data": now["data"]}  # to name what changed
            reconcile_record(workdir, config, now, details)
            outcome = provenance.check(workdir, now, outputs=RUN_OUTPUTS, overwrite=overwrite,
                                       resume_anyway=resume_anyway, what="pretraining run directory",
                                       details=details)
        try:
            return _train(config, workdir, is_main)
        except CheckpointRestoreError:
            if outcome == "resumed" and record is not None:
                _write_record(workdir, record)
            raise


def _read_record(workdir: str) -> Optional[bytes]:
    """The bytes of the run directory's provenance record (None when it has none)."""
    from hipt_jax import provenance

    try:
        with open(os.path.join(workdir, provenance.FILE), "rb") as f:
            return f.read()
    except OSError:
        return None


def _write_record(workdir: str, record: bytes) -> None:
    """Put back the provenance record a --resume-anyway replaced when no checkpoint restored into
    the new config: the record then named the failed attempt's config, and a rerun with the
    config the checkpoints were made with was refused as "made with other inputs"."""
    from hipt_jax import provenance

    path = os.path.join(workdir, provenance.FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(record)
    os.replace(tmp, path)


def _train(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> dict:
    import grain
    import orbax.checkpoint as ocp

    rules = tuple(tuple(r) for r in config.sharding_rules)
    mesh = shd.make_mesh(dict(config.mesh))
    if config.global_batch % mesh.size:
        raise ValueError(f"global_batch {config.global_batch} is not divisible by the "
                         f"{mesh.size} devices")
    source = data_lib.make_source(config.data)
    config = data_lib.resolve_config(config, source)
    steps_per_epoch = _steps_per_epoch(config, source)
    for note in data_lib.check_source(config, source) + check_lengths(config, steps_per_epoch):
        if is_main:
            print(f"hipt-pretrain: note: {note}", file=sys.stderr, flush=True)
    freeze_steps = config.optim.freeze_last_layer_epochs * steps_per_epoch
    total = config.total_steps
    stop = total if config.stop_at_step < 0 else min(config.stop_at_step, total)

    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    state, state_sh = init_sharded_state(config, mesh, init_rng)
    iterator = data_lib.make_iterator(config, source, process_index=jax.process_index(),
                                      process_count=jax.process_count(), num_steps=total)
    manager = _checkpoint_manager(workdir, config)
    latest, state = _restore_newest(manager, workdir, state, iterator, is_main,
                                    num_workers=config.data.num_workers)
    source_now = data_lib.source_record(source, steps_per_epoch)
    if latest is not None and is_main:
        change = data_lib.source_changes(_saved_source(workdir, latest), source_now, config)
        if change:
            print(f"hipt-pretrain: warning: {change}", file=sys.stderr, flush=True)
    if is_main:
        _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), latest or 0)
    if latest is None and config.warm_start:
        state = jax.device_put(_warm_start(state, config), state_sh)
        if is_main:
            print(f"warm start from {config.warm_start}", flush=True)

    update = jit_update(config, mesh, state_sh, freeze_steps, steps_per_epoch)
    if is_main:
        n_micro = resolve_microbatches(config, mesh)
        print(f"update: global batch {config.global_batch} on {mesh.size} device(s) "
              f"({dict(mesh.shape)}), {n_micro} microbatch(es)"
              f"{' (auto)' if config.microbatches == -1 else ''}", flush=True)
    batch_sh = shd.batch_sharding(mesh, rules)
    logger = _Logger(workdir, config, total, is_main, resumed_step=latest)
    crops_per_step = config.global_batch * (N_GLOBAL + config.crops.n_local)
    step = int(jax.device_get(state["step"]))
    metrics = {}
    from hipt_jax.pretrain.knn_monitor import from_config as knn_monitor_from_config
    knn_monitor = knn_monitor_from_config(config, workdir)
    # SIGTERM (preemption) stops the run between steps, never inside Orbax's save/delete threads
    # the loop waits for: the `finally` then finishes the checkpoint in flight (hipt_jax.interrupts).
    finished = False
    with interrupts.deferred():
        try:
            from tqdm import tqdm
            # --no-progress sets TQDM_DISABLE, which tqdm itself reads only at import: checked here.
            bars_off = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
            bar = tqdm(total=stop, initial=step, disable=not is_main or config.log_every <= 1 or bars_off,
                       desc="pretrain", unit="step", file=sys.stderr)
            pending = []  # (step, device metrics) not fetched yet: no host round trip per step
            while step < stop:
                # Batches go to the device two ahead of the update, within one checkpoint interval:
                # the Grain iterator saved with a checkpoint is then exactly at the checkpointed step.
                segment_end = min(stop, (step // config.checkpoint.every_steps + 1) * config.checkpoint.every_steps)
                batches = itertools.islice(iterator, segment_end - step)
                for batch in prefetch_to_device(batches, lambda b: shd.global_batch(b, batch_sh)):
                    interrupts.check()  # a safe point: the last checkpoint is whole
                    state, dev_metrics = update(state, batch, step_rng)
                    pending.append((step, dev_metrics))
                    step += 1
                    bar.update(1)
                    if _fetch_due(step, stop, config, knn_monitor):
                        metrics = _check_and_log(fetch_metrics(pending), workdir, logger, crops_per_step)
                        pending = []
                    if knn_monitor is not None:  # eval.knn: KNN of the current teacher every N steps
                        knn_monitor(step, stop, state, logger)
                # A checkpoint is written only after its step's metrics (and all before) passed.
                metrics = _check_and_log(fetch_metrics(pending), workdir, logger, crops_per_step) or metrics
                pending = []
                logger.flush()
                with _checkpoint_writes(workdir):
                    manager.wait_until_finished()  # Orbax waits for the previous save anyway
                if is_main:
                    _record_checksums(manager, workdir)
                with _checkpoint_writes(workdir):
                    manager.save(step, args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state),
                        data=grain.checkpoint.CheckpointSave(iterator),
                        source=ocp.args.JsonSave(source_now)))
            bar.close()
            finished = True
        finally:
            try:
                _finish_checkpoints(manager, workdir, is_main, failing=not finished)
            finally:
                logger.close()
                batch = batches = None  # the last batch may live in the loader's shared memory
                data_lib.close_iterator(iterator)  # stops loader worker processes, frees their batches
    export_dir = config.export_dir or os.path.join(workdir, "export")
    export_teacher(state, config, export_dir)
    if is_main:
        print(f"exported teacher backbone to {export_dir}", flush=True)
    return metrics
