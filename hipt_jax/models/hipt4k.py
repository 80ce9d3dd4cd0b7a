"""HIPT_4K: one 4096 px region (or any H x W >= 256) to its hierarchical embeddings.

The whole path — crop, normalize, cut into 256 px patches, ViT-256 over patch minibatches,
regrid, ViT-4K — is ONE jitted device computation: no host round trip between the stages.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hipt_jax.models import minibatch
from hipt_jax.models.archs import build_vit, dummy_input, get_arch
from hipt_jax.models.checkpoint import load_backbone
from hipt_jax.models.precision import resolve_dtype

PATCH = 256  # pixels per ViT-256 patch; a region is a grid of these
# ViT-256 minibatch inside the region program when a caller passes none and the machine is not
# asked (region_forward's default). HIPT4K and every CLI default to "auto": a value chosen for
# the machine's caches or calibrated on it (hipt_jax.models.minibatch).
DEFAULT_PATCH_BATCH = 8


def center_crop_box(height: int, width: int, multiple: int = PATCH) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of torchvision's CenterCrop to a multiple of ``multiple``.

    Offsets use Python's round (banker's rounding), as torchvision does: a difference of 1
    gives offset 0, 3 gives 2, 255 gives 128.
    """
    if height < multiple or width < multiple:
        raise ValueError(f"region is {height}x{width} px; HIPT4K needs at least {multiple} px per side")
    crop_h, crop_w = height - height % multiple, width - width % multiple
    return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0)), crop_h, crop_w


def normalize(images_u8: jnp.ndarray, dtype: Any = jnp.float32) -> jnp.ndarray:
    """uint8 -> (x / 255 - 0.5) / 0.5, the transform the released weights expect."""
    return ((images_u8.astype(jnp.float32) / 255.0 - 0.5) / 0.5).astype(dtype)


def _cut_patches(regions: jnp.ndarray) -> tuple[jnp.ndarray, int, int]:
    """[B,H,W,3] (H, W multiples of 256) -> ([B*R*C,256,256,3], R, C), row-major per region."""
    rows, cols = regions.shape[1] // PATCH, regions.shape[2] // PATCH
    # [B,R*256,C*256,3] -> [B*R*C,256,256,3]: patch (i, j) of region b is row b*R*C + i*C + j,
    # the reference's unfold order.
    patches = einops.rearrange(regions, "b (r y) (c x) ch -> (b r c) y x ch", y=PATCH, x=PATCH)
    return patches, rows, cols


def _map_in_minibatches(fn, xs: jnp.ndarray, batch_size: int, groups: int = 1, group_shards: int = 1):
    """Apply ``fn`` to ``xs`` = [G*P, ...] (G groups of P items: the patches of G regions, row
    b*P + i is item i of group b) in sequential minibatches of about ``batch_size`` items per
    device (bounded activation memory), padding each group's last chunk; returns the outputs
    (a pytree with leading dim G*P, same order).

    Every iteration takes the next ``c`` items of every group, never whole groups one after the
    other: the groups are what a mesh splits over devices (``group_shards`` of them), and a loop
    over a device-split axis makes SPMD gather every group onto every device, each device then
    computing all of them. With the group axis inside each iteration a device runs its own
    groups only. ``c = batch_size / (groups per device)``, at least 1."""
    n = xs.shape[0]
    g = max(1, groups)
    if n % g:
        raise ValueError(f"{n} items do not split into {g} equal groups")
    p = n // g
    local_groups = -(-g // max(1, group_shards))
    c = max(1, min(p, batch_size // local_groups))
    k = -(-p // c)
    # [G*P, ...] -> [G, P, ...], padded to [G, k*c, ...]
    xs = xs.reshape((g, p) + xs.shape[1:])
    if k * c > p:
        xs = jnp.pad(xs, [(0, 0), (0, k * c - p)] + [(0, 0)] * (xs.ndim - 2))
    # [G, k*c, ...] -> [k, G*c, ...]: lax.map runs chunk j of every group in iteration j; the
    # merged axis keeps G major, so a split of G over devices survives the merge.
    chunks = einops.rearrange(xs, "g (k c) ... -> k (g c) ...", c=c)
    out = jax.lax.map(fn, chunks)
    # [k, G*c, ...] -> [G, k*c, ...] -> [G*P, ...]: drop each group's padding.
    return jax.tree.map(
        lambda y: einops.rearrange(y, "k (g c) ... -> g (k c) ...", g=g)[:, :p].reshape((n,) + y.shape[2:]), out)


def region_forward(
    params256: Any,
    params4k: Optional[Any],
    regions_u8: jnp.ndarray,
    *,
    config256: ml_collections.ConfigDict,
    config4k: Optional[ml_collections.ConfigDict],
    patch_batch: int = DEFAULT_PATCH_BATCH,
    dtype: Any = jnp.float32,
    return_attention: bool = False,
    batch_shards: int = 1,
) -> dict[str, jnp.ndarray]:
    """Pure function: uint8 regions [B,H,W,3] -> HIPT_4K outputs (jit it with the configs static).

    ``patch_batch`` is the ViT-256 minibatch per device; ``batch_shards`` the number of devices
    the region axis is split over (a data-parallel jit), so a minibatch holds patch_batch /
    (B / batch_shards) patches of each region.

    Outputs (leading B): features_cls256 [B,R*C,384], features_mean256 [B,384]; with ViT-4K also
    features_cls4k [B,192] and features_mean256_cls4k [B,576]. With ``return_attention``:
    attention256 [B,R*C,heads,256] (CLS -> 16 px tokens of each patch, last block) and
    attention4k [B,heads,R*C] (CLS -> patches of the region).
    """
    batch, height, width, _ = regions_u8.shape
    top, left, crop_h, crop_w = center_crop_box(height, width)
    regions_u8 = regions_u8[:, top : top + crop_h, left : left + crop_w]
    patches_u8, rows, cols = _cut_patches(regions_u8)
    vit256 = build_vit(config256, dtype=dtype)

    def embed_patches(chunk_u8):
        # Normalize inside the minibatch so the fp32 copy of a region never exists at once.
        cls, aux = vit256.apply(params256, normalize(chunk_u8, dtype), cls_only=True)
        if return_attention:
            return cls.astype(jnp.float32), aux["attention"][:, :, 0, 1:]  # [b,heads,256]
        return cls.astype(jnp.float32)

    mapped = _map_in_minibatches(embed_patches, patches_u8, patch_batch, groups=batch, group_shards=batch_shards)
    cls256 = mapped[0] if return_attention else mapped
    # [B*R*C,384] -> [B,R*C,384]
    cls256 = cls256.reshape(batch, rows * cols, -1)
    out = {"features_cls256": cls256, "features_mean256": cls256.mean(axis=1)}
    if return_attention:
        # [B*R*C,heads,256] -> [B,R*C,heads,256]
        out["attention256"] = mapped[1].reshape(batch, rows * cols, *mapped[1].shape[1:])
    if params4k is not None:
        vit4k = build_vit(config4k, dtype=dtype)
        # [B,R*C,384] -> [B,R,C,384]: the same row-major grid, no spatial transpose.
        grid = cls256.reshape(batch, rows, cols, -1)
        cls4k, aux4k = vit4k.apply(params4k, grid, cls_only=True)
        cls4k = cls4k.astype(jnp.float32)
        out["features_cls4k"] = cls4k
        out["features_mean256_cls4k"] = jnp.concatenate([out["features_mean256"], cls4k], axis=-1)
        if return_attention:
            out["attention4k"] = aux4k["attention"][:, :, 0, 1:]
    return out


def auto_patch_batch(patch_batch: Optional[int], config256, dtype: Any = jnp.float32) -> int:
    """An explicit minibatch as given; None: chosen for the default device (see HIPT4K)."""
    if patch_batch is not None:
        return int(patch_batch)
    if jax.default_backend() != "cpu":
        return minibatch.MAX_PATCH_BATCH
    return minibatch.region_patch_batch(config256, jnp.dtype(dtype).itemsize)


def region_compiler_options(config256, dtype: Any = jnp.float32, dot_backend: Optional[str] = "auto") -> dict:
    """``jax.jit`` compiler options of the region program (and of any ViT-256 forward): on a CPU
    the dot backend calibrated with its minibatch ("auto"; XLA's default without a calibration)
    or the one named; {} on GPU/TPU."""
    return minibatch.cpu_compiler_options(minibatch.patch_batch_key(config256, jnp.dtype(dtype).itemsize),
                                          dot_backend)


class HIPT4K:
    """Region model: ``HIPT4K.from_checkpoints(vit256=..., vit4k=...)(region_u8)``.

    Args:
      params256, params4k: Flax variable dicts ({"params": ...}); params4k may be None to get
        only ViT-256 features.
      config256, config4k: architecture ConfigDicts (see hipt_jax.models.archs).
      patch_batch: ViT-256 minibatch inside the jitted computation; None (default) = auto: on
        CPU the size calibrated on this machine or fitted to its caches
        (hipt_jax.models.minibatch), the whole region (256) on GPU/TPU.
      dtype: compute dtype: "auto" (default: bfloat16 on GPU/TPU, float32 on CPU), "float32",
        "bfloat16" or a dtype; parameters stay float32 (hipt_jax.models.precision).
      dot_backend: how XLA:CPU computes the dots ("auto": as calibrated on this machine with the
        minibatch, XLA's default without a calibration; "ynnpack" or "eigen" to force one;
        hipt_jax.models.minibatch.DOT_BACKENDS). Ignored on GPU/TPU.
    """

    def __init__(self, params256, params4k, config256, config4k=None, *, patch_batch: Optional[int] = None,
                 dtype: Any = "auto", dot_backend: Optional[str] = "auto"):
        self.params256, self.params4k = params256, params4k
        self.config256, self.config4k = config256, config4k
        self.dtype = resolve_dtype(dtype)
        self.patch_batch = auto_patch_batch(patch_batch, config256, self.dtype)
        self.compiler_options = region_compiler_options(config256, self.dtype, dot_backend)
        self._jitted = {}

    @classmethod
    def from_checkpoints(cls, vit256: str, vit4k: Optional[str] = None, **kwargs) -> "HIPT4K":
        """Load backbones from saved ViT directories (hipt-convert, pretraining export) or
        straight from the released .pth files (needs torch)."""
        params256, config256 = load_backbone(vit256, expect_arch="vit256")
        params4k = config4k = None
        if vit4k is not None:
            params4k, config4k = load_backbone(vit4k, expect_arch="vit4k")
        return cls(params256, params4k, config256, config4k, **kwargs)

    @classmethod
    def random_init(cls, seed: int = 0, tiny: bool = False, with_vit4k: bool = True,
                    **kwargs) -> "HIPT4K":
        """Randomly initialised weights (reference init) for demos and tests; ``tiny`` swaps in
        2-block/1-block stand-ins with the same input/output sizes."""
        config256 = get_arch("vit256_tiny" if tiny else "vit256")
        config4k = get_arch("vit4k_tiny" if tiny else "vit4k")
        key256, key4k = jax.random.split(jax.random.PRNGKey(seed))
        params256 = jax.jit(build_vit(config256).init)(key256, dummy_input(config256))
        params4k = None
        if with_vit4k:
            params4k = jax.jit(build_vit(config4k).init)(key4k, dummy_input(config4k))
        return cls(params256, params4k, config256, config4k if with_vit4k else None, **kwargs)

    def _forward_fn(self, return_attention: bool):
        if return_attention not in self._jitted:
            self._jitted[return_attention] = jax.jit(functools.partial(
                region_forward, config256=self.config256, config4k=self.config4k,
                patch_batch=self.patch_batch, dtype=self.dtype, return_attention=return_attention,
            ), compiler_options=self.compiler_options)
        return self._jitted[return_attention]

    def embed_batch(self, regions_u8, return_attention: bool = False) -> dict[str, np.ndarray]:
        """uint8 [B,H,W,3] regions of one size -> dict of numpy arrays with leading B."""
        regions_u8 = np.asarray(regions_u8)
        if regions_u8.dtype != np.uint8 or regions_u8.ndim != 4 or regions_u8.shape[-1] != 3:
            raise ValueError(f"expected uint8 [B,H,W,3] regions, got {regions_u8.dtype} {regions_u8.shape}")
        out = self._forward_fn(return_attention)(self.params256, self.params4k, regions_u8)
        return {k: np.asarray(v) for k, v in out.items()}

    def __call__(self, region_u8, return_attention: bool = False) -> dict[str, np.ndarray]:
        """uint8 [H,W,3] region -> features_cls256 [R*C,384], features_mean256 [384],
        features_cls4k [192], features_mean256_cls4k [576]."""
        region_u8 = np.asarray(region_u8)
        if region_u8.ndim != 3:
            raise ValueError(f"expected one uint8 [H,W,3] region, got shape {region_u8.shape}")
        out = self.embed_batch(region_u8[None], return_attention)
        return {k: v[0] for k, v in out.items()}


def calibrate_patch_batch(config256, dtype: Any = jnp.float32, candidates=(4, 8, 16, 32, 64),
                          patches: int = 64, repeats: int = 2, seed: int = 0,
                          dot_backends: Optional[tuple] = None) -> int:
    """Time the region program's ViT-256 stage (``patches`` random patches in minibatches of each
    candidate size, best of ``repeats`` after a warm-up), store the fastest for this machine
    (hipt_jax.models.minibatch) and return it. ``dot_backends`` (default: every one XLA:CPU
    offers, unless XLA_FLAGS already chooses) are crossed with the sizes and the fastest pair's
    backend is stored too. About 20 s per pair for the full ViT-256 on a 2-core CPU."""
    import time

    if dot_backends is None:
        dot_backends = minibatch.dot_backends_to_try()
    vit = build_vit(config256, dtype=dtype)
    params = jax.jit(vit.init)(jax.random.PRNGKey(seed), dummy_input(config256))
    x = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (patches, PATCH, PATCH, 3), np.uint8))

    def seconds_per_patch(b: int, backend: Optional[str] = None) -> float:
        def embed(chunk_u8):
            return vit.apply(params, normalize(chunk_u8, dtype), cls_only=True)[0]

        fn = jax.jit(lambda u8: _map_in_minibatches(embed, u8, b),
                     compiler_options=minibatch.DOT_BACKENDS[backend] if backend else None)
        fn(x).block_until_ready()  # compile + warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        return best / patches

    key = minibatch.patch_batch_key(config256, jnp.dtype(dtype).itemsize)
    sizes = [b for b in candidates if b <= patches]
    if not dot_backends:
        return minibatch.calibrate(key, sizes, seconds_per_patch)
    return minibatch.calibrate(key, sizes, seconds_per_patch, dot_backends=dot_backends)
