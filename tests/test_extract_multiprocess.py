"""hipt-extract as 2 cooperating JAX processes (launch/local_multiprocess.py): every process
writes its own status file and the merged manifest names every slide, including a slide that
failed on process 1; bags come out in the TRIDENT h5 layout (--format h5)."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np

from tests.synthetic_cohort import tissue_crop, write_region_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_extraction_merges_every_status(tmp_path):
    """Slides sorted a, b, c: process 0 takes a and c, process 1 takes b (a broken shard).
    Plant checked: merging only process 0's own status file leaves b "pending" and fails."""
    prep = str(tmp_path / "prep")
    rng = np.random.default_rng(0)
    write_region_shard(prep, "a_good", [tissue_crop(rng, 256), tissue_crop(rng, 256)])
    write_region_shard(prep, "c_good", [tissue_crop(rng, 256)])
    with open(os.path.join(prep, "regions", "b_broken.array_record"), "wb") as f:
        f.write(b"not an array record")
    out = tmp_path / "emb"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"), "-n", "2",
         "--devices-per-process", "1", "--timeout", "400", "--",
         sys.executable, "-m", "hipt_jax.cli.extract", "--random-init", "tiny", "--shards", prep,
         "--out", str(out), "--format", "h5", "--no-progress"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=450)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-2000:]  # 1: some slide failed
    # Both processes report the merged result, so both name process 1's failure.
    assert "[0] hipt-extract: FAILED b_broken" in res.stdout and "[1] hipt-extract: FAILED b_broken" in res.stdout
    manifest = json.load(open(out / "manifest.json"))
    slides = manifest["slides"]
    assert set(slides) == {"a_good", "b_broken", "c_good"}
    assert slides["a_good"]["status"] == "done" and slides["a_good"]["num_regions"] == 2
    assert slides["c_good"]["status"] == "done" and slides["c_good"]["num_regions"] == 1
    assert slides["b_broken"]["status"] == "failed" and "b_broken.array_record" in slides["b_broken"]["error"]
    assert manifest["params"]["processes"] == 2 and manifest["counts"] == {"done": 2, "failed": 1}
    status1 = json.load(open(out / "status" / "process_00001.json"))
    assert status1["process"] == 1 and list(status1["slides"]) == ["b_broken"]
    # The bags are TRIDENT-layout h5: CLS-4K features, coords with the grid attributes.
    with h5py.File(out / "slides" / "a_good.h5") as f:
        assert f["features"].shape == (2, 192) and f["features_cls256"].shape == (2, 1, 384)
        attrs = dict(f["coords"].attrs)
        assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 256
        assert attrs["target_magnification"] == 20.0 and attrs["name"] == "a_good"
