"""Schedules of the DINO recipe, as pure jnp functions of the step.

lr, weight decay and teacher momentum are per-iteration; the teacher temperature is a
per-EPOCH array in DINO (stepped once per epoch, indexed by ``step // steps_per_epoch``).
They reproduce DINO's ``utils.cosine_scheduler`` arrays (linear warm-up from
``warmup_start`` over ``warmup_steps``, then a cosine from ``base`` to ``final`` over the
remaining steps) without materializing them, so they can be evaluated inside the jitted update.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections


def cosine_schedule(step, *, base: float, final: float, total_steps: int,
                    warmup_steps: int = 0, warmup_start: float = 0.0):
    """Value at ``step`` of DINO's cosine_scheduler(base, final, ...) flattened to iterations.

    Warm-up: np.linspace(warmup_start, base, warmup_steps)[step] (endpoint included).
    Then: final + (base - final) * (1 + cos(pi * j / (total_steps - warmup_steps))) / 2
    with j = step - warmup_steps. Steps past the end keep the last value.
    """
    step = jnp.asarray(step, jnp.float32)
    step = jnp.minimum(step, total_steps - 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    j = step - warmup_steps
    cosine = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * j / decay_steps))
    if warmup_steps <= 0:
        return cosine
    warm = warmup_start + (base - warmup_start) * step / max(warmup_steps - 1, 1)
    return jnp.where(step < warmup_steps, warm, cosine)


def linear_then_constant(step, *, start: float, end: float, warmup_steps: int):
    """Teacher temperature: np.linspace(start, end, warmup_steps)[step], then ``end``.
    np.linspace(a, b, 1) == [a]: one warm-up step is ``start`` at step 0, as in DINO."""
    step = jnp.asarray(step, jnp.float32)
    if warmup_steps <= 0:
        return jnp.full_like(step, end)
    frac = jnp.minimum(step / max(warmup_steps - 1, 1), 1.0)
    return start + (end - start) * frac


def teacher_temperature(step, teacher: ml_collections.ConfigDict, steps_per_epoch: int = 1):
    """DINO's per-epoch teacher temperature: linspace(warmup_temp, temp, warmup_temp_epochs)
    indexed by the epoch ``step // steps_per_epoch``, then ``temp``. Constant within an epoch."""
    epoch = jnp.floor_divide(jnp.asarray(step, jnp.int32), max(int(steps_per_epoch), 1))
    return linear_then_constant(epoch, start=teacher.warmup_temp, end=teacher.temp,
                                warmup_steps=teacher.warmup_temp_epochs)


def all_schedules(step, config: ml_collections.ConfigDict, steps_per_epoch: int = 1) -> dict:
    """lr, weight decay, teacher momentum and teacher temperature at ``step``.

    The peak lr scales with the global batch: lr_base * global_batch / 256 (DINO's rule).
    ``steps_per_epoch`` only affects the teacher temperature (stepped once per epoch).
    """
    total = config.total_steps
    optim = config.optim
    peak_lr = optim.lr * config.global_batch / 256.0
    return {
        "lr": cosine_schedule(step, base=peak_lr, final=optim.min_lr, total_steps=total,
                              warmup_steps=optim.warmup_steps),
        "wd": cosine_schedule(step, base=optim.weight_decay, final=optim.weight_decay_end,
                              total_steps=total),
        "momentum": cosine_schedule(step, base=config.teacher.momentum, final=1.0,
                                    total_steps=total),
        "teacher_temp": teacher_temperature(step, config.teacher, steps_per_epoch),
    }


def check_lengths(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[str]:
    """Warm-ups that do not fit the run are refused (ValueError naming the fields): DINO's
    schedulers fail on them, where ours would clamp silently (an lr still rising at the last
    step, no cosine). Returns notes (one line each) for epoch-based phases that cover more than
    a tenth of the run with epochs longer than one step: an epoch defaults to the dataset size,
    which at the paper's scale (~100M patches, batch 256) freezes the last layer for 390K of
    400K steps."""
    total, spe = int(config.total_steps), max(int(steps_per_epoch), 1)
    warmup = int(config.optim.warmup_steps)
    if warmup > total:
        raise ValueError(f"config.optim.warmup_steps={warmup} is longer than config.total_steps={total}: "
                         "the lr would never reach its peak nor decay (set a shorter warm-up)")
    epochs = -(-total // spe)  # the epochs the run touches, the last maybe partial
    temp_epochs = int(config.teacher.warmup_temp_epochs)
    if temp_epochs > epochs:
        raise ValueError(f"config.teacher.warmup_temp_epochs={temp_epochs} is longer than the run's {epochs} "
                         f"epoch(s) (config.total_steps={total} at {spe} steps per epoch): the teacher "
                         "temperature would never reach config.teacher.temp")
    notes = []
    phases = (("optim.freeze_last_layer_epochs", "the last layer is frozen"),
              ("teacher.warmup_temp_epochs", "the teacher temperature warms up"))
    for field, what in phases:
        section, name = field.split(".")
        steps = int(config[section][name]) * spe
        # At one step per epoch (runlocal, the demo) the phase is as short as its epoch count
        # allows: no data.samples_per_epoch would shorten it, so the note would only be noise.
        if steps > 0.1 * total and spe > 1:
            notes.append(f"{what} for {min(steps, total)} of {total} steps ({100 * min(steps, total) / total:.0f}%: "
                         f"config.{field}={config[section][name]} at {spe} steps per epoch); an epoch is the "
                         "dataset unless config.data.samples_per_epoch sets it")
    return notes
