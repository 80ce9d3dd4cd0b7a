"""Hierarchical attention heatmaps: shapes, rank ranges, shift bookkeeping, golden image, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hipt_jax.heatmap import (compute_region_heatmaps, overlay, percentile_rank, scores4k, scores256,
                              shift_region, slide_attention_map, unshift_and_average, write_region_heatmaps)
from hipt_jax.models.hipt4k import HIPT4K

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
REAL_SLIDE = os.path.join(ROOT, "data_prep", "testdata", "cmu_small_region.svs")


@pytest.fixture(scope="module")
def tiny_model():
    return HIPT4K.random_init(seed=0, tiny=True, patch_batch=16)


@pytest.fixture(scope="module")
def tissue():
    """A real 768 x 1024 tissue crop (non-square catches row/column mix-ups)."""
    import openslide

    slide = openslide.OpenSlide(REAL_SLIDE)
    return np.ascontiguousarray(np.asarray(slide.read_region((600, 1700), 0, (1024, 768)))[:, :, :3])


def test_percentile_rank_range_and_ties():
    r = percentile_rank(np.array([[3.0, 1.0, 2.0, 2.0]]))
    np.testing.assert_allclose(r, [[1.0, 0.25, 0.625, 0.625]])
    r = percentile_rank(np.random.default_rng(0).normal(size=(5, 256)))
    assert r.min() == pytest.approx(1 / 256) and r.max() == 1.0


def test_score_shapes_ranks_and_layout():
    rows, cols, heads = 2, 3, 6
    rng = np.random.default_rng(0)
    att256 = rng.random((rows * cols, heads, 256))
    s = scores256(att256, rows, cols, scale=4)
    assert s.shape == (heads, rows * 64, cols * 64)
    assert 0 < s.min() and s.max() <= 1
    # Patch (1, 2), head 3, token (5, 7) -> pixels [64+20:64+24, 128+28:128+32] at scale 4.
    expect = percentile_rank(att256[1 * cols + 2, 3])[5 * 16 + 7]
    np.testing.assert_allclose(s[3, 64 + 20 : 64 + 24, 128 + 28 : 128 + 32], expect)
    # Each patch's 16x16 token ranks are a permutation of 1/256 .. 1 (no ties in random data).
    block = s[0, 64:128:4, 0:64:4]
    np.testing.assert_allclose(np.sort(block.ravel()), np.arange(1, 257) / 256, rtol=1e-6)

    att4k = rng.random((heads, rows * cols))
    s4 = scores4k(att4k, rows, cols, scale=16)
    assert s4.shape == (heads, rows * 16, cols * 16)
    np.testing.assert_allclose(s4[2, 16:, 32:], percentile_rank(att4k[2])[1 * cols + 2])
    np.testing.assert_allclose(np.unique(s4[0]), np.arange(1, 7) / 6, rtol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        scores4k(att4k, rows, cols, scale=3)
    with pytest.raises(ValueError, match="patch grid"):
        scores4k(att4k, 3, 3)


def test_shift_region_pads_white():
    region = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    shifted = shift_region(region, 2)
    np.testing.assert_array_equal(shifted[:2, :3], region[2:, 2:])
    assert (shifted[2:] == 255).all() and (shifted[:, 3:] == 255).all()


def test_unshift_and_average_known_answer():
    """Evaluation k sees G shifted by o_k plus a constant c_k, with garbage in its padding; the
    average in original coordinates must be G + mean(c_k over the evaluations covering p)."""
    height, width, offsets, consts = 12, 10, [0, 2, 4, 6], [0.0, 1.0, 2.0, 3.0]
    big = np.random.default_rng(1).random((2, height + 8, width + 8))  # 2 "heads"
    maps = []
    for off, c in zip(offsets, consts):
        m = np.full((2, height, width), 99.0)  # padding: must never leak in
        m[:, : height - off, : width - off] = big[:, off:height, off:width] + c
        maps.append(m)
    mean, count = unshift_and_average(maps, offsets)
    yy, xx = np.mgrid[:height, :width]
    n_cover = sum((np.minimum(yy, xx) >= o).astype(int) for o in offsets)
    np.testing.assert_array_equal(count, n_cover)
    c_mean = sum((np.minimum(yy, xx) >= o) * c for o, c in zip(offsets, consts)) / n_cover
    np.testing.assert_allclose(mean, big[:, :height, :width] + c_mean, rtol=1e-6)


def _brute_force_maps(model, region, scale, shifts, level):
    """Independent per-pixel reference: for each output pixel and each evaluation, find the
    patch/token of the SHIFTED region containing it and average that evaluation's rank."""
    height, width = region.shape[0] // scale, region.shape[1] // scale
    rows, cols = region.shape[0] // 256, region.shape[1] // 256
    total, count = None, np.zeros((height, width))
    for off in [0, *shifts]:
        out = model(shift_region(region, off), return_attention=True)
        if level == "4k":
            ranks = percentile_rank(out["attention4k"])  # [heads, R*C]
        else:
            ranks = percentile_rank(out["attention256"])  # [R*C, heads, 256]
        acc = np.zeros((ranks.shape[0] if level == "4k" else ranks.shape[1], height, width))
        for py in range(height):
            for px in range(width):
                y, x = py * scale - off, px * scale - off  # pixel in the shifted region
                if y < 0 or x < 0:
                    continue
                patch = (y // 256) * cols + (x // 256)
                if level == "4k":
                    acc[:, py, px] = ranks[:, patch]
                else:
                    acc[:, py, px] = ranks[patch, :, ((y % 256) // 16) * 16 + (x % 256) // 16]
        covered = (np.arange(height)[:, None] * scale >= off) & (np.arange(width)[None] * scale >= off)
        count += covered
        total = acc if total is None else total + acc
    return total / count, count


def test_region_heatmaps_match_brute_force(tiny_model, tissue):
    region = tissue[:512, :768]  # 2 x 3 patches
    maps = compute_region_heatmaps(tiny_model, region, scale=16, shifts256=(128,), shifts4k=(128, 256, 384),
                                   progress=False)
    assert maps.region.shape == (32, 48, 3)
    assert maps.scores256.shape == (6, 32, 48) and maps.scores4k.shape == (6, 32, 48)
    for s in (maps.scores256, maps.scores4k):
        assert 0 < s.min() and s.max() <= 1
    ref4k, n4k = _brute_force_maps(tiny_model, region, 16, (128, 256, 384), "4k")
    ref256, n256 = _brute_force_maps(tiny_model, region, 16, (128,), "256")
    np.testing.assert_array_equal(maps.count4k, n4k)
    np.testing.assert_array_equal(maps.count256, n256)
    np.testing.assert_allclose(maps.scores4k, ref4k, atol=1e-6)
    np.testing.assert_allclose(maps.scores256, ref256, atol=1e-6)
    # Blends: official = the reference's module functions, written as they compute it: each
    # level's sum of shifted rank maps (0..100) over an "overlay" of 100 per 4K evaluation and
    # 200 per 256 evaluation, then (score4k*overlay4k + score256*overlay256) / (overlay4k +
    # overlay256) = (n4k*s4k + 2*n256*s256) / (n4k + 2*n256).
    # Plants: weighting the 256 level once (coverage) or the plain mean (equal) as "official":
    # both fail at the top/left edge pixels (checked).
    overlay4k, overlay256 = 100.0 * n4k, 200.0 * n256
    official = (ref4k[1] * overlay4k + ref256[2] * overlay256) / (overlay4k + overlay256)
    np.testing.assert_allclose(maps.blend(1, 2), official, atol=1e-6)
    np.testing.assert_allclose(maps.blend(1, 2, "official"), official, atol=1e-6)
    edge = n4k < 4
    assert edge.any() and (~edge).any()
    assert np.abs(maps.blend(1, 2, "equal") - official)[edge].max() > 1e-3
    assert np.abs(maps.blend(1, 2, "coverage") - official).max() > 1e-3
    # equal = plain mean; coverage = mean over all 4 + 2 underlying maps in the interior.
    np.testing.assert_allclose(maps.blend(1, 2, "equal"), 0.5 * (ref4k[1] + ref256[2]), atol=1e-6)
    interior = maps.blend(1, 2, "coverage")[30, 40]
    assert interior == pytest.approx((4 * ref4k[1, 30, 40] + 2 * ref256[2, 30, 40]) / 6, abs=1e-6)


def test_crop_and_no_vit4k(tissue):
    model = HIPT4K.random_init(seed=1, tiny=True, with_vit4k=False, patch_batch=16)
    maps = compute_region_heatmaps(model, tissue[:300, :700], scale=8, progress=False)
    assert maps.crop_box == (22, 94, 256, 512)  # banker's-rounded center crop, as HIPT4K does
    assert maps.scores4k is None and maps.scores256.shape == (6, 32, 64)
    with pytest.raises(ValueError, match="shift"):
        compute_region_heatmaps(model, tissue[:512, :512], scale=8, shifts256=(100,), progress=False)


def _golden_strip(maps):
    """[4K head 0 | 256 head 0 | blend 0x0] overlays side by side, uint8."""
    return np.concatenate([overlay(maps.region, maps.scores4k[0]), overlay(maps.region, maps.scores256[0]),
                           overlay(maps.region, maps.blend(0, 0, "equal"))], axis=1)


def test_golden_image(tiny_model, tissue):
    """Low-resolution maps of a fixed real crop with seed-0 tiny weights vs the stored fixture."""
    maps = compute_region_heatmaps(tiny_model, tissue[:512, :512], scale=16, progress=False)
    strip = _golden_strip(maps)
    golden_png = os.path.join(FIXTURES, "heatmap_golden.png")
    golden = np.load(os.path.join(FIXTURES, "heatmap_golden_scores.npy"))  # [2 (256, 4K), heads, 32, 32]
    # Ranks are exact unless two attention values nearly tie: allow a few flipped pixels.
    for key, ref in zip(("scores256", "scores4k"), golden.astype(np.float32)):
        diff = np.abs(getattr(maps, key) - ref)
        assert (diff > 2e-3).mean() < 0.01, f"{key}: {(diff > 2e-3).mean():.3%} pixels differ"
    png = np.asarray(Image.open(golden_png).convert("RGB"))
    assert png.shape == strip.shape == (32, 96, 3)
    assert (np.abs(png.astype(int) - strip.astype(int)) > 2).mean() < 0.01


def test_write_region_heatmaps_files(tiny_model, tissue, tmp_path):
    maps = compute_region_heatmaps(tiny_model, tissue[:512, :512], scale=16, progress=False)
    written = write_region_heatmaps(maps, str(tmp_path), "r", blends="diagonal")
    assert len(written["256"]) == 6 and len(written["4k"]) == 6 and len(written["blend"]) == 6
    assert os.path.exists(tmp_path / "r_blend_4k_head3_256_head3.png")  # not r_blend_4k3_2563.png
    sheet = np.asarray(Image.open(written["contact_sheet"][0]))
    assert sheet.shape[0] > 100 and sheet.shape[1] > 100
    img = np.asarray(Image.open(tmp_path / "r_4k_head0.png"))
    assert img.shape == (32, 32, 3)
    # What the colours mean: a colour bar file (the maps stay the region's size) and one under
    # the contact sheet; the crop box maps the maps back onto the input image (plant: no legend
    # / no crop_box -> fails).
    assert np.asarray(Image.open(written["legend"][0])).shape[1] == 300
    with np.load(tmp_path / "r_scores.npz") as z:
        assert tuple(z["crop_box"]) == maps.crop_box == (0, 0, 512, 512)


def test_slide_attention_map():
    thumb = np.full((40, 60, 3), 200, np.uint8)
    coords = np.array([[0, 0], [400, 0], [400, 200]])
    picture, score = slide_attention_map(thumb, 10.0, coords, 200, np.array([0.1, 0.7, 0.2]))
    assert picture.shape == thumb.shape
    np.testing.assert_allclose(score[5, 5], 1 / 3)
    np.testing.assert_allclose(score[5, 45], 1.0)
    np.testing.assert_allclose(score[25, 45], 2 / 3)
    assert np.isnan(score[30, 5]) and (picture[30, 5] == 200).all()
    assert not (picture[5, 45] == 200).all()
    with pytest.raises(ValueError, match="scores"):
        slide_attention_map(thumb, 10.0, coords, 200, np.array([1.0]))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hipt_jax.cli.heatmap", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=300)


def test_cli_image_and_errors(tissue, tmp_path, capsys):
    from hipt_jax.cli.heatmap import main

    image = tmp_path / "region.png"
    Image.fromarray(tissue[:512, :512]).save(image)
    # One real entry-point run (subprocess), the error paths in-process. Maps an earlier run
    # left under the same name, listed in its heatmap_outputs.json, are removed (plant: no
    # _remove_stale_maps -> they stay). A file named like a map that no listing names is the
    # user's: refused before any work, kept (plant: check_targets taking any such file as its
    # own -> it was deleted or replaced with exit 0). The stale blend map carries the name older
    # versions gave (_blend_4k{i}_256{j}, now _blend_4k_head{i}_256_head{j}): still removed.
    (tmp_path / "out").mkdir()
    for stale in ("region_blend_4k0_2561.png", "region_4k_head9.png", "other_4k_head0.png", "region_256_head7.png"):
        (tmp_path / "out" / stale).write_bytes(b"")
    (tmp_path / "out" / "heatmap_outputs.json").write_text(json.dumps(
        {"4k": ["out/region_4k_head9.png"], "blend": ["region_blend_4k0_2561.png"]}))  # an older listing
    assert main(["--random-init", "tiny", "--image", str(image), "--out", str(tmp_path / "out")]) == 2
    assert "region_256_head7.png: exists and is not an earlier hipt-heatmap output" in capsys.readouterr().err
    assert (tmp_path / "out" / "region_256_head7.png").exists()
    os.rename(tmp_path / "out" / "region_256_head7.png", tmp_path / "mine.png")
    res = _cli("--random-init", "tiny", "--image", str(image), "--out", str(tmp_path / "out"),
               "--scale", "16", "--blends", "none", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "heatmap evaluations" not in res.stderr  # --no-progress taken and honoured (was exit 2)
    left = set(os.listdir(tmp_path / "out"))
    assert "other_4k_head0.png" in left and not {"region_blend_4k0_2561.png", "region_4k_head9.png"} & left
    outputs = json.load(open(tmp_path / "out" / "heatmap_outputs.json"))
    assert len(outputs["4k"]) == 6 and outputs["blend"] == []
    assert "region_4k_head0.png" in outputs["by_name"]["region"] and outputs["colors"]["cmap"] == "coolwarm"
    (tmp_path / "bad.png").write_text("not an image")
    assert main(["--random-init", "tiny", "--image", str(tmp_path / "bad.png"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["--image", str(image), "--out", str(tmp_path / "o3")]) == 2
    assert "--vit256" in capsys.readouterr().err
    # --scale and shifts are checked before the model loads, naming the flag (they failed after
    # the first forward pass, blaming a default shift). Plants: --scale back to int_at_least(1)
    # -> "scale must divide 16" after the model ran; no check_shifts -> "shift 100 px": fail.
    for extra, needle in ((["--scale", "3"], "--scale: expected 1, 2, 4, 8 or 16"),
                          (["--scale", "8", "--shifts", "100"], "--shifts 100: 100 px must be a multiple of --scale 8")):
        try:
            code = main(["--random-init", "tiny", "--image", str(image), "--out", str(tmp_path / "o4"), *extra])
        except SystemExit as e:
            code = e.code
        assert code == 2 and needle in capsys.readouterr().err, extra


def test_cli_never_writes_over_its_input_image(tiny_model, tissue, tmp_path, capsys, monkeypatch):
    """--out the image's own folder (`--out .`): the region copy was saved as {name}.png, i.e. over
    the input image (a 256 px RGBA replaced by the tool's RGB copy; the rerun then read the copy),
    exit 0. The copy is {name}_region.png now, and a --name that gives any output the input's
    name is refused before any work. (The module's tiny model stands in for --random-init tiny's,
    one compile.) Plants: the copy back at {name}.png -> the input replaced; no check_targets ->
    the input replaced by a map, exit 0."""
    from hipt_jax.cli import flags
    from hipt_jax.cli.heatmap import main

    monkeypatch.setattr(flags, "load_hipt4k", lambda args: tiny_model)

    rgba = np.dstack([tissue[:256, :256], np.full((256, 256), 200, np.uint8)])
    image = tmp_path / "region.png"
    Image.fromarray(rgba).save(image)
    before = image.read_bytes()
    argv = ["--random-init", "tiny", "--scale", "16", "--blends", "none", "--shifts", "none",
            "--shifts256", "none", "--no-progress", "--out", str(tmp_path)]
    for _ in range(2):  # the rerun reads the same input
        assert main(argv + ["--image", str(image)]) == 0
        assert image.read_bytes() == before
    assert np.asarray(Image.open(tmp_path / "region_region.png")).shape == (16, 16, 3)  # RGB, at --scale
    named = tmp_path / "x_256_head0.png"
    named.write_bytes(before)
    capsys.readouterr()
    assert main(argv + ["--image", str(named), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "x_256_head0.png: is an input (--image)" in err and len(err.strip().splitlines()) == 1
    assert named.read_bytes() == before and not (tmp_path / "x_region.png").exists()


def test_a_run_stopped_while_writing_its_maps_is_rerun(tiny_model, tissue, tmp_path, capsys, monkeypatch):
    """A run stopped half-way through its maps (Ctrl-C, SIGTERM, SIGKILL) left files of its
    --name and no listing naming them: the rerun refused them as the user's (exit 2), so the
    stopped job could not be resumed. The listing marks the name unfinished before the first
    map, and the rerun replaces (and removes as stale) what the stopped run wrote. Plant: no
    mark_unfinished -> the rerun exits 2, fails."""
    from hipt_jax.cli import flags
    from hipt_jax.cli.heatmap import main
    from hipt_jax.heatmap import render

    monkeypatch.setattr(flags, "load_hipt4k", lambda args: tiny_model)
    image = tmp_path / "region.png"
    Image.fromarray(tissue[:256, :256]).save(image)
    out = tmp_path / "out"
    argv = ["--random-init", "tiny", "--image", str(image), "--out", str(out), "--scale", "16",
            "--shifts", "none", "--shifts256", "none", "--no-progress"]
    save_png, calls = render.save_png, []

    def stopped_after_three(path, picture):
        calls.append(path)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return save_png(path, picture)

    monkeypatch.setattr(render, "save_png", stopped_after_three)
    assert main(argv) == 130
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 3
    monkeypatch.setattr(render, "save_png", save_png)
    capsys.readouterr()
    assert main(argv + ["--blends", "none"]) == 0, capsys.readouterr().err
    listing = json.loads((out / "heatmap_outputs.json").read_text())
    assert "unfinished" not in listing and set(os.listdir(out)) == set(listing["by_name"]["region"]) | {
        "heatmap_outputs.json"}


def test_another_input_of_the_same_file_name_does_not_replace_the_maps(tiny_model, tissue, tmp_path, capsys,
                                                                      monkeypatch):
    """Maps are named after the input's file name: a/s1 then b/s1 (the same stem in two
    folders, as in many cohorts) into one --out replaced the first input's maps with the
    second's, exit 0. The listing records each name's input (file name and size); another
    input under a name taken from its file name is refused before any work, and --name gives
    it its own maps. Plant: no _check_same_input -> exit 0, fails."""
    from hipt_jax.cli import flags
    from hipt_jax.cli.heatmap import main

    monkeypatch.setattr(flags, "load_hipt4k", lambda args: tiny_model)
    for folder, crop in (("a", tissue[:256, :256]), ("b", tissue[256:512, 256:512])):
        (tmp_path / folder).mkdir()
        Image.fromarray(crop).save(tmp_path / folder / "s1.png")
    argv = ["--random-init", "tiny", "--out", str(tmp_path / "out"), "--scale", "16", "--blends", "none",
            "--shifts", "none", "--shifts256", "none", "--no-progress"]
    assert main(argv + ["--image", str(tmp_path / "a" / "s1.png")]) == 0
    first = (tmp_path / "out" / "s1_region.png").read_bytes()
    assert main(argv + ["--image", str(tmp_path / "a" / "s1.png")]) == 0  # a rerun replaces its own
    capsys.readouterr()
    assert main(argv + ["--image", str(tmp_path / "b" / "s1.png")]) == 2
    err = capsys.readouterr().err
    assert "holds the maps s1_* of another input file named s1.png" in err and "give --name" in err, err
    assert (tmp_path / "out" / "s1_region.png").read_bytes() == first
    assert main(argv + ["--image", str(tmp_path / "b" / "s1.png"), "--name", "s1_b"]) == 0


def test_slide_map_refuses_another_slide_of_the_same_name(tmp_path, capsys):
    """The bag is looked up by the slide's file name, so another file of that name (a re-scan,
    another cohort) got this bag's scores painted on it, exit 0. Checked against what the bag's
    records say about its slide: the file size beside a bag made from the slide (hipt-extract
    --slides), the hipt-prep record (size, level-0 size) of a bag made from region shards. A
    plain image given as --slide is named as such. Plant: no check_bag_slide -> exit 0."""
    import shutil

    from data_prep import bags
    from hipt_jax.cli.heatmap import main

    other = tmp_path / "other"
    other.mkdir()
    slide = str(other / os.path.basename(REAL_SLIDE))
    shutil.copy(REAL_SLIDE, slide)
    with open(slide, "ab") as f:  # same pixels, another file (a re-saved copy would differ more)
        f.write(b"\0" * 16)
    emb = str(tmp_path / "emb")
    bag = bags.write_bag(emb, "cmu_small_region", {"coords": np.array([[0, 0], [1024, 0]]),
                                                   "features_cls4k": np.zeros((2, 192), np.float32),
                                                   "attention_wsi": np.array([0.25, 0.75], np.float32)})
    argv = ["--vitwsi", "stored", "--embeddings", emb, "--size", "1024", "--thumb-px", "64"]
    bags.write_source(bag, {"slide": {"name": "cmu_small_region.svs", "bytes": os.path.getsize(REAL_SLIDE)},
                            "coords_sha256": None})
    assert main(argv + ["--slide", REAL_SLIDE, "--out", str(tmp_path / "m0")]) == 0
    capsys.readouterr()
    assert main(argv + ["--slide", slide, "--out", str(tmp_path / "m1")]) == 2
    err = capsys.readouterr().err
    assert f"{slide}: is not the slide {bag} was made from" in err and "bytes when extracted" in err
    assert not os.path.exists(tmp_path / "m1" / "cmu_small_region_slide_attention.png")
    # Bags of region shards: the hipt-prep record the embeddings manifest leads to.
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "manifest.json").write_text(json.dumps({"schema": "hipt.prep-manifest.v1", "items": {
        "cmu_small_region": {"width": 999, "height": 999, "source": {"bytes": os.path.getsize(REAL_SLIDE)}}}}))
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps({"schema": "hipt.embeddings.v1",
                                                                "params": {"shards": str(prep)}, "slides": {}}))
    bags.write_source(bag, {"shard": "cmu_small_region.array_record", "sha256": "x"})
    assert main(argv + ["--slide", REAL_SLIDE, "--out", str(tmp_path / "m2")]) == 2
    assert "level 0 999 x 999 px when extracted" in capsys.readouterr().err
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "photo.png")
    assert main(argv + ["--slide", str(tmp_path / "photo.png"), "--out", str(tmp_path / "m3")]) == 2
    assert "a plain PNG image, not a whole-slide format" in capsys.readouterr().err


def test_region_mode_slide_needs_x_and_y(tmp_path, capsys):
    """A region map of --slide without --x/--y painted the slide's (0, 0) corner (background on
    most slides) with exit 0. Plant: xy_default=0 for hipt-heatmap again -> exit 0 and maps."""
    from hipt_jax.cli.heatmap import main

    for xy in ([], ["--x", "0"]):
        assert main(["--random-init", "tiny", "--slide", REAL_SLIDE, "--size", "512", "--out",
                     str(tmp_path / "o")] + xy) == 2
        assert "--slide needs --x and --y" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_cli_slide_scores(tmp_path):
    np.savez(tmp_path / "scores.npz", coords=np.array([[0, 0], [1024, 0], [0, 1024]]),
             scores=np.array([0.2, 0.5, 0.3]), region_px=1024)
    res = _cli("--slide", REAL_SLIDE, "--region-scores", str(tmp_path / "scores.npz"), "--out",
               str(tmp_path), "--thumb-px", "256")
    assert res.returncode == 0, res.stderr
    picture = np.asarray(Image.open(tmp_path / "cmu_small_region_slide_attention.png"))
    # the thumbnail (192 x 256) with a colour bar below it, saying what the colours mean
    assert picture.shape[1] == 192 and 256 + 30 < picture.shape[0] < 256 + 80, picture.shape
    assert "percentile rank within the slide's regions" in res.stdout
    # Re-rendered from the scores it wrote, into the same folder (another alpha): its own
    # output, read in full before the same scores are written back (plant: --region-scores
    # kept among the inputs -> exit 2, "is an input").
    from hipt_jax.cli.heatmap import main
    own = tmp_path / "cmu_small_region_region_scores.npz"
    assert main(["--slide", REAL_SLIDE, "--region-scores", str(own), "--out", str(tmp_path), "--thumb-px", "256",
                 "--alpha", "0.3", "--no-progress"]) == 0
    with np.load(own) as z:
        np.testing.assert_allclose(z["scores"], [0.2, 0.5, 0.3])
    # Near-constant scores: ranks stretched a 1e-12 difference to the full colour range; now one
    # colour, said on stderr and in the listing (plant: no _slide_values check -> fails).
    np.savez(tmp_path / "flat.npz", coords=np.array([[0, 0], [1024, 0], [0, 1024]]),
             scores=np.array([0.0, 0.0, 1e-12]), region_px=1024)
    assert main(["--slide", REAL_SLIDE, "--region-scores", str(tmp_path / "flat.npz"), "--out",
                 str(tmp_path / "f"), "--thumb-px", "64", "--no-progress"]) == 0
    listing = json.load(open(tmp_path / "f" / "heatmap_outputs.json"))
    assert listing["colors"]["value"].startswith("all scores equal")
    # No regions: the plain thumbnail was written as the map, exit 0 (plant: no count check -> 0).
    np.savez(tmp_path / "empty.npz", coords=np.zeros((0, 2)), scores=np.zeros(0), region_px=1024)
    assert main(["--slide", REAL_SLIDE, "--region-scores", str(tmp_path / "empty.npz"), "--out",
                 str(tmp_path / "e"), "--thumb-px", "64"]) == 2
    assert not os.path.exists(tmp_path / "e" / "cmu_small_region_slide_attention.png")



def test_region_scores_file_is_checked_against_itself_and_the_slide(tmp_path):
    """Each of these painted a map (or the unchanged thumbnail) with exit 0, or crashed with a
    traceback (.npy). Plant: the checks removed -> the raises fail."""
    from hipt_jax.cli.heatmap import _file_scores

    dims = (2220, 2967)
    np.save(tmp_path / "arr.npy", np.zeros((3, 2)))
    cases = {
        "arr.npy": ("need an npz", None),
        "short.npz": ("coords [3, 2] and scores [2]", dict(coords=np.zeros((3, 2)), scores=np.ones(2), region_px=512)),
        "zero.npz": ("region_px=0.0", dict(coords=np.zeros((1, 2)), scores=np.ones(1), region_px=0)),
        "nan.npz": ("1 score(s) are NaN", dict(coords=np.zeros((2, 2)), scores=np.array([0.1, np.nan]), region_px=512)),
        "other.npz": ("2 of 3 region(s) lie outside the slide (2220 x 2967",
                      dict(coords=np.array([[0, 0], [50000, 0], [0, 60000]]), scores=np.ones(3), region_px=512)),
        # coordinates as fractions of the slide, or NaN: painted in the top-left corner, exit 0
        "fractions.npz": ("2 of 2 coordinate pair(s) are not whole level-0 pixels, e.g. [0.25, 0.5]",
                          dict(coords=np.array([[0.25, 0.5], [0.5, 0.75]]), scores=np.ones(2), region_px=512)),
        "nan_xy.npz": ("1 of 2 coordinate pair(s)", dict(coords=np.array([[0, 0], [np.nan, 0]]), scores=np.ones(2),
                                                          region_px=512)),
    }
    for name, (needle, arrays) in cases.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError) as e:
            _file_scores(str(tmp_path / name), dims)
        assert name in str(e.value) and needle in str(e.value), str(e.value)
    # an edge region reaching past the slide is fine
    np.savez(tmp_path / "ok.npz", coords=np.array([[2048, 2560]]), scores=np.ones(1), region_px=1024)
    assert len(_file_scores(str(tmp_path / "ok.npz"), dims)[0]) == 1
    np.savez(tmp_path / "floats.npz", coords=np.array([[2048.0, 0.0]]), scores=np.ones(1), region_px=1024)
    assert len(_file_scores(str(tmp_path / "floats.npz"), dims)[0]) == 1  # whole pixels stored as floats



def test_region_scores_grid_only_when_one_region_per_cell(tmp_path, capsys):
    """Overlapping (half-region stride), off-grid or duplicate coordinates: the grid of
    NAME_region_scores.npz kept one score per cell, later ones over earlier, exit 0. Then it is
    left out, said, and coords/scores keep every region. Plant: no _grid_problem check -> a 1 x 3
    grid of mixed scores is written: fails."""
    from hipt_jax.cli.heatmap import _save_region_scores

    cases = {"half.npz": [[0, 0], [512, 0], [1024, 0], [1536, 0]], "neg.npz": [[-100, 0], [0, 0], [1024, 0]],
             "dup.npz": [[0, 0], [0, 0], [1024, 0]]}
    for name, coords in cases.items():
        scores = np.arange(len(coords), dtype=np.float32)
        _save_region_scores(str(tmp_path / name), np.array(coords), scores, 1024.0)
        with np.load(tmp_path / name) as z:
            assert "grid" not in z.files and np.array_equal(z["scores"], scores), name
        assert f"{name}: no grid array" in capsys.readouterr().err
    _save_region_scores(str(tmp_path / "ok.npz"), np.array([[0, 0], [2048, 1024]]), np.array([1.0, 2.0]), 1024.0)
    with np.load(tmp_path / "ok.npz") as z:
        assert z["grid"].shape == (2, 3) and z["grid"][1, 2] == 2.0 and np.isnan(z["grid"][0, 1])
    assert capsys.readouterr().err == ""


def test_cli_lgp_slide_map(tmp_path):
    """--lgp: the map's region scores are the trained model's attention-pooling weights."""
    import jax

    from hipt_jax.cli.heatmap import main
    from hipt_jax.heatmap.slide import lgp_region_attention
    from hipt_jax.models import checkpoint, lgp

    model = lgp.HIPTLGP(n_classes=3, local_arch="vit4k_tiny", dropout_rate=0.0)
    params = lgp.init_lgp(model, seed=0)["params"]
    ckpt = str(tmp_path / "fold_0" / "checkpoint")
    checkpoint.save(ckpt, params, "hipt_lgp", lgp.lgp_arch(model, "subtyping"))
    feats = np.random.default_rng(0).normal(size=(3, 256, 384)).astype(np.float32)
    os.makedirs(tmp_path / "emb" / "slides")
    np.savez(tmp_path / "emb" / "slides" / "cmu_small_region.npz", features_cls256=feats,
             coords=np.array([[0, 0], [1024, 0], [0, 1024]]))
    attention = lgp_region_attention(ckpt, feats)
    _, aux = model.apply({"params": params}, jax.numpy.asarray(feats))
    np.testing.assert_allclose(attention, np.asarray(aux["attention"]), atol=1e-6)
    assert attention.sum() == pytest.approx(1.0, abs=1e-5)
    code = main(["--slide", REAL_SLIDE, "--lgp", ckpt, "--embeddings", str(tmp_path / "emb"), "--size", "1024",
                 "--out", str(tmp_path / "maps"), "--thumb-px", "128"])
    assert code == 0
    assert os.path.exists(tmp_path / "maps" / "cmu_small_region_slide_attention.png")
    assert main(["--slide", REAL_SLIDE, "--lgp", ckpt, "--out", str(tmp_path / "m2")]) == 2  # no --embeddings


def test_cli_vitwsi_slide_map(tmp_path):
    """--vitwsi EXPORT: the painted scores are the stage-3 CLS attention over the slide's regions
    (last block, heads averaged, renormalized to sum to 1), saved on the slide's region grid.
    Plants: the grid built from (column, row) cells (shape 3 x 2); embed_slide without the
    renormalization (the regions' share of the softmax, which also covers the CLS, sums < 1);
    the attention row of the first region instead of the CLS's."""
    import jax

    from hipt_jax.cli.heatmap import main
    from hipt_jax.models import checkpoint
    from hipt_jax.models.archs import build_vit, get_arch

    arch = get_arch("vitwsi_tiny")
    module = build_vit(arch)
    params = module.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 4, 192)))["params"]
    export = checkpoint.save(str(tmp_path / "export"), params, "vit", arch)
    cells = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 2]])  # 2 x 3 regions, (1, 1) no tissue
    feats = np.random.default_rng(0).normal(size=(len(cells), 192)).astype(np.float32)
    os.makedirs(tmp_path / "emb" / "slides")
    np.savez(tmp_path / "emb" / "slides" / "cmu_small_region.npz", features_cls4k=feats,
             coords=cells[:, ::-1] * 1024)  # level-0 (x, y) corners of 1024 px regions
    code = main(["--slide", REAL_SLIDE, "--vitwsi", export, "--embeddings", str(tmp_path / "emb"),
                 "--size", "1024", "--out", str(tmp_path / "maps"), "--thumb-px", "128"])
    assert code == 0
    assert os.path.getsize(tmp_path / "maps" / "cmu_small_region_slide_attention.png") > 0
    with np.load(tmp_path / "maps" / "cmu_small_region_region_scores.npz") as z:
        scores, grid = z["scores"], z["grid"]
    assert grid.shape == (2, 3) and np.isnan(grid[1, 1])
    np.testing.assert_array_equal(grid[cells[:, 0], cells[:, 1]], scores)
    assert scores.sum() == pytest.approx(1.0, abs=1e-5)
    _, aux = module.apply({"params": params}, feats[None], coords=cells[None])
    want = np.asarray(aux["attention"])[0, :, 0, 1:].mean(axis=0)  # [H,1+M,1+M] -> CLS row [M]
    np.testing.assert_allclose(scores, want / want.sum(), atol=1e-6)
    # A bag that records its region side (as hipt-extract writes it): used without --size, and a
    # --size asking for another is refused (plant: always --size -> the default 4096 px squares
    # collapse the 2 x 3 grid to 1 x 1 with exit 0).
    json_attrs = np.array('{"patch_size_level0": 1024, "patch_size": 1024}')
    np.savez(tmp_path / "emb" / "slides" / "cmu_small_region.npz", features_cls4k=feats,
             coords=cells[:, ::-1] * 1024, coords_attrs_json=json_attrs)
    code = main(["--slide", REAL_SLIDE, "--vitwsi", export, "--embeddings", str(tmp_path / "emb"),
                 "--out", str(tmp_path / "maps2"), "--thumb-px", "128"])
    assert code == 0
    with np.load(tmp_path / "maps2" / "cmu_small_region_region_scores.npz") as z:
        assert z["grid"].shape == (2, 3) and float(z["region_px"]) == 1024
    assert main(["--slide", REAL_SLIDE, "--vitwsi", export, "--embeddings", str(tmp_path / "emb"),
                 "--size", "2048", "--out", str(tmp_path / "maps3"), "--thumb-px", "128"]) == 2


def test_region_mode_refuses_upsampling_and_damaged_tiles_in_one_line(tmp_path, capsys):
    """Region mode read a 1.0 um/px slide's 256 level-0 px upsampled 2x with exit 0, and a
    corrupt JPEG tile under the region was an OpenSlideError traceback: both are one line, exit 2,
    like hipt-embed (flags.read_region). --allow-upsample is a region-mode flag: refused in slide
    mode. Slide mode's thumbnail of the damaged slide is one line too. Plants: read_region without
    check_upsample -> a map of the upsampled region (exit 0); read_rgb / read_thumbnail without
    their OpenSlideError -> SlideError conversion -> traceback: fails."""
    from data_prep.synth import make_aperio_slide
    from hipt_jax.cli.heatmap import main
    from tests.fixtures_slides import damage_tile

    s10 = make_aperio_slide(str(tmp_path / "s10.svs"), (768, 768), mag=20, levels=(1,), mpp=1.0)
    bad = damage_tile(make_aperio_slide(str(tmp_path / "bad.svs"), (1024, 1024), levels=(1,), seed=2), 5)
    for slide, needle in ((s10, "coarser than the target 0.5 um/px"), (bad, "cannot read its pixels")):
        code = main(["--random-init", "tiny", "--slide", slide, "--x", "0", "--y", "0", "--size", "512",
                     "--out", str(tmp_path / "o"), "--no-progress"])
        errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln or "Traceback" in ln]
        assert code == 2 and len(errors) == 1 and f"{slide}: " in errors[0] and needle in errors[0], errors
    np.savez(tmp_path / "scores.npz", coords=np.zeros((1, 2)), scores=np.ones(1), region_px=512)
    assert main(["--slide", s10, "--region-scores", str(tmp_path / "scores.npz"), "--allow-upsample",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--allow-upsample: options of region mode" in capsys.readouterr().err
    # slide mode paints on a thumbnail, read through the same damaged tile
    assert main(["--slide", bad, "--region-scores", str(tmp_path / "scores.npz"), "--out", str(tmp_path / "o")]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln or "Traceback" in ln]
    assert len(errors) == 1 and f"{bad}: cannot read its pixels (a thumbnail of at most 2048 px)" in errors[0]


if __name__ == "__main__":
    # Regenerate the golden fixtures (only after an intended change of the maps):
    #   .venv/bin/python -m tests.test_heatmap
    import openslide

    slide = openslide.OpenSlide(REAL_SLIDE)
    crop = np.ascontiguousarray(np.asarray(slide.read_region((600, 1700), 0, (512, 512)))[:, :, :3])
    m = compute_region_heatmaps(HIPT4K.random_init(seed=0, tiny=True, patch_batch=16), crop, scale=16,
                                progress=False)
    os.makedirs(FIXTURES, exist_ok=True)
    Image.fromarray(_golden_strip(m)).save(os.path.join(FIXTURES, "heatmap_golden.png"))
    np.save(os.path.join(FIXTURES, "heatmap_golden_scores.npy"),
            np.stack([m.scores256, m.scores4k]).astype(np.float16))


def test_outputs_of_the_version_before_by_name_stay_ours(tmp_path):
    """A listing from before "by_name" named only its last run's files: old A, old B, then a new
    run of A (or of B, then A) refused A's maps as "not an earlier hipt-heatmap output". Runs are
    recognised by their pair of signature files and kept in the listing across runs of other
    names; they may be replaced, never removed as stale; a user's file of no run stays refused.
    Plants: own_outputs = listed_outputs -> A refused; write_listing without EARLIER -> A (and
    the old listing's B) forgotten after a run of C."""
    from hipt_jax.cli.heatmap import LISTING, listed_outputs, own_outputs, write_listing

    out = tmp_path / "out"
    out.mkdir()
    run = lambda n: [f"{n}_region.png", f"{n}_4k_head0.png", f"{n}_contact_sheet.png", f"{n}_scores.npz"]  # noqa: E731
    for f in run("A") + run("B") + ["s1_slide_attention.png", "s1_region_scores.npz", "D_4k_head0.png"]:
        (out / f).write_bytes(b"")
    (out / LISTING).write_text(json.dumps({"4k": [str(out / "B_4k_head0.png")],
                                           "contact_sheet": [str(out / "B_contact_sheet.png")]}))
    assert set(run("A")) <= own_outputs(str(out), "A") and not listed_outputs(str(out), "A")
    assert {"s1_slide_attention.png", "s1_region_scores.npz"} <= own_outputs(str(out), "s1")
    assert own_outputs(str(out), "D") == set()  # no signature pair: the user's
    assert listed_outputs(str(out), "B") == {"B_4k_head0.png", "B_contact_sheet.png"}
    for name in ("C", "C2"):  # new runs of other names rewrite the listing
        (out / f"{name}_region.png").write_bytes(b"")
        write_listing(str(out), name, {"region": [str(out / f"{name}_region.png")]}, {})
    assert set(run("A")) <= own_outputs(str(out), "A") and not listed_outputs(str(out), "A")
    assert listed_outputs(str(out), "B") == {"B_4k_head0.png", "B_contact_sheet.png"}
    assert own_outputs(str(out), "D") == set() and own_outputs(str(out), "C") == {"C_region.png"}
    write_listing(str(out), "A", {"region": [str(out / "A_region.png")]}, {})  # new A: its files now by_name
    earlier = json.load(open(out / LISTING))["earlier"]
    assert "A_region.png" not in earlier["recognised"] and "A_4k_head0.png" in earlier["recognised"]
