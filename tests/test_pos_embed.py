"""Position-embedding interpolation against torch's bicubic resize called with a SCALE FACTOR."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hipt_jax.models.pos_embed import bicubic_weights, interpolate_pos_embed


def torch_interpolate(pos_embed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The reference's interpolate_pos_encoding body (patch size 1)."""
    pe = torch.from_numpy(pos_embed)
    n = pe.shape[1] - 1
    g = int(math.sqrt(n))
    dim = pe.shape[-1]
    out = F.interpolate(pe[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2),
                        scale_factor=((rows + 0.1) / g, (cols + 0.1) / g), mode="bicubic")
    assert out.shape[-2:] == (rows, cols)
    out = out.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pe[:, :1], out], dim=1).numpy()


@pytest.fixture(scope="module")
def table():
    return np.random.default_rng(0).normal(size=(1, 197, 32)).astype(np.float32)


GRIDS = [(16, 16), (6, 6), (4, 5), (5, 4), (1, 1), (2, 13), (13, 13), (15, 15), (20, 7), (32, 32), (3, 28)]


@pytest.mark.parametrize("grid", GRIDS)
def test_matches_torch_scale_factor_bicubic(table, grid):
    got = np.asarray(interpolate_pos_embed(jnp.asarray(table), *grid))
    want = torch_interpolate(table, *grid)
    assert got.shape == (1, 1 + grid[0] * grid[1], 32)
    # torch itself accumulates in fp32: even the float64-exact resize differs from it by up to
    # 5.4e-6 on a 16x16 grid of N(0,1) values, so 1e-5 is fp32 rounding, not a method gap
    # (a wrong method is off by > 0.05, see test_output_size_resize_is_wrong).
    assert np.abs(got - want).max() <= 1e-5


def test_identity_at_stored_grid(table):
    out = interpolate_pos_embed(jnp.asarray(table), 14, 14)
    np.testing.assert_array_equal(np.asarray(out), table)


def test_cls_row_kept_and_rows_sum_to_one(table):
    out = np.asarray(interpolate_pos_embed(jnp.asarray(table), 16, 16))
    np.testing.assert_array_equal(out[:, 0], table[:, 0])
    np.testing.assert_allclose(bicubic_weights(14, 16).sum(axis=1), 1.0, atol=1e-6)


def test_output_size_resize_is_wrong(table):
    """Guard the trap: resizing by OUTPUT SIZE (jax.image.resize) differs by ~0.1 on N(0,1)."""
    want = torch_interpolate(table, 16, 16)[0, 1:].reshape(16, 16, -1)
    naive = jax.image.resize(jnp.asarray(table[0, 1:].reshape(14, 14, -1)), (16, 16, 32), "bicubic")
    assert np.abs(np.asarray(naive) - want).max() > 0.05


def test_jittable_and_rejects_non_square_table():
    f = jax.jit(interpolate_pos_embed, static_argnums=(1, 2))
    assert f(jnp.zeros((1, 197, 4)), 4, 5).shape == (1, 21, 4)
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(jnp.zeros((1, 11, 4)), 4, 4)
