"""hipt-extract --slides --coords: regions read straight from the slide (embedded real slide,
tiny random model, 512 px regions), coordinate files from hipt-prep coords, TRIDENT and CLAM."""
import json
import os

import h5py
import numpy as np
import pytest

from data_prep import bags
from data_prep.coords import read_coords
from data_prep.runner import prepare_coords
from data_prep.slide_io import open_slide, read_region_at_mpp
from data_prep.synth import REAL_SLIDE, make_aperio_slide
from hipt_jax import extraction
from hipt_jax.cli.extract import main as extract_main
from hipt_jax.models.hipt4k import HIPT4K
from tests.fixtures_slides import damage_tile, grey_tiff

SID = "cmu_small_region"
SIZE = 512


@pytest.fixture(scope="module")
def model():
    return HIPT4K.random_init(seed=0, tiny=True)


@pytest.fixture(scope="module")
def extractor(model):
    """One engine for the module: compiled once, reused by every extraction here."""
    return extraction.Extractor(model, batch_per_device=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    slides = root / "slides"
    slides.mkdir()
    os.symlink(REAL_SLIDE, slides / os.path.basename(REAL_SLIDE))
    manifest = prepare_coords(str(slides), str(root / "prep"), region_px=SIZE, min_tissue_fraction=0.5)
    assert manifest["items"][SID]["status"] == "done"
    return root, {SID: REAL_SLIDE}, str(slides)


def test_direct_features_equal_hipt4k_on_read_region_at_mpp(model, extractor, prepared):
    """The bag of the direct path equals HIPT4K on read_region_at_mpp output (<= 1e-5).
    (Plant: reading the regions at (y, x) breaks the equality.)"""
    root, slides, slides_dir = prepared
    out = str(root / "emb")
    man = extraction.extract_cohort_direct(model, slides, str(root / "prep"), out, region_px=SIZE,
                                           readers=2, show_progress=False, extractor=extractor)
    assert man["slides"][SID]["status"] == "done"
    got = bags.read_bag(out, SID)
    coords = read_coords(str(root / "prep" / "coords" / f"{SID}_patches.h5")).coords
    np.testing.assert_array_equal(got["coords"], coords)
    slide = open_slide(REAL_SLIDE)
    imgs = np.stack([read_region_at_mpp(slide, int(x), int(y), SIZE, 0.5) for x, y in coords])
    ref = model.embed_batch(imgs)
    assert len(coords) >= 3
    np.testing.assert_allclose(got["features_cls256"], ref["features_cls256"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["features_cls4k"], ref["features_cls4k"], atol=1e-5, rtol=0)


def _trident_file(path, coords, size0):
    """A TRIDENT-layout coordinate file written from its published attribute names."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        d.attrs.update(dict(patch_size=SIZE, patch_size_level0=size0, level0_magnification=20,
                            target_magnification=20, overlap=0, name=SID, savetodir=os.path.dirname(path),
                            level0_width=2220, level0_height=2967))


def _direct(model, extractor, slides, coords, out):
    return extraction.extract_cohort_direct(model, slides, coords, out, region_px=SIZE, readers=2,
                                            show_progress=False, extractor=extractor)


def test_trident_and_clam_coordinates(model, extractor, prepared, tmp_path, capsys):
    """TRIDENT (`<job>/patches/<id>_patches.h5`) and CLAM (`<id>.h5` with patch_size/patch_level)
    coordinate files drive the direct path; through the CLI a CLAM file made for 256 px patches
    fails the slide with a reason naming the file (exit 1). (Plant: ignoring coords_file_extent
    makes the 256 px file pass.)"""
    root, slides, slides_dir = prepared
    ours = read_coords(str(root / "prep" / "coords" / f"{SID}_patches.h5")).coords[:2]
    trident = tmp_path / "trident"
    _trident_file(str(trident / "job" / "patches" / f"{SID}_patches.h5"), ours, SIZE)
    _trident_file(str(trident / "job" / "patches" / "other_patches.h5"), ours, SIZE)  # no such slide
    assert _direct(model, extractor, slides, str(trident), str(tmp_path / "e1"))["slides"][SID]["status"] == "done"
    # Named, not silently ignored (plant: no orphan line -> fails).
    assert "1 coordinate file(s) in" in capsys.readouterr().err
    np.testing.assert_array_equal(bags.read_bag(str(tmp_path / "e1"), SID)["coords"], ours)

    clam = tmp_path / "clam" / "patches"
    clam.mkdir(parents=True)
    with h5py.File(clam / f"{SID}.h5", "w") as f:
        d = f.create_dataset("coords", data=np.asarray(ours, np.int64))
        d.attrs.update(dict(patch_size=256, patch_level=0, name=SID,  # level_dim as CLAM writes it
                            level_dim=np.asarray(open_slide(REAL_SLIDE).dimensions, np.int64)))
    cli = ["--random-init", "tiny", "--slides", slides_dir, "--size", str(SIZE), "--no-progress",
           "--coords", str(tmp_path / "clam"), "--out", str(tmp_path / "e2")]
    assert extract_main(cli) == 1
    err = capsys.readouterr().err
    assert f"{SID}.h5" in err and "256 px level-0" in err
    man = json.loads((tmp_path / "e2" / "manifest.json").read_text())
    assert man["params"]["coords"] == str(tmp_path / "clam") and man["slides"][SID]["status"] == "failed"
    with h5py.File(clam / f"{SID}.h5", "a") as f:
        f["coords"].attrs["patch_size"] = SIZE
    assert _direct(model, extractor, slides, str(tmp_path / "clam"), str(tmp_path / "e3"))["slides"][SID]["status"] == "done"
    a, b = (bags.read_bag(str(tmp_path / e), SID) for e in ("e1", "e3"))
    np.testing.assert_allclose(a["features_cls4k"], b["features_cls4k"], atol=1e-6)


def test_coordinates_outside_the_slide_fail_it(model, extractor, prepared, tmp_path):
    """Coordinates made for a larger slide would embed white padding as tissue. Plant: no
    bounds check -> the slide is "done", fails."""
    root, slides, _ = prepared
    ours = read_coords(str(root / "prep" / "coords" / f"{SID}_patches.h5")).coords[:2]
    width, height = open_slide(REAL_SLIDE).dimensions
    off = np.asarray([ours[0], (width + 10, 0)], np.int64)
    _trident_file(str(tmp_path / "t" / "job" / "patches" / f"{SID}_patches.h5"), off, SIZE)
    result = _direct(model, extractor, slides, str(tmp_path / "t"), str(tmp_path / "e"))["slides"][SID]
    assert result["status"] == "failed" and f"1 of 2 regions start outside {REAL_SLIDE}" in result["error"]
    # A file that records the slide it was made on (TRIDENT, hipt-prep coords) and names another
    # size: other slide's coordinates even when all fall inside (plant: no size check -> "done").
    import shutil

    other = tmp_path / "o" / f"{SID}_patches.h5"
    other.parent.mkdir()
    shutil.copy(root / "prep" / "coords" / f"{SID}_patches.h5", other)
    with h5py.File(other, "a") as f:
        f["coords"].attrs["level0_width"] = width + 2000
    result = _direct(model, extractor, slides, str(tmp_path / "o"), str(tmp_path / "e4"))["slides"][SID]
    assert result["status"] == "failed" and f"made for a {width + 2000} x {height} px slide" in result["error"]
    # CLAM records the slide's size at its patch_level (level_dim); same check
    clam = tmp_path / "c" / f"{SID}.h5"
    clam.parent.mkdir()
    with h5py.File(clam, "w") as f:
        d = f.create_dataset("coords", data=np.asarray(ours, np.int64))
        d.attrs.update(dict(patch_size=SIZE, patch_level=0, level_dim=np.asarray([width, height + 500])))
    result = _direct(model, extractor, slides, str(tmp_path / "c"), str(tmp_path / "e5"))["slides"][SID]
    assert result["status"] == "failed" and f"made for a {width} x {height + 500} px slide" in result["error"]


def test_coordinate_files_two_per_slide_refused_and_out_folder_skipped(tmp_path):
    """Two coordinate files for one slide (a TRIDENT job folder beside CLAM's) were resolved by
    walk order, silently; an --out inside --coords had its own .h5 bags read as coordinates on
    the rerun (refused, then with --resume-anyway the bags deleted). Plants: setdefault on the
    id -> no error; no exclude -> the bag is taken as a second coordinate file, fails."""
    from data_prep.coords import CoordsError, find_coords_files

    coords = tmp_path / "coords"
    (coords / "trident" / "patches").mkdir(parents=True)
    (coords / "trident" / "patches" / "a.h5").write_bytes(b"")
    (coords / "clam").mkdir()
    (coords / "clam" / "a_patches.h5").write_bytes(b"")
    (coords / "clam" / "._b_patches.h5").write_bytes(b"")  # macOS metadata, not a slide
    with pytest.raises(CoordsError, match=r"two coordinate files for slide 'a': .*a_patches.h5 and .*a.h5"):
        find_coords_files(str(coords))
    os.remove(coords / "trident" / "patches" / "a.h5")
    out = coords / "emb"
    (out / "slides").mkdir(parents=True)
    (out / "slides" / "a.h5").write_bytes(b"")  # a bag of an earlier run, in h5 format
    assert find_coords_files(str(coords), exclude=(str(out),)) == {"a": str(coords / "clam" / "a_patches.h5")}


def test_coordinate_rows_duplicated_or_fractional_are_refused(tmp_path):
    """Duplicated rows were kept (a region counted twice in every mean of the bag) and 512.9
    read as 512: both wrong with exit 0. Plant: no checks -> read_coords returns, fails."""
    import h5py

    from data_prep.coords import CoordsError, read_coords

    def write(name, xy):
        with h5py.File(tmp_path / name, "w") as f:
            f["coords"] = np.asarray(xy)
        return str(tmp_path / name)

    assert read_coords(write("ok.h5", [[0, 0], [512, 0]])).coords.tolist() == [[0, 0], [512, 0]]
    assert read_coords(write("whole.h5", [[0.0, 0.0], [512.0, 0.0]])).coords.dtype == np.int64
    with pytest.raises(CoordsError, match=r"dup.h5: 2 duplicate coordinate row\(s\), e.g. \(0, 0\)"):
        read_coords(write("dup.h5", [[0, 0], [512, 0], [0, 0], [0, 0]]))
    with pytest.raises(CoordsError, match=r"frac.h5: coordinates must be whole level-0 pixels, got \(512.9, 0\)"):
        read_coords(write("frac.h5", [[0.0, 0.0], [512.9, 0.0]]))


def test_damaged_tile_fails_its_slide_and_the_cohort_goes_on(model, extractor, tmp_path):
    """A corrupt JPEG tile in one slide raised openslide's OpenSlideError out of the reader
    threads: a traceback, and the slides after it were never extracted. That slide fails now,
    named with the region that could not be read, and the next one is done.
    Plant: read_rgb without its OpenSlideError -> SlideError conversion -> fails."""
    from data_prep.coords import coords_path, write_coords

    slides = {}
    for sid, seed in (("a_bad", 2), ("b_good", 1)):  # the damaged slide first: the run must go on
        slides[sid] = make_aperio_slide(str(tmp_path / f"{sid}.svs"), (1024, 1024), levels=(1,), seed=seed)
        write_coords(coords_path(str(tmp_path), sid), [(0, 0), (512, 512)], slide_id=sid, region_px=SIZE,
                     read_px=SIZE, slide_mpp=0.5, target_mpp=0.5, width=1024, height=1024)
    damage_tile(slides["a_bad"], 5)  # row 1, column 1 of the 256 px tiles: inside the region at (0, 0)
    man = _direct(model, extractor, slides, str(tmp_path / "coords"), str(tmp_path / "emb"))
    assert man["slides"]["b_good"]["status"] == "done"
    bad = man["slides"]["a_bad"]
    assert bad["status"] == "failed" and "a_bad.svs: cannot read its pixels" in bad["error"], bad


def test_a_greyscale_slide_fails_and_the_cohort_goes_on(model, extractor, tmp_path):
    """A greyscale (or fluorescence) slide with CLAM/TRIDENT coordinates was embedded as grey RGB
    by an H&E model, exit 0. It fails, named; the H&E slide beside it is done. Plant: no
    colour check in embed_slide_direct -> done, fails."""
    from data_prep.coords import coords_path, write_coords

    slides = {"a_grey": grey_tiff(str(tmp_path / "a_grey.tif")),
              "b_he": make_aperio_slide(str(tmp_path / "b_he.svs"), (1024, 1024), levels=(1,), seed=1)}
    for sid in slides:
        write_coords(coords_path(str(tmp_path), sid), [(0, 0), (512, 512)], slide_id=sid, region_px=SIZE,
                     read_px=SIZE, slide_mpp=0.5, target_mpp=0.5, width=1024, height=1024)
    man = _direct(model, extractor, slides, str(tmp_path / "coords"), str(tmp_path / "emb"))
    assert man["slides"]["b_he"]["status"] == "done"
    grey = man["slides"]["a_grey"]
    assert grey["status"] == "failed" and "a_grey.tif: its pixels have no colour" in grey["error"], grey


def test_a_slide_without_mpp_is_read_at_the_mpp_its_coordinates_were_cut_with(model, extractor, tmp_path):
    """hipt-prep coords --assume-mpp 0.5 on a slide without mpp, then hipt-extract: without
    --assume-mpp the failure now names the value the coordinates were cut with, and another
    --assume-mpp (0.25) is named as the cause; it said "give matching --size/--target-mpp",
    which were right. Plant: the old extent message alone -> fails."""
    from data_prep.coords import coords_path, write_coords

    slides = {"nompp": make_aperio_slide(str(tmp_path / "nompp.svs"), (1024, 1024), levels=(1,), mpp=None)}
    write_coords(coords_path(str(tmp_path), "nompp"), [(0, 0)], slide_id="nompp", region_px=SIZE, read_px=SIZE,
                 slide_mpp=0.5, target_mpp=0.5, width=1024, height=1024, mpp_source="assumed")
    for assume, needle in ((None, "made with --assume-mpp 0.5"),
                           (0.25, "read at 0.5 um/px (assumed), but this run reads it at 0.25 um/px (assumed: "
                                  "--assume-mpp); give --assume-mpp 0.5")):
        man = extraction.extract_cohort_direct(model, slides, str(tmp_path / "coords"), str(tmp_path / f"e{assume}"),
                                               region_px=SIZE, assume_mpp=assume, show_progress=False,
                                               extractor=extractor)
        assert needle in man["slides"]["nompp"]["error"], man["slides"]["nompp"]
    man = extraction.extract_cohort_direct(model, slides, str(tmp_path / "coords"), str(tmp_path / "ok"),
                                           region_px=SIZE, assume_mpp=0.5, show_progress=False, extractor=extractor)
    assert man["slides"]["nompp"]["status"] == "done"


def test_a_coords_file_changed_in_place_fails_its_slide_until_hipt_prep_redoes_it(model, extractor, prepared,
                                                                                   tmp_path, capsys):
    """One row of a hipt-prep coords file changed in place (same size) still reads as valid
    coordinates, of another region: the slide fails naming the file and the checksum its status
    recorded, and the hipt-prep rerun (which notices the new mtime) redoes it. Plant: no
    verify_coords in extract_cohort_direct -> the slide is "done" with the wrong region, fails;
    plant: runner.is_done without _same_bytes -> the prep rerun keeps the damaged file, fails."""
    import shutil

    root, slides, slides_dir = prepared
    prep = tmp_path / "prep"
    shutil.copytree(root / "prep", prep)  # copy2: the recorded mtimes still hold
    path = prep / "coords" / f"{SID}_patches.h5"
    size = os.path.getsize(path)
    with h5py.File(path, "r+") as f:
        assert not (f["coords"][()] == (1, 1)).all(axis=1).any()
        f["coords"][0] = (1, 1)
    assert os.path.getsize(path) == size
    result = _direct(model, extractor, slides, str(prep), str(tmp_path / "e"))["slides"][SID]
    assert result["status"] == "failed"
    assert str(path) in result["error"] and "damaged coordinate file" in result["error"]
    assert "rerun the same `hipt-prep coords" in result["error"]

    prepare_coords(slides_dir, str(prep), region_px=SIZE, min_tissue_fraction=0.5)
    assert "its bytes changed since it was written" in capsys.readouterr().err
    assert _direct(model, extractor, slides, str(prep), str(tmp_path / "e"))["slides"][SID]["status"] == "done"
    np.testing.assert_array_equal(bags.read_bag(str(tmp_path / "e"), SID)["coords"],
                                  read_coords(str(root / "prep" / "coords" / f"{SID}_patches.h5")).coords)
