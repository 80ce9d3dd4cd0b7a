"""data_prep.slide_io: opening, mpp, region geometry at the target resolution, padding."""
import os

import numpy as np
import openslide
import pytest

from data_prep.slide_io import (SlideError, open_slide, read_region_at_mpp, region_geometry,
                                resolve_mpp, slide_mpp, snap_scale)
from data_prep.synth import make_aperio_slide
from tests.fixtures_slides import damage_tile, tiff_with_mpp
from tests.fixtures_slides import real_slide, synthetic_slides  # noqa: F401  (fixtures)


def _direct(path, x, y, level, size):
    s = openslide.OpenSlide(path)
    return np.asarray(s.read_region((x, y), level, (size, size)))[:, :, :3].astype(np.float32)


def test_snap_scale():
    assert snap_scale(0.5, 0.499) == 1.0          # 20x scanner: read 1:1
    assert snap_scale(0.5, 0.2527) == 2.0         # 40x: 2 level-0 px per output px
    assert snap_scale(0.5, 0.5) == 1.0
    assert snap_scale(0.5, 0.35) == pytest.approx(0.5 / 0.35)  # no integer nearby: resample


def test_geometry_20x_40x_with_and_without_20x_level(synthetic_slides):
    g20 = region_geometry(openslide.OpenSlide(synthetic_slides["s20"]), 0.5, 4096, 0.5)
    assert (g20.read_px, g20.level, g20.level_px, g20.mpp) == (4096, 0, 4096, 0.5)
    # 40x without a 20x level: 8192 level-0 px, resized to 4096.
    g40 = region_geometry(openslide.OpenSlide(synthetic_slides["s40"]), 0.25, 4096, 0.5)
    assert (g40.read_px, g40.level, g40.level_px, g40.mpp) == (8192, 0, 8192, 0.5)
    # 40x with a 20x level (downsample 2): read 4096 px from level 1, no resize.
    g40l = region_geometry(openslide.OpenSlide(synthetic_slides["s40l"]), 0.25, 4096, 0.5)
    assert (g40l.read_px, g40l.level, g40l.level_px) == (8192, 1, 4096)


def test_real_slide_mpp_and_white_padding(real_slide):
    slide = open_slide(real_slide)
    assert slide_mpp(slide) == pytest.approx(0.499)
    region = read_region_at_mpp(slide, 0, 0, size_px=4096, target_mpp=0.5)
    assert region.shape == (4096, 4096, 3) and region.dtype == np.uint8
    w, h = slide.dimensions  # 2220 x 2967: smaller than one region
    np.testing.assert_array_equal(region[:h, :w], _direct(real_slide, 0, 0, 0, 4096)[:h, :w])
    assert (region[h:] == 255).all() and (region[:, w:] == 255).all()


def test_40x_read_equals_2x2_mean_of_level0(synthetic_slides):
    x, y = 1024, 2048
    for name in ("s40", "s40l"):
        out = read_region_at_mpp(open_slide(synthetic_slides[name]), x, y, 512, 0.5).astype(np.float32)
        ref = _direct(synthetic_slides["s40"], x, y, 0, 1024).reshape(512, 2, 512, 2, 3).mean((1, 3))
        err = np.abs(out - ref)
        # s40: same pixels, box filter; s40l: the 20x pyramid level was JPEG-compressed again.
        assert err.mean() < (0.6 if name == "s40" else 3.0), (name, err.mean())


def test_open_slide_errors(tmp_path):
    txt = tmp_path / "notes.svs"
    txt.write_text("not a slide")
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    from PIL import Image

    crop = tmp_path / "crop.svs"  # a JPEG saved under a slide's extension (plant: no _plain_image)
    Image.new("RGB", (64, 64), "white").save(crop, format="JPEG")
    # an MRXS index copied without its data folder (the .mrxs is a JPEG preview: it was "a plain
    # JPEG image"), a link whose target is gone ("no such file"). Plants: no _mrxs_problem, no
    # islink case -> the old messages, fail.
    Image.new("RGB", (64, 64), "white").save(tmp_path / "mirax.mrxs", format="JPEG")
    os.symlink(tmp_path / "moved" / "x.svs", tmp_path / "link.svs")
    for path, msg in ((txt, "not a slide format"), (empty, "empty file"),
                      (tmp_path / "missing.svs", "no such file"),
                      (crop, "a plain JPEG image, not a whole-slide format"),
                      (tmp_path / "mirax.mrxs", "an MRXS slide without its data folder .*mirax/ \\(Slidedat.ini"),
                      (tmp_path / "link.svs", "a link to .*moved/x.svs, which does not exist")):
        with pytest.raises(SlideError, match=msg) as e:
            open_slide(str(path))
        assert str(path) in str(e.value)


def test_truncated_svs_is_called_truncated(real_slide, tmp_path):
    """OpenSlide reports a cut-off SVS as an unsupported format: the message must say truncated,
    or people hunt for a format problem. Plant: the plain OpenSlide message -> fails."""
    data = open(real_slide, "rb").read()
    for name, size in (("head.svs", 3000), ("half.svs", len(data) // 2)):
        (tmp_path / name).write_bytes(data[:size])
        with pytest.raises(SlideError, match=rf"{name}: truncated TIFF/SVS file: its first image directory "
                                             rf"is at byte [\d,]+ but the file has {size:,} bytes"):
            open_slide(str(tmp_path / name))
    # A TIFF header whose directory lies inside the file but is garbage: corrupt, not "format".
    (tmp_path / "bad.svs").write_bytes(b"II*\x00\x08\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(SlideError, match="bad.svs: a TIFF/SVS file OpenSlide cannot open as a slide"):
        open_slide(str(tmp_path / "bad.svs"))


def test_cut_slide_whose_directories_come_first_is_called_truncated(tmp_path):
    """tifffile (data_prep.synth, libvips too) writes each image directory before its tiles: the
    first directory survives a cut, and the check above called such a file "an image TIFF that
    is not a tiled slide, or a damaged or truncated file"; cut near its end OpenSlide's own
    "Short read" was passed on. The directory chain and tile extents are walked. A stripped
    TIFF (a plain image export) is named as such. Plant: the first-directory check only ->
    the generic message, fails."""
    import tifffile

    from tests.fixtures_slides import real_tissue_pixels

    p = make_aperio_slide(str(tmp_path / "whole.svs"), (1024, 1024), levels=(1, 4))
    data = open(p, "rb").read()
    for cut in (2000, len(data) // 2, len(data) - 10):
        (tmp_path / "cut.svs").write_bytes(data[:cut])
        with pytest.raises(SlideError, match=rf"cut.svs: truncated TIFF/SVS file: its image directories and "
                                             rf"data reach byte [\d,]+ but the file has {cut:,} bytes"):
            open_slide(str(tmp_path / "cut.svs"))
    strips = str(tmp_path / "strips.tif")
    tifffile.imwrite(strips, real_tissue_pixels()[:512, :512], photometric="rgb")
    with pytest.raises(SlideError, match="strips.tif: a stripped \\(untiled\\) TIFF image"):
        open_slide(strips)


def test_thumbnail_of_a_slide_without_pyramid_is_read_in_chunks(tmp_path, monkeypatch):
    """OpenSlide's get_thumbnail reads the whole best level into one buffer: level 0 for a slide
    without a pyramid (a tiled TIFF; an OME-TIFF whose levels are SubIFDs), 32 GB for a 100k x
    80k px slide (hipt-heatmap's slide map). read_thumbnail reads it in bounded chunks and gives
    the same picture. Plant: back to get_thumbnail -> one read of the whole slide, fails."""
    from data_prep import slide_io, tissue
    from data_prep.slide_io import read_thumbnail

    slide = open_slide(tiff_with_mpp(str(tmp_path / "flat.tif"), 0.5, 0.5, side=1024))
    assert slide.level_count == 1
    reads = []
    fast = slide_io._read_bgra_premultiplied
    monkeypatch.setattr(slide_io, "_read_bgra_premultiplied", lambda s, x, y, lvl, w, h: reads.append(w * h) or
                        fast(s, x, y, lvl, w, h))
    monkeypatch.setattr(slide.__class__, "read_region", lambda *a: reads.append(np.inf))  # get_thumbnail's
    monkeypatch.setattr(tissue, "CHUNK_MASK_PX", 16)  # 16 thumbnail px = 128 level-0 px per chunk side
    thumb = read_thumbnail(slide, 128)
    assert thumb.shape == (128, 128, 3) and max(reads) <= 128 * 128 and len(reads) == 64
    monkeypatch.undo()
    import cv2

    ref = cv2.resize(_direct(slide._filename, 0, 0, 0, 1024), (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(thumb - ref).max() <= 1  # the 8 x 8 box mean of level 0


def test_missing_mpp_needs_assume_mpp(tmp_path):
    """No mpp: refused, never guessed. A header with an objective power (AppMag 20) but no mpp
    gets that power named with the mpp it usually means, still not used. Plant: resolve_mpp
    with the generic hint -> "objective power (20x)" is missing, fails."""
    p = make_aperio_slide(str(tmp_path / "nompp.svs"), (512, 512), levels=(1,), mpp=None)
    slide = open_slide(p)
    with pytest.raises(SlideError, match="--assume-mpp"):
        slide_mpp(slide, path=p)
    with pytest.raises(SlideError, match=r"nompp.svs: slide has no mpp .* objective power \(20x\).* 0.5 um/px"):
        resolve_mpp(slide, path=p)
    assert slide_mpp(slide, assume_mpp=0.25) == 0.25
    assert os.path.getsize(p) > 0


def test_ome_tiff_pixel_size_is_read_from_its_ome_xml(tmp_path):
    """An OME-TIFF states its pixel size in the OME-XML (PhysicalSizeX/Y, unit default um), and
    OME writers such as tifffile leave the TIFF resolution tags out: OpenSlide reads it as a
    generic TIFF with no mpp, and the slide was refused as having none. Plant: _metadata_axes
    without the OME fallback -> "no mpp", fails."""
    import tifffile

    from tests.fixtures_slides import real_tissue_pixels

    img = np.ascontiguousarray(np.tile(real_tissue_pixels(), (2, 2, 1))[:1024, :1024])

    def ome(name, **meta):
        path = str(tmp_path / name)
        tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", ome=True,
                         metadata=dict(axes="YXS", **meta))
        return path

    um = ome("um.ome.tif", PhysicalSizeX=0.25, PhysicalSizeY=0.25)
    nm = ome("nm.ome.tif", PhysicalSizeX=500.0, PhysicalSizeXUnit="nm", PhysicalSizeY=500.0,
             PhysicalSizeYUnit="nm")
    assert resolve_mpp(open_slide(um), path=um) == (0.25, "slide property")
    assert slide_mpp(open_slide(nm)) == pytest.approx(0.5)
    assert read_region_at_mpp(open_slide(um), 0, 0, 256, 0.5).shape == (256, 256, 3)  # read 512 px, 2:1
    with pytest.raises(SlideError, match="not square"):  # checked like OpenSlide's mpp
        resolve_mpp(open_slide(ome("aniso.ome.tif", PhysicalSizeX=0.25, PhysicalSizeY=0.5)))
    bare = ome("bare.ome.tif")  # no pixel size stated: still "no mpp"
    with pytest.raises(SlideError, match="bare.ome.tif: slide has no mpp"):
        resolve_mpp(open_slide(bare), path=bare)


def test_non_integer_scale_resamples(tmp_path):
    import cv2

    # A 0.3 um/px scanner: 0.5 / 0.3 = 1.667 is not near an integer, so 512 output px cover
    # round(512 * 1.667) = 853 level-0 px, box-filtered down.
    p = make_aperio_slide(str(tmp_path / "odd.svs"), (1200, 1200), levels=(1,), mpp=0.3)
    slide = open_slide(p)
    geom = region_geometry(slide, slide_mpp(slide), 512, 0.5)
    assert (geom.read_px, geom.level, geom.level_px) == (853, 0, 853)
    assert geom.mpp == pytest.approx(0.3 * 853 / 512)
    out = read_region_at_mpp(slide, 100, 200, 512, 0.5)
    ref = cv2.resize(_direct(p, 100, 200, 0, 853), (512, 512), interpolation=cv2.INTER_AREA)
    assert out.shape == (512, 512, 3) and np.abs(out - ref).mean() < 0.6


def test_fast_read_equals_public_api_on_partially_transparent_edge(synthetic_slides):
    """A level-1 read at level-0 offsets that are not multiples of the downsample, running past
    the slide's right and bottom edges: OpenSlide blends the edge into partially transparent
    pixels. The fast path (premultiplied BGRA straight from the C library) gives exactly the
    public API's pixels composited over white on opaque and fully transparent pixels, and
    within 1 gray level on the partially transparent ones (measured: 52 of 12288 values differ
    by 1): ours composites the premultiplied colour exactly (c_pre + 255 - a), the public API
    first un-premultiplies to 8 bits. Plant run: the fast path without its alpha compositing
    fails here (the test asserts that partially transparent pixels are present)."""
    from data_prep.slide_io import _read_bgra_premultiplied, composite_white, read_rgb

    slide = open_slide(synthetic_slides["s20"])
    w0, h0 = slide.dimensions
    assert slide.level_downsamples[1] == 4
    for x, y in ((w0 - 4 * 40 + 1, h0 - 4 * 40 + 2), (w0 - 4 * 20 + 3, 5)):
        assert _read_bgra_premultiplied(slide, x, y, 1, 64, 64) is not None  # the fast path runs
        rgba = np.asarray(openslide.OpenSlide(synthetic_slides["s20"]).read_region((x, y), 1, (64, 64)))
        alpha = rgba[:, :, 3]
        assert ((alpha > 0) & (alpha < 255)).sum() > 20 and (alpha == 255).sum() > 0
        partial = (alpha > 0) & (alpha < 255)
        for order in ("rgb", "bgr"):
            fast = read_rgb(slide, x, y, 1, 64, 64, order=order).astype(int)
            public = composite_white(rgba, order=order).astype(int)
            np.testing.assert_array_equal(fast[~partial], public[~partial])
            assert np.abs(fast[partial] - public[partial]).max() <= 1, order


def test_non_square_pixels_are_refused_naming_both_axes(tmp_path):
    """mpp-x 0.5 and mpp-y 1.0 um/px were averaged to 0.75 um/px and every region came out
    stretched 2:1, with exit 0. Refused now, naming both values, also with --assume-mpp (no
    single mpp makes such pixels square); axes within the snapping tolerance still read as
    their mean. Plant: slide_mpp taking np.mean of both axes unchecked -> fails."""
    path = tiff_with_mpp(str(tmp_path / "nonsq.tif"), 0.5, 1.0, side=512)
    slide = open_slide(path)
    refused = r"nonsq.tif: refused: pixels are not square \(mpp-x 0.5, mpp-y 1 um/px\)"
    for read in (lambda: slide_mpp(slide, path=path), lambda: resolve_mpp(slide, 0.5, path),
                 lambda: read_region_at_mpp(slide, 0, 0, 256, 1.0)):
        with pytest.raises(SlideError, match=refused):
            read()
    near = open_slide(tiff_with_mpp(str(tmp_path / "near.tif"), 0.5, 0.5025, side=512))
    assert slide_mpp(near) == pytest.approx(0.50125)


def test_one_garbage_resolution_axis_is_implausible_metadata_not_non_square(tmp_path):
    """A converter's default of 1 px/cm on YResolution (mpp-y 1e4) beside a real mpp-x was
    refused as 'pixels are not square' even with --assume-mpp 0.25, which rescued such slides
    before. An implausible axis makes the metadata implausible: --assume-mpp takes over, and
    without it the refusal names that axis and the way out. Plant: _metadata_mpp checking the
    axes' ratio before their plausibility -> fails."""
    path = tiff_with_mpp(str(tmp_path / "garbage_y.tif"), 0.25, 10000.0, side=512)
    slide = open_slide(path)
    assert resolve_mpp(slide, 0.25, path) == (0.25, "assumed")
    assert slide_mpp(slide, 0.25, path) == 0.25  # hipt-heatmap reads it as hipt-extract did
    with pytest.raises(SlideError, match=r"garbage_y.tif: refused: its metadata says mpp-y 1e\+04 um/px, "
                                         r"outside the 0.1-10.0 um/px .*pass --assume-mpp"):
        resolve_mpp(slide, None, path)
    # The mean of a garbage-fine axis and a real one looks plausible (0.13): judged per axis.
    fine = open_slide(tiff_with_mpp(str(tmp_path / "fine_y.tif"), 0.25, 0.01, side=512))
    assert resolve_mpp(fine, 0.5, path) == (0.5, "assumed")


def test_damaged_tile_is_a_slide_error_naming_the_slide_and_region(tmp_path):
    """A corrupt JPEG tile raised openslide's OpenSlideError, which the per-slide handlers of
    hipt-extract did not catch (a traceback ended the cohort) and hipt-embed/hipt-heatmap
    printed as a traceback. It is a SlideError naming the file and the region read now.
    Plant: read_rgb without its OpenSlideError -> SlideError conversion -> fails."""
    path = make_aperio_slide(str(tmp_path / "bad.svs"), (1024, 1024), levels=(1,), seed=2)
    damage_tile(path, 5)  # row 1, column 1 of the 256 px tiles: level-0 px 256-511
    slide = open_slide(path)
    assert read_region_at_mpp(slide, 512, 512, 256).shape == (256, 256, 3)  # other tiles read
    with pytest.raises(SlideError, match=r"bad.svs: cannot read its pixels \(512 x 512 px at level 0 "
                                         r"from level-0 \(0, 0\)\): .+ \(a damaged tile\?\)"):
        read_region_at_mpp(slide, 0, 0, 512)


def test_objective_power_contradicting_the_mpp_is_warned_once(tmp_path, capsys):
    """AppMag 10 with MPP 0.25 was read as 40x without a word. The mpp still wins (it measures
    the pixels), but a one-line warning names both, once per slide; a consistent header says
    nothing. Plant: resolve_mpp without the magnification check -> fails."""
    path = make_aperio_slide(str(tmp_path / "m.svs"), (512, 512), mag=40, levels=(1,), mpp=0.25)
    with open(path, "rb") as f:  # synth writes 20x/40x only; the header says 10x in as many bytes
        data = f.read()
    with open(path, "wb") as f:
        f.write(data.replace(b"AppMag = 40", b"AppMag = 10"))
    slide = open_slide(path)
    assert resolve_mpp(slide, None, path) == (0.25, "slide property")
    resolve_mpp(slide, None, path)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{path}: warning: its metadata says AppMag 10 but 0.25 um/px (about 40x); reading it "
                   "at 0.25 um/px (the mpp wins)"]
    ok = make_aperio_slide(str(tmp_path / "ok.svs"), (512, 512), mag=40, levels=(1,), mpp=0.2527)
    resolve_mpp(open_slide(ok), None, ok)
    assert capsys.readouterr().err == ""


def test_camera_adapter_pixel_sizes_are_not_a_magnification_contradiction(tmp_path, capsys):
    """A 3DHistech Pannoramic's 20x objective gives 0.243 um/px (ratio 2.06 to the 0.5 of a
    '20x'): every such slide got a warning per command. The pixel size follows the camera
    adapter too; only a factor of 3 or more contradicts the header. Plant:
    MAGNIFICATION_MISMATCH back at 1.5 -> fails."""
    for mag, mpp in ((20, 0.243), (40, 0.5)):
        path = make_aperio_slide(str(tmp_path / f"p{mag}.svs"), (512, 512), mag=mag, levels=(1,), mpp=mpp)
        assert resolve_mpp(open_slide(path), None, path) == (mpp, "slide property")
    assert capsys.readouterr().err == ""
    far = make_aperio_slide(str(tmp_path / "far.svs"), (512, 512), mag=40, levels=(1,), mpp=1.0)
    resolve_mpp(open_slide(far), None, far)
    assert "AppMag 40 but 1 um/px" in capsys.readouterr().err
