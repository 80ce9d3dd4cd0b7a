"""Crash records: a native crash in the slide reader (a segfault in OpenSlide on a damaged file)
ends a run that reads slides in its main process; the rerun must report that slide and finish
the others instead of dying on it again. The crashes here are real SIGSEGVs in subprocesses
(faulthandler._sigsegv) raised where the slide reader calls OpenSlide's C read, which a
damaged tile can crash."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from data_prep import crash_record
from data_prep.synth import REAL_SLIDE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 512

# Pixel reads segfault on slides whose file name starts with "crash" (what libtiff or libjpeg
# can do on a damaged tile); then the command given in argv runs as its CLI would.
CRASHING_READER = """
import faulthandler, os, resource, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the planted segfaults leave no core file
from data_prep import slide_io
_read = slide_io._read_bgra_premultiplied  # every pixel read goes through it
def read(slide, *args):
    if os.path.basename(str(slide._filename)).startswith("crash"):
        faulthandler._sigsegv()
    return _read(slide, *args)
slide_io._read_bgra_premultiplied = read
if __name__ == "__main__":
    command, argv = sys.argv[1], sys.argv[2:]
    if command == "prep":
        from hipt_jax.cli.prep import main
    else:
        from hipt_jax.cli.extract import main
    sys.exit(main(argv))
"""


def _run(tmp_path, command, argv):
    script = tmp_path / "crashing_reader.py"
    script.write_text(CRASHING_READER)
    return subprocess.run([sys.executable, str(script), command] + [str(a) for a in argv], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)


def _cohort(tmp_path):
    """The real slide twice: a.svs (read first, fine) and crash.svs (crashes the reader), a
    copy (2 MB): the commands refuse two names for one file."""
    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(REAL_SLIDE, slides / "a.svs")
    shutil.copy(REAL_SLIDE, slides / "crash.svs")
    return slides


def test_hipt_prep_inline_rerun_skips_the_slide_that_crashed_the_reader(tmp_path):
    """hipt-prep --workers 1 reads slides in its main process: the crash ends the run (-11) after
    a.svs is done. The rerun used to die on crash.svs again, every time; now it is reported
    failed (exit 1, naming the slide and the record to delete), a.svs is kept, and deleting the
    record reads it again. Plant: ``_skip_crashed`` returning ``todo`` unchanged -> the rerun dies
    with -11, fails."""
    slides, out = _cohort(tmp_path), tmp_path / "out"
    argv = ["regions", "--workers", "1", "--slides", slides, "--out", out, "--region", SIZE, "--no-progress"]
    first = _run(tmp_path, "prep", argv)
    assert first.returncode == -signal.SIGSEGV, first.stderr[-2000:]
    record = out / "status" / "crash.crash"
    assert "Segmentation fault" in record.read_text() and (out / "status" / "a.json").exists()

    second = _run(tmp_path, "prep", argv)
    assert second.returncode == 1, second.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["items"]["a"]["status"] == "done"
    error = manifest["items"]["crash"]["error"]
    assert manifest["items"]["crash"]["status"] == "failed"
    assert str(slides / "crash.svs") in error and "crashed" in error and str(record) in error
    assert "Segmentation fault in read_rgb" in error and "slide_io.py:" in error  # what, where
    assert "crash.svs" in second.stderr and "1 of 2 already done" in second.stdout

    record.unlink()  # the user's retry (a new copy of the file): read again, and it crashes again
    assert _run(tmp_path, "prep", argv).returncode == -signal.SIGSEGV


def test_hipt_prep_pool_names_the_fatal_error_and_skips_on_rerun(tmp_path):
    """With a pool the worker dies, the run goes on; its failure now says what killed it and,
    as inline, the rerun does not read that slide again. Plant: ``_lost_item`` without its crash
    record -> the error lacks "Segmentation fault", fails."""
    slides, out = _cohort(tmp_path), tmp_path / "out"
    argv = ["regions", "--workers", "2", "--slides", slides, "--out", out, "--region", SIZE, "--no-progress"]
    first = _run(tmp_path, "prep", argv)
    assert first.returncode == 1, first.stderr[-2000:]
    items = json.loads((out / "manifest.json").read_text())["items"]
    assert items["a"]["status"] == "done"
    assert "worker process died" in items["crash"]["error"] and "Segmentation fault" in items["crash"]["error"]
    second = _run(tmp_path, "prep", argv)
    assert second.returncode == 1
    assert "Not read again" in json.loads((out / "manifest.json").read_text())["items"]["crash"]["error"]


def test_hipt_extract_direct_rerun_skips_the_slide_that_crashed_the_reader(tmp_path):
    """hipt-extract --slides reads regions in reader threads of its main process: a segfault in
    one ends the run. The rerun reports that slide failed (exit 1) and keeps the other's bag.
    Plant: ``_extract_slides`` without the ``crash_record.earlier`` check -> the rerun dies with
    -11, fails."""
    from data_prep.runner import prepare_coords

    slides = _cohort(tmp_path)
    prepare_coords(str(slides), str(tmp_path / "prep"), region_px=SIZE, min_tissue_fraction=0.5)
    out = tmp_path / "emb"
    argv = ["--random-init", "tiny", "--slides", slides, "--coords", tmp_path / "prep", "--size", SIZE,
            "--out", out, "--no-progress"]
    first = _run(tmp_path, "extract", argv)
    assert first.returncode == -signal.SIGSEGV, first.stderr[-2000:]
    assert (out / "slides").is_dir() and any(p.name.startswith("a.") for p in (out / "slides").iterdir())
    second = _run(tmp_path, "extract", argv)
    assert second.returncode == 1, second.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slides"]["a"]["status"] == "done"
    error = manifest["slides"]["crash"]["error"]
    assert str(slides / "crash.svs") in error and "crashed" in error and "crash.crash" in error


# --- the record itself, without a crash -------------------------------------------------------

def test_record_is_removed_when_the_item_ends_in_python(tmp_path):
    """Done or raising (a SlideError, Ctrl-C), nothing is left to blame the slide on the rerun."""
    with crash_record.watch(str(tmp_path), "s1", {"name": "s1.svs", "bytes": 3}):
        assert os.path.exists(crash_record.record_path(str(tmp_path), "s1"))
    with pytest.raises(KeyboardInterrupt), crash_record.watch(str(tmp_path), "s2"):
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def _write(tmp_path, item, source, body):
    path = crash_record.record_path(str(tmp_path), item)
    with open(path, "w") as f:
        f.write(json.dumps({"item": item, "source": source, "pid": 1}) + "\n" + body)
    return path


IN_READER = """Fatal Python error: Segmentation fault

Thread 0x00007f0000000001 (most recent call first):
  File "/x/hipt_jax/extraction.py", line 660 in embed_slide_direct

Current thread 0x00007f0000000002 (most recent call first):
  File "/venv/lib/python3.11/site-packages/openslide/lowlevel.py", line 310 in read_region
  File "/x/data_prep/slide_io.py", line 200 in read_region_geometry

Extension modules: numpy (total: 1)
"""


def test_what_an_earlier_record_says(tmp_path):
    """Only a fatal error in the reader blames the slide; a kill (no error), a crash elsewhere and
    a record of another file (the slide was replaced) do not. Plant: blaming any fatal error ->
    the crash-in-the-model case fails."""
    src = {"name": "s.svs", "bytes": 10}
    _write(tmp_path, "s", src, IN_READER)
    crash = crash_record.earlier(str(tmp_path), "s", src)
    assert crash.blames_slide and crash.fatal == "Fatal Python error: Segmentation fault"
    assert "openslide/lowlevel.py" in crash.where

    _write(tmp_path, "killed", src, "")  # kill -9 / OOM: only the header was written
    crash = crash_record.earlier(str(tmp_path), "killed", src)
    assert crash.fatal is None and not crash.blames_slide and "killed" in crash_record.retrying("k", crash)

    elsewhere = IN_READER.replace("openslide/lowlevel.py", "jax/_src/pjit.py").replace("data_prep/slide_io.py",
                                                                                      "hipt_jax/models/vit.py")
    _write(tmp_path, "model", src, elsewhere)
    assert not crash_record.earlier(str(tmp_path), "model", src).blames_slide

    path = _write(tmp_path, "replaced", src, IN_READER)
    assert crash_record.earlier(str(tmp_path), "replaced", {"name": "s.svs", "bytes": 11}) is None
    assert not os.path.exists(path)  # dropped: the new file is read
    assert crash_record.earlier(str(tmp_path), "never", src) is None


def test_a_record_shared_by_threads_blames_no_slide(tmp_path):
    """Beam's multi-threaded runner reads several slides at once in one process, and
    faulthandler has one file: a crash while another item was read too cannot say whose slide
    it was, so it is read again, not blamed on the record's item. Plants: watch without the
    shared mark, or ``earlier`` ignoring it -> the crash is blamed on "a", fails."""
    import threading

    src = {"name": "a.svs", "bytes": 1}
    inside, release = threading.Event(), threading.Event()

    def first():
        with crash_record.watch(str(tmp_path), "a", src):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    inside.wait(10)
    with crash_record.watch(str(tmp_path), "b", src):  # meanwhile, in another thread
        record = crash_record.record_path(str(tmp_path), "a")
        assert not os.path.exists(crash_record.record_path(str(tmp_path), "b"))
        with open(record) as f:
            text = f.read()
    release.set()
    t.join()
    assert "b was read in this process too" in text
    # The crash that record would have caught, dumped below the shared mark:
    _write(tmp_path, "a", src, text.partition("\n")[2] + IN_READER)
    crash = crash_record.earlier(str(tmp_path), "a", src)
    assert crash.fatal and not crash.blames_slide
    assert not os.listdir(tmp_path) or os.listdir(tmp_path) == ["a.crash"]
