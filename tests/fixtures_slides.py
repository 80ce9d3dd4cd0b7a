"""Synthetic slide cohorts for tests (reusable by other test modules: import the fixtures).

    from tests.fixtures_slides import synthetic_slides, LAYOUT  # noqa: F401  (pytest fixture)

All slides are Aperio pyramids grown from the real CMU-1-Small-Region tissue
(data_prep.synth.make_aperio_slide). The tissue layout is a boolean grid whose cells coincide
with the region grid used by the tests (512 px regions at 0.5 um/px), so the expected region
count can be computed by hand from LAYOUT.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from data_prep.synth import REAL_SLIDE, make_aperio_slide, real_tissue_pixels

REGION = 512  # region side (px at 0.5 um/px) used by the data_prep tests
# Level-0 (height, width) of the 20x slides: 4 x 6 region grid whose last column is only
# 40 px wide (2600 = 5 * 512 + 40) and last row 464 px tall (2000 = 3 * 512 + 464).
SIZE_20X = (2000, 2600)
LAYOUT = np.array([[1, 0, 1, 0, 0, 1],
                   [0, 1, 1, 0, 0, 0],
                   [0, 0, 0, 1, 0, 1],
                   [1, 0, 0, 0, 1, 1]], bool)


def expected_regions(layout: np.ndarray = LAYOUT, size_hw=SIZE_20X, region: int = REGION,
                     min_fraction: float = 0.1) -> list[tuple[int, int]]:
    """Hand computation: a tissue cell gives a region unless the slide border cuts it below
    `min_fraction` of the region area (here only the 40 px last column). 20x coordinates."""
    h, w = size_hw
    kept = []
    for r in range(layout.shape[0]):
        for c in range(layout.shape[1]):
            inside = (min(h, (r + 1) * region) - r * region) * (min(w, (c + 1) * region) - c * region)
            if layout[r, c] and inside / region ** 2 >= min_fraction:
                kept.append((c * region, r * region))
    return kept


def make_cohort(folder: str) -> dict[str, str]:
    """Three variants of the same layout: 20x, 40x without a 20x level, 40x with one."""
    os.makedirs(folder, exist_ok=True)
    h, w = SIZE_20X
    paths = {
        "s20": make_aperio_slide(os.path.join(folder, "s20.svs"), (h, w), mag=20, levels=(1, 4),
                                 seed=1, tissue=LAYOUT, tissue_cell_px=REGION),
        "s40": make_aperio_slide(os.path.join(folder, "s40.svs"), (2 * h, 2 * w), mag=40,
                                 levels=(1, 4, 16), seed=1, tissue=LAYOUT, tissue_cell_px=2 * REGION),
        "s40l": make_aperio_slide(os.path.join(folder, "s40l.svs"), (2 * h, 2 * w), mag=40,
                                  levels=(1, 2, 8), seed=1, tissue=LAYOUT, tissue_cell_px=2 * REGION),
    }
    return paths


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory) -> dict[str, str]:
    """{'s20', 's40', 's40l'} -> path of a synthetic slide (built once per test session).

    Each test module importing this fixture gets its own fixture instance, so the cohort is
    cached by path under the session's base temp folder (a marker file says it is complete).
    """
    folder = tmp_path_factory.getbasetemp() / "synthetic_slides_shared"
    marker = folder / "COMPLETE"
    if marker.exists():
        return {k: str(folder / f"{k}.svs") for k in ("s20", "s40", "s40l")}
    paths = make_cohort(str(folder))
    marker.write_text("ok")
    return paths


@pytest.fixture(scope="session")
def real_slide() -> str:
    return REAL_SLIDE


def damage_tile(path: str, index: int, seed: int = 0) -> str:
    """Overwrite level-0 JPEG tile `index` (row-major) of a slide with random bytes, keeping its
    first and last two bytes (the SOI/EOI markers): OpenSlide opens the file and fails only
    when a read decodes that tile ("Corrupt JPEG data"), as with a bad sector or a broken copy."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset + 2)
        f.write(np.random.default_rng(seed).integers(0, 256, count - 4, dtype=np.uint8).tobytes())
    return path


def tiff_with_mpp(path: str, mpp_x: float, mpp_y: float, side: int = 1024) -> str:
    """A tiled RGB TIFF of real tissue whose resolution tags give `mpp_x` and `mpp_y` um/px."""
    import tifffile

    img = np.ascontiguousarray(np.tile(real_tissue_pixels(), (2, 2, 1))[:side, :side])
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / mpp_x, 1e4 / mpp_y), resolutionunit="CENTIMETER")
    return path


def grey_tiff(path: str, side: int = 1024) -> str:
    """A tiled greyscale TIFF of real tissue at 0.5 um/px (a fluorescence-like channel): OpenSlide
    serves it as grey RGB."""
    import tifffile

    rgb = np.tile(real_tissue_pixels(), (2, 2, 1))[:side, :side]
    tifffile.imwrite(path, np.ascontiguousarray(rgb.mean(-1).astype(np.uint8)), tile=(256, 256),
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return path
