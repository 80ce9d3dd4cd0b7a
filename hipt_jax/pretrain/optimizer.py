"""AdamW exactly as DINO drives torch.optim.AdamW.

- Gradient clipping per tensor (DINO's ``clip_gradients``): each tensor's gradient is scaled
  by clip / (||g|| + 1e-6) when that factor is < 1. ``global_norm=True`` selects optax-style
  clipping by the norm of all gradients instead.
- Weight decay (decoupled, p *= 1 - lr * wd) only on tensors with ndim > 1 (DINO's
  ``get_params_groups``: biases and LayerNorm params are not regularized).
- The head's last layer gets NO update while ``freeze_last_layer`` is true (torch sees
  grad=None: no decay, no moment update, and its per-tensor Adam step counter does not advance,
  so each leaf keeps its own count for exact bias correction).

State is a plain pytree {"mu", "nu", "count"} shaped like the params (count: int32 scalars).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hipt_jax.pretrain.head import LAST_LAYER

Params = Any


def init(params: Params) -> dict:
    zeros = lambda p: jnp.zeros_like(p, dtype=jnp.float32)  # noqa: E731
    return {
        "mu": jax.tree.map(zeros, params),
        "nu": jax.tree.map(zeros, params),
        "count": jax.tree.map(lambda p: jnp.zeros((), jnp.int32), params),
    }


def clip_per_tensor(grads: Params, max_norm: float) -> Params:
    """DINO's clip_gradients: scale each tensor's gradient to norm <= max_norm (approximately)."""
    def clip(g):
        coef = max_norm / (jnp.linalg.norm(g.ravel()) + 1e-6)
        return jnp.where(coef < 1.0, g * coef, g)
    return jax.tree.map(clip, grads)


def clip_global_norm(grads: Params, max_norm: float) -> Params:
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * coef, grads)


def is_last_layer(path) -> bool:
    """True for the DINO head's weight-normalized last layer (frozen in the first epoch)."""
    return any(getattr(k, "key", None) == LAST_LAYER for k in path)


def update(grads: Params, state: dict, params: Params, *, lr, weight_decay, freeze_last_layer,
           clip_grad: float = 3.0, global_norm: bool = False, b1: float = 0.9,
           b2: float = 0.999, eps: float = 1e-8) -> tuple[Params, dict]:
    """One AdamW step. Returns (new_params, new_state). All schedule values may be traced."""
    if clip_grad and clip_grad > 0:
        grads = (clip_global_norm if global_norm else clip_per_tensor)(grads, clip_grad)

    def step_leaf(path, g, p, mu, nu, count):
        g = g.astype(jnp.float32)
        active = jnp.logical_not(freeze_last_layer) if is_last_layer(path) else jnp.bool_(True)
        wd = weight_decay if p.ndim > 1 else 0.0
        new_count = count + 1
        new_mu = b1 * mu + (1.0 - b1) * g
        new_nu = b2 * nu + (1.0 - b2) * jnp.square(g)
        t = new_count.astype(jnp.float32)
        # torch: denom = sqrt(v) / sqrt(1 - b2^t) + eps; p -= lr / (1 - b1^t) * m / denom
        denom = jnp.sqrt(new_nu) / jnp.sqrt(1.0 - b2**t) + eps
        new_p = p * (1.0 - lr * wd) - (lr / (1.0 - b1**t)) * new_mu / denom
        keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        return (keep(new_p.astype(p.dtype), p), keep(new_mu, mu), keep(new_nu, nu),
                keep(new_count, count))

    out = jax.tree_util.tree_map_with_path(
        step_leaf, grads, params, state["mu"], state["nu"], state["count"])
    treedef = jax.tree.structure(params)
    leaves = treedef.flatten_up_to(out)
    new_params, mu, nu, count = (treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(4))
    return new_params, {"mu": mu, "nu": nu, "count": count}
