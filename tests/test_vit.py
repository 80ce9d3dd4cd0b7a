"""The Flax ViT against the PyTorch reference (ViT-256, ViT-4K, HIPT4K): CLS, tokens, attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hipt_jax.models.torch_io import reference_to_variables
from hipt_jax.models.archs import build_vit, dummy_input, get_arch
from hipt_jax.models.vit import Block, DropPath, gelu_exact
from tests import reference_torch as ref

CLS_TOL = 2e-5   # acceptance: max abs error on CLS outputs (fp32)
ATTN_TOL = 1e-4  # acceptance: max abs error on last-layer attention


def converted(model: torch.nn.Module) -> dict:
    return reference_to_variables({k: v.numpy() for k, v in model.state_dict().items()})


@pytest.fixture(scope="module")
def vit256():
    model = ref.random_init_(ref.build_reference("vit256"), seed=1)
    return model, converted(model)


@pytest.fixture(scope="module")
def vit4k():
    model = ref.random_init_(ref.build_reference("vit4k"), seed=2)
    return model, converted(model)


def run_both(model, variables, arch, x_nchw):
    with torch.no_grad():
        t_tokens = model.forward_tokens(x_nchw).numpy()
        t_attn = model.get_last_selfattention(x_nchw).numpy()
    cls, aux = jax.jit(build_vit(get_arch(arch)).apply)(variables, jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1)))
    return t_tokens, t_attn, np.asarray(cls), {k: np.asarray(v) for k, v in aux.items()}


@pytest.mark.parametrize("side", [256, 224])
def test_vit256_parity(vit256, side):
    model, variables = vit256
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
    t_tokens, t_attn, cls, aux = run_both(model, variables, "vit256", x)
    n = (side // 16) ** 2
    assert cls.shape == (2, 384) and aux["tokens"].shape == (2, 1 + n, 384)
    assert aux["attention"].shape == (2, 6, 1 + n, 1 + n)
    assert np.abs(cls - t_tokens[:, 0]).max() <= CLS_TOL
    assert np.abs(aux["tokens"] - t_tokens).max() <= 1e-4
    assert np.abs(aux["attention"] - t_attn).max() <= ATTN_TOL
    # The reference's one-pass helper (used by the HIPT_4K oracle) is the same computation.
    with torch.no_grad():
        one_cls, one_attn = model.forward_with_attention(x)
    np.testing.assert_array_equal(one_cls.numpy(), t_tokens[:, 0])
    np.testing.assert_array_equal(one_attn.numpy(), t_attn)
    # Random weights must give non-trivial attention, else the tolerance proves nothing.
    assert t_attn.max() > 5 * t_attn.mean()


@pytest.mark.parametrize("grid", [(16, 16), (14, 14), (6, 6), (4, 5)])
def test_vit4k_parity(vit4k, grid):
    model, variables = vit4k
    rows, cols = grid
    x = torch.randn(2, 384, rows, cols, generator=torch.Generator().manual_seed(rows * 100 + cols))
    t_tokens, t_attn, cls, aux = run_both(model, variables, "vit4k", x)
    assert cls.shape == (2, 192) and aux["attention"].shape == (2, 6, 1 + rows * cols, 1 + rows * cols)
    assert np.abs(cls - t_tokens[:, 0]).max() <= CLS_TOL
    assert np.abs(aux["tokens"] - t_tokens).max() <= 1e-4
    assert np.abs(aux["attention"] - t_attn).max() <= ATTN_TOL


def test_non_square_grid_is_row_major(vit4k):
    """A 4x5 grid and its transpose 5x4 are different inputs: no hidden transpose anywhere."""
    _, variables = vit4k
    x = np.random.default_rng(0).normal(size=(1, 4, 5, 384)).astype(np.float32)
    apply = build_vit(get_arch("vit4k")).apply
    a, _ = apply(variables, x)
    b, _ = apply(variables, x.transpose(0, 2, 1, 3))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_param_counts():
    for arch, count in (("vit256", 21_665_664), ("vit4k", 2_781_504)):
        config = get_arch(arch)
        shapes = jax.eval_shape(build_vit(config).init, jax.random.PRNGKey(0), dummy_input(config))
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count


def test_gelu_is_exact_erf():
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(gelu_exact(jnp.asarray(x))), want, atol=1e-6, rtol=0)
    tanh_approx = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True))
    assert np.abs(tanh_approx - want).max() > 1e-4  # the trap this guards against


def test_post_norm_block_matches_torch_encoder_layer():
    """Block(pre_norm=False, relu, eps 1e-5) is torch's TransformerEncoderLayer (slide level)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(192, 3, 192, dropout=0.0, activation="relu", batch_first=True).eval()
    sd = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
    params = {
        "attn": {"qkv": {"kernel": sd["self_attn.in_proj_weight"].T, "bias": sd["self_attn.in_proj_bias"]},
                 "proj": {"kernel": sd["self_attn.out_proj.weight"].T, "bias": sd["self_attn.out_proj.bias"]}},
        "mlp": {"fc1": {"kernel": sd["linear1.weight"].T, "bias": sd["linear1.bias"]},
                "fc2": {"kernel": sd["linear2.weight"].T, "bias": sd["linear2.bias"]}},
        "norm1": {"scale": sd["norm1.weight"], "bias": sd["norm1.bias"]},
        "norm2": {"scale": sd["norm2.weight"], "bias": sd["norm2.bias"]},
    }
    x = torch.randn(2, 7, 192)
    with torch.no_grad():
        want = layer(x).numpy()
    block = Block(num_heads=3, mlp_dim=192, pre_norm=False, activation="relu", ln_eps=1e-5)
    got, _ = block.apply({"params": params}, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_drop_path_only_in_training():
    x = jnp.ones((64, 5, 8))
    same = DropPath(0.5).apply({}, x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(x))
    out = np.asarray(DropPath(0.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}))
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}           # whole samples dropped, survivors x2
    assert (per_sample == per_sample[:, :1]).all()
    assert 10 < (per_sample[:, 0] == 0).sum() < 54


def test_bf16_compute_close_to_fp32(vit256):
    _, variables = vit256
    x = np.random.default_rng(0).normal(size=(1, 256, 256, 3)).astype(np.float32)
    config = get_arch("vit256")
    f32, _ = build_vit(config).apply(variables, x)
    b16, aux = build_vit(config, dtype=jnp.bfloat16).apply(variables, x)
    assert b16.dtype == jnp.bfloat16 and aux["attention"].dtype == jnp.float32
    err = np.abs(np.asarray(b16, np.float32) - np.asarray(f32)).max()
    assert 0 < err < 0.25, err


def test_cls_only_last_block_is_the_same_computation(vit256, vit4k):
    """cls_only (used by HIPT4K) prunes the last block to the CLS query: same CLS and CLS row."""
    for (_, variables), arch, x in (
        (vit256, "vit256", np.random.default_rng(1).normal(size=(1, 256, 256, 3)).astype(np.float32)),
        (vit4k, "vit4k", np.random.default_rng(2).normal(size=(2, 4, 5, 384)).astype(np.float32)),
    ):
        module = build_vit(get_arch(arch))
        full_cls, full = module.apply(variables, x)
        cls, aux = module.apply(variables, x, cls_only=True)
        assert aux["tokens"].shape == (x.shape[0], 1, full_cls.shape[-1])
        assert aux["attention"].shape == full["attention"][:, :, :1].shape
        np.testing.assert_allclose(np.asarray(cls), np.asarray(full_cls), atol=2e-6, rtol=0)
        np.testing.assert_allclose(np.asarray(aux["attention"]), np.asarray(full["attention"][:, :, :1]),
                                   atol=1e-7, rtol=0)
