"""HIPT-LGP: forward parity with the torch reference, padding/mask invariance, importer errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor")

from hipt_jax.models import checkpoint, lgp, torch_io
from tests.reference_torch_lgp import random_lgp


def _import(ref):
    variables, info = torch_io.import_lgp_state_dict(ref.state_dict())
    return variables, info


@pytest.mark.parametrize("local_arch,m", [("vit4k_tiny", 7), ("vit4k", 3)])
def test_forward_parity_with_torch_reference_eval_mode(local_arch, m):
    torch.manual_seed(0)
    ref = random_lgp(n_classes=4, local_arch=local_arch, seed=1)
    x = torch.randn(m, 256, 384)
    with torch.no_grad():
        logits_ref, _, _, attn_ref = ref(x)
    variables, info = _import(ref)
    model = lgp.HIPTLGP(n_classes=info["n_classes"], local_arch=local_arch)
    checkpoint.check_params(variables["params"], "hipt_lgp", lgp.lgp_arch(model), "imported")
    logits, aux = jax.jit(model.apply)(variables, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(logits), logits_ref[0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(aux["attention"]), attn_ref[0].numpy(), atol=1e-5, rtol=0)


def test_padded_masked_forward_equals_unpadded():
    model = lgp.HIPTLGP(n_classes=2, local_arch="vit4k_tiny")
    variables = lgp.init_lgp(model, seed=2, grid=2)
    x = np.random.default_rng(0).normal(size=(5, 4, 384)).astype(np.float32)  # 2x2 grids
    apply = jax.jit(model.apply)
    logits, aux = apply(variables, x)
    padded, mask = lgp.pad_to_bucket(x)
    assert padded.shape[0] == 8 and mask.sum() == 5
    padded[5:] = 3.0  # garbage in padding must not leak
    logits_p, aux_p = apply(variables, padded, mask)
    np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux_p["attention"][:5]), np.asarray(aux["attention"]), atol=1e-6)
    assert np.all(np.asarray(aux_p["attention"][5:]) == 0)


def test_training_mode_dropout_is_active_and_frozen_local_gets_no_gradient():
    model = lgp.HIPTLGP(n_classes=2, local_arch="vit4k_tiny", freeze_local=True)
    variables = lgp.init_lgp(model, grid=2)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4, 384)), jnp.float32)  # 2x2 grids

    def loss(params, key):
        logits, _ = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
        return logits.sum()

    g = jax.jit(jax.grad(loss))(variables["params"], jax.random.PRNGKey(0))
    assert all(float(jnp.abs(t).max()) == 0 for t in jax.tree.leaves(g["local_vit"]))
    assert float(jnp.abs(g["classifier"]["kernel"]).max()) > 0
    jloss = jax.jit(loss)
    a = jloss(variables["params"], jax.random.PRNGKey(0))
    b = jloss(variables["params"], jax.random.PRNGKey(1))
    assert a != b  # dropout differs between keys
    # (freeze_local=False: its training step is held to torch in tests/test_parity_lgp_train.py.)


def test_local_then_aggregate_equals_full_forward():
    model = lgp.HIPTLGP(n_classes=2, local_arch="vit4k_tiny")
    variables = lgp.init_lgp(model, seed=3, grid=2)
    x = np.random.default_rng(2).normal(size=(6, 4, 384)).astype(np.float32)
    h = jax.jit(lambda v, x: model.apply(v, x, method=lgp.HIPTLGP.local))(variables, x)
    logits_a, _ = jax.jit(lambda v, h: model.apply(v, h, method=lgp.HIPTLGP.aggregate))(variables, h)
    logits_b, _ = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), atol=1e-6)


def test_importer_reports_missing_and_unexpected_keys():
    sd = random_lgp(n_classes=2, local_arch="vit4k_tiny").state_dict()
    broken = dict(sd)
    del broken["classifier.bias"]
    with pytest.raises(ValueError, match="missing keys.*classifier.bias"):
        torch_io.import_lgp_state_dict(broken)
    extra = dict(sd, **{"global_vit.cls_token": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys.*global_vit"):
        torch_io.import_lgp_state_dict(extra)
    variables, info = torch_io.import_lgp_state_dict({"module." + k: v for k, v in sd.items()})
    with pytest.raises(ValueError, match="do not match"):
        checkpoint.check_params(variables["params"], "hipt_lgp",
                                lgp.lgp_arch(lgp.HIPTLGP(n_classes=3, local_arch="vit4k_tiny")), "imported")


def test_bucket_lengths():
    assert [lgp.bucket_length(m) for m in (1, 8, 9, 100, 4096, 5000)] == [8, 8, 16, 128, 4096, 8192]
