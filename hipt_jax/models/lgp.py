"""HIPT-LGP: the weakly supervised slide model (the reference's HIPT_LGP_FC).

A slide is M regions, each a 16x16 grid of 384-d ViT-256 CLS features ([M,256,384]).

    local   ViT-4K per region                           [M,256,384] -> [M,192]  (frozen by default)
    phi     Linear + ReLU + dropout 0.25                [M,192]
    global  2 post-norm TransformerEncoder layers       [M,192]     (3 heads, ff 192, no pos-embed)
    pool    gated attention, softmax over regions       [M,192]     -> [192]
    rho     Linear + ReLU + dropout 0.25; classifier    [192]       -> [n_classes]

M varies per slide. To keep one compiled program per *bucket* rather than per slide, slides are
padded to a bucket length (``pad_to_bucket``) with a boolean mask: padded regions are excluded as
attention keys and get zero pooling weight, so the padded forward equals the unpadded one
(tested). Padded query rows are computed and thrown away.

The local ViT-4K has no dropout, so when it is frozen its output is a fixed function of the
slide: trainers compute it once per slide (``method=HIPTLGP.local``) and train only the rest
(``method=HIPTLGP.aggregate``), which is the same model and the same gradients at a fraction
of the cost.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hipt_jax.models.archs import build_vit, get_arch
from hipt_jax.models.vit import Encoder

Dtype = Any
DEFAULT_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

# Torch's nn.Linear default init is what the reference trains from for the global layers; a
# Flax default (lecun normal) is equivalent in spirit. Only the ViT-4K uses the trunc-normal init.
_dense = nn.Dense


class HIPTLGP(nn.Module):
    """HIPT_LGP_FC. ``__call__(features [M,256,384] or [M,R,C,384], mask [M] bool)`` ->
    (logits [n_classes], aux) with aux = {"attention": [M] pooling weights (0 on padding),
    "local": [M,192] ViT-4K CLS per region}.

    Attributes:
      n_classes: classifier outputs (4 time bins for survival).
      local_arch: architecture name of the local ViT-4K ("vit4k", or "vit4k_tiny" in tests).
      freeze_local: stop gradients at the ViT-4K output (the reference's freeze_4k; off by
        default there and here, so the ViT-4K is fine-tuned).
      dropout_rate: dropout of phi, the encoder layers, the gated attention and rho (0.25).
      global_heads, global_depth: the global TransformerEncoder (3 heads, 2 layers).
    """

    n_classes: int = 2
    local_arch: str = "vit4k"
    freeze_local: bool = False
    dropout_rate: float = 0.25
    global_heads: int = 3
    global_depth: int = 2
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = get_arch(self.local_arch)
        self.local_vit = build_vit(cfg, dtype=self.dtype)
        width = cfg.width
        self.global_phi = _dense(width, dtype=self.dtype)
        # torch.nn.TransformerEncoderLayer(d_model=192, nhead=3, dim_feedforward=192,
        # dropout=0.25, activation="relu"): post-norm, LayerNorm eps 1e-5.
        self.global_transformer = Encoder(
            depth=self.global_depth, num_heads=self.global_heads, mlp_dim=width, pre_norm=False,
            activation="relu", ln_eps=1e-5, dropout_rate=self.dropout_rate, dtype=self.dtype)
        self.attention_a = _dense(width, dtype=self.dtype)
        self.attention_b = _dense(width, dtype=self.dtype)
        self.attention_c = _dense(1, dtype=self.dtype)
        self.global_rho = _dense(width, dtype=self.dtype)
        self.classifier = _dense(self.n_classes, dtype=self.dtype)
        self.dropout = nn.Dropout(self.dropout_rate)

    def local(self, features: jnp.ndarray) -> jnp.ndarray:
        """[M,256,384] (or [M,R,C,384]) ViT-256 features -> [M,192] CLS-4K per region."""
        if features.ndim == 3:
            m, n, f = features.shape
            side = int(round(n**0.5))
            if side * side != n:
                raise ValueError(f"[M,N,F] features need a square N, got N={n}; pass [M,R,C,F]")
            # [M,256,384] -> [M,16,16,384]: token i*16+j is grid row i, column j (the reference's
            # unfold(1,16,16).transpose(1,2) gives the same row-major grid).
            features = features.reshape(m, side, side, f)
        cls, _ = self.local_vit(features, train=False)
        if self.freeze_local:
            cls = jax.lax.stop_gradient(cls)
        return cls

    def aggregate(self, h_local: jnp.ndarray, mask: jnp.ndarray | None = None, train: bool = False):
        """[M,192] region embeddings (+ mask [M]) -> (logits [n_classes], aux)."""
        det = not train
        m = h_local.shape[0]
        if mask is None:
            mask = jnp.ones((m,), bool)
        h = self.dropout(nn.relu(self.global_phi(h_local)), deterministic=det)
        # [M,192] -> [1,M,192]: the reference runs the encoder on one sequence of M regions.
        h, _ = self.global_transformer(h[None], key_mask=mask[None], deterministic=det,
                                       need_weights=False)  # no map wanted: fused attention
        h = h[0]
        a = self.dropout(jnp.tanh(self.attention_a(h)), deterministic=det)
        b = self.dropout(nn.sigmoid(self.attention_b(h)), deterministic=det)
        scores = self.attention_c(a * b)[:, 0].astype(jnp.float32)  # [M]
        scores = jnp.where(mask, scores, -jnp.inf)
        attn = jax.nn.softmax(scores)  # padded regions get exactly 0
        pooled = attn.astype(h.dtype) @ h  # [192]
        h_wsi = self.dropout(nn.relu(self.global_rho(pooled)), deterministic=det)
        logits = self.classifier(h_wsi).astype(jnp.float32)
        return logits, {"attention": attn}

    def __call__(self, features, mask=None, train: bool = False):
        h_local = self.local(features)
        logits, aux = self.aggregate(h_local, mask, train)
        return logits, dict(aux, local=h_local)


def bucket_length(m: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= m (multiples of the largest bucket beyond it)."""
    if m < 1:
        raise ValueError("a slide needs at least one region")
    for b in buckets:
        if m <= b:
            return b
    top = buckets[-1]
    return -(-m // top) * top


def pad_to_bucket(x: np.ndarray, buckets: Sequence[int] = DEFAULT_BUCKETS):
    """Pad the region axis of ``x`` [M,...] with zeros to its bucket -> (padded [L,...], mask [L])."""
    m = x.shape[0]
    length = bucket_length(m, buckets)
    padded = np.zeros((length,) + x.shape[1:], x.dtype)
    padded[:m] = x
    mask = np.zeros((length,), bool)
    mask[:m] = True
    return padded, mask


@functools.lru_cache(maxsize=8)
def _jitted_init(model: HIPTLGP):
    return jax.jit(model.init)


def init_lgp(model: HIPTLGP, seed: int = 0, grid: int = 16, in_features: int = 384):
    """Random variables for ``model`` (reference init for the ViT-4K, Flax defaults elsewhere).
    The jitted init is cached per model, so re-initializing for every fold compiles once."""
    dummy = jnp.zeros((2, grid * grid, in_features), jnp.float32)
    return _jitted_init(model)(jax.random.PRNGKey(seed), dummy)


def with_pretrained_local(variables, vit4k_variables):
    """Replace the local ViT-4K params with a pretrained backbone ({"params": ...} from
    hipt_jax.models.checkpoint.load_backbone); shapes must match exactly."""
    local = vit4k_variables["params"]
    want, got = _shapes(variables["params"]["local_vit"]), _shapes(local)
    if want != got:
        raise ValueError(f"pretrained ViT-4K does not match the LGP's local ViT: {got} vs {want}")
    params = dict(variables["params"], local_vit=jax.tree.map(jnp.asarray, local))
    return dict(variables, params=params)


def with_pretrained_global(variables, vitwsi_params, source: str = "stage-3 export"):
    """Start the global part from a stage-3 ViT-WSI export (archs.vitwsi: the same layers):
    its region stem -> global_phi, its encoder blocks -> global_transformer. The export's CLS
    token, position codes and final norm have no place in HIPT-LGP (gated attention pooling,
    no positions) and are left out; depth, width and heads must match exactly."""
    params = dict(variables["params"])
    mapping = {"global_phi": vitwsi_params.get("region_embed", {}).get("dense"),
               "global_transformer": vitwsi_params.get("encoder")}
    for name, theirs in mapping.items():
        if theirs is None or _shapes(theirs) != _shapes(params[name]):
            raise ValueError(f"{source}: not a ViT-WSI export matching HIPT-LGP's {name} "
                             f"(width {params['global_phi']['kernel'].shape[1]}, "
                             f"{_global_depth(params)} global layers)")
        params[name] = jax.tree.map(jnp.asarray, theirs)
    return dict(variables, params=params)


def _global_depth(params) -> int:
    return sum(1 for k in params["global_transformer"] if k.startswith("blocks_"))


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in leaves}


def lgp_arch(model: HIPTLGP, task: str = "") -> ml_collections.ConfigDict:
    """Everything that rebuilds ``model`` (stored as the arch.json of its checkpoints): class
    count, local ViT-4K (name and full architecture), widths, dropout, freeze flag, task."""
    local = get_arch(model.local_arch)
    return ml_collections.ConfigDict(dict(
        n_classes=model.n_classes, local_arch=model.local_arch, local=local.to_dict(),
        in_features=local.in_features, width=local.width, freeze_local=model.freeze_local,
        dropout_rate=model.dropout_rate, global_heads=model.global_heads,
        global_depth=model.global_depth, task=task))


def build_lgp(config: ml_collections.ConfigDict, *, dtype: Dtype = jnp.float32) -> HIPTLGP:
    """The HIPTLGP module an ``lgp_arch`` config describes (dtype is a run-time choice)."""
    return HIPTLGP(n_classes=config.n_classes, local_arch=config.local_arch,
                   freeze_local=config.freeze_local, dropout_rate=config.dropout_rate,
                   global_heads=config.global_heads, global_depth=config.global_depth, dtype=dtype)


def example_input(config: ml_collections.ConfigDict) -> tuple:
    """Init input of an ``lgp_arch`` config: one region of 16x16 ViT-256 features [1,256,F]."""
    return (jnp.zeros((1, 256, config.in_features), jnp.float32),)
