"""Tissue segmentation on a low-resolution view of the slide (CLAM/HIPT style).

Saturation (HSV) -> median blur -> Otsu threshold (never below a floor, so an empty glass slide
does not become "tissue" from noise) -> morphological closing -> external contours filtered by
area, with holes larger than a minimum area cut out again.

The mask lives at `downsample` level-0 pixels per mask pixel and is built chunk by chunk from
the coarsest pyramid level that is fine enough, so single-level gigapixel files never need to
be held in memory at full resolution.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import openslide

from data_prep.slide_io import read_rgb

CHUNK_MASK_PX = 256  # mask pixels per chunk side; bounds the memory of one read


@dataclasses.dataclass(frozen=True)
class TissueParams:
    """Segmentation parameters; areas are in pixels at the TARGET resolution (e.g. 0.5 um/px)."""
    mask_px: int = 16                 # target px per mask px (16 at 0.5 um/px = 8 um)
    median_blur: int = 7              # mask px, odd
    min_saturation: int = 15          # floor for the Otsu threshold (0..255)
    close_px: int = 4                 # closing kernel side, mask px
    min_tissue_area: int = 256 * 256  # drop tissue pieces smaller than one 256 px patch
    min_hole_area: int = 256 * 256    # holes smaller than this count as tissue


@dataclasses.dataclass
class TissueMask:
    mask: np.ndarray       # uint8 [h, w], 1 = tissue
    thumb: np.ndarray      # uint8 [h, w, 3] RGB at the mask's resolution
    downsample: float      # level-0 px per mask px
    contours: list         # kept tissue contours (mask px), for drawing
    holes: list            # kept holes (mask px)
    threshold: float       # saturation threshold actually used


def low_res_view(slide: openslide.OpenSlide, downsample: float, what: str | None = None) -> np.ndarray:
    """Whole slide at `downsample` level-0 px per pixel -> uint8 [ceil(H/d), ceil(W/d), 3]
    (``what``: the read a damaged tile's SlideError names; default each chunk's position)."""
    w0, h0 = slide.dimensions
    out_h, out_w = int(np.ceil(h0 / downsample)), int(np.ceil(w0 / downsample))
    level = 0
    for lvl, d in enumerate(slide.level_downsamples):
        if d <= downsample * 1.01 and d > slide.level_downsamples[level]:
            level = lvl
    d_level = slide.level_downsamples[level]
    out = np.empty((out_h, out_w, 3), np.uint8)
    for my in range(0, out_h, CHUNK_MASK_PX):
        for mx in range(0, out_w, CHUNK_MASK_PX):
            ch, cw = min(CHUNK_MASK_PX, out_h - my), min(CHUNK_MASK_PX, out_w - mx)
            x0, y0 = int(round(mx * downsample)), int(round(my * downsample))
            lw = max(1, int(round(cw * downsample / d_level)))
            lh = max(1, int(round(ch * downsample / d_level)))
            chunk = read_rgb(slide, x0, y0, level, lw, lh, what=what)
            out[my:my + ch, mx:mx + cw] = cv2.resize(chunk, (cw, ch), interpolation=cv2.INTER_AREA)
    return out


def segment_rgb(thumb: np.ndarray, params: TissueParams, px_area: float) -> tuple:
    """uint8 [h,w,3] -> (mask uint8 [h,w], contours, holes, threshold).

    px_area: target-resolution pixels per mask pixel area (mask_px ** 2), to convert min areas.
    """
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[:, :, 1]
    k = params.median_blur | 1
    sat = cv2.medianBlur(sat, k) if min(sat.shape) >= k else sat
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(float(otsu), float(params.min_saturation))
    binary = (sat > thr).astype(np.uint8)
    if params.close_px > 1:
        kernel = np.ones((params.close_px, params.close_px), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    # RETR_CCOMP: two-level hierarchy, outer boundaries (parent -1) and their holes.
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    min_tissue = params.min_tissue_area / px_area
    min_hole = params.min_hole_area / px_area
    kept, holes = [], []
    if hierarchy is not None:
        hierarchy = hierarchy[0]  # [N, 4]: next, previous, first child, parent
        for i, c in enumerate(contours):
            if hierarchy[i][3] != -1:
                continue
            if cv2.contourArea(c) < min_tissue:
                continue
            kept.append(c)
            child = hierarchy[i][2]
            while child != -1:
                if cv2.contourArea(contours[child]) >= min_hole:
                    holes.append(contours[child])
                child = hierarchy[child][0]
    mask = np.zeros(binary.shape, np.uint8)
    if kept:
        cv2.drawContours(mask, kept, -1, 1, thickness=cv2.FILLED)
    if holes:
        cv2.drawContours(mask, holes, -1, 0, thickness=cv2.FILLED)
    return mask, kept, holes, thr


def segment_slide(slide: openslide.OpenSlide, level0_per_target_px: float,
                  params: TissueParams = TissueParams()) -> TissueMask:
    """Tissue mask of a slide; `level0_per_target_px` is the slide's read scale (2 for 40x->20x)."""
    downsample = params.mask_px * level0_per_target_px
    thumb = low_res_view(slide, downsample)
    mask, kept, holes, thr = segment_rgb(thumb, params, float(params.mask_px) ** 2)
    return TissueMask(mask=mask, thumb=thumb, downsample=downsample, contours=kept, holes=holes,
                      threshold=thr)


def region_fraction(tm: TissueMask, x: int, y: int, read_px: int) -> float:
    """Fraction of the level-0 square [x, x+read_px) x [y, y+read_px) covered by tissue.

    The denominator is the whole square, including any part past the slide border (white padding).
    """
    d = tm.downsample
    x0, y0 = int(round(x / d)), int(round(y / d))
    x1, y1 = int(round((x + read_px) / d)), int(round((y + read_px) / d))
    area = max(1, (x1 - x0) * (y1 - y0))
    return float(tm.mask[y0:y1, x0:x1].sum()) / area
