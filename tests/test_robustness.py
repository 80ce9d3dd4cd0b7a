"""More classes of bad input, per command (tests/test_bad_inputs.py has the first ones):
damaged bags (checksum next to each bag), a full disk in every command that writes per-item or
result files (hipt-prep, hipt-knn, hipt-heatmap, hipt-convert), CSVs in other encodings or
with ids that are paths, out-of-range and huge flags, a config file that is not Python, and
Ctrl-C during hipt-pretrain's compilation.

Commands run in-process (their main(argv)) unless absl's global flags need a fresh process.
Each test names the bug planted once to see it fail.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from data_prep import bags, shards
from hipt_jax import workdir_lock
from tests.cli_helpers import ENV, call_main, run_module
from tests.synthetic_cohort import (make_feature_cohort, make_tissue_cohort, small_labelled_feature_cohort,
                                     write_feature_grids, write_labels)
from tests.test_bad_inputs import assert_one_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(folder) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if ".tmp-" in f]


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    """4 slides of one 256 px region each, in hipt-prep's layout."""
    prep_dir, _ = make_tissue_cohort(str(tmp_path_factory.mktemp("prep")), n_per_class=2, regions=(1, 1),
                                     size=256, seed=0)
    return prep_dir


@pytest.fixture(scope="module")
def feature_cohort(tmp_path_factory):
    return small_labelled_feature_cohort(tmp_path_factory.mktemp("features"))


# ------------------------------------------------------------------------------ bag checksums
def _h5_bag(out_dir) -> str:
    arrays = {"features_cls4k": np.full((2, 192), 1.2345, np.float32), "coords": np.zeros((2, 2), np.int64),
              "features_cls256": np.zeros((2, 4, 384), np.float32)}
    return bags.write_bag(str(out_dir), "s1", arrays, "h5")


def test_a_damaged_bag_is_named_on_read_and_redone_by_extraction(tmp_path, monkeypatch):
    """Plant: read_bag_file / bag_keys without verify_bag (h5 data bytes changed on disk were
    read as features, exit 0); _extract_slides taking every listed bag as done (the damaged
    bag stayed)."""
    from hipt_jax import extraction

    path = _h5_bag(tmp_path)
    assert open(bags.checksum_path(path)).read().split() == [shards.file_sha256(path), "s1.h5"]
    data = open(path, "rb").read()
    pattern = np.float32(1.2345).tobytes()
    at = data.index(pattern)
    with open(path, "r+b") as f:  # one feature value changed; the h5 file stays readable
        f.seek(at)
        f.write(np.float32(9.0).tobytes())
    with pytest.raises(bags.BagError, match=f"{path}: truncated or corrupt bag \\(its SHA-256 does not match"):
        bags.read_bag_file(path)
    failed = {}
    with pytest.raises(bags.BagError):  # nothing else readable: the error names the folder
        bags.read_slide_embeddings(str(tmp_path), failed)
    assert "does not match" in failed["s1"]
    assert bags.manifest_items(str(tmp_path), ["s1"], {})["s1"]["status"] == "failed"

    def embed_one(slide_id, bar):
        return {"features_cls256": np.zeros((2, 4, 384), np.float32), "coords": np.zeros((2, 2), np.int64),
                "features_cls4k": np.full((2, 192), 1.2345, np.float32)}, {}

    manifest = extraction._extract_slides(str(tmp_path), ["s1"], embed_one,
                                          extractor=types.SimpleNamespace(batch=1), fmt="h5",
                                          store_dtype="float32", params={}, show_progress=False)
    assert manifest["slides"]["s1"]["status"] == "done"
    assert float(bags.read_bag_file(path)["features_cls4k"][0, 0]) == np.float32(1.2345)


# ------------------------------------------------------------------------------ full disk
class _FullDiskWriter:
    """An ArrayRecordWriter whose disk fills up: records are written, the final flush fails."""

    def __init__(self, path, options):
        self.f = open(path, "wb")

    def write(self, record):
        self.f.write(record[:10])

    def close(self):
        if not self.f.closed:
            self.f.close()
            raise ENOSPC


def test_full_disk_in_hipt_prep_is_a_clean_per_slide_failure(prep, tmp_path, monkeypatch, capsys):
    """Plant: open_shard_writer closing the writer outside its try (the failed flush left
    patches/*.tmp-* behind); write_item_status without its OSError branch (a status file that
    cannot be written stopped the run with the manifest at "pending")."""
    from array_record.python import array_record_module

    from hipt_jax.cli import prep as prep_cli

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", _FullDiskWriter)
    out = tmp_path / "patches"
    code, _, err = call_main(prep_cli.main, ["patches", "--regions", prep, "--out", out, "--no-progress",
                                             "--min-tissue", "0", "--workers", "1"], capsys)
    assert code == 1 and "Traceback" not in err, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert {v["status"] for v in manifest["items"].values()} == {"failed"}
    assert all("No space left" in v["error"] for v in manifest["items"].values())
    assert not _leftovers(out) and not list((out / "patches").glob("*.array_record"))
    monkeypatch.undo()

    real = shards.write_json_atomic

    def status_disk_full(path, obj):
        if os.sep + "status" + os.sep in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, obj)

    monkeypatch.setattr(shards, "write_json_atomic", status_disk_full)
    out2 = tmp_path / "patches2"
    code, _, err = call_main(prep_cli.main, ["patches", "--regions", prep, "--out", out2, "--no-progress",
                                             "--min-tissue", "0", "--workers", "1"], capsys)
    assert code == 1 and "Traceback" not in err, err
    items = json.loads((out2 / "manifest.json").read_text())["items"]
    assert {v["status"] for v in items.values()} == {"failed"}
    assert all("status write failed" in v["error"] for v in items.values())
    assert not list((out2 / "patches").glob("*.array_record"))  # no shard without its status


def _fail_after_partial_write(real_open, folder):
    """open() whose files opened for writing under ``folder`` fill the disk after a few bytes."""
    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:5])
            raise ENOSPC

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Full(f) if "w" in mode and str(path).startswith(str(folder)) else f

    return fake_open


def test_full_disk_while_writing_results_is_one_line_and_no_partial_file(feature_cohort, tmp_path,
                                                                         monkeypatch, capsys):
    """Plant: hipt-knn writing its JSON with open(out, "w") (a truncated knn_results.json was
    left behind and the OSError exited 2); save_png without atomic_path (a truncated PNG)."""
    import builtins

    from hipt_jax import outputs
    from hipt_jax.cli import knn
    from hipt_jax.heatmap import render

    emb, labels = feature_cohort
    out = tmp_path / "r.json"
    monkeypatch.setattr(builtins, "open", _fail_after_partial_write(builtins.open, tmp_path))
    code, _, err = call_main(knn.main, ["--embeddings", emb, "--labels", labels, "--splits", "kfold:2",
                                        "--k", "1", "--out", out], capsys)
    monkeypatch.undo()
    assert_one_line(code, err, "hipt-knn", str(out), "No space left", exit_code=1)
    assert not out.exists() and not _leftovers(tmp_path)

    def png_disk_full(self, fp, *a, **kw):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise ENOSPC

    monkeypatch.setattr(render.Image.Image, "save", png_disk_full)
    with pytest.raises(outputs.OutputWriteError, match="map.png: write failed"):
        render.save_png(str(tmp_path / "map.png"), np.zeros((4, 4, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def test_a_failed_write_says_what_is_left_not_that_nothing_is(tmp_path):
    """hipt-heatmap's 51st picture failing said "nothing partial was left" beside the 50 it had
    written (hipt-predict: its attention folder): the message now says only what is true, of
    that file and of the rest. Plant: the old wording -> fails."""
    import errno

    from hipt_jax import outputs

    outputs.write_text(str(tmp_path / "a.png"), "first")
    with pytest.raises(outputs.OutputWriteError) as e:
        with outputs.atomic_path(str(tmp_path / "b.png")) as tmp:
            open(tmp, "w").write("part")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'b.png'}: write failed (No space left on device); no partial copy of it")
    assert "nothing partial" not in message and "what this run wrote before it is kept" in message
    assert os.listdir(tmp_path) == ["a.png"]


@pytest.mark.slow  # an Orbax save and torch: 97 s at load 20 (`make test-all`); full disk is fast-tested above
def test_full_disk_in_hipt_convert_leaves_no_half_checkpoint(tmp_path, monkeypatch, capsys):
    """Plant: to_torch calling torch.save(out, dst) directly (a truncated .pth that
    torch.load half-reads); to_orbax saving straight into DST (a directory without arch.json)."""
    import jax
    import torch

    from hipt_jax.cli import convert
    from hipt_jax.models import checkpoint
    from hipt_jax.models.archs import build_vit, get_arch

    arch = get_arch("vit4k_tiny")
    params = build_vit(arch).init(jax.random.PRNGKey(0), np.zeros((1, 2, 2, 384), np.float32))["params"]
    src = checkpoint.save(str(tmp_path / "m"), params, "vit", arch)

    def torch_disk_full(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04partial")
        raise ENOSPC

    monkeypatch.setattr(torch, "save", torch_disk_full)
    dst = tmp_path / "back.pth"
    code, _, err = call_main(convert.main, ["--to-torch", src, dst], capsys)
    assert_one_line(code, err, "hipt-convert", str(dst), "No space left", exit_code=1)
    assert sorted(os.listdir(tmp_path)) == ["m"]


# ------------------------------------------------------------------------------ inputs and flags
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "latin1.csv").write_bytes("path,slide_id\nx.svs,caf\xe9\n".encode("latin-1"))
    (root / "bom.csv").write_bytes(b"\xef\xbb\xbfpath,slide_id\nnothere.svs,s1\n")
    (root / "pathid.csv").write_text("path,slide_id\nx.svs,../other/s1\n")
    (root / "tiles.csv").write_bytes("path,label\nt.png,caf\xe9\n".encode("latin-1"))
    (root / "folder").mkdir()
    (root / "afile").write_text("x")
    return root


@pytest.mark.parametrize("command, argv, needles", [
    # CSVs: another encoding names the file; a BOM is read; an id that is a path is refused
    ("prep", ["regions", "--slides", "{bad}/latin1.csv", "--out", "{out}"], ("latin1.csv", "not UTF-8")),
    ("prep", ["regions", "--slides", "{bad}/pathid.csv", "--out", "{out}"], ("pathid.csv", "line 2", "is a path")),
    ("patch_eval", ["--random-init", "tiny", "--tiles", "{bad}/tiles.csv", "--out", "{out}"], ("tiles.csv", "not UTF-8")),
    # numbers out of range or huge
    ("extract", ["--random-init", "tiny", "--shards", "S", "--out", "{out}", "--readers", "0"], ("--readers",)),
    ("extract", ["--random-init", "tiny", "--shards", "S", "--out", "{out}", "--size", "99999999999"], ("--size",)),
    ("extract", ["--random-init", "tiny", "--shards", "S", "--out", "{out}", "--batch-per-device", "1000000000"], ("--batch-per-device",)),
    ("patch_eval", ["--random-init", "tiny", "--tiles", "T", "--out", "{out}", "--size", "0"], ("--size",)),
    ("patch_eval", ["--random-init", "tiny", "--tiles", "T", "--out", "{out}", "--test-fraction", "1.5"], ("--test-fraction",)),
    ("heatmap", ["--random-init", "tiny", "--image", "x.png", "--out", "{out}", "--shifts", "-128"], ("--shifts",)),
    ("heatmap", ["--random-init", "tiny", "--image", "x.png", "--out", "{out}", "--cmap", "nope"], ("--cmap",)),
    # names that are paths
    ("heatmap", ["--random-init", "tiny", "--image", "x.png", "--out", "{out}", "--name", "../../x"], ("--name", "path")),
    # outputs that cannot be written, checked before the work
    ("predict", ["--run", "R", "--embeddings", "E", "--out", "{bad}/afile/p.csv"], ("afile", "not a folder")),
    ("patch_eval", ["--random-init", "tiny", "--tiles", "{bad}/folder", "--out", "{bad}/afile/o"], ("afile", "not writable")),
])
def test_bad_inputs_and_flags_exit_2_with_one_line_before_work(command, argv, needles, bad_files, tmp_path,
                                                               capsys):
    """Plants (each run once): runner.find_slide_files and tiles._read_csv opening the CSV with
    the locale's codec (a UnicodeDecodeError line without the file name); --readers, --size,
    --batch-per-device, patch-eval --size/--test-fraction without a range (0 readers and a
    1e11 px region were accepted and exit 0); heatmap --shifts/--cmap/--name unchecked (a name
    '../../x' wrote outside --out); hipt-predict and hipt-patch-eval without check_output_* (a
    traceback after the work)."""
    import importlib

    out = tmp_path / "out"
    main = importlib.import_module(f"hipt_jax.cli.{command}").main
    code, _, err = call_main(main, [a.format(out=out, bad=bad_files) for a in argv], capsys)
    assert_one_line(code, err, "hipt-", *needles)
    assert not out.exists() or not os.listdir(out)  # at most the probed, empty output folder


def test_a_bom_prefixed_slide_csv_is_read(bad_files, tmp_path, capsys):
    """Plant: the CSV read without utf-8-sig (the BOM made the header '\\ufeffpath': 'CSV needs a
    path column')."""
    from data_prep.runner import find_slide_files

    assert [t.slide_id for t in find_slide_files(str(bad_files / "bom.csv"))] == ["s1"]


def test_a_config_file_that_is_not_python_is_one_line(bad_files, tmp_path):
    """Plant: absl_main's parse without the catch-all (a SyntaxError traceback, exit 1)."""
    (bad_files / "config.py").write_bytes(b"\x00\x01 not python")
    code, _, err = run_module("hipt_jax.cli.pretrain", f"--config={bad_files}/config.py", f"--workdir={tmp_path}/w")
    assert_one_line(code, err, "hipt-pretrain", "config.py", "cannot load the config file")


def test_a_config_file_without_get_config_is_named(bad_files, tmp_path):
    """ml_collections' "module 'config_config' has no attribute 'get_config'" named no file.
    Plant: _no_get_config returning "" (that line again)."""
    (bad_files / "noget.py").write_text("BATCH = 8\n")
    code, _, err = run_module("hipt_jax.cli.profile", f"--config={bad_files}/noget.py")
    assert_one_line(code, err, "hipt-profile", f"{bad_files}/noget.py: defines no get_config()")


# ------------------------------------------------------------------------------ Ctrl-C
@pytest.mark.slow  # up to the watchdog's 10 s grace + start-up; the fast Ctrl-C test is test_bad_inputs'
def test_ctrl_c_during_pretrain_compilation_exits_130_with_one_line(tmp_path):
    """Expected without the fix: a traceback from inside the compile or a hang until XLA
    returns (run_command's KeyboardInterrupt branch and watchdog; that plant was run on the
    hipt-extract test in test_bad_inputs, not on this one). The Ctrl-C often lands inside jax's
    garbage-collection callback, where Python printed "Exception ignored ... Traceback" and
    dropped it. Plant: interrupts.install's unraisable hook for Terminated only -> that
    traceback above the line, fails (3 of 3 runs)."""
    data = write_feature_grids(tmp_path / "feats", 4)
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hipt_jax.cli.pretrain",
                             "--config", "configs/pretrain_vit4k.py:runlocal", f"--workdir={workdir}",
                             f"--config.data.path={data}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (workdir / workdir_lock.LOCK).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the lock is taken right before the state is built and compiled
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert_one_line(proc.returncode, err, "hipt-pretrain", "interrupted", exit_code=130)  # not -11 (SIGSEGV)


# ------------------------------------------------------------------------------ SIGTERM
_POOL_RUN = """
import sys, time
from hipt_jax import workdir_lock
from hipt_jax.cli import flags

def run():
    with workdir_lock.hold(sys.argv[1]):
        from data_prep.runner import run_pool
        print("ready", flush=True)
        run_pool(time.sleep, [30, 30], (), 2, "sleep")  # 2 spawned workers, busy
    return 0

sys.exit(flags.run_command("prog", run, devices_at_start=False, exit_on_stop=True))
"""


def test_sigterm_takes_the_ctrl_c_path(tmp_path):
    """SIGTERM (SLURM/Kubernetes preemption) killed a command at once: exit 143 with no word, its
    .hipt-lock left (a job resubmitted on another host was refused), pool workers orphaned
    (BrokenPipeError tracebacks, leaked semaphores). Plant: run_command without
    _catch_sigterm -> rc -15, the lock stays."""
    proc = subprocess.Popen([sys.executable, "-c", _POOL_RUN, str(tmp_path)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.5)  # into run_pool: its workers are starting or asleep
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert_one_line(proc.returncode, err, "prog", "terminated (SIGTERM)", "finished outputs are kept",
                    exit_code=143)
    assert "leaked" not in err and "BrokenPipe" not in err, err
    assert not (tmp_path / workdir_lock.LOCK).exists()


def test_sigterm_in_a_deferred_block_waits_for_the_next_safe_point():
    """Pretraining must not be broken off inside Orbax's save/delete threads (a half-deleted old
    checkpoint, the newest one left without its checksum): its loop defers SIGTERM to the next
    step. Plant: on_sigterm raising inside deferred() -> Terminated at the sleep below."""
    from hipt_jax import interrupts

    previous = signal.signal(signal.SIGTERM, interrupts.on_sigterm)
    interrupts.reset()
    reached = []
    try:
        with pytest.raises(interrupts.Terminated):
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here
                os.kill(os.getpid(), signal.SIGTERM)  # a second one: ignored
                time.sleep(0.05)
                reached.append("the work in flight")
                interrupts.check()
                reached.append("past the safe point")
        assert reached == ["the work in flight"] and interrupts.requested()
        interrupts.reset()
        with pytest.raises(interrupts.Terminated):  # one arriving at the end: raised on leaving
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
        interrupts.reset()


_COMPILE_RUN = """
import sys
from hipt_jax.cli import flags

def run():
    import jax, jax.numpy as jnp

    def f(x):
        for i in range(300):  # seconds of XLA compilation
            x = jnp.sin(x @ x.T + i)
        return x

    print("ready", flush=True)
    jax.jit(f).lower(jnp.ones((64, 64))).compile()
    print("compiled", flush=True)
    return 0

sys.exit(flags.run_command("prog", run, devices_at_start=False, exit_on_stop=True))
"""


def test_sigterm_during_compilation_exits_143_not_sigsegv(tmp_path):
    """A stop abandons the compile, which goes on in XLA's threads; the interpreter's teardown
    then destroyed the JAX client under it: SIGSEGV (exit -11) after the one line, for Ctrl-C as
    for SIGTERM. Plant: run_command(exit_on_stop=False) -> -11."""
    proc = subprocess.Popen([sys.executable, "-c", _COMPILE_RUN], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert out == "", "the compile finished before the signal"
    assert_one_line(proc.returncode, err, "prog", "terminated (SIGTERM)", exit_code=143)


def test_a_sigterm_python_drops_is_delivered_again():
    """The handler runs at any bytecode, also in a garbage-collection callback (jax has one),
    where Python prints the exception and drops it: the run went on to exit 0 and the SIGTERM
    was lost (seen with hipt-extract). Plant: install() without its unraisablehook -> no
    Terminated below."""
    import gc

    from hipt_jax import interrupts

    armed = [True]

    def callback(phase, info):
        if armed and phase == "start":
            armed.clear()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside the collector

    restore = interrupts.install()
    gc.callbacks.append(callback)
    try:
        with pytest.raises(interrupts.Terminated):
            gc.collect()
            time.sleep(0.5)  # delivered again: raised here
    finally:
        gc.callbacks.remove(callback)
        restore()
        interrupts.reset()


# ------------------------------------------------------------------------------ free space
def test_pretrain_free_space_estimate_is_its_checkpoints():
    """Plant: _estimate_bytes returning flags.MIN_FREE_BYTES (a 16 MiB floor for a run that
    writes 4 checkpoints of 0.7 GB each; hipt-pretrain checks this estimate before any work). The released vit256_small_dino.pth (704,258,011
    bytes) holds what one of our checkpoints holds: student, teacher and the Adam moments."""
    from configs.pretrain_vit256 import get_config
    from hipt_jax.cli.pretrain import _estimate_bytes

    config = get_config()
    per_checkpoint = _estimate_bytes(config) / (config.checkpoint.keep + 1)
    assert abs(per_checkpoint / 704_258_011 - 1) < 0.05


# ------------------------------------------------------------------------------ shards: damage, failed redo
def _redo_fails(slide_id: str, out_dir: str) -> dict:
    """A hipt-prep item function whose (re)do fails."""
    result = {"slide_id": slide_id, "status": "failed", "error": f"{slide_id}: unreadable slide",
              "shard": f"regions/{slide_id}.array_record"}
    shards.write_item_status(os.path.join(out_dir, "status", slide_id + ".json"), result,
                             os.path.join(out_dir, result["shard"]))
    return result


def test_a_damaged_shard_is_named_and_a_failed_redo_leaves_no_stale_shard(tmp_path):
    """Plants: _open_reader without verify_shard (a shard whose bytes changed was decoded);
    run_items without retire_output (after a failed --redo the old shard was still listed and
    read by hipt-extract)."""
    from data_prep import runner
    from tests.synthetic_cohort import write_region_shard

    out = str(tmp_path / "out")
    path = write_region_shard(out, "s1", [np.full((256, 256, 3), 200, np.uint8)])
    os.makedirs(os.path.join(out, "status"))
    shards.write_json_atomic(os.path.join(out, "status", "s1.json"),
                             {"slide_id": "s1", "status": "done", "shard": "regions/s1.array_record",
                              "sha256": shards.file_sha256(path)})
    assert len(list(shards.iter_records(path))) == 1
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(shards.ShardError, match=f"{path}: damaged shard"):
        list(shards.iter_records(path))

    manifest = runner.run_items(_redo_fails, ["s1"], ["s1"], out, "regions", {}, (out,), redo=True)
    assert manifest["items"]["s1"]["status"] == "failed"
    assert not os.path.exists(path)  # nothing a downstream tool could list and read
    assert not [f for f in os.listdir(os.path.join(out, "regions")) if f.endswith(".array_record")]


# ------------------------------------------------------------------------------ pretraining resume
def test_metrics_are_cut_back_to_the_restored_step(tmp_path):
    """The fast check of the metrics half of the slow fallback test in test_bad_inputs. Plant:
    keeping lines with step <= restored step (step 3 logged twice after resuming from 3)."""
    from hipt_jax.pretrain.trainer import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(6)) + '{"step": 6, "lo')
    _truncate_metrics(str(path), 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert not _leftovers(tmp_path)


def test_the_watchdog_leaves_a_session_alone_once_its_command_returned(tmp_path):
    """A command called from Python (a notebook, a test runner) armed the watchdog for the rest
    of the process: a Ctrl-C or SIGTERM the session handled itself minutes later ended the
    whole process (exit 130/143; it crashed pytest workers). Plant: the watchdog without the
    "a command is running" check -> the child exits 130 instead of printing "alive"."""
    script = (
        "import os, signal, time\n"
        "from hipt_jax.cli import flags, knn\n"
        "flags.INTERRUPT_GRACE_S = 0.1\n"
        "assert knn.main(['--embeddings', 'no/such/folder', '--labels', 'no.csv']) == 2\n"
        "signal.signal(signal.SIGINT, lambda *a: None)  # the session's own handling\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(1.0)\n"
        "print('alive')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout.strip().splitlines()[-1]) == (0, "alive"), proc.stderr[-2000:]
