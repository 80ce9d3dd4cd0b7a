"""DINO projection head and the multi-crop student/teacher model.

Head (as DINO's ``DINOHead`` with nlayers=3, norm_last_layer=True):
Linear(D,2048)-GELU-Linear(2048,2048)-GELU-Linear(2048,256), L2-normalize (eps 1e-12),
then a weight-normalized Linear(256, out_dim, no bias) whose gain g is fixed to 1, i.e. each
output unit's weight vector is v / ||v||. Only ``v`` is a trainable parameter.

Param names follow hipt_jax.models.torch_io's head layout (= torch's Sequential indices):
mlp_0, mlp_2, mlp_4 {kernel [in,out], bias}, last_layer/weight_v [256, out_dim] (kernel
layout). The fixed gain ``last_layer/weight_g`` [out_dim] (all ones) is only added on export
(``head_for_export``) so exported heads convert back to the reference .pth layout.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hipt_jax.models.archs import build_vit
from hipt_jax.models.vit import gelu_exact, reference_trunc_normal
from hipt_jax.models.precision import resolve_dtype

Dtype = Any

_trunc02 = reference_trunc_normal(0.02)  # as the reference's trunc_normal_(std=0.02)
# The reference creates the last layer after its trunc-normal init pass, so it keeps torch's
# default Linear init: kaiming_uniform(a=sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_linear_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# Name of the head's last layer in the param tree; the optimizer freezes it for the first epoch.
LAST_LAYER = "last_layer"


class DINOHead(nn.Module):
    """[N, D] backbone CLS features -> [N, out_dim] logits (before any temperature).

    ``bottleneck`` stops before the last layer: the L2-normalized [N, bottleneck_dim] input of
    the weight-normalized Linear. The training step applies that layer itself (see
    ``weight_norm``, ``last_layer_logits`` and ``last_layer_weight_grad``) so that its
    weight gradient is one matmul over the whole batch, not one per microbatch."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    dtype: Dtype = jnp.float32

    def setup(self):
        dense = lambda feats: nn.Dense(  # noqa: E731
            feats, dtype=self.dtype, kernel_init=_trunc02, bias_init=nn.initializers.zeros)
        # Named as torch's Sequential indices (Linear, GELU, Linear, GELU, Linear).
        self.mlp_0 = dense(self.hidden_dim)
        self.mlp_2 = dense(self.hidden_dim)
        self.mlp_4 = dense(self.bottleneck_dim)
        self.last_layer = WeightNormLinear(self.out_dim, self.dtype)  # param name == LAST_LAYER

    def bottleneck(self, x: jnp.ndarray) -> jnp.ndarray:
        """[N, D] -> [N, bottleneck_dim], L2-normalized, fp32."""
        x = gelu_exact(self.mlp_0(x))
        x = gelu_exact(self.mlp_2(x))
        x = self.mlp_4(x)
        # F.normalize(x, dim=-1, p=2): divide by max(||x||, 1e-12); in fp32 for stability.
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.last_layer(self.bottleneck(x))


def _column_sq_norms(v: jnp.ndarray) -> jnp.ndarray:
    """[in, out] -> [1, out] squared column norms. A [1,in] @ [in,out] matmul because XLA:CPU
    reduces over a leading axis slowly; HIGHEST keeps it fp32 on TPU/GPU too."""
    return jnp.matmul(jnp.ones((1, v.shape[0]), jnp.float32), jnp.square(v.astype(jnp.float32)),
                      precision=jax.lax.Precision.HIGHEST)


class WeightNormLinear(nn.Module):
    """torch weight_norm(Linear(in, out, bias=False)) with the gain fixed to 1."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        v = self.param("weight_v", _torch_linear_default, (x.shape[-1], self.features))
        # x @ (v_j / ||v_j||) == (x @ v_j) / ||v_j||: scale the logits instead of the weights.
        # Both ways are the same math, but XLA:CPU fuses a normalized weight into the big
        # matmul's operand and, for small batches (the teacher's 2 x B rows), recomputes it per
        # output: 12 s instead of 0.08 s per call at [32,256] x [256,65536].
        logits = x.astype(self.dtype) @ v.astype(self.dtype)        # [N,out]
        return (logits.astype(jnp.float32) * jax.lax.rsqrt(_column_sq_norms(v))).astype(self.dtype)


def weight_norm(v: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The last layer's effective weight w = v / ||v_j|| (per output column j) and the
    [1, out] inverse norms r = 1 / ||v_j||, formed once per step (the training step applies
    the layer by hand; see ``weight_norm_grad``)."""
    r = jax.lax.rsqrt(_column_sq_norms(v)).astype(v.dtype)
    return v * r, r


def weight_norm_grad(w: jnp.ndarray, r: jnp.ndarray, w_grad: jnp.ndarray,
                     logits_dot: jnp.ndarray) -> jnp.ndarray:
    """d loss / d v from d loss / d w (``w_grad`` = G) for w = v * r, r_j = 1 / ||v_j||.

    The chain rule gives dv_ij = r_j (G_ij - w_ij S_j) with S_j = sum_i w_ij G_ij. Since
    G = z^T g for logits = z @ w, S_j also equals sum over rows n of g_nj * logits_nj
    (``logits_dot``, [out]), which each chunk forms from its own logits and their gradient:
    no reduction over the [in, out] gradient, which XLA:CPU would fuse into the matmul that
    produces G and run at a third of its speed."""
    return r * (w_grad - w * logits_dot)


def logits_dot(g: jnp.ndarray, logits: jnp.ndarray) -> jnp.ndarray:
    """[..., out] x [..., out] -> [out]: sum over every row of g * logits (see weight_norm_grad)."""
    return jnp.sum(g * logits, axis=tuple(range(g.ndim - 1)))


def last_layer_logits(z: jnp.ndarray, w: jnp.ndarray, dtype: Dtype = jnp.float32) -> jnp.ndarray:
    """[..., in] bottleneck features @ [in, out] effective weight -> [..., out] fp32 logits."""
    return (z.astype(dtype) @ w.astype(dtype)).astype(jnp.float32)


def last_layer_input_grad(g: jnp.ndarray, w: jnp.ndarray, dtype: Dtype = jnp.float32) -> jnp.ndarray:
    """d loss / d z = g @ w^T for logits = z @ w: [..., out] x [in, out] -> [..., in] fp32."""
    return jnp.einsum("...o,io->...i", g.astype(dtype), w.astype(dtype)).astype(jnp.float32)


def last_layer_weight_grad(z: jnp.ndarray, g: jnp.ndarray, dtype: Dtype = jnp.float32) -> jnp.ndarray:
    """d loss / d w = z^T g summed over every leading (row) axis: [..., in], [..., out] -> [in, out].

    Written as a plain [in, rows] @ [rows, out] product with the transpose of the small z
    materialized first (the barrier stops XLA from folding it back into the matmul): XLA:CPU
    runs the folded transposed-operand form at a third of the speed at out_dim 65536."""
    rows = z.ndim - 1
    # [r0,..,rk, in] -> [in, r0,..,rk]: a copy of the small operand only
    zt = jax.lax.optimization_barrier(jnp.moveaxis(z.astype(dtype), -1, 0))
    return jax.lax.dot_general(
        zt, g.astype(dtype), (((tuple(range(1, rows + 1))), tuple(range(rows))), ((), ())),
        preferred_element_type=jnp.float32)


def head_for_export(head_params) -> dict:
    """Our trainable head tree + the fixed gain weight_g = 1, as hipt_jax.models.torch_io lays it out."""
    head = {k: dict(v) for k, v in head_params.items()}
    out_dim = head[LAST_LAYER]["weight_v"].shape[-1]
    head[LAST_LAYER]["weight_g"] = np.ones((out_dim,), np.float32)
    return head


def head_from_checkpoint(head: dict, source: str = "") -> dict:
    """A stored head tree -> our trainable tree (drops weight_g, which must be all ones)."""
    head = {k: dict(v) for k, v in head.items()}
    gain = head[LAST_LAYER].pop("weight_g", None)
    if gain is not None and not np.allclose(np.asarray(gain), 1.0, atol=1e-5):
        raise ValueError(f"{source}: DINO head last_layer.weight_g is not all ones "
                         "(trained without norm_last_layer); cannot warm-start a fixed-gain head")
    return head


class MultiCropDINO(nn.Module):
    """Backbone + DINO head over a multi-crop batch.

    Runs the backbone once per crop resolution (all global crops together, all local crops
    together), as DINO's MultiCropWrapper does, then the head once over every CLS feature.
    Input views are sample-major ([B, V, ...], what the data pipeline shards over devices) and
    so are the output logits, [B, V, out_dim] (global views first). The sample axis stays the
    major one all the way through: [B,V,...] -> [B*V,...] keeps the device sharding of B, while
    DINO's view-major order ([V,B,...] -> [V*B,...], torch.cat(crops)) would put the sharded
    axis in the minor half of a merged axis, which SPMD can only serve by gathering the whole
    batch onto every device (each device would then compute every sample).
    ``view_major`` turns the logits into DINO's [V*B, out_dim] layout where a test needs it.
    """

    backbone: ml_collections.ConfigDict
    head_out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    drop_path_rate: float = 0.0
    # Only the CLS output feeds the head, so by default the last block skips the other
    # tokens' attention output, MLP and residual: same CLS values and gradients, ~13% fewer
    # FLOPs. False runs every token through it, as the reference does.
    last_block_cls_only: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        self.vit = build_vit(self.backbone, drop_path_rate=self.drop_path_rate, dtype=self.dtype)
        self.head = DINOHead(self.head_out_dim, self.head_hidden_dim, self.head_bottleneck_dim,
                             self.dtype)

    def features(self, views, train: bool) -> jnp.ndarray:
        """[B, V, *crop] -> [B, V, D] CLS features. Stage 3 views are a dict
        {"x" [B,V,N,F], "coords" [B,V,N,2], "mask" [B,V,N]} of padded region sets."""
        leaf = jax.tree.leaves(views)[0]
        batch, n_views = leaf.shape[:2]

        def sample_major(a):
            return a.reshape((batch * n_views,) + a.shape[2:])  # [B,V,...] -> [B*V,...]
        if isinstance(views, dict):
            cls, _ = self.vit(sample_major(views["x"]).astype(self.dtype), train=train,
                              cls_only=self.last_block_cls_only, coords=sample_major(views["coords"]),
                              key_mask=sample_major(views["mask"]))
        else:
            cls, _ = self.vit(sample_major(views).astype(self.dtype), train=train,
                              cls_only=self.last_block_cls_only)
        return cls.reshape((batch, n_views) + cls.shape[1:])  # [B*V,D] -> [B,V,D]

    def bottleneck(self, global_views, local_views=None, train: bool = False):
        """[B, V, bottleneck_dim]: the head's input to its last layer (see ``DINOHead``),
        global crops first, then local crops (if given)."""
        feats = [self.features(global_views, train)]
        n_local = 0 if local_views is None else jax.tree.leaves(local_views)[0].shape[1]
        if n_local > 0:
            feats.append(self.features(local_views, train))
        return self.head.bottleneck(jnp.concatenate(feats, axis=1))

    def __call__(self, global_views, local_views=None, train: bool = False):
        """Logits [B, V, out_dim]: global crops first, then local crops (if given)."""
        z = self.bottleneck(global_views, local_views, train)
        return self.head.last_layer(z).astype(jnp.float32)


def view_major(logits: jnp.ndarray) -> jnp.ndarray:
    """[B, V, K] -> [V*B, K], DINO's torch.cat(crops) row order (rows v*B..v*B+B-1 = view v)."""
    return jnp.swapaxes(logits, 0, 1).reshape((-1,) + logits.shape[2:])


def build_model(config: ml_collections.ConfigDict, *, student: bool) -> MultiCropDINO:
    """The student (with stochastic depth) or teacher (without) for a pretraining config."""
    dtype = resolve_dtype(config.get("compute_dtype", "auto"))
    return MultiCropDINO(
        backbone=config.model,
        head_out_dim=config.head.out_dim,
        head_hidden_dim=config.head.hidden_dim,
        head_bottleneck_dim=config.head.bottleneck_dim,
        drop_path_rate=config.drop_path_rate if student else 0.0,
        last_block_cls_only=config.last_block_cls_only,
        dtype=dtype,
    )
