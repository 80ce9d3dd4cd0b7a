"""CLS-256 features of labelled tiles: preprocessing, batched jitted extraction, on-disk cache.

Preprocessing (the paper's patch probes run at 224 px): every tile is resized so that its
SHORTER side is ``size`` px (bilinear, torchvision's ``Resize(size)``) and center-cropped to
size x size, then normalized with mean 0.5 / std 0.5 (the HIPT_4K inference transform;
``norm="imagenet"`` uses ImageNet statistics, as the reference's stage-1 training did). A
224 px crop is 14 x 14 tokens: the stored position embedding's own grid.

Extraction: one jitted ViT-256 forward (CLS only) over batches of ``batch_per_device`` tiles
per local device, the batch sharded over a 1-D ``data`` mesh of all local devices
(NamedSharding), the last batch padded. Image decoding runs in a thread pool one batch ahead.

Cache: ``cache_dir/<key>.npz`` (features [N,D] float32, the tile paths), where the key hashes
the model identity (checkpoint path and its files' mtimes, or random-init kind and seed), the
preprocessing and every tile's path, size, mtime, inode and ctime: a rerun with the same
inputs loads instead of recomputing; any change recomputes. On a miss every tile is checked to
decode first (``check_tiles``).
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image, UnidentifiedImageError

from hipt_jax.models.archs import build_vit, dummy_input, get_arch
from hipt_jax.models.hipt4k import region_compiler_options
from hipt_jax.pretrain.augment import normalize_images

DEFAULT_SIZE = 224


_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class TileError(ValueError):
    """A tile that cannot be used (message names the file and the problem)."""


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(values.astype(np.uint8)[..., None], 3, axis=2), "RGB")


def to_rgb(im: Image.Image, path: str) -> Image.Image:
    """``im`` as 8-bit RGB. PIL's convert("RGB") clips the wide grayscale modes to 0..255: a
    16-bit tile came out all white, a float 0..1 tile all black. They are rescaled here by the
    range of their mode instead; values outside it are refused, naming the tile."""
    mode = im.mode
    if mode in _16BIT_MODES or mode == "I":
        a = np.asarray(im).astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise TileError(f"{path}: integer image (mode {mode}) with values {lo}..{hi}, outside 0..65535")
        # "I" (32-bit) holding 8-bit values converts exactly as PIL does; else 16-bit scale
        return _gray(a if mode == "I" and hi <= 255 else (a + 128) // 257)
    if mode == "F":
        a = np.asarray(im, np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
            raise TileError(f"{path}: float image (mode F) with values {lo:g}..{hi:g}; expected 0..1 or 0..255")
        return _gray(np.rint(a * 255 if hi <= 1 else a))
    return im.convert("RGB")


def load_tile(path: str, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Image file -> uint8 [size,size,3]: shorter side resized to ``size``, center crop."""
    try:
        with Image.open(path) as im:
            img = to_rgb(im, path)
    except TileError:
        raise
    except (OSError, ValueError) as e:
        raise TileError(f"{path}: cannot read image ({e})") from None
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


# Modes convert("RGB") maps faithfully: checked by decoding alone, no conversion needed.
_PLAIN_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LA", "PA")


def tile_problem(path: str) -> Optional[str]:
    """Why ``path`` would fail ``load_tile`` (None: it reads), found cheaply: JPEGs decode at
    1/8 scale (PIL's draft), other tiles are small and decode whole (PNG's or TIFF's header
    alone does not show a truncated file); wide modes also get their range checked."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            if im.mode not in _PLAIN_MODES:
                to_rgb(im, path)
    except TileError as e:
        return str(e).removeprefix(f"{path}: ")
    except UnidentifiedImageError:
        return "not an image (format not recognised)"
    except Exception as e:  # noqa: BLE001 -- any failure to decode is the tile's problem, named
        return str(e).replace(repr(path), "").strip(" :") or type(e).__name__
    return None


class UnreadableTilesError(ValueError):
    """Tiles that cannot be read; ``bad`` lists every one as (path, reason)."""

    def __init__(self, bad: list[tuple[str, str]], total: int):
        self.bad, self.total = bad, total
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:3])
        super().__init__(f"{len(bad)} of {total} tiles cannot be read: {shown}"
                         f"{' ...' if len(bad) > 3 else ''}")


def check_tiles(paths: Sequence[str], progress: bool = True, threads: int = 4) -> None:
    """Every tile of ``paths`` decodes (``tile_problem``), checked before any feature is
    computed: one bad tile among thousands no longer ends a finished run, and every bad tile is
    named at once (UnreadableTilesError), not the first one met."""
    from tqdm import tqdm

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        problems = list(tqdm(pool.map(tile_problem, paths), total=len(paths), desc="checking tiles",
                             unit="tile", disable=not progress))
    bad = [(p, r) for p, r in zip(paths, problems) if r is not None]
    if bad:
        raise UnreadableTilesError(bad, len(paths))


def random_backbone(kind: str, seed: int = 0):
    """(variables, arch config) of a randomly initialised ViT-256 (``kind`` tiny|full)."""
    config = get_arch("vit256_tiny" if kind == "tiny" else "vit256")
    variables = jax.jit(build_vit(config).init)(jax.random.PRNGKey(seed), dummy_input(config))
    return variables, config


class CLSExtractor:
    """ViT-256 CLS features of uint8 tiles, batched over all local devices.

    ``extractor(tiles_u8)`` -> float32 [N, D]; ``extractor.params`` may be swapped (same tree
    structure) without recompiling, which is what the pretraining KNN monitor does.
    """

    def __init__(self, variables, config, *, batch_per_device: int = 32, norm: str = "half",
                 dtype: Any = jnp.float32, devices: Optional[Sequence[jax.Device]] = None):
        devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch = batch_per_device * len(devices)
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())
        self.params = variables
        self._forward = _jitted_forward(json.dumps(config.to_dict(), sort_keys=True), norm,
                                        jnp.dtype(dtype).name, self.mesh)

    def _batch(self, tiles_u8: np.ndarray):
        n = len(tiles_u8)
        pad = self.batch - n
        if pad:  # the last batch: one compiled shape for every batch
            tiles_u8 = np.concatenate([tiles_u8, np.zeros((pad,) + tiles_u8.shape[1:], np.uint8)])
        out = self._forward(self.params, jax.device_put(tiles_u8, self.batch_sharding))
        return np.asarray(out)[:n]

    def __call__(self, tiles_u8: np.ndarray) -> np.ndarray:
        return np.concatenate([self._batch(tiles_u8[i:i + self.batch])
                               for i in range(0, len(tiles_u8), self.batch)])

    def from_files(self, paths: Sequence[str], size: int = DEFAULT_SIZE, progress: bool = True) -> np.ndarray:
        """Features of image files, decoding the next batch in threads while this one runs."""
        from tqdm import tqdm

        chunks = [paths[i:i + self.batch] for i in range(0, len(paths), self.batch)]
        out = []
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            def decode(chunk):
                return np.stack(list(pool.map(lambda p: load_tile(p, size), chunk)))

            with concurrent.futures.ThreadPoolExecutor(1) as ahead:
                future = ahead.submit(decode, chunks[0]) if chunks else None
                for i in tqdm(range(len(chunks)), desc="features", unit="batch", disable=not progress):
                    tiles = future.result()
                    if i + 1 < len(chunks):
                        future = ahead.submit(decode, chunks[i + 1])
                    out.append(self._batch(tiles))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@functools.lru_cache(maxsize=8)
def _jitted_forward(config_json: str, norm: str, dtype_name: str, mesh: Mesh):
    """One jitted CLS forward per (architecture, preprocessing, mesh): later extractors in the
    same process (a rerun, the pretraining monitor) reuse its compilations."""
    import ml_collections

    dtype = jnp.dtype(dtype_name)
    config = ml_collections.ConfigDict(json.loads(config_json))
    model = build_vit(config, dtype=dtype)

    def forward(variables, tiles_u8):
        cls, _ = model.apply(variables, normalize_images(tiles_u8, norm).astype(dtype), cls_only=True)
        return cls.astype(jnp.float32)  # [B,D]

    # On a CPU, the dot backend calibrated for this architecture's region program (forward only,
    # like this one); XLA's default otherwise.
    return jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
                   out_shardings=NamedSharding(mesh, P("data")),
                   compiler_options=region_compiler_options(config, dtype))


def _model_identity(checkpoint: Optional[str], random_init: str, seed: int) -> dict:
    if not checkpoint:
        return {"random_init": random_init, "seed": seed}
    stamps = []
    for root, _, files in os.walk(checkpoint) if os.path.isdir(checkpoint) else [("", [], [checkpoint])]:
        for f in sorted(files):
            p = os.path.join(root, f)
            stamps.append((os.path.relpath(p, checkpoint) if root else p, os.path.getmtime(p)))
    return {"checkpoint": os.path.abspath(checkpoint), "files": sorted(stamps)}


def cache_key(paths: Sequence[str], model: dict, preprocessing: dict) -> str:
    # Size and mtime alone miss a tile replaced by `cp -p` or rsync (same size: uncompressed
    # tiles all have one; mtime copied): the inode and the ctime (set by any content write or
    # rename into place, and no tool can copy it) change then; reading the tiles changes neither.
    h = hashlib.sha1(json.dumps({"model": model, "pre": preprocessing}, sort_keys=True).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:16]


def cached_features(paths: Sequence[str], *, checkpoint: Optional[str], random_init: str = "none",
                    seed: int = 0, size: int = DEFAULT_SIZE, norm: str = "half",
                    batch_per_device: int = 32, dtype: Any = jnp.float32,
                    cache_dir: Optional[str] = None, progress: bool = True) -> tuple[np.ndarray, dict]:
    """Features [N,D] of ``paths`` with the named backbone; (features, info) where info says
    whether the cache was hit and where it is."""
    pre = {"size": size, "norm": norm, "dtype": jnp.dtype(dtype).name}
    key = cache_key(paths, _model_identity(checkpoint, random_init, seed), pre)
    cache = os.path.join(cache_dir, f"{key}.npz") if cache_dir else None
    if cache and os.path.isfile(cache):
        with np.load(cache) as z:
            return z["features"], {"cache": cache, "cache_hit": True}
    check_tiles(paths, progress)
    if checkpoint:
        from hipt_jax.models.checkpoint import load_backbone

        variables, config = load_backbone(checkpoint, expect_arch="vit256")
    else:
        variables, config = random_backbone(random_init, seed)
    extractor = CLSExtractor(variables, config, batch_per_device=batch_per_device, norm=norm, dtype=dtype)
    feats = extractor.from_files(list(paths), size, progress)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = cache + ".tmp.npz"
        np.savez(tmp, features=feats, paths=np.array(paths))
        os.replace(tmp, cache)
    return feats, {"cache": cache, "cache_hit": False}
