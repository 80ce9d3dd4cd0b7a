"""Synthetic Aperio pyramids grown from the real test slide's tissue (tests, demo, toy cohorts).

`make_aperio_slide` writes a tiled, JPEG-compressed, multi-level SVS that OpenSlide opens as an
Aperio slide with the requested magnification, mpp and pyramid levels. Pixels are the real
CMU-1-Small-Region tissue mirrored (reflect-tiled) to any size, so tissue detection and JPEG
statistics behave like a real slide, while the tissue layout is under the test's control:

    make_aperio_slide(p, (3000, 5000), mag=40, levels=(1, 4, 16), seed=1,
                      tissue=np.array([[1, 0], [0, 1]], bool), tissue_cell_px=2048,
                      stain=(1.3, 0.8, 1.0))

Everything is generated tile by tile, so memory stays bounded for large sizes.
"""
from __future__ import annotations

import functools
import os

import cv2
import numpy as np
import openslide
import tifffile

REAL_SLIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "cmu_small_region.svs")
# A box of the real slide (level 0, x0, y0, x1, y1) that is tissue almost everywhere, so a
# synthetic "tissue" cell is detected as tissue over (nearly) all of its area.
DENSE_TISSUE_BOX = (860, 1900, 1480, 2900)
TILE = 256


@functools.lru_cache(maxsize=2)
def _source_pixels(dense: bool) -> np.ndarray:
    """Real tissue as uint8 [H,W,3] (read once per process)."""
    slide = openslide.OpenSlide(REAL_SLIDE)
    if dense:
        x0, y0, x1, y1 = DENSE_TISSUE_BOX
        rgba = slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0))
    else:
        rgba = slide.read_region((0, 0), 0, slide.dimensions)
    return np.ascontiguousarray(np.asarray(rgba)[:, :, :3])


def real_tissue_pixels(dense: bool = True) -> np.ndarray:
    """The real slide's tissue as uint8 [H,W,3] (dense box by default); cached, do not modify."""
    return _source_pixels(dense)


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Reflect-tile indices into [0, n): 0..n-1, n-1..0, 0..n-1, ..."""
    idx = np.mod(idx, 2 * n)
    return np.where(idx < n, idx, 2 * n - 1 - idx)


def stain_perturb(rgb: np.ndarray, gains) -> np.ndarray:
    """Scale the optical density of each RGB channel by `gains` (white stays white).

    Gains > 1 darken a channel's absorption, e.g. (1.4, 0.8, 1.0) makes tissue look bluer-cyan
    than the original; used to give two synthetic "classes" a different look.
    """
    gains = np.asarray(gains, np.float32).reshape(1, 1, 3)
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    out = 256.0 * np.exp(-od * gains) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class _Canvas:
    """Computes any block of the synthetic level-0 image on demand."""

    def __init__(self, size_hw, mag, seed, tissue, tissue_cell_px, stain, dense):
        self.h, self.w = int(size_hw[0]), int(size_hw[1])
        self.src = _source_pixels(dense)
        # 40x slides show the same tissue at twice the pixel density as 20x ones.
        self.up = 2 if mag == 40 else 1
        rng = np.random.default_rng(seed)
        self.off_y, self.off_x = (int(v) for v in rng.integers(0, 4 * max(self.src.shape[:2]), 2))
        self.tissue = None if tissue is None else np.asarray(tissue, bool)
        if self.tissue is not None:
            gh, gw = self.tissue.shape
            self.cell = int(tissue_cell_px) if tissue_cell_px else int(np.ceil(max(self.h / gh, self.w / gw)))
        self.stain = stain

    def block(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Level-0 pixels [y0:y0+h, x0:x0+w] -> uint8 [h,w,3]; white past the canvas."""
        ys = np.arange(y0, y0 + h)
        xs = np.arange(x0, x0 + w)
        sy = _mirror(ys // self.up + self.off_y, self.src.shape[0])
        sx = _mirror(xs // self.up + self.off_x, self.src.shape[1])
        out = self.src[sy[:, None], sx[None, :]]
        if self.stain is not None:
            out = stain_perturb(out, self.stain)
        keep = (ys < self.h)[:, None] & (xs < self.w)[None, :]
        if self.tissue is not None:
            gy = np.minimum(ys // self.cell, self.tissue.shape[0] - 1)
            gx = np.minimum(xs // self.cell, self.tissue.shape[1] - 1)
            inside = (ys // self.cell < self.tissue.shape[0])[:, None] & (xs // self.cell < self.tissue.shape[1])[None, :]
            keep &= self.tissue[gy[:, None], gx[None, :]] & inside
        out = np.where(keep[:, :, None], out, np.uint8(255))
        return out.astype(np.uint8)

    def level_tiles(self, down: int):
        """Yield the 256x256 tiles of the level with integer downsample `down`, row-major."""
        lh, lw = self.h // down, self.w // down
        for ty in range(0, lh, TILE):
            for tx in range(0, lw, TILE):
                blk = self.block(ty * down, tx * down, TILE * down, TILE * down)
                if down > 1:  # box-filter downsample, like scanners build their pyramids
                    blk = cv2.resize(blk, (TILE, TILE), interpolation=cv2.INTER_AREA)
                yield blk


def make_aperio_slide(path: str, size_hw, mag: int = 20, levels=(1, 4, 16), seed: int = 0,
                      tissue=None, tissue_cell_px: int | None = None, stain=None, mpp="auto",
                      quality: int = 90, dense: bool = True) -> str:
    """Write a synthetic Aperio SVS and return its path.

    Args:
      path: output file (.svs).
      size_hw: level-0 (height, width) in pixels.
      mag: 20 or 40 (AppMag); sets the default mpp (0.5 / 0.25) and the tissue's pixel scale.
      levels: integer downsamples of the pyramid, starting with 1; levels smaller than one tile
        are dropped. (1, 4, 16) is a typical Aperio 40x file with no 20x level; (1, 2, 8) has one.
      seed: shifts where the mirrored tissue starts, so slides differ.
      tissue: None (tissue everywhere) or a bool array [gh, gw]; False cells are white glass.
      tissue_cell_px: level-0 side of one `tissue` cell (default: the slide split evenly).
      stain: optional per-channel optical-density gains (see `stain_perturb`).
      mpp: "auto" (10/mag), a float, or None to write no MPP (tests the --assume-mpp path).
      quality: JPEG quality of the tiles.
      dense: mirror only the dense-tissue box of the real slide (else the whole crop with its glass).
    """
    if mag not in (20, 40):
        raise ValueError(f"mag must be 20 or 40, got {mag}")
    levels = [int(d) for d in levels]
    if not levels or levels[0] != 1:
        raise ValueError(f"levels must start with downsample 1, got {levels}")
    h, w = int(size_hw[0]), int(size_hw[1])
    canvas = _Canvas((h, w), mag, seed, tissue, tissue_cell_px, stain, dense)
    mpp_value = 10.0 / mag if mpp == "auto" else mpp
    meta = f"|AppMag = {mag}" + (f"|MPP = {mpp_value:.4f}" if mpp_value is not None else "")
    levels = [d for d in levels if d == 1 or min(h, w) // d >= TILE]
    with tifffile.TiffWriter(path, bigtiff=h * w > 2**31) as tif:
        for i, down in enumerate(levels):
            lh, lw = h // down, w // down
            desc = f"Aperio Image Library v11.2.1 \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q={quality}"
            tif.write(canvas.level_tiles(down), shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE),
                      photometric="rgb", compression="jpeg", compressionargs={"level": quality}, subfiletype=0,
                      description=desc + (meta if i == 0 else ""), metadata=None)
            if i == 0:
                # Aperio's second page is a stripped thumbnail; OpenSlide expects it there.
                scale = 768 / max(h, w)
                th, tw = max(1, int(h * scale)), max(1, int(w * scale))
                thumb = cv2.resize(canvas.block(0, 0, h, w) if h * w <= 4096 * 4096 else
                                   np.full((th, tw, 3), 255, np.uint8), (tw, th), interpolation=cv2.INTER_AREA)
                tif.write(thumb, photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                          description=f"Aperio Image Library v11.2.1 \r\n{w}x{h} -> {tw}x{th}", metadata=None)
    return path
