"""hipt-prep regions: counts vs hand computation, coordinates, pixels, manifest, bad input, reruns."""
import json
import os
import shutil

import numpy as np
import openslide
import pytest

from hipt_jax.cli.prep import main
from data_prep.shards import iter_records
from data_prep.shards import decode_jpeg
from data_prep.synth import make_aperio_slide
from tests.fixtures_slides import (REGION, LAYOUT, expected_regions, real_slide,  # noqa: F401
                                   synthetic_slides)

JPEG_TOL = 6.5  # mean |error| of q90 JPEG on H&E texture: ~1.4 (re-encoding 20x tiles), ~5.2 (40x resized)


def _run(args):
    return main(["regions", "--workers", "1"] + args)


@pytest.fixture(scope="module")
def cohort_out(synthetic_slides, tmp_path_factory):
    slides = tmp_path_factory.mktemp("cohort")
    for name, p in synthetic_slides.items():
        os.symlink(p, slides / os.path.basename(p))
    out = tmp_path_factory.mktemp("out")
    assert _run(["--slides", str(slides), "--out", str(out), "--region", str(REGION)]) == 0
    return str(out)


def _shard(out, sid):
    return list(iter_records(os.path.join(out, "regions", sid + ".array_record")))


@pytest.mark.parametrize("sid,scale", [("s20", 1), ("s40", 2), ("s40l", 2)])
def test_region_counts_and_coordinates(cohort_out, sid, scale):
    recs = _shard(cohort_out, sid)
    expected = [(x * scale, y * scale) for x, y in expected_regions()]
    assert [(r["x"], r["y"]) for r in recs] == expected
    for i, r in enumerate(recs):
        assert r["index"] == i and r["slide_id"] == sid and r["region_px"] == REGION
        assert r["read_px"] == REGION * scale and r["mpp"] == pytest.approx(0.5)
        assert r["level"] == (1 if sid == "s40l" else 0)
        assert r["tissue_fraction"] > 0.8  # tissue cells are full of tissue (or cut by the border)


@pytest.mark.parametrize("sid", ["s20", "s40", "s40l"])
def test_stored_pixels_match_openslide(cohort_out, synthetic_slides, sid):
    slide = openslide.OpenSlide(synthetic_slides[sid])
    for r in _shard(cohort_out, sid)[:3]:
        img = decode_jpeg(r["image_jpeg"]).astype(np.float32)
        assert img.shape == (REGION, REGION, 3)
        n = r["read_px"]
        ref = np.asarray(slide.read_region((r["x"], r["y"]), 0, (n, n)))[:, :, :3].astype(np.float32)
        f = n // REGION
        ref = ref.reshape(REGION, f, REGION, f, 3).mean((1, 3))  # [n,n,3] -> [512,512,3]
        assert np.abs(img - ref).mean() < JPEG_TOL
        # The tolerance still tells a 1 px misalignment apart (texture differs by ~20 levels).
        assert np.abs(img[:, 1:] - ref[:, :-1]).mean() > 2 * JPEG_TOL


def test_manifest_status_and_qc(cohort_out):
    with open(os.path.join(cohort_out, "manifest.json")) as f:
        m = json.load(f)
    assert m["kind"] == "regions" and m["counts"] == {"done": 3}
    assert m["n_records"] == 3 * len(expected_regions())
    assert m["params"]["region_px"] == REGION and m["versions"]["openslide"]
    assert m["items"]["s40"]["read_px"] == 2 * REGION and m["items"]["s40"]["n_candidates"] == LAYOUT.size
    for sid in ("s20", "s40", "s40l"):
        for kind in ("mask", "regions"):
            assert os.path.getsize(os.path.join(cohort_out, "qc", f"{sid}_{kind}.png")) > 100


def test_real_slide_default_4096_region_is_padded(real_slide, tmp_path):
    assert _run(["--slides", os.path.dirname(real_slide), "--out", str(tmp_path)]) == 0
    (rec,) = _shard(str(tmp_path), "cmu_small_region")
    img = decode_jpeg(rec["image_jpeg"])
    assert img.shape == (4096, 4096, 3) and (rec["x"], rec["y"]) == (0, 0)
    slide = openslide.OpenSlide(real_slide)
    w, h = slide.dimensions
    ref = np.asarray(slide.read_region((0, 0), 0, (w, h)))[:, :, :3].astype(np.float32)
    assert np.abs(img[:h, :w] - ref).mean() < JPEG_TOL
    assert img[h + 16:, :].min() >= 250 and img[:, w + 16:].min() >= 250  # white padding


def test_real_slide_1024_grid(real_slide, tmp_path):
    assert _run(["--slides", os.path.dirname(real_slide), "--out", str(tmp_path), "--region", "1024"]) == 0
    recs = _shard(str(tmp_path), "cmu_small_region")
    # 2220 x 2967 at 0.499 um/px -> 3 x 3 grid of 1024 px regions (snapped 1:1), of which
    # exactly these 5 hold tissue (the x = 2048 column is a 172 px strip of glass, the top-left
    # corner empty glass). Plant: floor(height / region) rows instead of ceil fails:
    # (0, 2048) and (1024, 2048) disappear (checked).
    assert sorted((r["x"], r["y"]) for r in recs) == [(0, 1024), (0, 2048), (1024, 0), (1024, 1024),
                                                      (1024, 2048)]
    assert all(r["x"] % 1024 == 0 and r["y"] % 1024 == 0 and r["x"] < 2220 and r["y"] < 2967 for r in recs)
    assert (0, 0) not in [(r["x"], r["y"]) for r in recs]  # the top-left corner is empty glass


def test_bad_inputs_reported_and_run_continues(tmp_path, synthetic_slides):
    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(synthetic_slides["s20"], slides / "good.svs")
    (slides / "text.svs").write_text("this is a text file renamed .svs\n")
    with open(synthetic_slides["s20"], "rb") as f:
        (slides / "truncated.svs").write_bytes(f.read()[:50_000])
    (slides / "zero.svs").write_bytes(b"")
    data = bytearray(open(synthetic_slides["s20"], "rb").read())
    third = len(data) // 3
    data[third:2 * third] = bytes(third)  # level-0 tile data zeroed: opens fine, fails on read
    (slides / "corrupt.svs").write_bytes(bytes(data))
    make_aperio_slide(str(slides / "blank.svs"), (1024, 1024), levels=(1,), tissue=np.zeros((1, 1), bool))
    make_aperio_slide(str(slides / "nompp.svs"), (1024, 1024), levels=(1,), mpp=None)
    # all tissue but smaller than the smallest piece kept: said so, not "no tissue" (plant: the
    # old message -> fails)
    make_aperio_slide(str(slides / "small.svs"), (200, 200), levels=(1,))
    # a greyscale (fluorescence-like) TIFF: named as colourless, not "no tissue" (plant: no
    # colour check in process_slide -> fails)
    from tests.fixtures_slides import grey_tiff

    grey_tiff(str(slides / "grey.tif"))
    out = tmp_path / "out"
    assert _run(["--slides", str(slides), "--out", str(out), "--region", str(REGION)]) == 1
    with open(out / "manifest.json") as f:
        items = json.load(f)["items"]
    assert items["good"]["status"] == "done" and items["good"]["n_regions"] == len(expected_regions())
    reasons = {k: v["error"] for k, v in items.items() if v["status"] == "failed"}
    assert set(reasons) == {"text", "truncated", "zero", "corrupt", "blank", "nompp", "small", "grey"}
    assert "grey.tif: its pixels have no colour" in reasons["grey"] and "not a brightfield H&E" in reasons["grey"]
    assert "the whole slide is 200 x 200 px at 0.5 um/px, smaller than the smallest tissue piece" in reasons["small"]
    assert "corrupt.svs" in reasons["corrupt"] and "JPEG" in reasons["corrupt"]
    assert not os.path.exists(out / "regions" / "corrupt.array_record")  # no partial shard
    assert "not a slide format" in reasons["text"]
    assert "empty file" in reasons["zero"]
    assert "no tissue" in reasons["blank"]
    assert "--assume-mpp" in reasons["nompp"]
    assert "truncated.svs" in reasons["truncated"]
    # Rerun, same parameters: the good slide is skipped (shard untouched), failures retried.
    mtime = os.path.getmtime(out / "regions" / "good.array_record")
    assert _run(["--slides", str(slides), "--out", str(out), "--region", str(REGION)]) == 1
    assert os.path.getmtime(out / "regions" / "good.array_record") == mtime
    # Other parameters in the same folder are refused (exit 2) rather than mixed.
    assert _run(["--slides", str(slides), "--out", str(out), "--region", str(REGION),
                 "--assume-mpp", "0.5"]) == 2
    only = tmp_path / "only_nompp"
    only.mkdir()
    shutil.move(str(slides / "nompp.svs"), only / "nompp.svs")
    assert _run(["--slides", str(only), "--out", str(tmp_path / "out2"), "--region", str(REGION),
                 "--assume-mpp", "0.5"]) == 0


def _dies_on_crash_slides(task, out_dir, params):
    """process_slide, except that the worker process dies on a slide named crash* (what a
    segfault in the slide reader on a damaged file, or the OOM killer, does to it)."""
    import signal

    from data_prep.regions import process_slide

    if task.slide_id.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    return process_slide(task, out_dir, params)


def test_a_worker_that_dies_fails_its_slide_and_the_run_goes_on(tmp_path, synthetic_slides):
    """A pool worker that died under a slide (a crash in OpenSlide/libtiff, the OOM killer) was
    replaced by the pool, but imap_unordered waited for that slide's result forever: hipt-prep
    hung. The slide fails, named, and the others are done. Plant: run_pool back to
    imap_unordered -> the run never ends (the test's timeout), fails."""
    import threading

    from data_prep.regions import RegionParams
    from data_prep.runner import find_slide_files, run_items

    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(synthetic_slides["s20"], slides / "good.svs")
    os.symlink(synthetic_slides["s40"], slides / "crash.svs")
    tasks = find_slide_files(str(slides))
    params = RegionParams(region_px=REGION)
    out = str(tmp_path / "out")
    manifest = {}
    run = threading.Thread(target=lambda: manifest.update(run_items(
        _dies_on_crash_slides, tasks, [t.slide_id for t in tasks], out, "regions", params.to_dict(),
        (out, params), workers=2)), daemon=True)
    run.start()
    run.join(timeout=240)
    assert not run.is_alive(), "hipt-prep hung on a slide whose worker died"
    items = manifest["items"]
    assert items["good"]["status"] == "done" and items["good"]["n_regions"] == len(expected_regions())
    assert items["crash"]["status"] == "failed"
    assert "crash.svs: the worker process died while processing it" in items["crash"]["error"]


def test_rerun_skips_done_slides(cohort_out, synthetic_slides, capsys):
    slides = os.path.dirname(synthetic_slides["s20"])
    before = {sid: os.path.getmtime(os.path.join(cohort_out, "regions", sid + ".array_record"))
              for sid in ("s20", "s40", "s40l")}
    assert _run(["--slides", slides, "--out", cohort_out, "--region", str(REGION)]) == 0
    assert "3 of 3 already done" in capsys.readouterr().out
    after = {sid: os.path.getmtime(os.path.join(cohort_out, "regions", sid + ".array_record"))
             for sid in before}
    assert before == after


def test_cli_bad_folder_exit_2(tmp_path, capsys):
    assert _run(["--slides", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: no such file or folder" in capsys.readouterr().err
    (tmp_path / "crop.png").write_bytes(b"\x89PNG")
    assert _run(["--slides", str(tmp_path / "crop.png"), "--out", str(tmp_path / "o")]) == 2
    assert "crop.png: not a folder, a slide file (.svs" in capsys.readouterr().err


def test_one_slide_file_as_slides(tmp_path, synthetic_slides):
    """--slides takes one slide file too (it was refused as "not a folder or a table of
    slides"). Plant: no single-file branch -> exit 2, fails."""
    out = tmp_path / "o"
    assert _run(["--slides", synthetic_slides["s20"], "--out", str(out), "--region", str(REGION)]) == 0
    assert len(_shard(str(out), "s20")) == len(expected_regions())


def test_csv_input(tmp_path, synthetic_slides):
    csv = tmp_path / "slides.csv"
    csv.write_text(f"slide_id,path\ncase_A,{synthetic_slides['s20']}\n")
    assert _run(["--slides", str(csv), "--out", str(tmp_path / "o"), "--region", str(REGION)]) == 0
    assert len(_shard(str(tmp_path / "o"), "case_A")) == len(expected_regions())


def test_find_slide_files_folder_dicom_and_duplicates(tmp_path, monkeypatch):
    from data_prep.runner import InputError, find_slide_files

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.svs").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    dcm = tmp_path / "case 7"
    dcm.mkdir()
    for name in ("b.dcm", "a.dcm"):  # a DICOM slide is a folder of instances: one task
        (dcm / name).write_bytes(b"")
    tasks = find_slide_files(str(tmp_path))
    assert [(t.slide_id, os.path.basename(t.path)) for t in tasks] == [("x", "x.svs"), ("case_7", "a.dcm")]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.ndpi").write_bytes(b"")
    with pytest.raises(InputError, match="'x' used by both"):
        find_slide_files(str(tmp_path))
    home = tmp_path / "home"
    (home / "slides").mkdir(parents=True)
    (home / "slides" / "h.svs").write_bytes(b"")
    (tmp_path / "list.csv").write_text("path\n~/slides/h.svs\nb/x.ndpi\n")
    monkeypatch.setenv("HOME", str(home))  # ~ was joined to the CSV's folder: ".../~/slides/h.svs: no such file"
    assert [t.path for t in find_slide_files(str(tmp_path / "list.csv"))] == [
        str(home / "slides" / "h.svs"), str(tmp_path / "b" / "x.ndpi")]
    bad_csv = tmp_path / "s.csv"
    bad_csv.write_text("file\nx.svs\n")
    with pytest.raises(InputError, match="needs a 'path' column"):
        find_slide_files(str(bad_csv))


def test_tissue_too_small_for_a_region_is_reported(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    tissue = np.zeros((2, 2), bool)
    tissue[1, 1] = True  # one 512 px tissue square: 1.6% of a 4096 px region
    make_aperio_slide(str(slides / "speck.svs"), (1024, 1024), levels=(1,), tissue=tissue,
                      tissue_cell_px=512)
    assert _run(["--slides", str(slides), "--out", str(tmp_path / "o")]) == 1
    with open(tmp_path / "o" / "manifest.json") as f:
        err = json.load(f)["items"]["speck"]["error"]
    assert "no 4096 px region reaches tissue fraction 0.1" in err
    assert _run(["--slides", str(slides), "--out", str(tmp_path / "o2"), "--min-tissue", "0.01"]) == 0


def test_no_tissue_under_a_saturation_floor_names_the_floor(tmp_path):
    """--min-saturation 255 (nothing is more saturated) on a slide of tissue: the failure said
    "threshold 255, Otsu's" and blamed a crop without glass, not the flag. (Plant: the Otsu
    wording whatever decided -> fails.)"""
    slides = tmp_path / "slides"
    slides.mkdir()
    make_aperio_slide(str(slides / "t.svs"), (768, 768), levels=(1,), tissue=np.ones((3, 3), bool))
    assert main(["coords", "--workers", "1", "--no-progress", "--slides", str(slides), "--out",
                 str(tmp_path / "o"), "--region", "256", "--min-saturation", "255"]) == 1
    with open(tmp_path / "o" / "manifest.json") as f:
        err = json.load(f)["items"]["t"]["error"]
    assert "HSV saturation threshold 255: the --min-saturation floor, above Otsu's" in err, err
    assert "Otsu's threshold splits" not in err


def test_python_api_matches_cli(cohort_out, synthetic_slides, tmp_path):
    from data_prep.runner import prepare_regions

    m = prepare_regions(os.path.dirname(synthetic_slides["s20"]), str(tmp_path), region_px=REGION)
    assert m["counts"] == {"done": 3}
    for sid in ("s20", "s40", "s40l"):
        with open(os.path.join(cohort_out, "regions", sid + ".array_record"), "rb") as a, \
                open(tmp_path / "regions" / (sid + ".array_record"), "rb") as b:
            assert a.read() == b.read()


def test_find_slide_files_links_hidden_files_and_spaced_header(tmp_path):
    """A linked subfolder is searched (it was skipped: its slides silently missing), a link back
    up does not loop, macOS "._x.svs" files are not slides (they blocked the run as a duplicate
    id), and a "slide_id, path" header with spaces is read. Plants: os.walk without followlinks
    -> s2 missing; no hidden-file skip -> 'used by both'; no header strip -> 'needs a path'."""
    from data_prep.runner import InputError, find_slide_files

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "s2.svs").write_bytes(b"")
    root = tmp_path / "cohort"
    (root / "real").mkdir(parents=True)
    (root / "real" / "s1.svs").write_bytes(b"")
    (root / "real" / "._s1.svs").write_bytes(b"\x00\x05\x16\x07")
    (root / "linked").symlink_to(tmp_path / "other")
    (root / "real" / "loop").symlink_to(root)
    tasks = find_slide_files(str(root))
    assert sorted(t.slide_id for t in tasks) == ["s1", "s2"]
    spaced = tmp_path / "slides.csv"
    spaced.write_text("slide_id, path\ncase_1, cohort/real/s1.svs\n")
    assert [(t.slide_id, t.path) for t in find_slide_files(str(spaced))] == \
        [("case_1", os.path.join(str(tmp_path), "cohort/real/s1.svs"))]
    # One file under two ids (plant: no realpath check -> two tasks, a train/test leak).
    # A slides CSV saved by a decimal-comma spreadsheet: ';' separators, trailing ';' rows
    # (plant: the slide list without data_prep.csv_table -> "needs a 'path' column").
    semicolon = tmp_path / "slides_semicolon.csv"
    semicolon.write_text("slide_id;path\ncase_1;cohort/real/s1.svs\n;\n")
    assert [(t.slide_id, t.path) for t in find_slide_files(str(semicolon))] == \
        [("case_1", os.path.join(str(tmp_path), "cohort/real/s1.svs"))]
    twice = tmp_path / "twice.csv"
    twice.write_text("slide_id,path\nx,cohort/real/s1.svs\ny,cohort/real/../real/s1.svs\n")
    with pytest.raises(InputError, match=r"s1.svs is listed as slide 'x' and as 'y'"):
        find_slide_files(str(twice))


def test_ids_keep_letters_of_any_script_and_coordinate_files_meet_them(tmp_path):
    """'患者1.svs' and '病人1.svs' were both id '1' (the whole run refused as a duplicate), and
    'my slide.svs' (id 'my_slide') never found its 'my slide_patches.h5'. Plants: the ASCII-only
    id -> 'used by both'; coordinate ids not normalized -> key 'my slide', fails."""
    from data_prep.coords import find_coords_files
    from data_prep.runner import find_slide_files

    for name in ("患者1.svs", "病人1.svs", "my slide.svs"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(t.slide_id for t in find_slide_files(str(tmp_path))) == sorted(["患者1", "病人1", "my_slide"])
    coords = tmp_path / "coords"
    coords.mkdir()
    (coords / "my slide_patches.h5").write_bytes(b"")
    assert list(find_coords_files(str(coords))) == ["my_slide"]


def test_slide_csv_ids_lose_their_extension_and_nfd_names_are_nfc(tmp_path):
    """A CLAM slide table (slide_id=good.svs) made shards and bags named good.svs, which no labels
    row (with or without .svs) ever met; a macOS (NFD) 'café.svs' became id 'cafe'. Plants: no
    extension strip in find_slide_files -> 'good.svs'; no NFC in safe_slide_id -> 'cafe'."""
    import unicodedata

    from data_prep.runner import find_slide_files

    nfd = unicodedata.normalize("NFD", "café")
    (tmp_path / f"{nfd}.svs").write_bytes(b"")
    (tmp_path / "good.svs").write_bytes(b"")
    (tmp_path / "slides.csv").write_text("slide_id,path\ngood.svs,good.svs\n")
    assert [t.slide_id for t in find_slide_files(str(tmp_path / "slides.csv"))] == ["good"]
    (tmp_path / "slides.csv").unlink()
    assert sorted(t.slide_id for t in find_slide_files(str(tmp_path))) == ["café", "good"]


def test_a_qc_picture_that_cannot_be_written_fails_its_slide_naming_it(tmp_path, monkeypatch):
    """cv2.imwrite reports a failed write (disk full, file too large) only by returning False:
    the rename after it then failed as "FileNotFoundError ... s_mask.png.tmp-13274.png ->
    s_mask.png", or, when a cut file was left, the slide was "done" with a broken picture. Plant:
    _qc_pictures ignoring imwrite's result -> "done" (exit 0) here, fails."""
    from data_prep import regions

    slides = tmp_path / "slides"
    slides.mkdir()
    make_aperio_slide(str(slides / "s.svs"), (1024, 1024), levels=(1,))
    real = regions.cv2.imwrite

    def full(path, img, *args):
        if "_mask.png" not in path:
            return real(path, img, *args)
        with open(path, "wb") as f:
            f.write(b"\x89PNG")  # what a full disk lets through
        return False

    monkeypatch.setattr(regions.cv2, "imwrite", full)
    assert _run(["--slides", str(slides), "--out", str(tmp_path / "o"), "--region", "512", "--no-progress"]) == 1
    error = json.loads((tmp_path / "o" / "manifest.json").read_text())["items"]["s"]["error"]
    assert f"{tmp_path / 'o' / 'qc' / 's_mask.png'}: could not write the QC picture (disk full?)" in error, error
    assert os.listdir(tmp_path / "o" / "qc") == []
