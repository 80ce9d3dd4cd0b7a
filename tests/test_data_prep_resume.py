"""Kill-and-resume: SIGKILL the `hipt-prep regions` process group mid-run, twice, then resume;
the final shards must hold exactly the records of an uninterrupted run (no duplicate, none missing)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hipt_jax.cli.prep import main
from data_prep.shards import iter_records
from data_prep.synth import make_aperio_slide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_SLIDES = 8
REGION = "256"


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_slides")
    layout = np.ones((4, 4), bool)
    layout[0, 0] = layout[3, 2] = False
    for i in range(N_SLIDES):
        # 1536 x 1536 at 20x with 256 px regions: 36 candidates, ~30 kept per slide.
        make_aperio_slide(str(d / f"slide{i}.svs"), (1536, 1536), mag=20, levels=(1, 4), seed=i,
                          tissue=layout, tissue_cell_px=384)
    return str(d)


def _all_records(out):
    """{shard name: [record bytes...]} of every finished shard."""
    from array_record.python import array_record_module

    recs = {}
    for p in sorted(glob.glob(os.path.join(out, "regions", "*.array_record"))):
        r = array_record_module.ArrayRecordReader(p)
        recs[os.path.basename(p)] = r.read(list(range(r.num_records())))
        r.close()
    return recs


def _cmd(slides, out):
    return [sys.executable, "-m", "hipt_jax.cli.prep", "regions", "--slides", slides, "--out", out,
            "--region", REGION, "--workers", "2"]


def _kill_after(slides, out, n_status):
    """Start the CLI in its own process group; SIGKILL the group once n_status slides finished."""
    proc = subprocess.Popen(_cmd(slides, out), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    status = os.path.join(out, "status")
    while time.time() < deadline and proc.poll() is None:
        done = glob.glob(os.path.join(status, "*.json"))
        if len(done) >= n_status:
            break
        time.sleep(0.01)
    finished = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its pool workers, mid-write
    proc.wait()
    return finished, len(glob.glob(os.path.join(status, "*.json")))


def test_sigkill_and_resume_gives_identical_records(slides_dir, tmp_path):
    ref_out = str(tmp_path / "reference")
    assert main(["regions", "--slides", slides_dir, "--out", ref_out, "--region", REGION,
                 "--workers", "1"]) == 0
    reference = _all_records(ref_out)
    assert len(reference) == N_SLIDES and sum(len(v) for v in reference.values()) > 100

    out = str(tmp_path / "killed")
    finished, n1 = _kill_after(slides_dir, out, 1)
    assert not finished and n1 < N_SLIDES, "run ended before the kill: nothing was tested"
    finished, n2 = _kill_after(slides_dir, out, min(n1 + 2, N_SLIDES - 2))  # resume, kill again
    assert not finished and n2 < N_SLIDES
    partial = _all_records(out)
    for name, recs in partial.items():  # a shard on disk is always complete
        assert recs == reference[name]

    res = subprocess.run(_cmd(slides_dir, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"already done" in res.stdout
    assert _all_records(out) == reference  # same shards, same records, same order, same bytes
    assert not glob.glob(os.path.join(out, "*", "*.tmp-*"))
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert m["counts"] == {"done": N_SLIDES}
    assert m["n_records"] == sum(len(v) for v in reference.values())
    # The Grain view sees each region exactly once.
    from hipt_jax.data import RegionSource

    src = RegionSource(out)
    keys = [(r["slide_id"], r["x"], r["y"]) for r in (src.raw(i) for i in range(len(src)))]
    assert len(keys) == len(set(keys)) == m["n_records"]
    assert list(iter_records(os.path.join(out, "regions", "slide0.array_record")))[0]["slide_id"] == "slide0"


def test_rerun_redoes_a_replaced_slide_and_a_truncated_shard(slides_dir, tmp_path, capsys):
    """A finished slide is skipped on rerun only while its shard is whole and its id still names
    the same slide file; the manifest lists every slide the folder holds. Plant: the old
    is_done (status says done and the shard exists) -> the replaced slide and the truncated
    shard are both skipped, fails."""
    import shutil

    from data_prep.runner import prepare_regions

    folder, out = tmp_path / "slides", str(tmp_path / "out")
    folder.mkdir()
    a, b = os.path.join(slides_dir, "slide0.svs"), os.path.join(slides_dir, "slide1.svs")
    assert os.path.getsize(a) != os.path.getsize(b)  # else "replaced" would not be visible
    shutil.copy(a, folder / "s.svs")
    prepare_regions(str(folder), out, region_px=int(REGION))
    shard, status = os.path.join(out, "regions", "s.array_record"), os.path.join(out, "status", "s.json")
    first = open(shard, "rb").read()

    prepare_regions(str(folder), out, region_px=int(REGION))  # unchanged: skipped
    assert "redoing" not in capsys.readouterr().err and open(shard, "rb").read() == first

    patches = str(tmp_path / "patches")  # derived from the region shard
    assert main(["patches", "--regions", out, "--out", patches, "--workers", "1", "--no-progress"]) == 0
    patch_status = os.path.join(patches, "status", "s.json")
    assert json.load(open(patch_status))["source"]["sha256"] == json.load(open(status))["sha256"]

    shutil.copy(b, folder / "s.svs")  # same id, another slide
    prepare_regions(str(folder), out, region_px=int(REGION))
    assert "its output was made from" in capsys.readouterr().err
    assert json.load(open(status))["source"]["bytes"] == os.path.getsize(b)
    assert open(shard, "rb").read() != first
    # The patches (and features) of the old region shard are redone, not kept as "already
    # done" (plant: run_items without source_of for derived shards -> skipped, fails).
    assert main(["patches", "--regions", out, "--out", patches, "--workers", "1", "--no-progress"]) == 0
    assert "its output was made from" in capsys.readouterr().err
    assert json.load(open(patch_status))["source"]["sha256"] == json.load(open(status))["sha256"]

    with open(shard, "r+b") as f:  # a shard cut short after it was finished
        f.truncate(os.path.getsize(shard) // 2)
    m = prepare_regions(str(folder), out, region_px=int(REGION))
    assert "truncated or replaced" in capsys.readouterr().err
    assert os.path.getsize(shard) == json.load(open(status))["shard_bytes"] and m["counts"] == {"done": 1}

    # Another slide folder into the same --out: the manifest (what hipt-extract and the loaders
    # go by) lists both runs' slides (plant: rebuilt from this run's ids only -> "s" missing).
    other = tmp_path / "more"
    other.mkdir()
    shutil.copy(a, other / "t.svs")
    m = prepare_regions(str(other), out, region_px=int(REGION))
    assert set(m["items"]) == {"s", "t"} and m["counts"] == {"done": 2}
    # ... and the earlier slide this run does not list is named (it may have been removed or
    # renamed since; plant: no _say_earlier_items -> silent).
    assert "1 item(s) of earlier runs" in capsys.readouterr().err

    # The slide now fails (damaged): its region shard is retired, and the patches made from it
    # go too, named (plant: no drop_orphans -> "2 of 2 already done"-style skip, the old
    # patch shard still read by pretraining).
    with open(folder / "s.svs", "r+b") as f:
        f.truncate(1000)
    m = prepare_regions(str(folder), out, region_px=int(REGION))
    assert m["items"]["s"]["status"] == "failed" and not os.path.exists(shard)
    capsys.readouterr()
    assert main(["patches", "--regions", out, "--out", patches, "--workers", "1", "--no-progress"]) == 0
    assert "s: its input is gone" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(patches, "patches", "s.array_record"))
    assert "s" not in json.load(open(os.path.join(patches, "manifest.json")))["items"]


def test_a_rerun_with_other_parameters_names_what_changed(tmp_path):
    """Plant: the old message (no list of changed parameters) -> fails."""
    from data_prep.runner import InputError, check_params

    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "regions", "params": {"region_px": 1024, "jpeg_quality": 95}}))
    check_params(str(tmp_path), "regions", {"region_px": 1024, "jpeg_quality": 95})
    with pytest.raises(InputError, match=r"\(region_px: 1024 -> 512; manifest.json\)"):
        check_params(str(tmp_path), "regions", {"region_px": 512, "jpeg_quality": 95})
    # Another kind, and another command's folder (an embeddings manifest has no kind; plant:
    # the old message -> "holds `hipt-prep None` output").
    with pytest.raises(InputError, match=r"holds `hipt-prep regions` output; give `hipt-prep patches`"):
        check_params(str(tmp_path), "patches", {})
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "hipt.embeddings.v1", "params": {}}))
    with pytest.raises(InputError, match=r"holds another command's output \(hipt.embeddings.v1\)"):
        check_params(str(tmp_path), "regions", {})


def test_finished_items_made_with_other_parameters_are_refused_without_a_manifest(tmp_path, capsys):
    """With manifest.json gone (deleted, or only regions/ and status/ copied) a rerun with
    --min-tissue 0.9 skipped the slide finished at 0.1 and wrote a manifest saying 0.9, exit 0.
    Each status records a digest of its parameters now: the rerun is refused (exit 2), the same
    parameters are still resumed. (Plant: check_params returning when there is no manifest ->
    exit 0, fails.)"""
    slides = tmp_path / "slides"
    slides.mkdir()
    make_aperio_slide(str(slides / "s.svs"), (768, 768), mag=20, levels=(1,), tissue=np.ones((3, 3), bool))
    out = tmp_path / "out"
    run = lambda *extra: main(["coords", "--slides", str(slides), "--out", str(out), "--region", REGION,
                               "--workers", "1", "--no-progress", *extra])
    assert run() == 0
    os.remove(out / "manifest.json")
    capsys.readouterr()
    assert run("--min-tissue", "0.9") == 2
    assert (f"{out}: 1 finished item(s) (s) were made with other parameters than this run's "
            "(manifest.json, which named them, is missing)") in capsys.readouterr().err
    assert run() == 0 and "1 of 1 already done" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["[1, 2, 3]", "{\n", '{"kind": "regions", "params": [1]}', "\xff\xfe"])
def test_an_unreadable_prep_manifest_is_named_never_a_traceback(tmp_path, capsys, text):
    """OUT/manifest.json is rebuilt from status/, but only it records the parameters: unreadable
    with no finished item it is rebuilt (named on stderr); with finished items the run is refused
    naming it (it could mix parameters). Plant: check_params without its guard -> AttributeError
    (a list) or a bare "Expecting value" (invalid JSON) without the file name."""
    from data_prep.runner import InputError, check_params
    from data_prep.shards import read_prep_manifest

    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(text.encode("latin-1"))
    check_params(str(tmp_path), "regions", {"region_px": 1024})
    assert f"{manifest}: " in capsys.readouterr().err
    (tmp_path / "status").mkdir()
    (tmp_path / "status" / "s.json").write_text(json.dumps({"status": "done", "shard": "regions/s.array_record"}))
    with pytest.raises(InputError, match=f"{manifest}: .*1 finished item.*remove manifest.json"):
        check_params(str(tmp_path), "regions", {"region_px": 1024})
    # the readers downstream (hipt-extract, hipt-prep patches) skip its checks, and say so once
    assert read_prep_manifest(str(tmp_path)) == {} and read_prep_manifest(str(tmp_path)) == {}
    assert capsys.readouterr().err.count(f"warning: {manifest}: ") == 1


def test_a_shard_damaged_in_place_is_redone_and_a_copy_is_hashed_once(slides_dir, tmp_path, capsys, monkeypatch):
    """A region shard zero-filled in place keeps its size: the rerun notices its new mtime,
    hashes it against the status record and redoes it. A shard whose mtime moved but whose bytes
    match (a copy, a touch; records from before the mtime was kept) is kept and its mtime
    recorded, so the next rerun hashes nothing. Plant: is_done without _same_bytes -> the
    zero-filled shard counts as done, fails."""
    import shutil

    from data_prep import shards
    from data_prep.runner import prepare_regions

    folder, out = tmp_path / "slides", str(tmp_path / "out")
    folder.mkdir()
    shutil.copy(os.path.join(slides_dir, "slide0.svs"), folder / "s.svs")
    prepare_regions(str(folder), out, region_px=int(REGION))
    shard, status = os.path.join(out, "regions", "s.array_record"), os.path.join(out, "status", "s.json")
    first = open(shard, "rb").read()
    with open(shard, "r+b") as f:
        f.seek(len(first) // 3)
        f.write(bytes(4096))
    assert os.path.getsize(shard) == len(first)
    m = prepare_regions(str(folder), out, region_px=int(REGION))
    assert f"{shard}: its bytes changed since it was written" in capsys.readouterr().err
    assert open(shard, "rb").read() == first and m["counts"] == {"done": 1}

    record = json.load(open(status))
    del record["shard_mtime_ns"]  # as an older release wrote it
    json.dump(record, open(status, "w"))
    hashed = []
    real = shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda p: hashed.append(p) or real(p))
    prepare_regions(str(folder), out, region_px=int(REGION))
    assert hashed == [shard] and "redoing" not in capsys.readouterr().err
    assert json.load(open(status))["shard_mtime_ns"] == os.stat(shard).st_mtime_ns
    prepare_regions(str(folder), out, region_px=int(REGION))
    assert hashed == [shard]  # the rerun after it compares size and mtime only
