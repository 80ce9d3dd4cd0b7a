"""One Vision Transformer definition for every HIPT scale.

ViT-256 (pixels -> 16 px tokens), ViT-4K (384-d patch features -> region) and the slide-level
aggregator differ only by configuration: the stem, the width/depth, pre- or post-norm blocks.
Parameter names follow the reference's state-dict names (``blocks_3/attn/qkv``,
``patch_embed/proj``, ``phi``) so that conversion is a rename plus a transpose.

Every module returns ``(out, aux)``; aux carries what heatmaps and analysis need (all tokens
after the final norm, the last block's softmax attention).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from hipt_jax.models.pos_embed import interpolate_pos_embed, sincos_2d

Dtype = Any



def reference_trunc_normal(stddev: float = 0.02, bound: float = 2.0):
    """The reference's ``trunc_normal_(std=0.02)``: a normal of std ``stddev`` truncated at
    +-``bound`` in ABSOLUTE units (torch's a=-2, b=2), i.e. at 100 sigma for std 0.02: in
    effect an untruncated normal (measured std 0.0200). Flax's ``truncated_normal(0.02)`` cuts
    at +-2 sigma instead and gives std 0.0176."""
    def init(key, shape, dtype=jnp.float32):
        x = stddev * jax.random.normal(key, shape, jnp.float32)
        return jnp.clip(x, -bound, bound).astype(dtype)
    return init


# Reference init: trunc_normal_(std=0.02) for kernels, pos-embed and CLS; zero biases.
_kernel_init = reference_trunc_normal(0.02)


def gelu_exact(x: jnp.ndarray) -> jnp.ndarray:
    """Exact erf GELU, 0.5 x (1 + erf(x / sqrt 2)), written as torch.nn.GELU() computes it.

    Flax's default is the tanh approximation, and ``nn.gelu(approximate=False)`` goes
    through erfc, which XLA:CPU evaluates more slowly and does not fuse into the preceding
    matmul as it does erf. Same values to fp32 rounding (where 1 + erf underflows, GELU is
    below 1e-7 |x|).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))  # 1/sqrt(2)


_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu": gelu_exact,
    "relu": nn.relu,
}


def _dense(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, kernel_init=_kernel_init,
        bias_init=nn.initializers.zeros, name=name,
    )


class DropPath(nn.Module):
    """Stochastic depth per sample (DINO's drop_path): zero a sample's residual branch with
    probability ``rate`` and rescale survivors by 1 / (1 - rate)."""

    rate: float

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, mask_shape)
        # One multiply by 0 or 1/keep (torch: x.div(keep) * mask), cheaper than a select.
        return x * (mask.astype(x.dtype) * (1.0 / keep))


class QKV(nn.Module):
    """The fused qkv Linear (params ``kernel`` [D, 3D], ``bias`` [3D], laid out [q | k | v],
    each head-major, as timm's Attention and torch's MultiheadAttention in_proj store it),
    applied as three projections of width D.

    Same parameters and values as one [D, 3D] Dense, but the gradient with respect to the
    input is then a sum of three matmuls instead of one over a concatenation of dq, dk, dv,
    and no [B,N,3,H,hd] activation is transposed: the attention sub-layer's forward and
    backward take about a third less time on XLA:CPU. ``x_q`` (default ``x``) are the
    tokens that need queries.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, x_q=None):
        width = x.shape[-1]
        kernel = self.param("kernel", _kernel_init, (width, 3 * width))
        bias = self.param("bias", nn.initializers.zeros, (3 * width,))
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        x = x.astype(self.dtype)
        x_q = x if x_q is None else x_q.astype(self.dtype)

        def project(inputs, i):  # [B,N,D] @ [D,D] + [D]: slice i of [q | k | v]
            return inputs @ kernel[:, i * width:(i + 1) * width] + bias[i * width:(i + 1) * width]

        return project(x_q, 0), project(x, 1), project(x, 2)


def attention_weights(q, k, key_mask=None, scale=None):
    """Softmax attention weights, heads first: q [B,Nq,H,hd], k [B,N,H,hd], key_mask [B,N]
    (True = real token) -> [B,H,Nq,N] in fp32 (logits and softmax in fp32 under any compute
    dtype: the weights feed heatmaps and pooling)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # [B,N,H,hd] -> [B,H,N,hd]: each product is then one batched matmul over (B,H) with
    # contiguous operands, which XLA:CPU fuses with the softmax into one YNNPACK kernel.
    qh, kh = (einops.rearrange(t, "b n h d -> b h n d") for t in (q, k))
    # padded keys get no weight: [B,N] -> [B,1,1,N] over (heads, queries)
    keep = None if key_mask is None else key_mask[:, None, None, :]
    return _heads_first_weights(qh, kh, keep, scale)


def _heads_first_weights(qh, kh, keep, scale):
    """qh [B,H,Nq,hd], kh [B,H,N,hd], keep None or bool [B,1,1,N] -> softmax weights [B,H,Nq,N]
    in fp32."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh * jnp.asarray(scale, qh.dtype), kh,
                        preferred_element_type=jnp.float32)  # [B,H,Nq,N]
    if keep is not None:
        logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
    return jax.nn.softmax(logits, axis=-1)


def attend(weights, v):
    """weights [B,H,Nq,N], v [B,N,H,hd] -> [B,Nq,H,hd] (in v's dtype)."""
    vh = einops.rearrange(v, "b n h d -> b h n d")  # [B,N,H,hd] -> [B,H,N,hd]
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(vh.dtype), vh)
    return einops.rearrange(out, "b h n d -> b n h d")  # [B,H,Nq,hd] -> [B,Nq,H,hd]


def _xla_dot_product_attention(q, k, v, key_mask=None, scale=None):
    """``jax.nn.dot_product_attention`` on [B,N,H,hd] tensors (the GPU/TPU path; jax picks the
    implementation: XLA's in jax 0.10, cuDNN's only when asked for explicitly)."""
    # key_mask [B,N] -> [B,1,1,N] over (heads, queries); softmax in fp32 inside.
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def _cpu_attention(q, k, v, key_mask=None, scale=None):
    """The same arithmetic as ``_xla_dot_product_attention``, heads first (see ``fused_attention``),
    with the backward written out (``_heads_first_core``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # [B,N,H,hd] -> [B,H,N,hd] (see attention_weights)
    qh, kh, vh = (einops.rearrange(t, "b n h d -> b h n d") for t in (q, k, v))
    # key_mask [B,N] -> [B,1,1,N] over (heads, queries), as a float: it gets a (zero) cotangent
    keep = (jnp.zeros((), jnp.float32) if key_mask is None
            else key_mask[:, None, None, :].astype(jnp.float32))
    out = _heads_first_core(qh, kh, vh, keep, float(scale), key_mask is not None)
    return einops.rearrange(out, "b h n d -> b n h d")  # [B,H,Nq,hd] -> [B,Nq,H,hd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _heads_first_core(qh, kh, vh, keep, scale, masked):
    """softmax(q k^T * scale) v on [B,H,N,hd] tensors, softmax in fp32; ``masked``: only keys
    where keep [B,1,1,N] > 0 (else ``keep`` is unused)."""
    return _heads_first_core_fwd(qh, kh, vh, keep, scale, masked)[0]


def _heads_first_core_fwd(qh, kh, vh, keep, scale, masked):
    weights = _heads_first_weights(qh, kh, keep > 0 if masked else None, scale)  # [B,H,Nq,N]
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(vh.dtype), vh)  # [B,H,Nq,hd]
    return out, (qh, kh, vh, keep, weights, out)


def _heads_first_core_bwd(scale, masked, residuals, d_out):
    """The softmax backward as flash attention writes it: d logits = P * (dP - rowsum(dO * O)).
    rowsum(dO * O) equals autodiff's rowsum(dP * P) (O = P V) but reads [B,H,Nq,hd] instead of
    a second [B,H,Nq,N] map; on XLA:CPU, where these maps' memory traffic is most of the cost,
    this and the fixed product layouts made the attention layer's forward + backward 0-20%
    faster than autodiff of the same forward on a 2-core EPYC (most at the ViT-4K region shape;
    BENCHMARKS.md). Masked keys have P = 0, so they get no gradient."""
    qh, kh, vh, keep, weights, out = residuals
    d_v = jnp.einsum("bhqk,bhqd->bhkd", weights.astype(vh.dtype), d_out)         # [B,H,N,hd]
    d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out, vh, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits = (weights * (d_weights - row)).astype(qh.dtype)                     # [B,H,Nq,N]
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, kh) * jnp.asarray(scale, qh.dtype)
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, qh * jnp.asarray(scale, qh.dtype))
    return d_q, d_k, d_v, jnp.zeros_like(keep)


_heads_first_core.defvjp(_heads_first_core_fwd, _heads_first_core_bwd)


_ACCELERATOR_LOWERING = {"forced": False}


@contextlib.contextmanager
def accelerator_attention():
    """Programs traced inside use ``jax.nn.dot_product_attention`` on every platform, CPU
    included: memory plans for GPUs and TPUs are compiled by XLA:CPU and must hold the
    program those devices would run."""
    before = _ACCELERATOR_LOWERING["forced"]
    _ACCELERATOR_LOWERING["forced"] = True
    try:
        yield
    finally:
        _ACCELERATOR_LOWERING["forced"] = before


def fused_attention(q, k, v, key_mask=None, scale=None):
    """Attention without its weights: ``jax.nn.dot_product_attention`` on GPUs and TPUs; on
    CPUs the same arithmetic, heads first, with a hand-written backward (``_cpu_attention``).

    Why two lowerings of one op: XLA's ``dot_product_attention`` vmaps over a head-group axis
    (size 1 here); on XLA:CPU that degenerate axis leads layout assignment to materialize the
    transposed [N,N] softmax weights and split the attention into two kernels: the attention
    core 1.2-2.3x slower than the heads-first form, a whole attention layer 1.06-1.62x, the
    ViT-4K backbone's forward + backward 13-16% (BENCHMARKS.md, docs/performance_notes.md).
    ``lax.platform_dependent`` picks the branch when the program is lowered for its platform,
    so a GPU/TPU program is exactly the ``dot_product_attention`` one."""
    if _ACCELERATOR_LOWERING["forced"]:
        return _xla_dot_product_attention(q, k, v, key_mask, scale=scale)
    args = (q, k, v) if key_mask is None else (q, k, v, key_mask)
    return jax.lax.platform_dependent(
        *args, cpu=lambda *a: _cpu_attention(*a, scale=scale),
        default=lambda *a: _xla_dot_product_attention(*a, scale=scale))


class Attention(nn.Module):
    """Multi-head self-attention; its qkv projection is stored fused (see ``QKV``).

    Two paths, same values: when the caller needs the softmax weights (``need_weights`` at
    inference: heatmaps, the last block's CLS row) or dropout acts on them (training with
    ``dropout_rate`` > 0), the explicit heads-first einsum/softmax (``attention_weights``);
    otherwise ``fused_attention``, which is ``jax.nn.dot_product_attention`` on GPUs and TPUs
    and returns no weights (None)."""

    num_heads: int
    dropout_rate: float = 0.0  # on the attention weights (torch MHA's dropout)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None, deterministic=True, cls_only=False, need_weights=True):
        """``cls_only``: queries from token 0 only -> output [B,1,D], attention [B,H,1,N]
        (keys and values still come from all tokens)."""
        width = x.shape[-1]
        head_dim = width // self.num_heads
        q, k, v = QKV(self.dtype, name="qkv")(x, x[:, :1] if cls_only else None)
        # [B,N,D] -> [B,N,H,hd]: channels are head-major, so this is a free reshape.
        q, k, v = (einops.rearrange(t, "b n (h d) -> b n h d", h=self.num_heads) for t in (q, k, v))
        dropout_active = self.dropout_rate > 0.0 and not deterministic
        if (need_weights and deterministic) or dropout_active:
            out, attn = self._explicit(q, k, v, key_mask, deterministic)
        else:
            out, attn = fused_attention(q, k, v, key_mask, scale=head_dim**-0.5), None
        # [B,Nq,H,hd] -> [B,Nq,D]: heads back to head-major channels (a free reshape).
        out = einops.rearrange(out, "b n h d -> b n (h d)")
        return _dense(width, "proj", self.dtype)(out), attn

    def _explicit(self, q, k, v, key_mask, deterministic):
        """q [B,Nq,H,hd], k, v [B,N,H,hd] -> (out [B,Nq,H,hd], softmax weights [B,H,Nq,N] fp32).
        The weights are returned before dropout."""
        attn = attention_weights(q, k, key_mask)
        dropped = nn.Dropout(self.dropout_rate)(attn, deterministic=deterministic)
        return attend(dropped, v), attn


class Mlp(nn.Module):
    hidden_dim: int
    activation: str = "gelu"
    dropout_rate: float = 0.0  # after the activation (torch TransformerEncoderLayer.dropout)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        width = x.shape[-1]
        h = _ACTIVATIONS[self.activation](_dense(self.hidden_dim, "fc1", self.dtype)(x))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return _dense(width, "fc2", self.dtype)(h)


class Block(nn.Module):
    """Transformer block. ``pre_norm=True`` is the ViT block (x += f(LN(x)));
    ``pre_norm=False`` is torch's TransformerEncoderLayer default (x = LN(x + f(x)))."""

    num_heads: int
    mlp_dim: int
    pre_norm: bool = True
    activation: str = "gelu"
    ln_eps: float = 1e-6
    dropout_rate: float = 0.0  # residual-branch dropout (post-norm encoder only)
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None, deterministic=True, cls_only=False, need_weights=True):
        """``cls_only`` (pre-norm only): update and return only token 0, [B,1,D]; what every
        token after the LAST block is not needed for (the CLS output and its attention row).
        ``need_weights=False``: attention map None (fused attention, see ``Attention``)."""
        norm1 = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm1")
        norm2 = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm2")
        attn = Attention(self.num_heads, self.dropout_rate, self.dtype, name="attn")
        mlp = Mlp(self.mlp_dim, self.activation, self.dropout_rate, self.dtype, name="mlp")
        drop_path = DropPath(self.drop_path)
        dropout = nn.Dropout(self.dropout_rate)
        if self.pre_norm:
            y, attn_map = attn(norm1(x), key_mask, deterministic, cls_only, need_weights)
            x = (x[:, :1] if cls_only else x) + drop_path(y, deterministic)
            x = x + drop_path(mlp(norm2(x), deterministic), deterministic)
        else:
            if cls_only:
                raise ValueError("cls_only is implemented for pre-norm blocks only")
            y, attn_map = attn(x, key_mask, deterministic, need_weights=need_weights)
            x = norm1(x + dropout(y, deterministic=deterministic))
            x = norm2(x + dropout(mlp(x, deterministic), deterministic=deterministic))
        return x, attn_map


class Encoder(nn.Module):
    """A stack of blocks; stochastic depth grows linearly from 0 to ``drop_path_rate``.
    Returns (tokens, last block's attention [B, heads, N, N])."""

    depth: int
    num_heads: int
    mlp_dim: int
    pre_norm: bool = True
    activation: str = "gelu"
    ln_eps: float = 1e-6
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None, deterministic=True, cls_only=False, need_weights=True):
        """``cls_only``: the last block computes token 0 only (tokens out [B,1,D], attention
        [B,H,1,N]); ~7% fewer FLOPs for ViT-256 when only the CLS output is wanted.
        Only the last block's weights are ever returned (at inference, with ``need_weights``):
        every other block takes the fused attention path."""
        attn_map = None
        for i in range(self.depth):
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x, attn_map = Block(
                self.num_heads, self.mlp_dim, self.pre_norm, self.activation, self.ln_eps,
                self.dropout_rate, rate, self.dtype, name=f"blocks_{i}",
            )(x, key_mask, deterministic, cls_only and i == self.depth - 1,
              need_weights and i == self.depth - 1)
        return x, attn_map


class PixelStem(nn.Module):
    """16x16/16 conv patch embedding, computed as one matmul over unfolded patches
    (faster than a strided conv on CPU XLA). The kernel keeps nn.Conv's HWIO layout."""

    width: int
    patch_size: int = 16
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        batch, height, width, chans = images.shape
        rows, cols = height // p, width // p
        kernel = self.param("kernel", _kernel_init, (p, p, chans, self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,))
        # The reference's conv drops any remainder past the last full patch.
        images = images[:, : rows * p, : cols * p]
        # [B,R*p,C*p,3] -> [B,R,C,p*p*3] in (kh, kw, cin) order, matching HWIO flattening.
        patches = images.reshape(batch, rows, p, cols, p, chans).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, rows, cols, p * p * chans).astype(self.dtype)
        flat_kernel = kernel.reshape(p * p * chans, self.width).astype(self.dtype)
        return patches @ flat_kernel + bias.astype(self.dtype)  # [B,R,C,D]


class FeatureStem(nn.Module):
    """ViT-4K's "phi": Linear(in -> width) + exact GELU (+ dropout 0 in the reference)."""

    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, grid):
        return gelu_exact(_dense(self.width, "dense", self.dtype)(grid))  # [B,R,C,D]


class RegionStem(nn.Module):
    """The slide-level (ViT-WSI) stem: Linear(in -> width) + activation per region embedding.
    With ReLU it is HIPT-LGP's global ``phi`` (Linear + ReLU), so a stage-3 export can start
    that model's global transformer (hipt_jax.models.lgp.with_pretrained_global)."""

    width: int
    activation: str = "relu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, regions):
        return _ACTIVATIONS[self.activation](_dense(self.width, "dense", self.dtype)(regions))  # [B,M,D]


class VisionTransformer(nn.Module):
    """HIPT's ViT at any scale.

    Input: ``stem="pixels"``: normalized images [B,H,W,3] (H, W multiples of patch_size);
    ``stem="features"``: feature grids [B,R,C,F] (R x C tokens, row-major);
    ``stem="regions"`` (stage 3, ViT-WSI): a slide's region embeddings [B,M,F] in any order,
    with ``coords`` [B,M,2] their (row, column) on the slide's region grid (2D sin-cos
    position codes, any grid shape) and ``key_mask`` [B,M] True for real regions (padding to a
    bucket length leaves the real tokens' outputs unchanged). Without ``coords`` the regions are
    taken as one row (0, 0..M-1), which only ``init`` should rely on.
    Returns ``(cls, aux)``: cls [B,D] after the final norm; aux["tokens"] [B,1+R*C,D] after the
    final norm; aux["attention"] [B,heads,1+R*C,1+R*C] softmax of the last block.
    """

    stem: str = "pixels"
    patch_size: int = 16
    width: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    pos_embed_grid: int = 14
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    # Block style; the defaults are the ViT-256/4K ones. ViT-WSI uses HIPT-LGP's global layers
    # (post-norm, ReLU, eps 1e-5), see archs.vitwsi.
    pre_norm: bool = True
    activation: str = "gelu"
    ln_eps: float = 1e-6

    @nn.compact
    def __call__(self, x, train: bool = False, cls_only: bool = False, coords=None, key_mask=None):
        """``cls_only=True`` skips the last block's work for non-CLS tokens: same CLS output,
        aux["tokens"] is then [B,1,D] and aux["attention"] [B,heads,1,1+N] (the CLS row)."""
        if self.stem == "regions":
            return self._regions(x, coords, key_mask, train, cls_only)
        if self.stem == "pixels":
            grid = PixelStem(self.width, self.patch_size, self.dtype, name="patch_embed")(x)
        elif self.stem == "features":
            grid = FeatureStem(self.width, self.dtype, name="phi")(x)
        else:
            raise ValueError(f"unknown stem {self.stem!r}: expected 'pixels', 'features' or 'regions'")
        batch, rows, cols, width = grid.shape
        # [B,R,C,D] -> [B,R*C,D]: row-major tokens, token i*C+j is grid cell (i, j).
        tokens = grid.reshape(batch, rows * cols, width)
        cls_token = self.param("cls_token", _kernel_init, (1, 1, width))
        n_pos = self.pos_embed_grid**2 + 1
        pos_embed = self.param("pos_embed", _kernel_init, (1, n_pos, width))
        cls = jnp.broadcast_to(cls_token.astype(tokens.dtype), (batch, 1, width))
        tokens = jnp.concatenate([cls, tokens], axis=1)  # [B,1+R*C,D]
        tokens = tokens + interpolate_pos_embed(pos_embed, rows, cols).astype(tokens.dtype)
        return self._encode(tokens, None, train, cls_only)

    def _encode(self, tokens, key_mask, train, cls_only):
        """[B,1+N,D] tokens (CLS first) -> (cls [B,D], aux) through the blocks and final norm."""
        tokens, attn = Encoder(
            self.depth, self.num_heads, self.mlp_dim, pre_norm=self.pre_norm,
            activation=self.activation, ln_eps=self.ln_eps, drop_path_rate=self.drop_path_rate,
            dtype=self.dtype, name="encoder",
        )(tokens, key_mask, deterministic=not train, cls_only=cls_only)
        tokens = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm")(tokens)
        return tokens[:, 0], {"tokens": tokens, "attention": attn}

    def _regions(self, x, coords, key_mask, train, cls_only):
        """Stage-3 tokens: region embeddings + 2D sin-cos of their grid cell, CLS first."""
        batch, n_regions, _ = x.shape
        tokens = RegionStem(self.width, self.activation, self.dtype, name="region_embed")(x)  # [B,M,D]
        if coords is None:
            coords = jnp.stack([jnp.zeros((n_regions,)), jnp.arange(n_regions)], -1)[None]  # [1,M,2]
        tokens = tokens + sincos_2d(coords, self.width).astype(tokens.dtype)
        cls_token = self.param("cls_token", _kernel_init, (1, 1, self.width))
        cls = jnp.broadcast_to(cls_token.astype(tokens.dtype), (batch, 1, self.width))
        tokens = jnp.concatenate([cls, tokens], axis=1)  # [B,1+M,D]
        mask = None
        if key_mask is not None:
            # [B,M] -> [B,1+M]: the CLS token is always a key.
            mask = jnp.concatenate([jnp.ones((batch, 1), bool), key_mask.astype(bool)], axis=1)
        return self._encode(tokens, mask, train, cls_only)
