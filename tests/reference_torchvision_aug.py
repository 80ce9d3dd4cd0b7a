"""DINO's stage-1 augmentation (DataAugmentationDINO) re-implemented from torchvision's and
DINO's documented algorithms, in numpy (+ PIL where torchvision's PIL code path itself calls
PIL: the bicubic resize, the RGB<->HSV conversion and DINO's GaussianBlur, which is
``PIL.ImageFilter.GaussianBlur(radius)``).

Random draws come from a ``Draws`` object that REPLAYS what our pipeline drew, by kind
(uniform, integer, random, permutation), and checks that each draw is asked for with the same
distribution parameters (e.g. the log-ratio bounds of RandomResizedCrop). torchvision's own
draw ORDER differs in one place (ColorJitter draws the permutation before the factors); draws
of different kinds do not interact, so replaying per kind is exact.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
from PIL import Image, ImageFilter


class Recorder:
    """Wraps a numpy Generator and records every draw by kind (give it to our pipeline)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.log = {"uniform": [], "integers": [], "random": [], "permutation": []}

    def uniform(self, low, high):
        v = float(self.rng.uniform(low, high))
        self.log["uniform"].append((float(low), float(high), v))
        return v

    def integers(self, low, high):
        v = int(self.rng.integers(low, high))
        self.log["integers"].append((int(low), int(high), v))
        return v

    def random(self):
        v = float(self.rng.random())
        self.log["random"].append(v)
        return v

    def permutation(self, n):
        v = self.rng.permutation(n)
        self.log["permutation"].append((n, v.copy()))
        return v


class Draws:
    """Replays a Recorder's draws, asserting the requested distribution matches."""

    def __init__(self, recorder: Recorder):
        self.q = {k: deque(v) for k, v in recorder.log.items()}

    def uniform(self, low, high):
        lo, hi, v = self.q["uniform"].popleft()
        assert math.isclose(lo, low, rel_tol=1e-12, abs_tol=1e-12) and math.isclose(hi, high, rel_tol=1e-12, abs_tol=1e-12), \
            f"uniform({low}, {high}) asked, ours drew from ({lo}, {hi})"
        return v

    def randint(self, low, high):  # torch.randint: high exclusive
        lo, hi, v = self.q["integers"].popleft()
        assert (lo, hi) == (low, high), f"randint({low}, {high}) asked, ours drew from ({lo}, {hi})"
        return v

    def rand(self):
        return self.q["random"].popleft()

    def randperm(self, n):
        m, v = self.q["permutation"].popleft()
        assert m == n
        return v

    def exhausted(self) -> bool:
        return all(not q for q in self.q.values())


# ------------------------------------------------------------------------ RandomResizedCrop
def rrc_params(draws: Draws, height, width, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params: up to 10 tries of (area fraction uniform in
    scale, aspect log-uniform in ratio, sides rounded), accepted when the box fits; then a
    uniform top-left. Otherwise a centered crop of the whole image clamped to the ratio range."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * draws.uniform(scale[0], scale[1])
        aspect = math.exp(draws.uniform(lo, hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = draws.randint(0, height - h + 1)
            left = draws.randint(0, width - w + 1)
            return top, left, h, w
    image_ratio = width / height
    if image_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


# ------------------------------------------------------------------------------ colour ops
def _u8(x):
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def gray(img: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma (PIL's "L" conversion, torchvision's rgb_to_grayscale): float."""
    img = img.astype(np.float64)
    return 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]


def _blend(img, other, factor):
    """torchvision _blend / PIL ImageEnhance: other + factor * (img - other), clipped to
    [0, 255] and cast to uint8 by truncation (as both torchvision paths do)."""
    return np.clip(other + factor * (img.astype(np.float64) - other), 0, 255).astype(np.uint8)


def brightness(img, f):
    return _blend(img, 0.0, f)  # blend with black


def contrast(img, f):
    # PIL's ImageEnhance.Contrast (torchvision's PIL path): a uniform gray at the rounded mean
    # of the image's luma.
    return _blend(img, float(int(gray(img).round().mean() + 0.5)), f)


def saturation(img, f):
    return _blend(img, np.round(gray(img))[..., None], f)


def hue(img, f):
    """torchvision's PIL path: 8-bit HSV (PIL's conversion), H shifted by int(f*255) mod 256."""
    hsv = np.asarray(Image.fromarray(img).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + math.trunc(f * 255)) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def color_jitter(draws: Draws, img, b=0.4, c=0.4, s=0.2, h=0.1):
    """torchvision ColorJitter.get_params + forward: a random order of the four, factors
    uniform in [1-b, 1+b], [1-c, 1+c], [1-s, 1+s], [-h, h]."""
    order = draws.randperm(4)
    fb, fc = draws.uniform(max(0, 1 - b), 1 + b), draws.uniform(max(0, 1 - c), 1 + c)
    fs, fh = draws.uniform(max(0, 1 - s), 1 + s), draws.uniform(-h, h)
    ops = {0: lambda x: brightness(x, fb), 1: lambda x: contrast(x, fc),
           2: lambda x: saturation(x, fs), 3: lambda x: hue(x, fh)}
    for i in order:
        img = ops[int(i)](img)
    return img


def solarize(img, threshold=128):
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8)


def gaussian_blur(img, radius):
    """DINO's GaussianBlur: PIL's GaussianBlur with radius = the drawn value (PIL's radius is
    the Gaussian's standard deviation)."""
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=radius)))


def dino_view(draws: Draws, img: np.ndarray, size, scale, blur_p, solarize_p=0.0):
    """One view of DataAugmentationDINO: RandomResizedCrop(bicubic) -> RandomHorizontalFlip ->
    RandomApply(ColorJitter, 0.8) -> RandomGrayscale(0.2) -> GaussianBlur(blur_p: applied when
    random() <= p) -> Solarization(solarize_p: applied when random() < p)."""
    top, left, h, w = rrc_params(draws, img.shape[0], img.shape[1], scale)
    view = np.asarray(Image.fromarray(img[top:top + h, left:left + w]).resize((size, size), Image.BICUBIC))
    if draws.rand() < 0.5:
        view = view[:, ::-1]
    if not 0.8 < draws.rand():  # RandomApply: skipped when p < rand
        view = color_jitter(draws, np.ascontiguousarray(view))
    if draws.rand() < 0.2:
        view = np.repeat(_u8(gray(view))[..., None], 3, axis=-1)
    if draws.rand() <= blur_p:
        view = gaussian_blur(np.ascontiguousarray(view), draws.uniform(0.1, 2.0))
    # Our pipeline draws the solarization coin for every view (p = 0 where DINO has no
    # Solarization transform); consuming it here keeps the replay aligned, output unaffected.
    if draws.rand() < solarize_p:
        view = solarize(view)
    return np.ascontiguousarray(view)
