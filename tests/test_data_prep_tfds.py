"""TFDS builders over hipt-prep shards: generation (plain and Beam) and reading, without TensorFlow."""

import numpy as np
import pytest

from data_prep.shards import REGION, encode_feature, encode_jpeg
from hipt_jax.cli.prep import main
from tests.shards import write_shard

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds_shards")
    rng = np.random.default_rng(0)
    for sid in ("a", "b", "c"):
        regs, feats = [], []
        for i in range(3):
            img = rng.integers(0, 255, (256, 512, 3), dtype=np.uint8)
            regs.append(REGION.encode(image_jpeg=encode_jpeg(img), slide_id=sid, x=512 * i, y=0,
                                              level=0, read_px=512, mpp=0.5, region_px=512,
                                              tissue_fraction=0.5, index=i))
            feats.append(encode_feature(rng.normal(size=(2, 384)), grid=(1, 2), slide_id=sid,
                                                x=512 * i, y=0, mpp=0.5, region_px=512, dtype="float32"))
        write_shard(root / "regions" / f"{sid}.array_record", regs)
        write_shard(root / "features" / f"{sid}.array_record", feats)
    return str(root)


def test_regions_tfds_matches_shards(shards, tmp_path):
    from data_prep.tfds_builders import build_tfds
    from hipt_jax.data import RegionSource

    builder = build_tfds("regions", shards, str(tmp_path), splits={"train": ["a", "b"], "test": ["c"]})
    assert builder.info.splits["train"].num_examples == 6 and builder.info.splits["test"].num_examples == 3
    # Reopen from disk only (no builder class needed), as a Grain-compatible random-access source.
    ds = tfds.builder_from_directory(builder.data_dir).as_data_source()["test"]
    got = sorted((int(ds[i]["x"]), ds[i]["image"].tobytes()) for i in range(len(ds)))
    src = RegionSource(shards)
    want = sorted((int(r["x"]), r["image"].tobytes()) for r in (src[i] for i in range(6, 9)))
    assert got == want  # the TFDS copy decodes to the same pixels


def test_features_tfds_beam_and_cli(shards, tmp_path):
    from data_prep.tfds_builders import build_tfds
    from hipt_jax.data import FeatureSource

    beam = pytest.importorskip("apache_beam")
    builder = build_tfds("features", shards, str(tmp_path / "beam"), beam_runner=beam.runners.DirectRunner())
    ds = builder.as_data_source()["train"]
    assert len(ds) == 9 and ds[0]["features"].dtype == np.float32
    want = {(r["slide_id"], int(r["x"])): r["features"] for r in FeatureSource(shards)}
    for ex in (ds[i] for i in range(len(ds))):
        np.testing.assert_array_equal(ex["features"], want[(ex["slide_id"].decode(), int(ex["x"]))])
    assert main(["tfds", "--kind", "features", "--shards", shards, "--data-dir", str(tmp_path / "cli")]) == 0
    assert len(tfds.data_source("hipt_features", data_dir=str(tmp_path / "cli"), split="train")) == 9


def test_tfds_rerun_reuses_same_shards_refuses_others(shards, tmp_path, capsys):
    """A rerun into the same --data-dir reuses the dataset only when it was built from the same
    shards: other or grown shards are refused naming both folders and --redo (TFDS reused the old
    dataset and reported its counts with exit 0); --redo rebuilds; refusals leave no folders."""
    import shutil

    grown = tmp_path / "grown"
    shutil.copytree(f"{shards}/features", grown / "features")
    data_dir = str(tmp_path / "ds")
    cli = lambda src, *extra: main(["tfds", "--kind", "features", "--shards", str(src), "--data-dir", data_dir, *extra])  # noqa: E731
    assert cli(grown) == 0 and "built: train=9" in capsys.readouterr().out
    assert cli(grown) == 0 and "reused (built from the same shards): train=9" in capsys.readouterr().out
    write_shard(grown / "features" / "d.array_record",
                [encode_feature(np.zeros((2, 384)), grid=(1, 2), slide_id="d", x=512 * i, y=0, mpp=0.5,
                                region_px=512, dtype="float32") for i in range(3)])
    assert cli(grown) == 2
    err = capsys.readouterr().err
    assert "already holds a dataset built from" in err and "1 shards added (d)" in err and "--redo" in err
    assert cli(grown, "--redo") == 0 and "built: train=12" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tfds", "--kind", "features", "--shards", str(empty), "--data-dir", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()  # nothing created by a refusal


def test_tfds_record_matches_touched_and_copied_shards(tmp_path):
    """A `touch` or `cp -r` of the shards (same bytes, other mtime) is the same input: the shard
    is hashed against hipt-prep's recorded SHA-256 (was "N shards changed", a refused rerun);
    other bytes of the same size still differ."""
    import os
    import shutil

    from data_prep.shards import product_identity, shard_status_path, write_json_atomic
    from data_prep.tfds_builders import _differences, shards_record

    src = tmp_path / "prep"
    path = write_shard(src / "features" / "a.array_record",
                       [encode_feature(np.ones((2, 384)), grid=(1, 2), slide_id="a", x=0, y=0, mpp=0.5,
                                       region_px=512, dtype="float32")])
    os.makedirs(src / "status")
    write_json_atomic(shard_status_path(path), dict(product_identity(path), done=True))
    built = shards_record("features", str(src))
    os.utime(path, ns=(1, 1))  # touch
    assert _differences(built, shards_record("features", str(src))) == []
    shutil.copytree(src, tmp_path / "copy")  # mtimes not kept (cp -r)
    os.utime(tmp_path / "copy" / "features" / "a.array_record", ns=(2, 2))
    assert _differences(built, shards_record("features", str(tmp_path / "copy"))) == []
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    open(path, "wb").write(bytes(data))
    assert _differences(built, shards_record("features", str(src))) == ["1 shards changed (a)"]
