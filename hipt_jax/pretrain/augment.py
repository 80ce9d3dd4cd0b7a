"""Multi-crop augmentations of both stages, as Grain transforms (run in loader workers).

Every element arrives as ``{"index": g, **record}`` where ``g`` is its position in the global
sample stream (see data.py). Randomness comes from ``np.random.default_rng([seed, g])`` only, so
a sample's crops depend on (seed, g) and nothing else: the same on 1 or N hosts, with any number
of workers, and after a resume.

Stage 1 follows DINO's DataAugmentationDINO with torchvision's PIL code paths:
RandomResizedCrop (bicubic) -> flip p 0.5 -> ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 in random
order -> grayscale p 0.2 -> Gaussian blur (global 1: p 1.0, global 2: p 0.1, locals: p 0.5)
-> solarize p 0.2 (global 2 only). Crops stay uint8 (4x less inter-process traffic);
normalization happens on device in the update step (``normalize_images``).

Stage 2 (HIPT's ViT-4K recipe): random 14x14 global and 6x6 local crops of the [16,16,384] feature
grid, each with an independent horizontal flip (column axis reversed).
"""
from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

MEAN_STD = {
    # The released HIPT weights are served with mean = std = 0.5 (stage-1 training used ImageNet's).
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def sample_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


# ----------------------------------------------------------------------------- stage 1: images
def random_resized_crop_box(rng, height: int, width: int, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params: (top, left, h, w); 10 tries, then center."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision F_pil.adjust_hue: shift the uint8 H channel with wrap-around."""
    h, s, v = img.convert("HSV").split()
    h_arr = np.asarray(h, dtype=np.uint8)
    h_arr = (h_arr.astype(np.int16) + int(factor * 255)).astype(np.uint8)  # wraps mod 256
    return Image.merge("HSV", (Image.fromarray(h_arr, "L"), s, v)).convert("RGB")


def color_jitter(rng, img, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """torchvision ColorJitter: the four adjustments in a random order."""
    factors = {
        0: rng.uniform(1 - brightness, 1 + brightness),
        1: rng.uniform(1 - contrast, 1 + contrast),
        2: rng.uniform(1 - saturation, 1 + saturation),
        3: rng.uniform(-hue, hue),
    }
    for fn_id in rng.permutation(4):
        f = factors[int(fn_id)]
        if fn_id == 0:
            img = ImageEnhance.Brightness(img).enhance(f)
        elif fn_id == 1:
            img = ImageEnhance.Contrast(img).enhance(f)
        elif fn_id == 2:
            img = ImageEnhance.Color(img).enhance(f)
        else:
            img = _adjust_hue(img, f)
    return img


def image_view(rng, img: Image.Image, size: int, scale, blur_p: float,
               solarize_p: float = 0.0) -> np.ndarray:
    """One DINO view of a PIL image -> uint8 [size, size, 3]."""
    top, left, h, w = random_resized_crop_box(rng, img.height, img.width, scale)
    view = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        view = color_jitter(rng, view)
    if rng.random() < 0.2:
        view = view.convert("L").convert("RGB")
    if rng.random() < blur_p:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < solarize_p:
        view = ImageOps.solarize(view, threshold=128)
    return np.asarray(view, dtype=np.uint8)


class ImageMultiCrop(grain.transforms.Map):
    """{"index", "image" uint8 [H,W,3]} -> {"global" [2,G,G,3], "local" [L,l,l,3]} uint8."""

    def __init__(self, seed: int, global_size=224, local_size=96, n_local=8,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)):
        self.seed, self.global_size, self.local_size = seed, global_size, local_size
        self.n_local, self.global_scale, self.local_scale = n_local, global_scale, local_scale

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        rng = sample_rng(self.seed, element["index"])
        img = Image.fromarray(np.asarray(element["image"], np.uint8)).convert("RGB")
        g = self.global_size
        globals_ = [image_view(rng, img, g, self.global_scale, blur_p=1.0),
                    image_view(rng, img, g, self.global_scale, blur_p=0.1, solarize_p=0.2)]
        locals_ = [image_view(rng, img, self.local_size, self.local_scale, blur_p=0.5)
                   for _ in range(self.n_local)]
        out = {"index": np.int64(element["index"]), "global": np.stack(globals_)}
        out["local"] = (np.stack(locals_) if locals_ else
                        np.zeros((0, self.local_size, self.local_size, 3), np.uint8))
        return out


def normalize_images(images_u8, norm: str = "half"):
    """uint8 views -> float32 (x / 255 - mean) / std (jnp or numpy)."""
    mean, std = MEAN_STD[norm]
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (images_u8.astype(np.float32) / 255.0 - mean) / std


# ----------------------------------------------------------------------- stage 2: feature grids
def grid_crop(rng, grid: np.ndarray, size: int) -> np.ndarray:
    """Random size x size crop of [R,C,F] + horizontal flip p 0.5 (reverse the column axis)."""
    rows, cols = grid.shape[:2]
    if rows < size or cols < size:
        raise ValueError(f"feature grid {rows}x{cols} is smaller than the {size}x{size} crop")
    top = int(rng.integers(0, rows - size + 1))
    left = int(rng.integers(0, cols - size + 1))
    crop = grid[top:top + size, left:left + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


class FeatureMultiCrop(grain.transforms.Map):
    """{"index", "features" [R*C,F] or [R,C,F]} -> {"global" [2,G,G,F], "local" [L,l,l,F]}."""

    def __init__(self, seed: int, global_size=14, local_size=6, n_local=8, grid=(16, 16)):
        self.seed, self.global_size, self.local_size = seed, global_size, local_size
        self.n_local, self.grid = n_local, tuple(grid)

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        rng = sample_rng(self.seed, element["index"])
        feats = np.asarray(element["features"], np.float32)
        if feats.ndim == 2:
            # [R*C,F] -> [R,C,F]: token i*C+j is grid row i, column j (row-major).
            feats = feats.reshape(self.grid + (feats.shape[-1],))
        globals_ = [grid_crop(rng, feats, self.global_size) for _ in range(2)]
        locals_ = [grid_crop(rng, feats, self.local_size) for _ in range(self.n_local)]
        out = {"index": np.int64(element["index"]), "global": np.stack(globals_)}
        out["local"] = (np.stack(locals_) if locals_ else
                        np.zeros((0, self.local_size, self.local_size, feats.shape[-1]), np.float32))
        return out


# ------------------------------------------------------------------- stage 3: slides of regions
def _dihedral(rng, cells: np.ndarray) -> np.ndarray:
    """One of the 8 flips/rotations of the grid, drawn from ``rng``, applied to [N,2] (row, col)
    cells; the result is shifted so its smallest row and column are 0."""
    rc = cells.astype(np.int64)
    if rng.random() < 0.5:
        rc = rc[:, ::-1]                  # transpose (with the flips: every rotation)
    signs = np.where(rng.random(2) < 0.5, -1, 1)
    rc = rc * signs
    return (rc - rc.min(axis=0)).astype(np.float32) if len(rc) else rc.astype(np.float32)


def _in_window(cells: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    r, c = cells[:, 0], cells[:, 1]
    return (r >= top) & (r < top + h) & (c >= left) & (c < left + w)


def global_window(rng, cells: np.ndarray, scale=(0.5, 1.0), tries: int = 10) -> np.ndarray:
    """Indices of the regions inside a random rectangle of the region grid holding at least
    half of the slide's regions (ceil(M/2)); the area is a ``scale`` fraction of the tissue's
    bounding box, the aspect ratio in [3/4, 4/3] (as a random resized crop). After ``tries``
    misses the whole bounding box is the window."""
    m = len(cells)
    need = -(-m // 2)
    rows, cols = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    for _ in range(tries):
        area = rows * cols * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        h = min(rows, max(1, int(round(math.sqrt(area / aspect)))))
        w = min(cols, max(1, int(round(math.sqrt(area * aspect)))))
        top, left = int(rng.integers(0, rows - h + 1)), int(rng.integers(0, cols - w + 1))
        inside = np.flatnonzero(_in_window(cells, top, left, h, w))
        if len(inside) >= need:
            return inside
    return np.arange(m)


def local_window(rng, cells: np.ndarray, size: int) -> np.ndarray:
    """Indices of the regions in a size x size window placed over a random tissue region
    (so it holds at least that one)."""
    anchor = cells[int(rng.integers(0, len(cells)))]
    top = int(anchor[0]) - int(rng.integers(0, size))
    left = int(anchor[1]) - int(rng.integers(0, size))
    return np.flatnonzero(_in_window(cells, top, left, size, size))


def region_dropout(rng, idx: np.ndarray, rate: float, keep_at_least: int) -> np.ndarray:
    """Drop each region with probability ``rate``, never going below ``keep_at_least``."""
    drop = rng.random(len(idx)) < rate
    n_drop = min(int(drop.sum()), max(0, len(idx) - keep_at_least))
    dropped = np.flatnonzero(drop)[:n_drop]
    return np.delete(idx, dropped)


def region_view(rng, features: np.ndarray, cells: np.ndarray, idx: np.ndarray, length: int,
                noise_std: float, feature_std: float):
    """One padded view: (features [length,F], cells [length,2], mask [length]) from the regions
    ``idx`` (subsampled to ``length`` when there are more), Gaussian noise of std
    noise_std * the slide's feature std, and a random flip/rotation of the grid cells."""
    if len(idx) > length:
        idx = np.sort(rng.choice(idx, size=length, replace=False))
    n, f = len(idx), features.shape[1]
    feats = np.zeros((length, f), np.float32)
    feats[:n] = features[idx] + rng.normal(0.0, noise_std * feature_std, (n, f)).astype(np.float32)
    pos = np.zeros((length, 2), np.float32)
    pos[:n] = _dihedral(rng, cells[idx])
    mask = np.zeros((length,), bool)
    mask[:n] = True
    return feats, pos, mask


def region_views(features: np.ndarray, cells: np.ndarray, seed: int, index: int, *,
                 global_tokens: int, n_local: int, local_size: int, dropout: float = 0.1,
                 noise_std: float = 0.05, global_scale=(0.5, 1.0)) -> dict[str, np.ndarray]:
    """The DINO views of one slide, a pure function of (slide arrays, seed, index).

    features [M,F] region embeddings, cells [M,2] (row, column) grid cells. Returns
    global [2,Lg,F], global_coords [2,Lg,2], global_mask [2,Lg]   (Lg = global_tokens)
    local  [n,Ll,F], local_coords  [n,Ll,2], local_mask  [n,Ll]   (Ll = local_size**2).
    Global views: a rectangle with >= ceil(M/2) regions (global_window), region dropout that
    keeps >= ceil(M/2) of them; local views: a local_size x local_size window over a random
    region, dropout keeping >= 1. Every view: noise, flip/rotation of its cells.
    """
    features = np.asarray(features, np.float32)
    cells = np.asarray(cells)
    m = len(features)
    if m == 0:
        raise ValueError("slide has no regions")
    rng = sample_rng(seed, index)
    need = -(-m // 2)
    feature_std = float(features.std()) if m > 1 else 1.0
    out: dict[str, list] = {k: [] for k in ("global", "global_coords", "global_mask",
                                            "local", "local_coords", "local_mask")}
    views = [("global", global_tokens, None)] * 2 + [("local", local_size * local_size, local_size)] * n_local
    for kind, length, size in views:
        if kind == "global":
            idx = region_dropout(rng, global_window(rng, cells, global_scale), dropout, need)
        else:
            idx = region_dropout(rng, local_window(rng, cells, size), dropout, 1)
        feats, pos, mask = region_view(rng, features, cells, idx, length, noise_std, feature_std)
        out[kind].append(feats)
        out[f"{kind}_coords"].append(pos)
        out[f"{kind}_mask"].append(mask)
    f = features.shape[1]
    empty = {"local": np.zeros((0, local_size**2, f), np.float32),
             "local_coords": np.zeros((0, local_size**2, 2), np.float32),
             "local_mask": np.zeros((0, local_size**2), bool)}
    return {k: (np.stack(v) if v else empty[k]) for k, v in out.items()}


class RegionMultiCrop(grain.transforms.Map):
    """{"index", "features" [M,F], "cells" [M,2]} -> region_views(...) + "index"."""

    def __init__(self, seed: int, global_tokens: int, n_local: int = 8, local_size: int = 4,
                 dropout: float = 0.1, noise_std: float = 0.05, global_scale=(0.5, 1.0)):
        self.seed, self.kw = seed, dict(global_tokens=global_tokens, n_local=n_local,
                                        local_size=local_size, dropout=dropout,
                                        noise_std=noise_std, global_scale=tuple(global_scale))

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        out = region_views(element["features"], element["cells"], self.seed, element["index"],
                           **self.kw)
        return {"index": np.int64(element["index"]), **out}


def region_dummy_batch(config, batch: int, n_global: int) -> dict[str, np.ndarray]:
    """Zero stage-3 batch with the pipeline's shapes (for init and the sharding layout)."""
    crops, f = config.crops, config.model.in_features
    lg, ll = crops.global_tokens, crops.local_size**2
    if lg <= 0:
        raise ValueError("crops.global_tokens is unresolved (-1): see data.resolve_config")
    out = {"index": np.zeros((batch,), np.int64)}
    for kind, n, length in (("global", n_global, lg), ("local", crops.n_local, ll)):
        out[kind] = np.zeros((batch, n, length, f), np.float32)
        out[f"{kind}_coords"] = np.zeros((batch, n, length, 2), np.float32)
        out[f"{kind}_mask"] = np.ones((batch, n, length), bool)
    return out


def region_views_of_batch(batch: dict) -> dict:
    """Stage-3 batch -> {"global": {"x", "coords", "mask"}, "local": {...}} (the model's input)."""
    return {k: {"x": batch[k].astype(np.float32), "coords": batch[f"{k}_coords"], "mask": batch[f"{k}_mask"]}
            for k in ("global", "local")}
