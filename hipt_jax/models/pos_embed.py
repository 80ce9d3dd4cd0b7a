"""Position-embedding interpolation that matches the reference bit-for-bit in spirit.

The released checkpoints store a 14x14 (+CLS) table because DINO trained on 224 px crops.
The reference resizes it with ``torch.nn.functional.interpolate(mode="bicubic")`` called with a
SCALE FACTOR ((R + 0.1) / 14, (C + 0.1) / 14), not an output size. The scale factor changes the
source coordinates (s = (d + 0.5) / scale - 0.5, with 1/scale != 14/R), so any "cleaner" resize
(by output size, ``jax.image.resize``) is off by 0.09-0.3. We rebuild PyTorch's separable cubic
convolution as two small [out, 14] weight matrices computed on the host (grid sizes are static),
and apply them with one einsum on device.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

# PyTorch's cubic-convolution constant (Keys' kernel with A = -0.75).
_CUBIC_A = -0.75


def _cubic_near(x: np.ndarray) -> np.ndarray:
    """Kernel for |x| <= 1 (PyTorch's cubic_convolution1)."""
    a = _CUBIC_A
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: np.ndarray) -> np.ndarray:
    """Kernel for 1 < |x| < 2 (PyTorch's cubic_convolution2)."""
    a = _CUBIC_A
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


@functools.lru_cache(maxsize=None)
def bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix equal to PyTorch's 1-D bicubic resize with
    scale_factor = (out_size + 0.1) / in_size, align_corners=False, no antialias.

    Border taps are clamped to [0, in_size - 1], so their weights accumulate on the edge rows.
    """
    # PyTorch stores 1/scale_factor as float32 and computes source indices in float32.
    inv_scale = np.float32(1.0 / ((out_size + 0.1) / in_size))
    dst = np.arange(out_size, dtype=np.float32)
    src = inv_scale * (dst + np.float32(0.5)) - np.float32(0.5)
    # guard_index_and_lambda: index clamped to the last row, lambda to [0, 1].
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - idx.astype(np.float32), 0.0, 1.0).astype(np.float32)
    coeffs = np.stack(
        [_cubic_far(t + 1.0), _cubic_near(t), _cubic_near(1.0 - t), _cubic_far(2.0 - t)], axis=1
    ).astype(np.float32)  # [out, 4]
    weights = np.zeros((out_size, in_size), np.float32)
    for tap in range(4):
        cols = np.clip(idx - 1 + tap, 0, in_size - 1)
        np.add.at(weights, (np.arange(out_size), cols), coeffs[:, tap])
    return weights


def interpolate_pos_embed(pos_embed: jnp.ndarray, rows: int, cols: int) -> jnp.ndarray:
    """Resize a stored [1, 1 + G*G, D] table to a rows x cols grid, as the reference does.

    The CLS row is kept as is; no resize happens when the grid already matches the table.
    Returns [1, 1 + rows*cols, D].
    """
    n_stored = pos_embed.shape[1] - 1
    grid = int(round(n_stored**0.5))
    if grid * grid != n_stored:
        raise ValueError(f"pos_embed has {n_stored} patch rows, not a square grid")
    if rows == grid and cols == grid:
        return pos_embed
    cls_pos = pos_embed[:, :1]
    # [1, G*G, D] -> [G, G, D]: stored row-major, like the tokens.
    table = pos_embed[0, 1:].reshape(grid, grid, -1)
    w_rows = jnp.asarray(bicubic_weights(grid, rows))  # [rows, G]
    w_cols = jnp.asarray(bicubic_weights(grid, cols))  # [cols, G]
    resized = jnp.einsum(
        "rh,hwd,cw->rcd", w_rows, table.astype(jnp.float32), w_cols,
        precision="highest",
    ).astype(pos_embed.dtype)
    # [rows, cols, D] -> [1, rows*cols, D], row-major like the token order.
    resized = resized.reshape(1, rows * cols, -1)
    return jnp.concatenate([cls_pos, resized], axis=1)


def sincos_2d(grid_rc: jnp.ndarray, width: int, temperature: float = 10000.0) -> jnp.ndarray:
    """Fixed 2D sine-cosine position codes of grid cells, for any grid shape and size.

    ``grid_rc`` [..., 2] (row, column) cell indices (int or float) -> [..., width] float32:
    the first half of the channels encodes the row, the second half the column, each as
    [sin(p * w_k), cos(p * w_k)] with w_k = temperature^(-k / (width/4)), k < width/4 (the
    2D layout MAE and ViT-WSI-style slide models use). No parameters: a slide of 3 x 200
    regions and one of 40 x 40 get codes from the same function.
    """
    if width % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / temperature ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)  # [W/4]
    pos = grid_rc.astype(jnp.float32)
    # [..., 1] * [W/4] -> [..., W/4] per axis; then [sin | cos] of the row, [sin | cos] of the col.
    rows = pos[..., 0:1] * omega
    cols = pos[..., 1:2] * omega
    return jnp.concatenate([jnp.sin(rows), jnp.cos(rows), jnp.sin(cols), jnp.cos(cols)], axis=-1)
