"""The Apache Beam path (DirectRunner) writes exactly the records of the process-pool path."""
import glob
import json
import os

import pytest

from hipt_jax.cli.prep import main
from tests.fixtures_slides import REGION, synthetic_slides  # noqa: F401  (fixture)

pytest.importorskip("apache_beam")


def _records(out, kind):
    from array_record.python import array_record_module

    recs = {}
    for p in sorted(glob.glob(os.path.join(out, kind, "*.array_record"))):
        r = array_record_module.ArrayRecordReader(p)
        recs[os.path.basename(p)] = r.read(list(range(r.num_records())))
        r.close()
    return recs


@pytest.fixture(scope="module")
def pool_regions(synthetic_slides, tmp_path_factory):  # noqa: F811
    """(hipt-prep regions flags, its process-pool output folder): 3 slides and a broken one."""
    root = tmp_path_factory.mktemp("beam")
    slides = root / "slides"
    slides.mkdir()
    for p in synthetic_slides.values():
        os.symlink(p, slides / os.path.basename(p))
    (slides / "broken.svs").write_text("not a slide")
    common = ["--slides", str(slides), "--region", str(REGION)]
    pool_out = str(root / "pool")
    assert main(["regions", *common, "--out", pool_out, "--workers", "2"]) == 1
    return common, pool_out


def test_beam_direct_runner_equals_pool(pool_regions, tmp_path):
    common, pool_out = pool_regions
    beam_out = str(tmp_path / "beam")
    # Extra flags go to Beam's PipelineOptions untouched.
    assert main(["regions", *common, "--out", beam_out, "--runner", "DirectRunner",
                 "--direct_num_workers", "1"]) == 1
    pool, beam = _records(pool_out, "regions"), _records(beam_out, "regions")
    assert set(pool) == {"s20.array_record", "s40.array_record", "s40l.array_record"}
    assert pool == beam  # record for record, byte for byte
    for out in (pool_out, beam_out):
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        assert m["counts"] == {"done": 3, "failed": 1}
        assert "not a slide format" in m["items"]["broken"]["error"]

    # Patches through Beam too.
    assert main(["patches", "--regions", pool_out, "--out", str(tmp_path / "pp"), "--workers", "1"]) == 0
    assert main(["patches", "--regions", pool_out, "--out", str(tmp_path / "pb"),
                 "--runner", "DirectRunner"]) == 0
    assert _records(str(tmp_path / "pp"), "patches") == _records(str(tmp_path / "pb"), "patches")


def test_beam_multi_processing_two_workers_equals_pool(pool_regions, tmp_path):
    """The DirectRunner with 2 worker processes (each slide pickled to a separate SDK worker
    process) writes the pool's records. Plant: the Beam step skips slides outside the submitting
    process (pid check) -> no shards, this test fails while the in-process DirectRunner test passes."""
    common, pool_out = pool_regions
    beam_out = str(tmp_path / "beam_mp")
    assert main(["regions", *common, "--out", beam_out, "--runner", "DirectRunner",
                 "--direct_running_mode=multi_processing", "--direct_num_workers=2"]) == 1
    pool, beam = _records(pool_out, "regions"), _records(beam_out, "regions")
    assert len(pool) == 3 and pool == beam  # record for record, byte for byte
    with open(os.path.join(beam_out, "manifest.json")) as f:
        m = json.load(f)
    assert m["counts"] == {"done": 3, "failed": 1}


def test_pool_only_flags_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(["regions", "--slides", str(tmp_path), "--out", str(tmp_path / "o"), "--bogus_flag", "1"])
    # --workers with a Beam runner was ignored without a word (plant: no check -> no SystemExit)
    with pytest.raises(SystemExit):
        main(["regions", "--slides", str(tmp_path), "--out", str(tmp_path / "o"), "--runner", "DirectRunner",
              "--workers", "2"])


def test_a_flag_beam_does_not_know_is_refused_before_anything_is_written(tmp_path, capsys):
    """Beam only logs "Discarding unparseable args" and runs on its defaults: a mistyped
    --direct_num_worker=2 ran one worker with exit 0. Refused, with Beam's nearest option, on the
    command line (exit 2) and from Python (InputError), before the output folder exists.
    Plant: check_beam_args returns at once -> the run goes ahead (exit 1: the broken slide)."""
    from data_prep.runner import InputError, prepare_regions

    slides, out = tmp_path / "slides", tmp_path / "o"
    slides.mkdir()
    (slides / "a.svs").write_text("not a slide")  # found: the check must come before the slide's run
    with pytest.raises(SystemExit) as e:
        main(["regions", "--slides", str(slides), "--out", str(out), "--runner", "DirectRunner",
              "--direct_num_worker=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--direct_num_worker (did you mean --direct_num_workers?)" in err, err
    assert not out.exists()
    with pytest.raises(InputError, match="--no_such_beam_flag"):
        prepare_regions(str(slides), str(out), runner="DirectRunner",
                        beam_args=["--direct_num_workers", "1", "--no_such_beam_flag", "3"])
    assert not out.exists()


def _stopped_by_sigterm(item):
    from hipt_jax.interrupts import Terminated

    raise Terminated()


def test_a_stop_inside_a_beam_step_is_the_stop_itself(capfd, caplog):
    """SIGTERM / Ctrl-C inside the DoFn: Beam logged a 170-line traceback and re-raised it as a
    RuntimeError, so the CLI ended with that traceback and exit 1 instead of its one line and
    143/130. run_beam raises the stop itself (hipt_jax.cli.flags.run_command's path), Beam's log
    of it silenced. Plants: no stop_inside unwrapping -> RuntimeError; no log filter -> Beam's
    record with the traceback: each fails."""
    from data_prep.runner import run_beam
    from hipt_jax.interrupts import Terminated

    with pytest.raises(Terminated):
        run_beam(_stopped_by_sigterm, [1], (), "DirectRunner", [])
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_multi_processing_stop_is_prompt_and_kills_its_workers():
    """The multi_processing DirectRunner blocks the main thread in its job service: a SIGTERM sat
    there until the watchdog ended the run 130 s later, its SDK workers alive. _run_stoppable runs
    the pipeline in a thread, so the stop is raised at once, and kills the processes the run
    started (here: a child standing in for an SDK worker). Plant: no kill -> the child lives: fails."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from data_prep.runner import _run_stoppable

    children = []

    def pipeline():  # starts a "worker" and blocks, as the job service does
        children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        children[0].wait()

    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _run_stoppable(pipeline)
    assert time.monotonic() - start < 5
    assert children[0].wait(timeout=5) == -signal.SIGKILL


def test_beam_is_imported_without_its_bigquery_note():
    """Importing Beam logged "apitools not found, and bigquery client libraries are not
    available..." on every Beam run of hipt-prep (BigQuery is never used). A fresh process (this
    one imported Beam at collection). Plant: _import_beam without its filter -> the line is back."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", "from data_prep.runner import unknown_beam_args; "
                          "print(unknown_beam_args(['--direct_num_workers=1', '--bogus']))"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "['--bogus']"
    assert "apitools" not in res.stderr, res.stderr
