"""hipt_jax.data: Grain sources over hipt-prep shards, per-process sharding, checkpointable state."""
import os
import pickle

import grain
import numpy as np
import pytest

from data_prep.shards import PATCH, REGION, encode_feature, encode_jpeg, find_shards
from hipt_jax.data import FeatureSource, PatchSource, RegionSource, make_iter_dataset, make_loader
from tests.shards import write_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Small hand-made shards: 2 slides x 5 regions (64 px), patches and [16,384] features."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s in range(2):
        sid = f"slide{s}"
        regs, pats, feats = [], [], []
        for i in range(5):
            img = np.full((64, 64, 3), 40 * i + 10 * s, np.uint8)
            regs.append(REGION.encode(image_jpeg=encode_jpeg(img), slide_id=sid, x=64 * i, y=0,
                                              level=0, read_px=64, mpp=0.5, region_px=64,
                                              tissue_fraction=0.5, index=i))
            pats.append(PATCH.encode(image_jpeg=encode_jpeg(np.zeros((256, 256, 3), np.uint8)),
                                             slide_id=sid, x=64 * i, y=0, region_x=0, region_y=0,
                                             row=0, col=i, patch_px=256, mpp=0.5, tissue_fraction=1.0))
            f = rng.normal(size=(16, 384)).astype(np.float32)
            f[:, 0] = np.arange(16)  # token index, to check the row-major grid layout
            feats.append(encode_feature(f, grid=(4, 4), slide_id=sid, x=64 * i, y=0, mpp=0.5,
                                                region_px=1024, dtype="float32"))
        write_shard(root / "regions" / f"{sid}.array_record", regs)
        write_shard(root / "patches" / f"{sid}.array_record", pats)
        write_shard(root / "features" / f"{sid}.array_record", feats)
    return str(root)


def test_sources_decode(shards):
    regions = RegionSource(shards)
    assert len(regions) == 10 and len(regions.paths) == 2
    r = regions[7]
    assert r["image"].shape == (64, 64, 3) and r["image"].dtype == np.uint8
    assert r["slide_id"] == "slide1" and r["x"] == 128 and abs(int(r["image"].mean()) - 90) <= 2
    p = PatchSource(shards)[0]
    assert p["image"].shape == (256, 256, 3) and p["slide_id"] == "slide0"
    fs = FeatureSource(shards)
    f = fs[3]
    assert f["features"].shape == (16, 384) and f["features"].dtype == np.float32
    assert list(f["grid"]) == [4, 4]
    g = FeatureSource(shards, as_grid=True)[3]["features"]  # [4,4,384]: token i*C+j at [i,j]
    assert g[1, 2, 0] == 1 * 4 + 2
    assert fs.slide_index() == {"slide0": [0, 1, 2, 3, 4], "slide1": [5, 6, 7, 8, 9]}
    assert fs.slide_bag([5, 6]).shape == (2, 16, 384)


def test_wrong_kind_and_missing(shards, tmp_path):
    with pytest.raises(ValueError, match="schema"):
        RegionSource(os.path.join(shards, "features"))[0]
    with pytest.raises(FileNotFoundError, match="no .*shards"):
        RegionSource(str(tmp_path))
    assert len(find_shards(os.path.join(shards, "regions", "*.array_record"))) == 2


def test_source_pickles_for_grain_workers(shards):
    src = FeatureSource(shards, as_grid=True)
    len(src)
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[4]["features"], src[4]["features"])


def test_loader_shuffle_epochs_and_checkpoint(shards):
    src = RegionSource(shards)
    loader = make_loader(src, batch_size=2, seed=3, num_epochs=2)
    batches = [(tuple(b["slide_id"]), tuple(b["x"])) for b in loader]
    assert len(batches) == 10  # 2 epochs x 10 records / 2
    keys = [k for sids, xs in batches for k in zip(sids, xs)]
    assert sorted(keys[:10]) == sorted(keys[10:])  # each epoch sees every record once
    assert keys[:10] != sorted(keys[:10])  # shuffled

    it = iter(loader)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [tuple(b["x"]) for b in it]
    it2 = iter(make_loader(src, batch_size=2, seed=3, num_epochs=2))
    it2.set_state(state)
    assert [tuple(b["x"]) for b in it2] == rest


def test_shards_are_disjoint_across_processes(shards):
    """What each of 3 JAX processes would read under ShardByJaxProcess (explicit options here)."""
    src = RegionSource(shards)
    seen = []
    for idx in range(3):
        sampler = grain.samplers.IndexSampler(
            len(src), grain.sharding.ShardOptions(idx, 3, drop_remainder=True), shuffle=True,
            num_epochs=1, seed=0)
        loader = grain.DataLoader(data_source=src, sampler=sampler, operations=[])
        seen.append([(r["slide_id"], int(r["x"])) for r in loader])
    flat = [k for s in seen for k in s]
    assert len(flat) == len(set(flat)) == 9 and all(len(s) == 3 for s in seen)


def test_iter_dataset_state(shards):
    ds = make_iter_dataset(FeatureSource(shards), batch_size=4, seed=1, num_epochs=1)
    it = iter(ds)
    first = next(it)
    assert first["features"].shape == (4, 16, 384)
    state = it.get_state()
    rest = [b["x"].tolist() for b in it]
    it2 = iter(ds)
    it2.set_state(state)
    assert [b["x"].tolist() for b in it2] == rest and len(rest) == 1


def _copy_shard(shards, tmp_path, name, damage=None):
    """A copy of slide0's patch shard at tmp_path/patches/<name>, damaged by ``damage(bytes)``."""
    data = open(os.path.join(shards, "patches", "slide0.array_record"), "rb").read()
    folder = tmp_path / "patches"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(damage(bytearray(data)) if damage else data)
    return str(folder / name)


def test_damaged_shards_and_records_are_named_with_the_remedy(shards, tmp_path):
    """A truncated shard was a 53-line Riegeli traceback at start-up, a corrupted record one
    mid-run, naming neither file nor record (and the rerun failed at the same sample). Now one
    ShardError naming the shard (and the record within it) and what to do. Plant: RecordSource
    without the handlers in _records / raw -> RuntimeError, fails."""
    from data_prep.shards import ShardError

    _copy_shard(shards, tmp_path, "a.array_record")
    cut = _copy_shard(shards, tmp_path, "b.array_record", lambda b: b[:len(b) - 200])
    with pytest.raises(ShardError) as e:
        len(PatchSource(str(tmp_path)))  # at start-up: every shard's index is opened
    assert str(e.value).startswith(f"{cut}: not a readable shard") and "slide 'b'" in str(e.value)
    assert "move the shard out of the folder" in str(e.value)
    os.remove(cut)

    def flip(b):  # corrupt record 2's chunk (one chunk per ~1.8 KB record): its hash mismatches
        for i in range(4200, 4216):
            b[i] ^= 255
        return b
    flipped = _copy_shard(shards, tmp_path, "c.array_record", flip)
    src = PatchSource(str(tmp_path))
    assert len(src) == 10 and src[0]["slide_id"] == "slide0"  # a.array_record is fine
    with pytest.raises(ShardError, match=rf"^{flipped}: record 2: cannot be read \(.*hipt-prep patches"):
        src[7]


def test_a_folder_of_empty_shards_is_refused_at_start(tmp_path):
    """Only empty shards: a note "every batch repeats samples", then ZeroDivisionError inside
    Grain. Refused naming the count. Plant: _steps_per_epoch without the 0 check, fails."""
    from configs.pretrain_vit256 import get_config
    from hipt_jax.pretrain import trainer

    write_shard(tmp_path / "patches" / "empty.array_record", [])
    config = get_config("runlocal")
    config.data.path = str(tmp_path)
    with pytest.raises(ValueError, match=r"0 samples \(0 records in 1 patch shard\(s\)\)"):
        trainer._steps_per_epoch(config, PatchSource(str(tmp_path)))
