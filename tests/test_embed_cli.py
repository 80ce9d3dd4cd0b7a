"""hipt-embed: image and slide regions -> .npz with the Python API's keys and values."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hipt_jax.models import checkpoint
from hipt_jax.cli import embed
from hipt_jax.models.hipt4k import HIPT4K

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny random backbones saved as converted directories, and the model they make."""
    d = tmp_path_factory.mktemp("embed")
    model = HIPT4K.random_init(seed=0, tiny=True)
    checkpoint.save(str(d / "vit256"), model.params256["params"], "vit", model.config256)
    checkpoint.save(str(d / "vit4k"), model.params4k["params"], "vit", model.config4k)
    return d, model


def run(capsys, *argv):
    code = embed.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_image_region(setup, capsys):
    d, model = setup
    region = np.random.default_rng(0).integers(0, 256, size=(600, 530, 3), dtype=np.uint8)
    Image.fromarray(region).save(d / "region.png")
    code, out, err = run(capsys, "--vit256", d / "vit256", "--vit4k", d / "vit4k", "--image", d / "region.png",
                         "--out", d / "out" / "region.npz")
    assert code == 0, err
    assert "region 600x530 px (its 512x512 centre at (9, 44); crop_box in the npz) -> 4 patches" in out
    assert "features_cls4k" in out
    saved = np.load(d / "out" / "region.npz")
    # the embedded centre crop, (top, left, height, width) of the input (plant: no crop_box -> fails)
    assert tuple(saved["crop_box"]) == (44, 9, 512, 512)
    want = model(region)
    for key in embed.OUTPUT_KEYS:
        np.testing.assert_allclose(saved[key], want[key], atol=1e-6, rtol=0)
    assert saved["features_cls256"].shape == (4, 384) and saved["features_mean256_cls4k"].shape == (576,)


def test_slide_region(setup, tmp_path, capsys):
    """A 40x synthetic Aperio slide: 512 px at 0.5 um/px = 1024 level-0 px, downsampled."""
    from data_prep.slide_io import open_slide, read_region_at_mpp
    from data_prep.synth import make_aperio_slide

    d, model = setup
    slide_path = make_aperio_slide(str(tmp_path / "s.svs"), (2048, 2048), mag=40, levels=(1, 4))
    code, out, err = run(capsys, "--vit256", d / "vit256", "--vit4k", d / "vit4k", "--slide", slide_path,
                         "--x", 256, "--y", 512, "--size", 512, "--out", tmp_path / "s.npz", "--attention")
    assert code == 0, err
    saved = np.load(tmp_path / "s.npz")
    region = read_region_at_mpp(open_slide(slide_path), 256, 512, size_px=512, target_mpp=0.5)
    want = model(region, return_attention=True)
    np.testing.assert_allclose(saved["features_cls4k"], want["features_cls4k"], atol=1e-6, rtol=0)
    assert saved["attention256"].shape == (4, 6, 256) and saved["attention4k"].shape == (6, 4)
    # A region past the slide's edge would be all white padding (plant: no bounds check).
    code, _, err = run(capsys, "--vit256", d / "vit256", "--vit4k", d / "vit4k", "--slide", slide_path,
                       "--x", 4096, "--y", 0, "--size", 512, "--out", tmp_path / "w.npz")
    assert code == 2 and "(--x 4096, --y 0) is outside the slide (2048 x 2048 level-0 px)" in err


def test_region_past_the_slide_edge_is_noted_and_a_plain_image_named(tmp_path, capsys):
    """A 512 px region at (400, 400) of a 600 px slide is 85% white padding: it was embedded with
    exit 0 and no word; the share outside the slide is noted now (nothing for a region inside). A
    PNG given as --slide got "not a slide format OpenSlide can read": it is named as a plain image,
    with the flag that takes one. (flags.read_region: hipt-embed's and hipt-heatmap's region.)
    Plants: no _note_outside -> no note; flags.open_slide without the plain-image case ->
    OpenSlide's message alone."""
    import argparse

    from data_prep.synth import make_aperio_slide
    from hipt_jax.cli.flags import UsageError, read_region

    slide = make_aperio_slide(str(tmp_path / "small.svs"), (600, 600), mag=20, levels=(1,))
    args = argparse.Namespace(image=None, slide=slide, x=400, y=400, size=512, target_mpp=0.5, assume_mpp=None)
    assert read_region(args).shape == (512, 512, 3)
    assert ("small.svs: note: 85% of the region (512 x 512 level-0 px at (400, 400)) lies outside the slide "
            "(600 x 600 px)") in capsys.readouterr().err
    read_region(argparse.Namespace(**dict(vars(args), x=0, y=0)))  # inside the slide
    assert "note" not in capsys.readouterr().err
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(UsageError, match="photo.png: a plain PNG image, not a whole-slide format OpenSlide can "
                                         "read; give it as --image"):
        read_region(argparse.Namespace(**dict(vars(args), slide=str(tmp_path / "photo.png"), x=0, y=0)))


def test_image_files_are_read_as_a_viewer_shows_them(tmp_path, capsys):
    """16-bit and float images are refused (PIL's convert("RGB") clips them to near-white);
    transparency is composited over white, EXIF orientation applied, and each conversion said.
    Plants: the old read (convert("RGB") only) -> the 16-bit image reads, alpha is dropped
    (black), the rotated JPEG keeps its stored size: fails."""
    from hipt_jax.cli.flags import UsageError, read_image

    Image.fromarray(np.full((300, 300), 4000, np.uint16)).save(tmp_path / "g16.png")
    with pytest.raises(UsageError, match="g16.png: I;16 image \\(not 8-bit\\)"):
        read_image(str(tmp_path / "g16.png"))
    with pytest.raises(UsageError, match="is a directory"):
        read_image(str(tmp_path))
    # 16 bits per channel RGB: PIL opens it as "RGB" and keeps the high byte (12-bit data ->
    # near black, exit 0). Plant: no depth check -> both read: fails.
    import tifffile

    rgb48 = np.full((300, 300, 3), 3000, np.uint16)
    tifffile.imwrite(tmp_path / "c48.tif", rgb48, photometric="rgb")
    with open(tmp_path / "c48.png", "wb") as f:  # PIL cannot write 48-bit PNGs: cv2 can
        import cv2

        f.write(cv2.imencode(".png", rgb48)[1].tobytes())
    for name in ("c48.tif", "c48.png"):
        with pytest.raises(UsageError, match=f"{name}: 16-bit-per-channel RGB image .*convert it to 8-bit RGB"):
            read_image(str(tmp_path / name))
    rgba = np.zeros((300, 300, 4), np.uint8)
    rgba[:, :150] = (200, 50, 100, 255)  # left half opaque, right half fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    got = read_image(str(tmp_path / "a.png"))
    assert (got[:, 150:] == 255).all() and (got[:, :150] == (200, 50, 100)).all()
    assert "RGBA -> RGB: alpha composited over white" in capsys.readouterr().err
    im = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees
    im.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(str(tmp_path / "r.jpg")).shape == (400, 300, 3)
    assert "EXIF orientation 6" in capsys.readouterr().err
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "plain.png")
    read_image(str(tmp_path / "plain.png"))
    assert capsys.readouterr().err == ""  # plain 8-bit RGB: nothing to say


def test_bad_inputs_give_one_line_errors(setup, tmp_path, capsys):
    d, _ = setup
    (tmp_path / "fake.png").write_text("not a png")
    Image.fromarray(np.zeros((100, 300, 3), np.uint8)).save(tmp_path / "small.png")
    cases = [
        (["--image", tmp_path / "fake.png"], "fake.png: not an image file"),
        (["--image", tmp_path / "small.png"], "needs >= 256 px"),
        (["--image", tmp_path / "missing.png"], "missing.png: no such file"),
        (["--slide", tmp_path / "fake.png"], "--slide needs --x and --y"),
        (["--slide", tmp_path / "fake.png", "--x", 0, "--y", 0], "fake.png"),
        # a whole slide as --image was decoded whole and embedded as one region, exit 0; --out
        # a folder wrote DIR/.npz or DIR.npz (plants: no _refuse_whole_slide / no folder check)
        (["--image", tmp_path / "slide.svs"], "slide.svs: a whole-slide image; give it as --slide"),
        (["--image", tmp_path / "small.png", "--out", tmp_path], "is a folder; --out takes the .npz file"),
    ]
    (tmp_path / "slide.svs").write_bytes(b"II*\x00")
    for extra, needle in cases:
        code, _, err = run(capsys, "--vit256", d / "vit256", "--out", tmp_path / "o.npz", *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (extra, err)
    # A ViT-4K checkpoint given as ViT-256.
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "ok.png")
    code, _, err = run(capsys, "--vit256", d / "vit4k", "--image", tmp_path / "ok.png", "--out", tmp_path / "o.npz")
    assert code == 2 and "is a vit4k checkpoint, expected vit256" in err
    assert not (tmp_path / "o.npz").exists()


def test_out_never_replaces_another_file(tmp_path, capsys):
    """--out replaced any file, exit 0: a bag of an embeddings folder, an .npz hipt-embed did not
    write. Refused before any work, one line naming the path; an earlier hipt-embed output is
    replaced as before. Plant: no outputs.check_target in embed._run -> exit 0, the file replaced."""
    from hipt_jax import outputs

    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "ok.png")
    emb = tmp_path / "emb"
    (emb / "slides").mkdir(parents=True)
    (emb / "manifest.json").write_text('{"schema": "hipt.embeddings.v1", "slides": {}}')
    np.savez(emb / "slides" / "s1.npz", features_cls4k=np.zeros((1, 192), np.float32))
    np.savez(tmp_path / "theirs.npz", scores=np.zeros(3))
    for out, needle in ((emb / "slides" / "s1.npz", "lies inside"),
                        (tmp_path / "theirs.npz", "exists and is not an earlier hipt-embed output")):
        before = out.read_bytes()
        code, _, err = run(capsys, "--random-init", "tiny", "--image", tmp_path / "ok.png", "--out", out)
        assert code == 2 and needle in err and str(out) in err and len(err.strip().splitlines()) == 1, err
        assert out.read_bytes() == before
    np.savez(tmp_path / "mine.npz", features_cls256=np.zeros((1, 384)), region_shape=np.array([256, 256]))
    outputs.check_target(str(tmp_path / "mine.npz"), writer="hipt-embed", is_own=embed._own_output)


def test_out_suffix_in_capitals_names_the_file_written(tmp_path, capsys):
    """--out r.NPZ wrote r.NPZ.npz (the .npz check was case-sensitive) and checked that name, not
    the one given: a foreign r.NPZ was neither replaced nor refused. Plant: endswith(".npz")
    without .lower() in embed._npz_path -> r.NPZ.npz written, theirs.NPZ not refused."""
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "ok.png")
    code, out, err = run(capsys, "--random-init", "tiny", "--image", tmp_path / "ok.png", "--out", tmp_path / "r.NPZ")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png", "r.NPZ"]
    assert f"wrote {tmp_path / 'r.NPZ'}" in out and "features_cls256" in np.load(tmp_path / "r.NPZ")
    np.savez(tmp_path / "theirs.npz", scores=np.zeros(3))
    os.rename(tmp_path / "theirs.npz", tmp_path / "theirs.NPZ")
    code, _, err = run(capsys, "--random-init", "tiny", "--image", tmp_path / "ok.png", "--out", tmp_path / "theirs.NPZ")
    assert code == 2 and "exists and is not an earlier hipt-embed output" in err, err


def test_entry_point_subprocess(setup, tmp_path):
    d, _ = setup
    (tmp_path / "bad.pth").write_bytes(b"\x00\x01garbage")
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "ok.png")
    proc = subprocess.run([sys.executable, "-m", "hipt_jax.cli.embed", "--vit256", str(tmp_path / "bad.pth"),
                           "--image", str(tmp_path / "ok.png"), "--out", str(tmp_path / "o.npz")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "bad.pth: not a PyTorch checkpoint" in proc.stderr.strip().splitlines()[-1]


def test_slide_coarser_than_the_target_needs_allow_upsample(tmp_path, capsys):
    """A 1.0 um/px slide read for 0.5 um/px was 256 level-0 px upsampled 2x, with exit 0 and no
    word, where hipt-prep and hipt-extract --slides refuse it. Refused the same way now (one line,
    exit 2); --allow-upsample reads it, and is refused beside --image (it would do nothing).
    Plant: flags.read_region without check_upsample -> exit 0 -> fails."""
    import argparse

    from data_prep.synth import make_aperio_slide
    from hipt_jax.cli.flags import read_region

    slide = make_aperio_slide(str(tmp_path / "s10.svs"), (768, 768), mag=20, levels=(1,), mpp=1.0)
    code, _, err = run(capsys, "--random-init", "tiny", "--slide", slide, "--x", 0, "--y", 0, "--size", 512,
                       "--out", tmp_path / "e.npz")
    assert code == 2 and not (tmp_path / "e.npz").exists()
    # (the synthetic header also says AppMag 20: a warning line of its own comes first)
    assert [ln for ln in err.splitlines() if "error" in ln] == [
        f"hipt-embed: error: {slide}: refused: slide is 1 um/px, coarser than the target 0.5 um/px (regions "
        "would be upsampled 2.00x); pass --allow-upsample to accept, or a --target-mpp >= the slide's"]
    args = argparse.Namespace(image=None, slide=slide, x=0, y=0, size=512, target_mpp=0.5, assume_mpp=None,
                              allow_upsample=True)
    assert read_region(args).shape == (512, 512, 3)
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "r.png")
    code, _, err = run(capsys, "--random-init", "tiny", "--image", tmp_path / "r.png", "--allow-upsample",
                       "--out", tmp_path / "i.npz")
    assert code == 2 and "--allow-upsample: choose a region of --slide" in err


def test_damaged_tile_is_one_line_exit_2(tmp_path, capsys):
    """A corrupt JPEG tile under the region was an OpenSlideError traceback (exit 1); it is one
    line naming the slide and the region read, exit 2.
    Plant: read_rgb without its OpenSlideError -> SlideError conversion -> fails."""
    from data_prep.synth import make_aperio_slide
    from tests.fixtures_slides import damage_tile

    slide = damage_tile(make_aperio_slide(str(tmp_path / "bad.svs"), (1024, 1024), levels=(1,), seed=2), 5)
    code, _, err = run(capsys, "--random-init", "tiny", "--slide", slide, "--x", 0, "--y", 0, "--size", 512,
                       "--out", tmp_path / "e.npz")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"hipt-embed: error: {slide}: cannot read its pixels (512 x 512 px at level 0 from level-0 (0, 0))" in err


def test_greyscale_slide_region_is_refused(tmp_path):
    """A greyscale (fluorescence-like) slide was read as grey RGB and embedded by the H&E model,
    exit 0 (flags.read_region: hipt-embed's and hipt-heatmap's --slide). Refused, naming it;
    an H&E region with a few grey pixels is not. Plant: no colour check -> no error, fails."""
    import argparse

    from data_prep.synth import make_aperio_slide
    from hipt_jax.cli.flags import UsageError, read_region
    from tests.fixtures_slides import grey_tiff

    args = argparse.Namespace(image=None, slide=grey_tiff(str(tmp_path / "grey.tif")), x=0, y=0, size=512,
                              target_mpp=0.5, assume_mpp=None)
    with pytest.raises(UsageError, match="grey.tif: its pixels have no colour .* not a brightfield H&E slide"):
        read_region(args)
    he = make_aperio_slide(str(tmp_path / "he.svs"), (600, 600), mag=20, levels=(1,))
    assert read_region(argparse.Namespace(**dict(vars(args), slide=he))).shape == (512, 512, 3)


def test_greyscale_image_region_is_refused_like_a_greyscale_slide(tmp_path, capsys):
    """A greyscale --image (an H&E crop saved as grey, or a TIFF whose pages are its R, G and B
    planes, read as its first page) was copied to grey RGB and embedded with exit 0 and a note,
    where the same pixels from --slide are refused. Refused now, one line naming the file (the
    channel stack told how to fix it); the colour original and its palette copy are read.
    Plant: no _refuse_colourless_image in flags.read_region -> exit 0: fails."""
    import argparse

    import tifffile

    from hipt_jax.cli.flags import read_region
    from tests.synthetic_cohort import tissue_crop

    he = tissue_crop(np.random.default_rng(0), 300)
    Image.fromarray(he).save(tmp_path / "he.png")
    Image.fromarray(he).convert("L").save(tmp_path / "grey.png")
    tifffile.imwrite(tmp_path / "planes.tif", np.moveaxis(he, -1, 0), photometric="minisblack")
    for name, needle in (("grey.png", "grey.png: its pixels have no colour"),
                         ("planes.tif", "its first page was read, of 3: if they are its colour channels")):
        code, _, err = run(capsys, "--random-init", "tiny", "--image", tmp_path / name, "--out", tmp_path / "o.npz")
        errors = [ln for ln in err.splitlines() if "error" in ln]
        assert code == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err
        assert not (tmp_path / "o.npz").exists()
    Image.fromarray(he).convert("P").save(tmp_path / "palette.png")
    for name in ("he.png", "palette.png"):
        assert read_region(argparse.Namespace(image=str(tmp_path / name), slide=None)).shape == (300, 300, 3)


def test_assume_mpp_for_a_slide_with_an_mpp_is_said_to_be_unused(tmp_path, capsys):
    """--assume-mpp 1.0 on a slide whose metadata says 0.5 um/px was dropped without a word (the
    region read at the metadata's scale, not the one asked for). A note names the slide and both
    values; the same value, or a slide without an mpp (where it is used), says nothing.
    Plant: no _note_assume_mpp_unused in flags.read_region -> no note: fails."""
    import argparse

    from data_prep.synth import make_aperio_slide
    from hipt_jax.cli.flags import read_region

    slide = make_aperio_slide(str(tmp_path / "s.svs"), (600, 600), mag=20, levels=(1,))
    bare = make_aperio_slide(str(tmp_path / "bare.svs"), (600, 600), mag=20, levels=(1,), mpp=None)
    args = argparse.Namespace(image=None, slide=slide, x=0, y=0, size=512, target_mpp=0.5, assume_mpp=1.0,
                              allow_upsample=True)
    capsys.readouterr()
    read_region(args)
    assert "s.svs: note: --assume-mpp 1 is not used: the slide's metadata gives 0.5 um/px" in capsys.readouterr().err
    for changed in ({"assume_mpp": 0.5}, {"slide": bare, "assume_mpp": 0.5}):
        read_region(argparse.Namespace(**dict(vars(args), **changed)))
        assert "--assume-mpp" not in capsys.readouterr().err, changed
