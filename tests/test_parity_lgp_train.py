"""HIPT-LGP in training mode (dropout 0.25 everywhere the reference has it) against the torch
reference under the SAME dropout masks, with the ViT-4K unfrozen (the official default):
classification (cross-entropy) and survival (MCAT's NLL, alpha 0.15) losses and the gradients of
every parameter, the local ViT-4K's included.

Masks: our Flax Dropout calls are intercepted (flax.linen.intercept_methods) and given masks
drawn here, recorded in call order; the torch side runs the reference's modules with the
documented TransformerEncoderLayer (post-norm) algorithm written out so that the attention-weight
dropout, which torch applies inside its fused attention, can take the same mask.

Plant run: the gated attention's dropout moved inside the tanh (tanh(dropout(x)) instead of
dropout(tanh(x))) fails the survival case. (A frozen ViT-4K fails the non-zero local-gradient
check by construction.)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hipt_jax.finetune import survival
from hipt_jax.models import lgp, torch_io
from tests.reference_torch_lgp import random_lgp

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor")
RATE, M = 0.25, 3


class _Masks:
    """Draws a keep mask per Flax Dropout call (interceptor), replays them for torch."""

    def __init__(self, seed):
        self.rng, self.masks, self.pos = np.random.default_rng(seed), [], 0

    def interceptor(self, next_fun, args, kwargs, context):
        if not (isinstance(context.module, nn.Dropout) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x = args[0]
        det = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
        if det or context.module.rate == 0:
            return x
        mask = (self.rng.random(x.shape) >= context.module.rate).astype(np.float32)
        self.masks.append(mask)
        return x * (jnp.asarray(mask) / (1.0 - context.module.rate))

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.from_numpy(self.masks[self.pos])
        self.pos += 1
        assert mask.numel() == x.numel(), (mask.shape, x.shape)
        mask = mask.reshape(x.shape)  # ours pools to [D], the reference to [1, D]
        return x * mask / (1.0 - RATE)


def _torch_encoder_layer(layer, x, masks):
    """torch TransformerEncoderLayer (post-norm, relu) on x [1, M, D] with explicit dropout."""
    attn = layer.self_attn
    d, heads = x.shape[-1], attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.reshape(1, M, heads, d // heads).transpose(1, 2)  # [1,M,D] -> [1,H,M,hd]
    w = torch.softmax(split(q) @ split(k).transpose(-2, -1) / (d // heads) ** 0.5, dim=-1)
    w = masks.drop(w)  # dropout on the attention weights [1,H,M,M]
    y = (w @ split(v)).transpose(1, 2).reshape(1, M, d)  # [1,H,M,hd] -> [1,M,D]
    x = layer.norm1(x + masks.drop(attn.out_proj(y)))
    ff = layer.linear2(masks.drop(F.relu(layer.linear1(x))))
    return layer.norm2(x + masks.drop(ff))


def _torch_forward(ref, x, masks):
    """HIPT_LGP_FC.forward in training mode with the recorded masks."""
    h = ref.local_vit(x.unfold(1, 16, 16).transpose(1, 2))  # [M,256,384] -> [M,384,16,16]
    h = masks.drop(F.relu(ref.global_phi[0](h)))
    h = h[None]  # [M,D] -> [1,M,D] (our layout; torch's seq-first [M,1,D] is the same values)
    for layer in ref.global_transformer.layers:
        h = _torch_encoder_layer(layer, h, masks)
    h = h[0]
    pool = ref.global_attn_pool
    a = masks.drop(torch.tanh(pool.attention_a[0](h)))
    b = masks.drop(torch.sigmoid(pool.attention_b[0](h)))
    att = torch.softmax(pool.attention_c(a * b).T, dim=1)  # [1,M]
    h_wsi = masks.drop(F.relu(ref.global_rho[0](att @ h)))
    return ref.classifier(h_wsi)  # [1, n_classes]


def _torch_nll(logits, y, c, alpha, eps=1e-7):
    """MCAT's NLLSurvLoss for one patient."""
    h = torch.sigmoid(logits)
    s = torch.cat([torch.ones(1, 1), torch.cumprod(1 - h, dim=1)], dim=1)
    unc = -(1 - c) * (torch.log(s[:, y].clamp(min=eps)) + torch.log(h[:, y].clamp(min=eps)))
    cen = -c * torch.log(s[:, y + 1].clamp(min=eps))
    return ((1 - alpha) * (cen + unc) + alpha * unc).mean()


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_lgp_training_step_matches_torch_under_shared_dropout_masks(task):
    n_classes = 4
    torch.manual_seed(0)
    ref = random_lgp(n_classes=n_classes, local_arch="vit4k_tiny", seed=1).train()
    x = torch.randn(M, 256, 384)
    variables, _ = torch_io.import_lgp_state_dict(ref.state_dict())
    model = lgp.HIPTLGP(n_classes=n_classes, local_arch="vit4k_tiny")
    assert not model.freeze_local  # the official default: the ViT-4K is fine-tuned
    y, c, alpha = 2, 0.0, 0.15

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, jnp.asarray(x.numpy()), train=True,
                                rngs={"dropout": jax.random.key(0)})
        if task == "survival":
            return survival.nll_survival_loss(logits[None], jnp.array([y]), jnp.array([c > 0]), alpha)
        return -jax.nn.log_softmax(logits)[y]

    masks = _Masks(seed=3)
    with nn.intercept_methods(masks.interceptor):
        # Traced once inside the interceptor: the masks become constants of the program.
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    assert len(masks.masks) == 1 + 2 * 4 + 3  # phi, 2 x (attn, res, ff, res), a, b, rho
    assert min(m.mean() for m in masks.masks) < 0.9  # the masks drop

    logits_t = _torch_forward(ref, x, masks)
    assert masks.pos == len(masks.masks)
    loss_t = (_torch_nll(logits_t, y, c, alpha) if task == "survival"
              else F.cross_entropy(logits_t, torch.tensor([y])))
    loss_t.backward()
    np.testing.assert_allclose(float(loss), loss_t.item(), rtol=1e-5)
    want = torch_io.import_lgp_state_dict(
        {k: p.grad for k, p in ref.named_parameters()} | {k: b for k, b in ref.named_buffers()})[0]["params"]
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    checked = 0
    for path, have in jax.tree_util.tree_flatten_with_path(grads)[0]:
        w = np.asarray(flat_want[path])
        scale = np.abs(w).max()
        np.testing.assert_allclose(np.asarray(have), w, atol=1e-4 * scale + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))
        checked += 1
    local = jax.tree.leaves(grads["local_vit"])
    assert checked > 20 and max(float(jnp.abs(g).max()) for g in local) > 1e-6
