"""hipt-prep patches / features: derived shards agree with their region shards and with HIPT4K."""
import json
import os

import numpy as np
import pytest

from hipt_jax.cli.prep import main
from data_prep.shards import iter_records
from data_prep.shards import FEATURE, decode_features, decode_jpeg, encode_feature
from tests.fixtures_slides import real_slide  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def regions_out(real_slide, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("regions"))
    assert main(["regions", "--slides", os.path.dirname(real_slide), "--out", out,
                 "--region", "1024", "--workers", "1"]) == 0
    return out


def _regions(out):
    return list(iter_records(os.path.join(out, "regions", "cmu_small_region.array_record")))


def test_patches_grid_coordinates_pixels_and_filter(regions_out, tmp_path):
    regions = _regions(regions_out)
    assert main(["patches", "--regions", regions_out, "--out", str(tmp_path / "all"), "--workers", "1"]) == 0
    patches = list(iter_records(str(tmp_path / "all" / "patches" / "cmu_small_region.array_record")))
    assert len(patches) == 16 * len(regions)  # 1024 px region -> 4 x 4 patches of 256
    by_region = {(r["x"], r["y"]): decode_jpeg(r["image_jpeg"]).astype(np.float32) for r in regions}
    for p in patches[:20]:
        assert (p["x"], p["y"]) == (p["region_x"] + 256 * p["col"], p["region_y"] + 256 * p["row"])
        crop = by_region[(p["region_x"], p["region_y"])][256 * p["row"]:256 * (p["row"] + 1),
                                                         256 * p["col"]:256 * (p["col"] + 1)]
        img = decode_jpeg(p["image_jpeg"])
        assert img.shape == (256, 256, 3)
        assert np.abs(img - crop).mean() < 6.5

    assert main(["patches", "--regions", regions_out, "--out", regions_out, "--workers", "1"]) == 2
    # A patch side that does not divide the region: refused, nothing written (it kept 3 x 3
    # patches of 300 px per 1024 px region and dropped the rest; plant: no check -> exit 0)
    assert main(["patches", "--regions", regions_out, "--out", str(tmp_path / "p300"), "--patch", "300"]) == 2
    assert not (tmp_path / "p300").exists()
    assert main(["patches", "--regions", regions_out, "--out", str(tmp_path / "tissue"),
                 "--workers", "1", "--min-tissue", "0.5"]) == 0
    kept = list(iter_records(str(tmp_path / "tissue" / "patches" / "cmu_small_region.array_record")))
    assert 0 < len(kept) < len(patches)  # the real slide has glass around the tissue
    assert min(p["tissue_fraction"] for p in kept) >= 0.5
    fractions = {(p["x"], p["y"]): p["tissue_fraction"] for p in patches}
    assert sorted((p["x"], p["y"]) for p in kept) == sorted(k for k, f in fractions.items() if f >= 0.5)


def test_features_equal_hipt4k(regions_out, tmp_path, dtype="float16", tol=2e-3):
    from hipt_jax import HIPT4K

    out = tmp_path / "feats"
    assert main(["features", "--regions", regions_out, "--out", str(out), "--random-init", "tiny",
                 "--store-dtype", dtype, "--batch-per-device", "2"]) == 0
    feats = list(iter_records(str(out / "features" / "cmu_small_region.array_record")))
    regions = _regions(regions_out)
    assert [(f["x"], f["y"]) for f in feats] == [(r["x"], r["y"]) for r in regions]
    model = HIPT4K.random_init(seed=0, tiny=True, with_vit4k=False)
    ref = model.embed_batch(np.stack([decode_jpeg(r["image_jpeg"]) for r in regions]))["features_cls256"]
    got = np.stack([decode_features(f) for f in feats])
    assert got.shape == (len(regions), 16, 384) and feats[0]["grid"] == [4, 4]
    assert feats[0]["dtype"] == dtype
    np.testing.assert_allclose(got, ref, atol=tol * max(1.0, np.abs(ref).max()), rtol=0)
    with open(out / "manifest.json") as f:
        assert json.load(f)["counts"] == {"done": 1}
    # float32 storage is exact (checked on the record level, without a second model run).
    exact = FEATURE.decode(encode_feature(ref[0], grid=(4, 4), slide_id="s", x=0, y=0, mpp=0.5,
                                                  region_px=1024, dtype="float32"))
    np.testing.assert_array_equal(decode_features(exact), ref[0])


def test_features_bad_checkpoint_exit_2(regions_out, tmp_path, capsys):
    assert main(["features", "--regions", regions_out, "--out", str(tmp_path / "f"),
                 "--vit256", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
