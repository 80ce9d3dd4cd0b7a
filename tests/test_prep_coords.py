"""hipt-prep coords / --annotations / resolution sanity (synthetic slides, 512 px regions)."""
import json
import os
import re

import h5py
import numpy as np
import pytest
import tifffile

from data_prep.annotations import AnnotationError, load_annotations
from data_prep.coords import read_coords
from data_prep.shards import decode_jpeg, read_records
from data_prep.slide_io import open_slide, read_region_at_mpp
from data_prep.synth import make_aperio_slide, real_tissue_pixels
from hipt_jax.cli.prep import main
from tests.fixtures_slides import tiff_with_mpp
from tests.fixtures_slides import REGION, SIZE_20X, expected_regions, synthetic_slides  # noqa: F401


def _prep(command, slides, out, *extra):
    return main([command, "--workers", "1", "--no-progress", "--slides", str(slides), "--out", str(out),
                 "--region", str(REGION), *extra])


def _one_slide_dir(tmp_path, path, name=None):
    d = tmp_path / "slides"
    d.mkdir(exist_ok=True)
    os.symlink(path, d / (name or os.path.basename(path)))
    return d


def _geojson(path, polygons):
    """QuPath-style FeatureCollection of (ring [(x, y)...], class name or None)."""
    feats = []
    for ring, cls in polygons:
        props = {"objectType": "annotation"}
        if cls:
            props["classification"] = {"name": cls, "colorRGB": -65536}
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
                      "properties": props})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def test_coords_files_in_trident_layout(synthetic_slides, tmp_path):
    """The coordinate file holds the same selection as `regions` with TRIDENT's attributes.
    (Plant: writing coords as (y, x) fails the equality.)"""
    out = tmp_path / "out"
    assert _prep("coords", _one_slide_dir(tmp_path, synthetic_slides["s40"]), out) == 0
    path = out / "coords" / "s40_patches.h5"
    cf = read_coords(str(path))
    assert [tuple(c) for c in cf.coords] == [(2 * x, 2 * y) for x, y in expected_regions()]
    with h5py.File(path) as f:
        assert f["coords"].dtype == np.int64
    a = cf.attrs
    assert (a["patch_size"], a["patch_size_level0"]) == (REGION, 2 * REGION)
    assert (a["level0_magnification"], a["target_magnification"]) == (40, 20)
    assert (a["level0_width"], a["level0_height"], a["name"]) == (2 * SIZE_20X[1], 2 * SIZE_20X[0], "s40")
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "coords" and man["items"]["s40"]["mpp_source"] == "slide property"
    assert not (out / "regions").exists() and (out / "qc" / "s40_regions.png").exists()


def test_annotations_keep_inside_and_drop_excluded(synthetic_slides, tmp_path):
    """A polygon over the left half keeps exactly the regions inside it; an exclusion polygon
    removes the one region it covers. (Plants: ignoring the inclusion union keeps the right
    half; testing the exclusion with `<` instead of `>=` keeps the excluded region.)"""
    slides = _one_slide_dir(tmp_path, synthetic_slides["s20"])
    ann = tmp_path / "ann"
    ann.mkdir()
    h = SIZE_20X[0]
    half = 3 * REGION  # the region grid has 6 columns: the left 3
    _geojson(ann / "s20.geojson", [([(0, 0), (half, 0), (half, h), (0, h)], "Tumor")])
    out = tmp_path / "inc"
    assert _prep("coords", slides, out, "--annotations", str(ann)) == 0
    inside = [(x, y) for x, y in expected_regions() if x < half]
    assert 0 < len(inside) < len(expected_regions())
    assert [tuple(c) for c in read_coords(str(out / "coords" / "s20_patches.h5")).coords] == inside

    x0, y0 = inside[0]  # an exclusion square over one kept region (slightly larger than it)
    _geojson(ann / "s20.geojson", [([(0, 0), (half, 0), (half, h), (0, h)], "Tumor"),
                                   ([(x0 - 5, y0 - 5), (x0 + REGION + 5, y0 - 5),
                                     (x0 + REGION + 5, y0 + REGION + 5), (x0 - 5, y0 + REGION + 5)], "Exclude")])
    out2 = tmp_path / "exc"
    assert _prep("coords", slides, out2, "--annotations", str(ann)) == 0
    assert [tuple(c) for c in read_coords(str(out2 / "coords" / "s20_patches.h5")).coords] == inside[1:]


def test_an_edited_annotation_file_redoes_its_slide(synthetic_slides, tmp_path, capsys):
    """A rerun after the annotation file was edited (same size: only a coordinate changed) redid
    nothing and kept the regions of the old polygon, exit 0. The file's SHA-256 is part of the
    slide's source now, so the slide is redone with the new polygon; an unchanged file is still
    skipped. (Plant: recording and comparing only the slide file's identity -> fails.)"""
    slides = _one_slide_dir(tmp_path, synthetic_slides["s20"])
    ann = tmp_path / "ann"
    ann.mkdir()
    h = SIZE_20X[0]
    _geojson(ann / "s20.geojson", [([(0, 0), (3 * REGION, 0), (3 * REGION, h), (0, h)], "Tumor")])
    out = tmp_path / "out"
    coords = lambda: [tuple(c) for c in read_coords(str(out / "coords" / "s20_patches.h5")).coords]
    assert _prep("coords", slides, out, "--annotations", str(ann)) == 0
    assert coords() == [(x, y) for x, y in expected_regions() if x < 3 * REGION]
    assert _prep("coords", slides, out, "--annotations", str(ann)) == 0
    assert "1 of 1 already done" in capsys.readouterr().out
    text = (ann / "s20.geojson").read_text()
    edited = text.replace(str(3 * REGION), str(2 * REGION))  # 1536 -> 1024: same length
    assert edited != text and len(edited) == len(text)
    (ann / "s20.geojson").write_text(edited)
    assert _prep("coords", slides, out, "--annotations", str(ann)) == 0
    assert "already done" not in capsys.readouterr().out
    assert coords() == [(x, y) for x, y in expected_regions() if x < 2 * REGION]


def _square(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def _feature(geometry, cls="Tumor"):
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": "annotation", "classification": {"name": cls}}}


@pytest.mark.parametrize("features, kinds", [
    ([], "0 feature(s);"),
    ([_feature({"type": "Point", "coordinates": [5, 5]})] * 2, "(2 Point)"),
    ([_feature({"type": "LineString", "coordinates": [[0, 0], [9, 9]]})], "(1 LineString)"),
    ([_feature(None)], "(1 no geometry)"),
    ([_feature({"type": "Polygon", "coordinates": [[[0, 0], [9, 9], [0, 0]]]})], "(1 Polygon)"),  # no area
])
def test_an_annotation_file_without_any_area_is_refused(tmp_path, features, kinds):
    """An empty FeatureCollection, or one of points/lines only, gave no inclusion polygon, so
    every region of the slide was kept, exit 0: the annotation silently ignored. (Plant: no
    check after the loop -> load_annotations returns, fails.)"""
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.raises(AnnotationError, match=rf"^{path}: no area annotation .*{re.escape(kinds)}"):
        load_annotations(str(path))


def test_a_geometry_collection_counts_by_its_polygons(tmp_path):
    """A GeometryCollection feature (QuPath's ROI of mixed parts) was skipped as "not an area",
    so its polygon restricted nothing. (Plant: accepting only Polygon/MultiPolygon -> refused
    as a file without areas.)"""
    path = tmp_path / "s.geojson"
    collection = {"type": "GeometryCollection",
                  "geometries": [_square(0, 0, 100, 50), {"type": "Point", "coordinates": [500, 500]}]}
    path.write_text(json.dumps([_feature(collection)]))
    ann = load_annotations(str(path))
    assert len(ann.include) == 1 and ann.include[0].area == 5000 and not ann.exclude


def test_include_classes_that_match_no_polygon_are_refused(tmp_path):
    """--include-classes Tumour on a file whose polygons are "Tumor": no inclusion polygon, and
    with none every region qualified, so the whole slide was kept, exit 0. Now the slide fails
    naming the classes the file has; a matching class (any case) still loads. (Plant: no check
    -> load_annotations returns an Annotations with no inclusion, fails.)"""
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps([_feature(_square(0, 0, 10, 10), "Tumor"),
                                _feature(_square(0, 0, 5, 5), "Exclude"),
                                {"type": "Feature", "geometry": _square(20, 20, 30, 30), "properties": None}]))
    with pytest.raises(AnnotationError, match=rf"^{path}: no polygon of the include classes \(Tumour, "
                                              r"--include-classes\); its polygons are 'Exclude', 'Tumor', unclassified"):
        load_annotations(str(path), include_classes="Tumour")
    ann = load_annotations(str(path), include_classes="tumor,Stroma")
    assert len(ann.include) == 1 and len(ann.exclude) == 1


def test_a_polygon_wholly_outside_the_slide_fails_it(synthetic_slides, tmp_path, capsys):
    """An exclusion polygon in other coordinates (here 4x the slide's: another slide's file, or
    an export at another scale) lay outside the slide and excluded nothing: every region was
    kept, exit 0. The slide fails now, naming the file and the polygon. (Plant: no
    check_inside_slide call -> exit 0, fails.)"""
    slides = _one_slide_dir(tmp_path, synthetic_slides["s20"])
    ann = tmp_path / "ann"
    ann.mkdir()
    h, w = SIZE_20X
    (ann / "s20.geojson").write_text(json.dumps([
        _feature(_square(0, 0, w, h), "Tumor"), _feature(_square(4 * w, 4 * h, 5 * w, 5 * h), "Exclude")]))
    out = tmp_path / "out"
    assert _prep("coords", slides, out, "--annotations", str(ann)) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "FAILED" in ln]
    assert len(err) == 1 and (f"{ann / 's20.geojson'}: 1 of 2 polygon(s) lie entirely outside the slide "
                              f"({w} x {h} level-0 px), e.g. an exclusion at x {4 * w}-{5 * w}") in err[0], err
    assert not (out / "coords" / "s20_patches.h5").exists()


def test_two_annotation_files_for_one_slide_fail_it(synthetic_slides, tmp_path, capsys):
    """<id>.geojson beside QuPath's <file name>.geojson (an old export and a new one): the first
    name was taken and the other ignored, exit 0. The slide fails naming both. (Plant:
    find_annotation_file returning the first it finds -> exit 0, fails.)"""
    slides = _one_slide_dir(tmp_path, synthetic_slides["s20"])
    ann = tmp_path / "ann"
    ann.mkdir()
    h, w = SIZE_20X
    (ann / "s20.geojson").write_text(json.dumps([_feature(_square(0, 0, w, h))]))
    (ann / "s20.svs.geojson").write_text(json.dumps([_feature(_square(0, 0, w // 2, h))]))
    assert _prep("coords", slides, tmp_path / "out", "--annotations", str(ann)) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "FAILED" in ln]
    assert len(err) == 1 and (f"{ann / 's20.geojson'} and {ann / 's20.svs.geojson'}: two annotation "
                              "files for slide s20; keep one") in err[0], err


def test_invalid_polygons_mean_shell_minus_holes(tmp_path):
    """Hand-made polygons that are not valid GeoJSON are read as their author meant: a hole that
    shares an edge with its shell (the top half cut out of the slide) was dropped by GEOS's
    default repair, so the regions in it were kept; two overlapping parts of a MultiPolygon lost
    their overlap, so those regions were dropped. (Plant: shapely.make_valid's default method
    -> areas 5200000 and 15000, fails.)"""
    def ring(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]

    path = tmp_path / "s.geojson"
    path.write_text(json.dumps([
        _feature({"type": "Polygon", "coordinates": [ring(0, 0, 2600, 2000), ring(0, 0, 2600, 1024)[::-1]]}),
        _feature({"type": "MultiPolygon", "coordinates": [[ring(0, 0, 100, 100)], [ring(50, 50, 150, 150)]]},
                 "Exclude")]))
    ann = load_annotations(str(path))
    assert ann.include[0].area == 2600 * (2000 - 1024) and ann.include[0].bounds == (0, 1024, 2600, 2000)
    assert ann.exclude[0].area == 2 * 100 * 100 - 50 * 50


def test_qc_rings_include_the_holes():
    """The QC picture drew only each polygon's outline, so a hole cut out of an inclusion (whose
    regions are dropped) did not show. (Plant: no interiors in polygon_rings -> 1 ring.)"""
    from shapely.geometry import Polygon

    from data_prep.annotations import polygon_rings

    shell = [(0, 0), (100, 0), (100, 100), (0, 100)]
    hole = [(40, 40), (60, 40), (60, 60), (40, 60)]
    rings = polygon_rings([Polygon(shell, [hole])])
    assert len(rings) == 2 and sorted(rings[1])[0] == (40.0, 40.0)


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe\x00 not text", "cannot read GeoJSON ('utf-8' codec can't decode"),
    (json.dumps(["hello"]).encode(), "feature 0: not a GeoJSON Feature object (str)"),
    (json.dumps([None, {"type": "Feature", "geometry": "Polygon"}]).encode(),
     "feature 1: its geometry is not a JSON object (str)"),
    (json.dumps([{"type": "Feature", "geometry": _square(0, 0, 9, 9), "properties": "Tumor"}]).encode(),
     "feature 0: its properties is not a JSON object (str)"),
])
def test_malformed_annotation_files_are_named(tmp_path, content, needle):
    """A binary file or a feature that is not an object failed the slide with a
    UnicodeDecodeError/AttributeError naming the slide, not the annotation file. (Plant: without
    _check_feature and the ValueError catch -> those errors, fails.)"""
    path = tmp_path / "s.geojson"
    path.write_bytes(content)
    with pytest.raises(AnnotationError, match=rf"^{path}: {re.escape(needle)}"):
        load_annotations(str(path))


def test_an_annotation_file_with_a_bom_and_null_class_name_loads(tmp_path):
    """UTF-8 with a byte-order mark (a Windows editor's save) is read; {"name": null} is
    unclassified, not the class "None"."""
    path = tmp_path / "s.geojson"
    feats = [_feature(_square(0, 0, 9, 9), None), _feature(_square(0, 0, 5, 5), "Exclude")]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(feats).encode())
    assert len(load_annotations(str(path)).include) == 1
    with pytest.raises(AnnotationError, match="its polygons are 'Exclude', unclassified"):
        load_annotations(str(path), include_classes="None")


def _tiff_72dpi(path):
    tissue = real_tissue_pixels()
    img = np.ascontiguousarray(np.tile(tissue, (2, 2, 1))[:1024, :1024])  # [1024,1024,3] uint8
    tifffile.imwrite(path, img, tile=(256, 256), resolution=(72, 72), resolutionunit="INCH",
                     photometric="rgb")
    return path


def test_72dpi_tiff_refused_then_assume_mpp(tmp_path, capsys):
    """A 72 dpi generic TIFF (352.8 um/px per OpenSlide) is refused with a one-line reason that
    names --assume-mpp, and no shard is written; --assume-mpp 0.5 then works (with --codec png,
    pixel-exact). (Plants: dropping the plausibility check in resolve_mpp makes the first run
    exit 0; encoding PNG regions as JPEG breaks the exact equality.)"""
    slides = tmp_path / "slides"
    slides.mkdir()
    _tiff_72dpi(str(slides / "photo.tif"))
    out = tmp_path / "out"
    assert _prep("regions", slides, out) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "FAILED" in ln]
    assert len(err) == 1 and "photo" in err[0] and "--assume-mpp" in err[0] and "72 dpi" in err[0]
    assert not os.path.exists(out / "regions" / "photo.array_record")
    # ... and with --codec png the stored pixels are exactly the slide reader's (lossless).
    assert _prep("regions", slides, tmp_path / "out2", "--assume-mpp", "0.5", "--codec", "png") == 0
    recs = read_records(str(tmp_path / "out2" / "regions" / "photo.array_record"))
    assert len(recs) >= 2
    slide = open_slide(str(slides / "photo.tif"))
    for r in recs:
        want = read_region_at_mpp(slide, r["x"], r["y"], REGION, 0.5, assume_mpp=0.5)
        np.testing.assert_array_equal(decode_jpeg(r["image_jpeg"]), want)
    man = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert man["items"]["photo"]["mpp_source"] == "assumed"


def test_10x_slide_needs_allow_upsample(tmp_path, capsys):
    """A 1.0 um/px slide against a 0.5 um/px target fails unless --allow-upsample.
    (Plant: check_upsample returning early always makes the first run exit 0.)"""
    slides = tmp_path / "slides"
    slides.mkdir()
    make_aperio_slide(str(slides / "s10x.svs"), (768, 768), mag=20, levels=(1,), mpp=1.0)
    assert _prep("coords", slides, tmp_path / "a") == 1
    err = capsys.readouterr().err
    assert "--allow-upsample" in err and "1 um/px" in err
    assert not (tmp_path / "a" / "coords" / "s10x_patches.h5").exists()
    assert _prep("coords", slides, tmp_path / "b", "--allow-upsample", "--min-tissue", "0.01") == 0
    cf = read_coords(str(tmp_path / "b" / "coords" / "s10x_patches.h5"))
    assert cf.attrs["patch_size_level0"] == REGION // 2


def test_non_square_slide_fails_by_name_and_the_cohort_goes_on(tmp_path, capsys):
    """mpp-x 0.5 / mpp-y 1.0 um/px was read at their mean, 0.75 um/px (exit 0, regions stretched
    2:1). That slide fails now, named with both values; the square one beside it is done.
    Plant: slide_mpp taking np.mean of both axes unchecked -> exit 0 -> fails."""
    slides = tmp_path / "slides"
    slides.mkdir()
    tiff_with_mpp(str(slides / "nonsq.tif"), 0.5, 1.0)
    tiff_with_mpp(str(slides / "square.tif"), 1.0, 1.0)
    out = tmp_path / "out"
    assert _prep("coords", slides, out, "--target-mpp", "1.0") == 1
    failed = [ln for ln in capsys.readouterr().err.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and "FAILED nonsq:" in failed[0]
    assert "pixels are not square (mpp-x 0.5, mpp-y 1 um/px)" in failed[0]
    items = json.loads((out / "manifest.json").read_text())["items"]
    assert items["square"]["status"] == "done" and items["square"]["slide_mpp"] == 1.0
