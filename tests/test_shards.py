"""data_prep.shards and data_prep.bags: the on-disk record bytes, shard discovery, bags."""
import hashlib
import json
import os

import numpy as np
import pytest

from data_prep import bags, shards
from tests.shards import write_shard

JPEG = b"\xff\xd8fakejpeg"  # the encoders store bytes as they are


def _region(sid="s1", i=0):
    return shards.REGION.encode(image_jpeg=JPEG, slide_id=sid, x=4096 * (i + 1), y=8192, level=1,
                                read_px=8192, mpp=0.5, region_px=4096, tissue_fraction=0.25, index=3 + i)


def test_record_bytes_are_unchanged():
    """The sha256 of records written by the first release (data_prep/records.py), so shards
    written before and after this layer are byte-identical."""
    patch = shards.PATCH.encode(image_jpeg=JPEG, slide_id="s1", x=4352, y=8192, region_x=4096,
                                region_y=8192, row=0, col=1, patch_px=256, mpp=0.5, tissue_fraction=0.75)
    feature = shards.encode_feature(np.arange(32, dtype=np.float32).reshape(8, 4) / 8, grid=(2, 4),
                                    slide_id="s1", x=4096, y=8192, mpp=0.5, region_px=1024, dtype="float16")
    got = [hashlib.sha256(r).hexdigest() for r in (_region(), patch, feature)]
    assert got == ["fa613e15b7c5ac58db40d59011cc270910edfc4e9ea181190a949c2263897274",
                   "98bf05e9590a2721f5e3172d4ccb96486ac516abe32bd6b6ba1867562bb07e7b",
                   "607a5e68ad75bb2e340f0afd80e36cf45754698f1cf81685b1dda7a58ceb3b7f"]
    rec = shards.FEATURE.decode(feature)
    np.testing.assert_array_equal(shards.decode_features(rec), np.arange(32).reshape(8, 4) / 8)
    with pytest.raises(TypeError, match=r"missing fields \['index'\]"):
        shards.REGION.encode(**{k: v for k, v in shards.REGION.decode(_region()).items()
                                if k not in ("schema", "index")})
    with pytest.raises(shards.ShardError, match="expected 'hipt.patch.v1'"):
        shards.PATCH.decode(_region())


def test_find_shards_from_folder_glob_list_and_manifest(tmp_path):
    out = tmp_path / "prep"
    for sid in ("b", "a", "c"):
        write_shard(out / "regions" / f"{sid}.array_record", [_region(sid, i) for i in range(2)])
    (out / "regions" / "d.array_record.tmp-123").write_bytes(b"unfinished write")
    want = [str(out / "regions" / f"{s}.array_record") for s in ("a", "b", "c")]
    assert shards.find_shards(str(out), "regions") == want
    assert shards.find_shards(str(out / "regions")) == want
    assert shards.find_shards(str(out / "regions" / "*.array_record")) == want
    assert shards.find_shards([want[2], want[0], want[2]]) == [want[2], want[0]]
    manifest = {"kind": "regions", "items": {
        "a": {"status": "done", "shard": "regions/a.array_record"},
        "b": {"status": "failed", "error": "bad slide", "shard": "regions/b.array_record"},
        "c": {"status": "done", "shard": "regions/c.array_record"}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert shards.find_shards(str(out / "manifest.json"), "regions") == [want[0], want[2]]
    with pytest.raises(shards.ShardError, match="expected 'patches'"):
        shards.find_shards(str(out / "manifest.json"), "patches")
    with pytest.raises(FileNotFoundError, match="no such shard file or folder"):
        shards.find_shards(str(tmp_path / "nope"))
    assert list(shards.list_slide_shards(str(out), "regions")) == ["a", "b", "c"]
    with pytest.raises(FileNotFoundError, match="run `hipt-prep patches` first"):
        shards.list_slide_shards(str(out), "patches")
    src = shards.RecordSource(str(out), "regions")
    assert len(src) == 6 and src.raw(5)["slide_id"] == "c" and src.raw(5)["index"] == 4
    assert [r["x"] for r in shards.iter_records(want[1], shards.REGION)] == [4096, 8192]


def test_unreadable_shard_names_the_file(tmp_path):
    bad = tmp_path / "broken.array_record"
    bad.write_bytes(b"not an array record")
    with pytest.raises(shards.ShardError, match="broken.array_record"):
        shards.read_records(str(bad))


def test_bags_write_read_list(tmp_path):
    out = str(tmp_path / "emb")
    arrays = dict(features_cls256=np.ones((3, 4, 384), np.float16), features_cls4k=np.zeros((3, 192), np.float32),
                  slide_embedding=np.full(192, 2.0, np.float32), coords=np.arange(6).reshape(3, 2))
    path = bags.write_bag(out, "s1", arrays)
    assert path == bags.bag_path(out, "s1") and path.endswith(os.path.join("slides", "s1.npz"))
    with open(path + ".tmp-99", "wb") as f:  # a killed writer's leftover is not a bag
        f.write(b"partial")
    assert list(bags.list_bags(out)) == ["s1"]
    got = bags.read_bag(out, "s1")
    assert got["features_cls256"].dtype == np.float32 and got["coords"].tolist() == arrays["coords"].tolist()
    assert bags.read_slide_embeddings(out)["s1"][0] == 2.0
    assert bags.manifest_items(out, ["s1", "s2", "s3"], {"s2": "boom"}) == {
        "s1": {"file": os.path.join("slides", "s1.npz"), "status": "done", "num_regions": 3},
        "s2": {"status": "failed", "error": "boom"}, "s3": {"status": "pending"}}
    with pytest.raises(bags.BagError, match="'s9' was not extracted"):
        bags.read_bag(out, "s9")
    with open(bags.bag_path(out, "trunc"), "wb") as f:
        f.write(open(path, "rb").read()[:100])
    with pytest.raises(bags.BagError, match="trunc.npz: truncated or corrupt bag"):
        bags.read_bag(out, "trunc")


def test_a_failed_json_write_names_its_file_not_the_temporary(tmp_path, monkeypatch):
    """A full disk shows in f.write or fsync, whose OSError names no file: the command then said
    "error: [Errno 28] No space left on device" (hipt-extract's status/process_0.json). Plant:
    write_json_atomic re-raising the bare error -> no file name, fails."""
    import errno

    path = str(tmp_path / "status.json")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards.os, "fsync", full)
    with pytest.raises(OSError) as e:
        shards.write_json_atomic(path, {"a": 1})
    assert e.value.filename == path and e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []
