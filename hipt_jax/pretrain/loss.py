"""DINO's self-distillation loss and center update (as DINO's DINOLoss computes them).

loss = mean over (teacher global view i, student view v != i) pairs of
       mean over the batch of  sum_k -p_i[k] * log_softmax(s_v / student_temp)[k],
with p_i = softmax((t_i - center) / teacher_temp), no gradient through the teacher.
center <- m * center + (1 - m) * mean of teacher logits over the GLOBAL batch (both views).

Under ``jax.jit`` with a batch sharded over devices or hosts, ``jnp.mean`` over the batch axis
is already the global mean: no explicit all-reduce is needed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dino_loss(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray, center: jnp.ndarray,
              *, n_global: int, teacher_temp, student_temp: float = 0.1) -> jnp.ndarray:
    """Scalar loss.

    student_logits: [B, V, K] (V = n_global + n_local views, global first), as the model
    returns them, or DINO's view-major [V*B, K]; teacher_logits: [B, n_global, K] or
    [n_global*B, K] (same layout as the student's); center: [1, K].
    """
    if student_logits.ndim == 2:  # view-major rows, as torch's .chunk(ncrops) reads them
        batch = teacher_logits.shape[0] // n_global
        # [V*B,K] -> [V,B,K] -> [B,V,K]
        student_logits = jnp.swapaxes(student_logits.reshape(-1, batch, student_logits.shape[-1]), 0, 1)
        teacher_logits = jnp.swapaxes(teacher_logits.reshape(n_global, batch, -1), 0, 1)
    n_views = student_logits.shape[1]
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    teacher = (teacher_logits.astype(jnp.float32) - center) / teacher_temp
    p_teacher = jax.lax.stop_gradient(jax.nn.softmax(teacher, axis=-1))
    # DINO's double loop over (teacher view i, student view v != i), literally: 18 pairs of
    # [B,K] products. XLA fuses each pair's product and row sum; this is faster on CPU than
    # summing the student views first, whose reduction over the view axis is slow.
    total = 0.0
    for i in range(n_global):
        for v in range(n_views):
            if v != i:
                total = total + jnp.sum(-p_teacher[:, i] * log_p_student[:, v], axis=-1).mean()
    return total / (n_global * n_views - n_global)  # 2 x 10 - 2 = 18 pairs with DINO's crops


def update_center(center: jnp.ndarray, teacher_logits: jnp.ndarray,
                  momentum: float = 0.9) -> jnp.ndarray:
    """EMA of the teacher's batch-mean logits: [1,K] <- m * [1,K] + (1 - m) * mean over every
    row of teacher_logits ([N,K] or [B,V,K]: the order of rows does not matter)."""
    # A mean over every leading axis, not a reshape to [N,K]: merging a device-sharded sample
    # axis with others would gather the logits onto every device.
    leading = tuple(range(teacher_logits.ndim - 1))
    batch_center = jnp.mean(teacher_logits.astype(jnp.float32), axis=leading).reshape(1, -1)
    return center * momentum + batch_center * (1.0 - momentum)
