"""Reading whole-slide images at a target resolution (shared by data_prep, hipt-embed, hipt-heatmap).

The one subtle point is resolution: HIPT regions are 4096 px AT 20x (~0.5 um/px). A 40x slide
(~0.25 um/px) must be read over 8192 level-0 pixels and downsampled, preferably from a pyramid
level that already is 20x when the file has one. `region_geometry` decides this once;
`read_region_at_mpp` executes it. Past the slide border the region is padded with white.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import struct
import sys

import cv2
import numpy as np
import openslide
import openslide.lowlevel

# Relative error within which a slide's mpp counts as an exact multiple of the target mpp, e.g. a
# 0.499 um/px slide is read 1:1 for 0.5 um/px instead of being resampled by 0.2%.
DEFAULT_MPP_TOLERANCE = 0.1


class SlideError(Exception):
    """A slide that cannot be used; the message names the file and the problem."""


def open_slide(path: str) -> openslide.OpenSlide:
    """Open a slide with OpenSlide, turning every failure into a one-line SlideError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        if os.path.islink(path):  # a linked cohort whose files moved or whose mount is gone
            raise SlideError(f"{path}: a link to {os.readlink(path)}, which does not exist")
        raise SlideError(f"{path}: no such file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise SlideError(f"{path}: empty file")
    try:
        slide = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{path}: {_mrxs_problem(path) or _tiff_problem(path) or _plain_image(path) or 'not a slide format OpenSlide can read'}"
                         ) from None
    except openslide.OpenSlideError as e:
        if _mrxs_problem(path):
            raise SlideError(f"{path}: {_mrxs_problem(path)}") from None
        cut = _tiff_problem(path)  # "Short read": a cut-off TIFF whose directories survived
        raise SlideError(f"{path}: {cut if cut and cut.startswith('truncated') else f'unreadable or corrupt slide ({e})'}"
                         ) from None
    except Exception as e:  # PIL/ctypes errors on odd files
        raise SlideError(f"{path}: cannot open ({type(e).__name__}: {e})") from None
    if slide.dimensions[0] <= 0 or slide.dimensions[1] <= 0:
        raise SlideError(f"{path}: slide has no pixels")
    return slide


def _mrxs_problem(path: str) -> str | None:
    """A MIRAX slide is its .mrxs file and a folder of the same name beside it (Slidedat.ini and
    the Data*.dat tiles); the .mrxs alone, copied without it, was named "a plain JPEG image"."""
    folder = os.path.splitext(path)[0]
    if not path.lower().endswith(".mrxs") or os.path.isfile(os.path.join(folder, "Slidedat.ini")):
        return None
    return (f"an MRXS slide without its data folder {folder}{os.sep} (Slidedat.ini and the Data*.dat "
            "files): copy that folder beside the .mrxs file")


def _plain_image(path: str) -> str | None:
    """What a non-TIFF image file OpenSlide refused is ("a plain JPEG image, ..."): a crop or
    screenshot saved under a slide's extension; None when PIL does not read it either."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt = im.format
    except Exception:  # noqa: BLE001 -- only used to name the problem
        return None
    if fmt in (None, "TIFF"):
        return None
    return f"a plain {fmt} image, not a whole-slide format OpenSlide can read"


def _tiff_problem(path: str) -> str | None:
    """Why a file with a TIFF header (SVS, generic and BigTIFF slides) was refused: OpenSlide
    calls a truncated or damaged TIFF "unsupported", which sends users looking for a format
    problem. None when the file is not a TIFF."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 8:
        return None
    magic = int.from_bytes(head[2:4], "little" if order == "<" else "big")
    if magic == 42:  # classic TIFF: 4-byte offset of the first directory
        first = int.from_bytes(head[4:8], "little" if order == "<" else "big")
    elif magic == 43 and len(head) == 16:  # BigTIFF: 8-byte offset
        first = int.from_bytes(head[8:16], "little" if order == "<" else "big")
    else:
        return None
    if first >= size:
        return (f"truncated TIFF/SVS file: its first image directory is at byte {first:,} but the "
                f"file has {size:,} bytes (an interrupted copy or download?)")
    try:
        with open(path, "rb") as f:
            reaches, tiled = _tiff_extent(f, size, order, magic == 43, first)
    except (OSError, struct.error, ValueError):
        reaches, tiled = 0, None
    if reaches > size:  # writers that put the directories first (tifffile, libvips) cut anywhere
        return (f"truncated TIFF/SVS file: its image directories and data reach byte {reaches:,} but the "
                f"file has {size:,} bytes (an interrupted copy or download?)")
    if tiled is False:
        return (f"a stripped (untiled) TIFF image ({size:,} bytes): OpenSlide reads TIFF slides stored in "
                "tiles; convert it, e.g. vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg")
    return (f"a TIFF/SVS file OpenSlide cannot open as a slide ({size:,} bytes): an image TIFF that is "
            "not a tiled slide, or a damaged or truncated file (an interrupted copy?)")


_TIFF_INT = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8: the types of offsets and byte counts


def _tiff_extent(f, size: int, order: str, big: bool, first: int) -> tuple[int, bool | None]:
    """(the last byte the file's image directories and image data point to, whether the first
    image is tiled (None: unknown)), walking the directory chain from `first` (struct.error on
    a malformed directory). A cut-off file points past its end; (0, None) when the first
    directory itself does not fit in the file."""
    count_fmt, entry_size, off_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    off_size = struct.calcsize(off_fmt)
    reaches, offset, seen, tiled = 0, first, set(), None
    while offset and offset not in seen and len(seen) < 4096:
        seen.add(offset)
        f.seek(offset)
        n = struct.unpack(order + count_fmt, f.read(struct.calcsize(count_fmt)))[0]
        end = offset + struct.calcsize(count_fmt) + n * entry_size + off_size
        if end > size:  # the first directory not whole: garbage as likely as a cut (unknown)
            return (end, tiled) if offset != first else (0, None)
        entries = f.read(n * entry_size)
        values = {}
        for i in range(n):
            entry = entries[i * entry_size:(i + 1) * entry_size]
            tag, typ = struct.unpack(order + "HH", entry[:4])
            if tag not in (273, 279, 324, 325) or typ not in _TIFF_INT:  # strip/tile offsets, byte counts
                continue
            count = struct.unpack(order + off_fmt, entry[4:4 + off_size])[0]
            fmt = f"{order}{count}{_TIFF_INT[typ]}"
            nbytes = struct.calcsize(fmt)
            if nbytes <= off_size:
                raw = entry[4 + off_size:4 + off_size + nbytes]
            else:
                at = struct.unpack(order + off_fmt, entry[4 + off_size:])[0]
                if at + nbytes > size:
                    return at + nbytes, tiled
                f.seek(at)
                raw = f.read(nbytes)
            values[tag] = struct.unpack(fmt, raw)
        if tiled is None and values:
            tiled = 324 in values
        starts, counts = values.get(324, values.get(273)), values.get(325, values.get(279))
        if starts and counts and len(starts) == len(counts):
            reaches = max(reaches, max(s + c for s, c in zip(starts, counts)))
        f.seek(end - off_size)
        offset = struct.unpack(order + off_fmt, f.read(off_size))[0]
        if offset >= size:
            return offset + 1, tiled
    return reaches, tiled


# A microscope's level-0 resolution lies well inside this range (um/px); outside it the metadata
# is a screen/print resolution or garbage (a 72 dpi TIFF tag reads as 352.8 um/px).
PLAUSIBLE_MPP = (0.1, 10.0)
# TIFF resolution tags of screen/print images (dots per inch): never a scanner's resolution.
PRINT_DPI = (72.0, 96.0, 150.0, 200.0, 300.0, 600.0)


def _print_dpi_tag(props) -> float | None:
    """The dpi value when the TIFF resolution tags look like a screen/print image, else None."""
    if str(props.get("tiff.ResolutionUnit", "")).lower() != "inch":
        return None
    try:
        dpi = float(props.get("tiff.XResolution", "nan"))
    except ValueError:
        return None
    return dpi if any(abs(dpi - d) < 1e-3 for d in PRINT_DPI) else None


def mpp_problem(slide: openslide.OpenSlide, mpp: float, axis: str = "") -> str | None:
    """Why a level-0 mpp read from the slide's metadata cannot be a microscope's, or None.
    `axis` ("mpp-x"/"mpp-y") names the one value judged when the two axes differ."""
    dpi = _print_dpi_tag(slide.properties)
    if dpi is not None:
        return f"its TIFF resolution tag says {dpi:g} dpi ({mpp:.4g} um/px), a screen/print value"
    lo, hi = PLAUSIBLE_MPP
    if not lo <= mpp <= hi:
        said = f"{axis} {mpp:.4g}" if axis else f"{mpp:.4g}"
        return f"its metadata says {said} um/px, outside the {lo}-{hi} um/px of a microscope"
    return None


def _axes_problem(slide: openslide.OpenSlide, axes: dict[str, float]) -> str | None:
    """`mpp_problem` of the first implausible axis, or None. Each axis is judged alone: with
    mpp-x 0.25 and mpp-y 0.01 their mean (0.13) looks like a microscope's while one axis is
    garbage, and a converter's default on one axis (1 px/cm = 1e4 um/px) is not a slide's
    anisotropy but metadata to overrule with --assume-mpp."""
    differ = len(set(axes.values())) > 1
    for axis, v in axes.items():
        problem = mpp_problem(slide, v, f"mpp-{axis}" if differ else "")
        if problem is not None:
            return problem
    return None


def resolve_mpp(slide: openslide.OpenSlide, assume_mpp: float | None = None,
                path: str = "") -> tuple[float, str]:
    """Level-0 mpp and where it came from: ("slide property" | "assumed").

    A plausible mpp in the metadata wins. An implausible one (see `mpp_problem`; either axis)
    or none at all needs `assume_mpp`; without it SlideError names the reason and the way out.
    Non-square pixels (both axes plausible) are refused whatever `assume_mpp` says.
    """
    name = path or getattr(slide, "_filename", "slide")
    axes = _metadata_axes(slide)
    if not axes:
        if assume_mpp is not None:
            return float(assume_mpp), "assumed"
        raise SlideError(_no_mpp(slide, name))
    problem = _axes_problem(slide, axes)
    if problem is None:
        mpp = _metadata_mpp(slide, name)
        _warn_magnification_contradicts(slide, mpp, name)
        return mpp, "slide property"
    if assume_mpp is not None:
        return float(assume_mpp), "assumed"
    raise SlideError(f"{name}: refused: {problem}; if it really is a slide, pass --assume-mpp "
                     "(e.g. 0.25 for 40x, 0.5 for 20x)")


# An objective power this far (as a ratio) from the one the mpp implies (10 / mpp) contradicts
# it. Not nearer: the pixel size follows the camera and its adapter as much as the objective
# (a 3DHistech Pannoramic's 20x objective gives 0.243 um/px, a ratio of 2.06), so only a
# factor of 3 or more (AppMag 40 at 1.0 um/px, AppMag 10 at 0.25) is a header in error.
MAGNIFICATION_MISMATCH = 3.0
_WARNED_MAGNIFICATION: set[str] = set()


def _warn_magnification_contradicts(slide: openslide.OpenSlide, mpp: float, name: str) -> None:
    """A header saying AppMag 10 with MPP 0.25 is read at 0.25 um/px (40x): the mpp is what
    the pixels are measured in, but a user reading the header as 10x should hear that, once
    per slide (a command reads a slide's mpp more than once)."""
    power = _objective_power(slide)
    if power is None or name in _WARNED_MAGNIFICATION:
        return
    ratio = (10.0 / power) / mpp
    if max(ratio, 1.0 / ratio) < MAGNIFICATION_MISMATCH:
        return
    _WARNED_MAGNIFICATION.add(name)
    said = f"AppMag {power:g}" if "aperio.AppMag" in slide.properties else f"objective power {power:g}x"
    print(f"{name}: warning: its metadata says {said} but {mpp:.4g} um/px (about {10.0 / mpp:.0f}x); "
          f"reading it at {mpp:.4g} um/px (the mpp wins)", file=sys.stderr)


# A pixel "has signal" when its grey level is between black fill and glass, and "colour" when
# its channels differ by more than JPEG noise; a slide whose signal is colourless (R = G = B)
# is a greyscale or fluorescence image, which OpenSlide serves as grey RGB without a word.
_SIGNAL_GREY = (20, 220)
_COLOUR_SPREAD = 8
_MIN_SIGNAL = 100  # sampled signal pixels needed before judging


def colour_counts(rgb: np.ndarray, step: int = 8) -> np.ndarray:
    """[signal pixels, signal pixels with colour] among every ``step``-th pixel of uint8
    [..., H, W, 3] RGB (one image or a batch)."""
    sub = np.asarray(rgb[..., ::step, ::step, :], np.int16)
    grey = sub.mean(axis=-1)
    signal = (grey > _SIGNAL_GREY[0]) & (grey < _SIGNAL_GREY[1])
    colour = signal & (sub.max(axis=-1) - sub.min(axis=-1) > _COLOUR_SPREAD)
    return np.array([int(signal.sum()), int(colour.sum())])


def colourless_problem(counts, path: str) -> str | None:
    """Why pixels with these ``colour_counts`` are not an H&E slide's, or None (also when there
    is too little signal to tell)."""
    signal, colour = (int(c) for c in counts)
    if signal < _MIN_SIGNAL or colour > 0.01 * signal:
        return None
    return (f"{path}: its pixels have no colour (R = G = B wherever there is signal): a greyscale or "
            "fluorescence image, not a brightfield H&E slide (the models take H&E RGB)")


def check_upsample(mpp: float, target_mpp: float, tolerance: float = DEFAULT_MPP_TOLERANCE,
                   allow_upsample: bool = False, path: str = "slide") -> None:
    """SlideError when reading at `target_mpp` would enlarge the slide's pixels beyond snapping."""
    if allow_upsample or snap_scale(target_mpp, mpp, tolerance) >= 1.0:
        return
    raise SlideError(f"{path}: refused: slide is {mpp:.4g} um/px, coarser than the target "
                     f"{target_mpp:g} um/px (regions would be upsampled {mpp / target_mpp:.2f}x); "
                     "pass --allow-upsample to accept, or a --target-mpp >= the slide's")


_NO_MPP = ("{name}: slide has no mpp in its metadata; pass --assume-mpp (e.g. 0.25 for 40x, "
           "0.5 for 20x)")


def _objective_power(slide: openslide.OpenSlide) -> float | None:
    try:
        power = float(slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER, "nan"))
    except ValueError:
        return None
    return power if np.isfinite(power) and power > 0 else None


def _no_mpp(slide: openslide.OpenSlide, name: str) -> str:
    """The refusal of a slide without a pixel size. An objective power in its header is named
    with the mpp it usually means, but not used: the pixel size follows the camera and its
    adapter as much as the objective (20x objectives give 0.24-0.50 um/px across scanners),
    and a wrong guess would embed every region at the wrong scale without a word."""
    power = _objective_power(slide)
    if power is None:
        return _NO_MPP.format(name=name)
    return (f"{name}: slide has no mpp in its metadata, only an objective power ({power:g}x), which does "
            f"not fix the pixel size (it depends on the scanner's camera as much as its objective); pass "
            f"--assume-mpp with your scanner's pixel size at {power:g}x (10/{power:g} = {10 / power:g} um/px "
            "on many scanners)")


def _metadata_axes(slide: openslide.OpenSlide) -> dict[str, float]:
    """{"x": mpp-x, "y": mpp-y} as the metadata states them (finite and > 0), either may be absent.
    OpenSlide's mpp properties, else the OME-XML of an OME-TIFF (``_ome_axes``)."""
    values = {}
    for axis, key in (("x", openslide.PROPERTY_NAME_MPP_X), ("y", openslide.PROPERTY_NAME_MPP_Y)):
        try:
            v = float(slide.properties.get(key, "nan"))
        except ValueError:
            v = float("nan")
        if np.isfinite(v) and v > 0:
            values[axis] = v
    return values or _ome_axes(slide.properties)


# OME-XML length units (PhysicalSizeXUnit; default micrometre) -> micrometres.
_OME_UNITS_UM = {"µm": 1.0, "\u03bcm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "Å": 1e-4, "pm": 1e-6,
                 "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_axes(props) -> dict[str, float]:
    """{"x", "y"} um/px from the first image's <Pixels PhysicalSizeX/Y> of an OME-TIFF's OME-XML
    (its ImageDescription). OpenSlide reads an OME-TIFF as a generic TIFF and takes the mpp from
    the TIFF resolution tags only, which OME writers (tifffile's ome=True, many converters)
    leave out: the pixel size is then stated in the file but "no mpp" was reported."""
    description = str(props.get("tiff.ImageDescription", ""))
    if "<OME" not in description[:2000]:
        return {}
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(description.strip())
    except ET.ParseError:
        return {}
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    values = {}
    for axis in ("x", "y") if pixels is not None else ():
        size, unit = pixels.get(f"PhysicalSize{axis.upper()}"), pixels.get(f"PhysicalSize{axis.upper()}Unit", "µm")
        try:
            v = float(size) * _OME_UNITS_UM[unit]
        except (TypeError, ValueError, KeyError):
            continue
        if np.isfinite(v) and v > 0:
            values[axis] = v
    return values


def _metadata_mpp(slide: openslide.OpenSlide, name: str) -> float | None:
    """The level-0 mpp the metadata states (mean of mpp-x and mpp-y), None when it states none.

    SlideError when the two axes differ beyond DEFAULT_MPP_TOLERANCE, both plausible: one scale
    cannot read such a slide, and their mean gave regions stretched along one axis with nothing
    said. With an implausible axis the metadata is garbage, not the pixels' shape: the caller's
    plausibility check (or --assume-mpp) decides."""
    values = _metadata_axes(slide)
    if not values:
        return None
    if len(values) == 2 and _axes_problem(slide, values) is None:
        lo, hi = sorted(values.values())
        if hi > lo * (1.0 + DEFAULT_MPP_TOLERANCE):
            raise SlideError(f"{name}: refused: pixels are not square (mpp-x {values['x']:.4g}, mpp-y "
                             f"{values['y']:.4g} um/px): its regions would be stretched {hi / lo:.2f}:1 along "
                             "one axis; resample the slide to square pixels (or correct its metadata)")
    return float(np.mean(list(values.values())))


def slide_mpp(slide: openslide.OpenSlide, assume_mpp: float | None = None, path: str = "") -> float:
    """Level-0 microns per pixel from the slide metadata, else `assume_mpp`, else SlideError.
    Non-square pixels (mpp-x and mpp-y apart, both plausible) are a SlideError even with
    `assume_mpp`.

    Metadata with an implausible axis yields to `assume_mpp` as in `resolve_mpp` (the slide
    must be read at the scale hipt-extract read it); otherwise no plausibility check."""
    name = path or getattr(slide, "_filename", "slide")
    mpp = _metadata_mpp(slide, name)
    if mpp is not None and not (assume_mpp is not None and _axes_problem(slide, _metadata_axes(slide))):
        return mpp
    if assume_mpp is not None:
        return float(assume_mpp)
    raise SlideError(_no_mpp(slide, name))


@dataclasses.dataclass(frozen=True)
class RegionGeometry:
    """How one output region of `region_px` px at the target mpp maps onto the slide."""
    read_px: int       # side of the region in level-0 pixels
    level: int         # pyramid level read from
    level_px: int      # side of the region in pixels of that level (resized to region_px if != )
    region_px: int
    mpp: float         # mpp of the output image (= slide_mpp * read_px / region_px)


def snap_scale(target_mpp: float, mpp: float, tolerance: float = DEFAULT_MPP_TOLERANCE) -> float:
    """Level-0 pixels per output pixel; snapped to an integer when within `tolerance` of one."""
    scale = target_mpp / mpp
    nearest = round(scale)
    if nearest >= 1 and abs(scale - nearest) <= tolerance * scale:
        return float(nearest)
    return scale


def region_geometry(slide: openslide.OpenSlide, mpp: float, region_px: int = 4096,
                    target_mpp: float = 0.5, tolerance: float = DEFAULT_MPP_TOLERANCE) -> RegionGeometry:
    """Choose level-0 extent and pyramid level for regions of `region_px` px at `target_mpp`.

    The level is the coarsest one that is still at least as fine as the target, so a 40x slide
    with a 20x level reads 4096 px from that level, and one without reads 8192 px from level 0.
    """
    scale = snap_scale(target_mpp, mpp, tolerance)
    read_px = int(round(region_px * scale))
    best = 0
    for lvl, down in enumerate(slide.level_downsamples):
        # 1% slack: pyramid downsamples of odd-sized levels are not exact (e.g. 3.9998).
        if down <= scale * 1.01 and down > slide.level_downsamples[best]:
            best = lvl
    level_px = int(round(read_px / slide.level_downsamples[best]))
    return RegionGeometry(read_px=read_px, level=best, level_px=level_px, region_px=region_px,
                          mpp=mpp * read_px / region_px)


def composite_white(rgba: np.ndarray, order: str = "rgb") -> np.ndarray:
    """uint8 [h,w,4] RGBA from OpenSlide -> uint8 [h,w,3] in `order` ("rgb" or "bgr") over white.

    Transparent pixels are outside the scanned area (past the border, gaps in sparse scans).
    """
    if rgba[:, :, 3].min() == 255:  # fully inside the slide: one cheap OpenCV pass
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB if order == "rgb" else cv2.COLOR_RGBA2BGR)
    a = rgba[:, :, 3:4].astype(np.float32) / 255.0
    out = rgba[:, :, :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out if order == "rgb" else np.ascontiguousarray(out[:, :, ::-1])


def _read_bgra_premultiplied(slide: openslide.OpenSlide, x: int, y: int, level: int, w: int,
                             h: int) -> np.ndarray | None:
    """OpenSlide's native output -> uint8 [h,w,4] premultiplied BGRA, or None if unavailable.

    openslide_read_region fills premultiplied ARGB uint32s, i.e. B,G,R,A bytes on little-endian
    machines. Reading them straight into numpy skips openslide-python's ARGB->RGBA conversion,
    PIL image and numpy copy (~50 ms per 4096 px region, as much as the JPEG encode).
    """
    osr = getattr(slide, "_osr", None)
    fn = getattr(openslide.lowlevel, "_read_region", None)
    if osr is None or fn is None or sys.byteorder != "little" or w <= 0 or h <= 0:
        return None
    buf = np.empty((h, w), np.uint32)
    fn(osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), int(x), int(y), int(level),
       int(w), int(h))  # raises OpenSlideError on a read error (ctypes errcheck)
    return buf.view(np.uint8).reshape(h, w, 4)  # [h,w] uint32 -> [h,w,4] bytes B,G,R,A


def read_rgb(slide: openslide.OpenSlide, x: int, y: int, level: int, w: int, h: int,
             order: str = "rgb", what: str | None = None) -> np.ndarray:
    """OpenSlide read_region composited over white -> uint8 [h,w,3]. (x, y) in level-0 pixels.

    A read OpenSlide cannot decode (a damaged JPEG tile) is a SlideError naming the slide and
    the region (or ``what`` the read is part of), so callers that go on past a bad slide catch
    it like any other."""
    try:
        bgra = _read_bgra_premultiplied(slide, x, y, level, w, h)
        if bgra is None:  # not the C-backed OpenSlide class (or big-endian): public API
            rgba = np.asarray(slide.read_region((int(x), int(y)), int(level), (int(w), int(h))))
    except openslide.OpenSlideError as e:
        raise _unreadable(slide, what or f"{w} x {h} px at level {level} from level-0 ({x}, {y})", e) from None
    if bgra is None:
        return composite_white(rgba, order)
    alpha = bgra[:, :, 3]
    if alpha.min() != 255:
        # Premultiplied colour over white: c*a/255 + 255*(1 - a/255) = c_premultiplied + 255 - a.
        bgra = bgra.copy()
        bgra[:, :, :3] += (255 - alpha)[:, :, None]
        bgra[:, :, 3] = 255
    return cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB if order == "rgb" else cv2.COLOR_BGRA2BGR)


def read_thumbnail(slide: openslide.OpenSlide, max_px: int) -> np.ndarray:
    """The whole slide as uint8 [h,w,3] RGB, its longer side at most `max_px`; a damaged tile is
    a SlideError naming the slide, as in `read_rgb`. Read in chunks from the best level
    (data_prep.tissue.low_res_view): OpenSlide's get_thumbnail reads that whole level in one
    buffer, which for a slide without a pyramid (a tiled TIFF, an OME-TIFF whose levels are
    SubIFDs OpenSlide does not see) is level 0: 32 GB for 100k x 80k px."""
    from data_prep.tissue import low_res_view

    downsample = max(1.0, max(slide.dimensions) / float(max_px))
    return low_res_view(slide, downsample, what=f"a thumbnail of at most {max_px} px")


def _unreadable(slide: openslide.OpenSlide, what: str, error: Exception) -> SlideError:
    """A read OpenSlide cannot decode, as a SlideError naming the slide and the read."""
    name = getattr(slide, "_filename", None) or "slide"
    return SlideError(f"{name}: cannot read its pixels ({what}): {error} (a damaged tile?)")


def read_region_geometry(slide: openslide.OpenSlide, x: int, y: int, geom: RegionGeometry,
                         order: str = "rgb") -> np.ndarray:
    """Read one region described by `geom` at level-0 (x, y) -> uint8 [region_px, region_px, 3].

    order="bgr" skips a channel swap when the pixels go straight to an OpenCV JPEG encoder.
    """
    img = read_rgb(slide, x, y, geom.level, geom.level_px, geom.level_px, order)
    if geom.level_px != geom.region_px:
        # INTER_AREA is the box filter: for an exact 2x it is the mean of each 2x2 block.
        interp = cv2.INTER_AREA if geom.level_px > geom.region_px else cv2.INTER_CUBIC
        img = cv2.resize(img, (geom.region_px, geom.region_px), interpolation=interp)
    return img


def read_region_at_mpp(slide: openslide.OpenSlide, x: int, y: int, size_px: int = 4096,
                       target_mpp: float = 0.5, assume_mpp: float | None = None,
                       tolerance: float = DEFAULT_MPP_TOLERANCE) -> np.ndarray:
    """Region of `size_px` px at `target_mpp` whose top-left is level-0 (x, y) -> uint8 [S,S,3].

    A 40x slide reads 2*size_px level-0 pixels (or size_px from a 20x pyramid level) and resizes;
    pixels past the slide border are white. The level-0 mpp is checked as in `resolve_mpp`
    (an implausible metadata value needs `assume_mpp`).
    """
    mpp, _ = resolve_mpp(slide, assume_mpp)
    geom = region_geometry(slide, mpp, size_px, target_mpp, tolerance)
    return read_region_geometry(slide, x, y, geom)
