"""hipt-extract as 2 cooperating JAX processes (launch/local_multiprocess.py): every process
writes its own status file and the merged manifest names every slide, including a slide that
failed on process 1; bags come out in the TRIDENT h5 layout (--format h5)."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

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


def test_a_process_with_another_seed_is_refused_by_the_cli_before_any_slide(tmp_path, monkeypatch, capsys):
    """hipt-extract in this process as process 1 with --seed 1, the exchange faked with process
    0's fields (--seed 0): exit 2 naming the processes, the fields and both models, no bag.
    The cheap guard of the 2-process run below (slow-marked).
    Plant: drop the check_same_everywhere call in extraction.check_provenance -> exit 0 with the
    slides embedded (fails)."""
    from hipt_jax import distributed
    from hipt_jax.cli import extract

    from tests.cli_helpers import call_main

    prep = str(tmp_path / "prep")
    rng = np.random.default_rng(0)
    write_region_shard(prep, "a", [tissue_crop(rng, 256)])
    write_region_shard(prep, "b", [tissue_crop(rng, 256)])
    out = tmp_path / "emb"
    real, seen = distributed.check_same_everywhere, []

    def as_process_1(fields):
        mine = fields()
        seen.append(mine)
        process0 = json.loads(json.dumps(mine, sort_keys=True, default=str).replace("seed1", "seed0"))
        real(mine, gather=lambda b: [json.dumps(process0, sort_keys=True).encode(), b])

    monkeypatch.setattr(distributed, "check_same_everywhere", as_process_1)
    code, _, err = call_main(extract.main, ["--random-init", "tiny", "--seed", "1", "--shards", prep,
                                            "--out", out, "--no-progress"], capsys)
    assert code == 2 and seen, err[-2000:]
    assert "process 1 differs from process 0 in vit256, vit4k" in err, err[-2000:]
    assert "random:tiny:seed0" in err and "random:tiny:seed1" in err, err[-2000:]
    assert not (out / "slides").exists() or not any((out / "slides").iterdir())


@pytest.mark.slow  # two JAX processes (~13 s); in make test: the in-process refusal above
def test_processes_with_different_arguments_refuse_before_any_slide(tmp_path):
    """Process 0 runs --seed 0, process 1 --seed 1 (in practice: another local copy of --vit256):
    both must refuse (exit 2) naming the processes and the differing fields, before any bag.
    Plant: drop the check_same_everywhere call in extraction.check_provenance -> exit 0 with
    half the slides from another model (fails)."""
    prep = str(tmp_path / "prep")
    rng = np.random.default_rng(0)
    write_region_shard(prep, "a", [tissue_crop(rng, 256)])
    write_region_shard(prep, "b", [tissue_crop(rng, 256)])
    out = tmp_path / "emb"
    # The launcher gives every process one command; this one adds --seed <process id>.
    per_process = ("import os, sys; from hipt_jax.cli import extract; "
                   "sys.exit(extract.main(sys.argv[1:] + ['--seed', os.environ['JAX_PROCESS_ID']]))")
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"), "-n", "2",
         "--devices-per-process", "1", "--timeout", "200", "--",
         sys.executable, "-c", per_process, "--random-init", "tiny", "--shards", prep,
         "--out", str(out), "--no-progress"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=250)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-2000:]
    for rank in (0, 1):
        line = next(l for l in res.stdout.splitlines() if l.startswith(f"[{rank}] hipt-extract: error:"))
        assert "process 1 differs from process 0 in vit256, vit4k" in line, line
        assert "random:tiny:seed0" in line and "random:tiny:seed1" in line, line
    assert not (out / "slides").exists() or not any((out / "slides").iterdir())


def test_process_mismatch_check_names_every_differing_process():
    """The comparison itself, with a fake exchange of 3 processes (no JAX processes started).
    Plant: compare only the digest of process 0 with its own (no cross-process exchange) -> no
    error raised (fails)."""
    import pytest

    from hipt_jax import distributed

    fields = [{"vit256": "aaa", "format": "npz", "target_mpp": 0.5},
              {"vit256": "aaa", "format": "npz", "target_mpp": 0.5},
              {"vit256": "bbb", "format": "h5", "target_mpp": 0.5}]

    def fake_gather(_mine: bytes) -> list[bytes]:
        return [json.dumps(f, sort_keys=True).encode() for f in fields]

    with pytest.raises(distributed.ProcessMismatchError) as err:
        distributed.check_same_everywhere(fields[0], gather=fake_gather)
    message = str(err.value)
    assert "process 2 differs from process 0 in format, vit256" in message
    assert "process 1" not in message
    assert "aaa (process 0) vs bbb (process 2)" in message and "npz (process 0) vs h5 (process 2)" in message
    fields[2] = dict(fields[0])
    distributed.check_same_everywhere(fields[0], gather=fake_gather)  # all alike: no error


def test_processes_agree_on_one_cohort_mounted_at_two_paths_and_refuse_another(tmp_path, monkeypatch):
    """Hosts mounting one cohort at /mnt/a and /data/a hold the same input; a cohort cut with
    the same hipt-prep parameters (same names, other bytes) or another --out is refused. The
    exchange is faked: each case's fields against the first process's (no processes started).
    Plants: cross_process_fields comparing the shard paths as written -> the two mounts are
    refused, fails; leaving out the input identity -> the other cohort passes, fails; --out
    compared by absolute path -> the symlinked --out is refused, fails."""
    import shutil

    import pytest

    from hipt_jax import distributed, extraction

    rng = np.random.default_rng(0)
    mount_a = str(tmp_path / "mnt" / "prep")
    write_region_shard(mount_a, "a", [tissue_crop(rng, 256)])
    write_region_shard(mount_a, "b", [tissue_crop(rng, 256)])
    mount_b = str(tmp_path / "data" / "prep")
    shutil.copytree(mount_a, mount_b)
    other = str(tmp_path / "other" / "prep")
    write_region_shard(other, "a", [tissue_crop(rng, 256)])
    write_region_shard(other, "b", [tissue_crop(rng, 256)])
    real = distributed.check_same_everywhere
    fields = []

    class Checked(Exception):
        pass

    def capture(make_fields):  # stops the extraction once its fields are made
        fields.append(make_fields())
        raise Checked

    monkeypatch.setattr(distributed, "check_same_everywhere", capture)
    # The first case is process 0 (writes the output token), the others process 1 (read it);
    # process 0 drops the token only after the real exchange.
    identity = distributed.output_identity
    monkeypatch.setattr(distributed, "output_identity", lambda folder: identity(folder, process=1 if fields else 0))
    monkeypatch.setattr(distributed, "drop_output_token", lambda folder: None)
    os.symlink(tmp_path / "emb", tmp_path / "emb_link", target_is_directory=True)
    fingerprint = {"vit256": "random:tiny:seed0", "vit4k": "random:tiny:seed0"}
    for prep, out in ((mount_a, "emb"), (mount_b, "emb"), (other, "emb"), (mount_a, "emb2"), (mount_b, "emb_link")):
        with pytest.raises(Checked):
            extraction.extract_cohort(None, prep, str(tmp_path / out), fingerprint=fingerprint)

    def exchange(mine):
        return lambda _: [json.dumps(fields[0], sort_keys=True).encode(), json.dumps(mine, sort_keys=True).encode()]

    real(fields[1], gather=exchange(fields[1]))  # one cohort at two mount points: alike
    with pytest.raises(distributed.ProcessMismatchError, match="process 1 differs from process 0 in inputs;"):
        real(fields[2], gather=exchange(fields[2]))
    with pytest.raises(distributed.ProcessMismatchError, match="process 1 differs from process 0 in out;"):
        real(fields[3], gather=exchange(fields[3]))
    real(fields[4], gather=exchange(fields[4]))  # one --out at two paths (a mount, a symlink): alike
