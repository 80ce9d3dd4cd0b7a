"""Slide-level multiple-instance baselines trained by hipt-finetune next to HIPT-LGP.

A bag is M instance embeddings [M,F] plus a boolean mask [M] (False = padding added to reach a
bucket length). Region-level bags are the ViT-4K CLS per region ([M,192], ``features_cls4k``);
patch-level bags are the ViT-256 CLS per patch ([M*256,384], ``features_cls256`` flattened).

    mean_pool  masked mean of the instances -> Linear (the paper's weakest baseline)
    abmil      Linear+ReLU -> gated attention pooling (Ilse et al., 2018: tanh(V h) * sigm(U h)
               -> w) -> Linear
    clam_sb    CLAM single branch (Lu et al., 2021): Linear+ReLU+dropout -> gated attention ->
               Linear, plus one 2-way instance classifier per class trained on the k most and
               least attended instances (the instance-level clustering loss)

Every model returns (logits [n_classes], aux) with aux["attention"] [M] (0 on padding; uniform
over real instances for mean_pool). Padding never changes the outputs: the attention scores of
padded instances are -inf before the softmax, and the instance loss ignores them.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

MIL_MODELS = ("mean_pool", "abmil", "clam_sb")


def _masked_softmax(scores: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Softmax over the real instances of [M] scores; padded instances get exactly 0."""
    return jax.nn.softmax(jnp.where(mask, scores.astype(jnp.float32), -jnp.inf))


class GatedAttention(nn.Module):
    """tanh(a(h)) * sigmoid(b(h)) -> c: one attention score per instance ([M,L] -> [M])."""

    hidden: int = 256
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, h, train: bool = False):
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        a = drop(jnp.tanh(nn.Dense(self.hidden, name="attention_a")(h)))
        b = drop(nn.sigmoid(nn.Dense(self.hidden, name="attention_b")(h)))
        return nn.Dense(1, name="attention_c")(a * b)[:, 0]  # [M,1] -> [M]


class MeanPool(nn.Module):
    n_classes: int = 2

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False, label=None):
        mask = jnp.ones(x.shape[:1], bool) if mask is None else mask
        weights = mask.astype(jnp.float32) / jnp.maximum(mask.sum(), 1)  # [M]
        pooled = weights @ x.astype(jnp.float32)  # [F]
        return nn.Dense(self.n_classes, name="classifier")(pooled), {"attention": weights}


class ABMIL(nn.Module):
    """Gated attention MIL: h = ReLU(fc(x)); a = softmax(gated(h)); logits = classifier(a @ h)."""

    n_classes: int = 2
    embed: int = 512
    attn_hidden: int = 128
    dropout_rate: float = 0.25

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False, label=None):
        mask = jnp.ones(x.shape[:1], bool) if mask is None else mask
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        h = drop(nn.relu(nn.Dense(self.embed, name="fc")(x)))  # [M,L]
        attn = _masked_softmax(GatedAttention(self.attn_hidden, self.dropout_rate, name="attention")(h, train), mask)
        logits = nn.Dense(self.n_classes, name="classifier")(attn @ h)
        return logits, {"attention": attn}


def _top_k_loss(logits_k: jnp.ndarray, targets: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """Mean cross-entropy of [S,2] instance logits over the valid slots only."""
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits_k), targets[:, None], axis=1)[:, 0]
    return (ce * valid).sum() / jnp.maximum(valid.sum(), 1)


class CLAMSB(nn.Module):
    """Single-branch CLAM. ``label`` (int scalar) turns on the instance loss: aux["instance_loss"].

    For the bag's own class the instance classifier learns the k most attended instances as
    positive and the k least attended as negative; with ``subtyping`` the other classes' instance
    classifiers learn the k most attended as negative. The loss is averaged over classes when
    ``subtyping``. Bags with fewer than k real instances use the ones they have.
    """

    n_classes: int = 2
    embed: int = 512
    attn_hidden: int = 256
    dropout_rate: float = 0.25
    k_sample: int = 8
    subtyping: bool = True

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False, label=None):
        mask = jnp.ones(x.shape[:1], bool) if mask is None else mask
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        h = drop(nn.relu(nn.Dense(self.embed, name="fc")(x)))  # [M,L]
        scores = GatedAttention(self.attn_hidden, self.dropout_rate, name="attention")(h, train)
        attn = _masked_softmax(scores, mask)
        logits = nn.Dense(self.n_classes, name="classifier")(attn @ h)
        inst = [nn.Dense(2, name=f"instance_{c}") for c in range(self.n_classes)]
        aux = {"attention": attn}
        if self.is_initializing():  # create every instance classifier's parameters
            for clf in inst:
                clf(h[:1])
        if label is None:
            return logits, aux
        k = min(self.k_sample, x.shape[0])
        n_real = mask.sum()
        valid = (jnp.arange(k) < n_real).astype(jnp.float32)  # [k]
        top = jax.lax.top_k(jnp.where(mask, attn, -jnp.inf), k)[1]      # most attended
        bottom = jax.lax.top_k(jnp.where(mask, -attn, -jnp.inf), k)[1]  # least attended
        ones, zeros = jnp.ones((k,), jnp.int32), jnp.zeros((k,), jnp.int32)
        losses = []
        for c, clf in enumerate(inst):
            in_class = clf(jnp.concatenate([h[top], h[bottom]]))  # [2k,2]
            loss_in = _top_k_loss(in_class, jnp.concatenate([ones, zeros]), jnp.concatenate([valid, valid]))
            loss_out = _top_k_loss(clf(h[top]), zeros, valid) if self.subtyping else 0.0
            losses.append(jnp.where(label == c, loss_in, loss_out))
        total = sum(losses)
        aux["instance_loss"] = total / self.n_classes if self.subtyping else total
        return logits, aux


def mil_arch(name: str, n_classes: int, in_features: int, embed: int = 512, attn_hidden: int = 256,
             dropout_rate: float = 0.25, k_sample: int = 8, subtyping: bool = True,
             task: str = "", bag: str = "region") -> ml_collections.ConfigDict:
    """Everything that rebuilds a baseline (its checkpoint's arch.json)."""
    if name not in MIL_MODELS:
        raise ValueError(f"unknown MIL model {name!r}; known: {MIL_MODELS}")
    return ml_collections.ConfigDict(dict(
        name=name, n_classes=n_classes, in_features=in_features, embed=embed, attn_hidden=attn_hidden,
        dropout_rate=dropout_rate, k_sample=k_sample, subtyping=subtyping, task=task, bag=bag))


def build_mil(config: ml_collections.ConfigDict, **_options: Any) -> nn.Module:
    """The module a ``mil_arch`` config describes."""
    if config.name == "mean_pool":
        return MeanPool(n_classes=config.n_classes)
    if config.name == "abmil":
        return ABMIL(n_classes=config.n_classes, embed=config.embed, attn_hidden=config.attn_hidden,
                     dropout_rate=config.dropout_rate)
    if config.name == "clam_sb":
        return CLAMSB(n_classes=config.n_classes, embed=config.embed, attn_hidden=config.attn_hidden,
                      dropout_rate=config.dropout_rate, k_sample=config.k_sample, subtyping=config.subtyping)
    raise ValueError(f"unknown MIL model {config.name!r}; known: {MIL_MODELS}")


def example_input(config: ml_collections.ConfigDict) -> tuple:
    """Init input of a ``mil_arch`` config: a bag of two instances [2,F]."""
    return (jnp.zeros((2, config.in_features), jnp.float32),)
