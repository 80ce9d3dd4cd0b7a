"""The real scheduler (a one-node SLURM cluster started by tests/slurm_cluster.py), in `make test`.

Scheduler basics: 2-task jobs see the scheduler's variables, 2 JAX processes under srun find each
other and reduce across processes, and scancel ends a running job.

launch/slurm_gpu.sbatch itself is submitted with ``sbatch``; only its GPU header is overridden
on the command line (1 node, 2 tasks, no GPUs). MODE=per_host: each task's JAX process id and
count come from SLURM_PROCID / SLURM_NTASKS and the coordinator from ``scontrol show hostnames``.
- stage-2 runlocal pretraining as 2 tasks exports what one process (one device) exports;
- preemption: scancel mid-run (the tasks are killed), resubmit the same job: the resumed steps'
  losses and the final export equal the uninterrupted 2-task job's, bit for bit;
- hipt-extract as 2 tasks writes the per-slide bags of a one-process run and a merged manifest.

Kept cheap: ONE uninterrupted 2-task run (module fixture) is both the "2 tasks == one process"
subject and the preemption test's reference; runs stop after 4 steps with a checkpoint every 2;
every job inherits the pytest worker's persistent XLA compilation cache (tests/conftest.py) with
no minimum compile time, so after the first job the others load their programs instead of
compiling them (test_jobs_share_the_compilation_cache); the one-process references run inside
the pytest process.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.slurm_cluster import free_port, slurm_cluster  # noqa: F401  (the session fixture)
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sed, not head: head exits early and a SIGPIPE to scontrol fails a `set -o pipefail` script.
_COORD = 'COORD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"'


def _job_output(job) -> str:
    with open(job.output) as f:
        return f.read()


def _batch(body: str) -> str:
    return "#!/bin/bash\nset -euo pipefail\n" + textwrap.dedent(body)


def test_two_tasks_see_scheduler_variables(slurm_cluster, tmp_path):  # noqa: F811
    script = _batch(f"""\
        {_COORD}
        srun "$@" -c "import os; print('TASK', os.environ['SLURM_PROCID'], os.environ['SLURM_NTASKS'], '$COORD')"
        """)
    job = slurm_cluster.sbatch(script, sys.executable, ntasks=2, wait=True, workdir=str(tmp_path))
    out = _job_output(job)
    assert job.returncode == 0, out
    tasks = re.findall(r"^TASK (\d+) (\d+) (\S+)$", out, re.M)
    assert sorted(t[0] for t in tasks) == ["0", "1"], out  # both tasks ran, distinct ids
    assert {t[1] for t in tasks} == {"2"} and {t[2] for t in tasks} == {slurm_cluster.node}


# Each task: start jax.distributed through the project's own entry point, then one cross-process
# allgather and one jit reduction over a global array with one row per process.
_JAX_TASK = textwrap.dedent("""\
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from hipt_jax import distributed
    assert distributed.initialize(), "not multi-process"
    rank = jax.process_index()
    gathered = multihost_utils.process_allgather(np.array([rank + 1.0], np.float32))  # (2, 1)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = np.full((1, 3), rank + 1.0, np.float32)  # (1, 3) rows of this process
    glob = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)  # (2, 3)
    total = jax.jit(lambda x: x.sum(axis=0), out_shardings=NamedSharding(mesh, P()))(glob)  # (3,)
    print("RESULT", rank, jax.process_count(), gathered.ravel().tolist(),
          np.asarray(total.addressable_data(0)).tolist(), flush=True)
    """)


def _jax_env(slurm_cluster):  # noqa: F811
    env = dict(slurm_cluster.env, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
    env["XLA_FLAGS"] = xla_flags(1)
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    return env


# explicit: the coordinator from scontrol, count and id from SLURM_NTASKS / SLURM_PROCID, and
# SLURM_LOCALID hidden so jax cannot fall back to reading SLURM itself (launch/slurm_gpu.sbatch
# MODE=per_host); slurm: jax reads the SLURM variables itself (MODE=per_gpu).
_LAUNCH = {
    "explicit": f"""\
        {_COORD}
        PORT=$((20000 + SLURM_JOB_ID % 20000))
        srun --kill-on-bad-exit=1 bash -c 'export JAX_COORDINATOR_ADDRESS='"$COORD:$PORT"' \\
            JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID; unset SLURM_LOCALID
            exec "$@"' _ "$@"
        """,
    "slurm": 'srun --kill-on-bad-exit=1 "$@"\n',
}


# explicit is slow-marked: it is launch/slurm_gpu.sbatch's MODE=per_host mechanism, which every
# 2-task job below uses (test_two_task_pretraining_equals_one_process checks the 2 processes
# joined one group and reduced across it); slurm (JAX reading SLURM itself) stays fast.
@pytest.mark.parametrize("mode", [pytest.param("explicit", marks=pytest.mark.slow), "slurm"])
def test_two_jax_processes_under_srun(slurm_cluster, tmp_path, mode):  # noqa: F811
    task = tmp_path / "task.py"
    task.write_text(_JAX_TASK)
    job = slurm_cluster.sbatch(_batch(_LAUNCH[mode]), sys.executable, str(task), ntasks=2, wait=True,
                               workdir=str(tmp_path), env=_jax_env(slurm_cluster), timeout=180)
    out = _job_output(job)
    assert job.returncode == 0, out[-3000:]
    results = sorted(re.findall(r"^RESULT (\d) (\d) (\[.*?\]) (\[.*?\])$", out, re.M))
    assert [r[:2] for r in results] == [("0", "2"), ("1", "2")], out[-3000:]
    for _, _, gathered, total in results:
        assert gathered == "[1.0, 2.0]" and total == "[3.0, 3.0, 3.0]"


def test_scancel_ends_running_job(slurm_cluster, tmp_path):  # noqa: F811
    """sbatch --wait returns non-zero once the job is cancelled, its processes are gone and the
    job's state is CANCELLED: what a preempted run looks like to the submitter."""
    pid_file = tmp_path / "pid"
    script = _batch(f"""\
        sleep 300 &
        echo $! > {pid_file}
        wait
        """)
    path = tmp_path / "sleep.sh"
    path.write_text(script)
    waiter = subprocess.Popen(["sbatch", "--wait", "--parsable", "--ntasks=1", "--time=5",
                               f"--output={tmp_path}/slurm-%j.out", str(path)], env=slurm_cluster.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        job_id = int(waiter.stdout.readline().strip())
        assert slurm_cluster.wait_for_state(job_id, ("RUNNING",)) == "RUNNING"
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        sleeper = int(pid_file.read_text())
        assert _alive(sleeper)
        slurm_cluster.run("scancel", str(job_id))
        assert waiter.wait(timeout=60) != 0
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    try:
        assert slurm_cluster.wait_for_state(job_id, ("CANCELLED", "PURGED"), timeout=20) in ("CANCELLED", "PURGED")
        assert _gone(sleeper, timeout=20), "the job's process outlived scancel"
    finally:
        if not _gone(sleeper, timeout=0):  # our own leftover: do not leak it into later tests
            os.kill(sleeper, signal.SIGKILL)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_failed_install_is_a_skip_reason(monkeypatch):
    """Missing daemons + a failing apt-get raise SlurmUnavailable (the fixture's skip), once."""
    from tests import slurm_cluster as mod

    calls = []
    monkeypatch.setattr(mod, "_missing_programs", lambda: ["munged"])
    monkeypatch.setattr(mod, "_installed", None)
    monkeypatch.setattr(mod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(mod.shutil, "which", lambda *a, **k: "/usr/bin/apt-get")
    monkeypatch.setattr(mod, "_apt_get", lambda *args: calls.append(args) or subprocess.CompletedProcess(
        args, 100, "", "E: Unable to locate package slurm-wlm"))
    with pytest.raises(mod.SlurmUnavailable, match="apt-get update failed: E: Unable to locate"):
        mod.ensure_installed()
    with pytest.raises(mod.SlurmUnavailable, match="apt-get failed before"):
        mod.ensure_installed()
    assert calls == [("update",)]  # apt-get is not retried within one session


# ------------------------------------------------------------ launch/slurm_gpu.sbatch jobs
SBATCH = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")
# The GPU header asks for 2 nodes x 8 GPUs; a CPU node takes 2 tasks and no GPU.
CPU_NODE = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1")
STOP = 4  # pretraining steps of every run (total_steps stays 1000: the schedules are the same)
EVERY = 2  # checkpoint cadence: a victim's first checkpoint (step 2) is mid-run
GLOO = "[Gloo] Rank 1 is connected to 1 peer ranks"  # the 2 processes formed one group


def _script() -> str:
    with open(SBATCH) as f:
        return f.read()


# The jobs' compilation cache and calibration folder, this module's own (set by _own_caches):
# what the jobs reuse must be what this module's jobs wrote, not what other tests of the same
# pytest worker left in its shared folders.
_JOB_DIRS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _own_caches(tmp_path_factory):
    _JOB_DIRS.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jobs-xla-cache")),
                     XDG_CACHE_HOME=str(tmp_path_factory.mktemp("jobs-xdg-cache")))
    yield
    _JOB_DIRS.clear()


def _clean_env(base: dict) -> dict:
    env = dict(base, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", **_JOB_DIRS)
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"):
        env.pop(key, None)
    # Every program goes to (and comes from) the worker's persistent cache, however small.
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _job_env(cluster, module: str) -> dict:
    env = _clean_env(cluster.env)
    # JAX_PORT: a free coordinator port (the script's default derives it from the job id, and
    # every fresh test cluster numbers its jobs from 1: two clusters on one machine would collide).
    env.update(PYTHON=sys.executable, MODE="per_host", TASKS_PER_HOST="2", MODULE=module,
               XLA_FLAGS=xla_flags(1), JAX_PORT=str(free_port()))
    return env


def _submit(cluster, module, args, workdir, wait=True, timeout=420):
    os.makedirs(workdir, exist_ok=True)
    return cluster.sbatch(_script(), *args, ntasks=2, wait=wait, workdir=str(workdir),
                          env=_job_env(cluster, module), options=CPU_NODE, timeout=timeout)


def _pretrain_args(workdir, feats, stop=STOP, workers=0):
    return ["--config", os.path.join(ROOT, "configs", "pretrain_vit4k.py") + ":runlocal",
            f"--workdir={workdir}", f"--config.data.path={feats}", "--config.total_steps=1000",
            f"--config.stop_at_step={stop}", f"--config.checkpoint.every_steps={EVERY}",
            f"--config.data.num_workers={workers}", "--config.checkpoint.keep=100"]


def _train_in_this_process(workdir, feats) -> None:
    """What _pretrain_args(workdir, feats) trains, run by the library in this (1-device) pytest
    process: no interpreter start, and the programs may already be in the worker's cache."""
    from configs.pretrain_vit4k import get_config
    from hipt_jax.pretrain import trainer

    config = get_config("runlocal")
    config.data.path, config.total_steps, config.stop_at_step = feats, 1000, STOP
    config.checkpoint.update(every_steps=EVERY, keep=100)
    config.data.num_workers = 0
    trainer.train(config, str(workdir))


def _export_params(workdir) -> dict:
    from hipt_jax.models.checkpoint import flatten, load

    loaded = load(os.path.join(str(workdir), "export"))
    assert loaded.meta["step"] == STOP
    return {k: np.asarray(v) for k, v in flatten(loaded.params).items()}


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _checkpoints(workdir) -> list[int]:
    folder = os.path.join(str(workdir), "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def _cache_entries() -> set:
    folder = _JOB_DIRS.get("JAX_COMPILATION_CACHE_DIR", "")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    """4 stage-2 inputs: [256, 384] ViT-256 feature grids (random numbers)."""
    folder = tmp_path_factory.mktemp("feats")
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(folder / f"region{i}.npy", rng.normal(size=(256, 384)).astype(np.float32))
    return str(folder)


@pytest.fixture(scope="module")
def two_task_run(slurm_cluster, feats, tmp_path_factory):  # noqa: F811
    """The uninterrupted 2-task pretraining job: (workdir, job output, compile-cache entries it added)."""
    workdir = tmp_path_factory.mktemp("pretrain2") / "run"
    before = _cache_entries()
    job = _submit(slurm_cluster, "hipt_jax.pretrain", _pretrain_args(workdir, feats), workdir.parent)
    out = _job_output(job)
    assert job.returncode == 0, out[-3000:]
    return workdir, out, _cache_entries() - before


def test_two_task_pretraining_equals_one_process(two_task_run, feats, tmp_path):
    """Plant: the script exports JAX_PROCESS_ID=0 instead of $SLURM_PROCID -> both tasks register
    as process 0, the coordinator aborts the job and the test fails. (Ignoring TASKS_PER_HOST is
    no plant on one node: srun warns and still starts the job's 2 tasks.)"""
    workdir, out, _ = two_task_run
    assert re.search(r"hipt_jax\.pretrain: 1 nodes, 2 tasks \(per_host\), coordinator \S+:\d+", out), out
    assert GLOO in out, out[-3000:]
    assert len(re.findall(rf"^step\s+{STOP - 1}/", out, re.M)) == 1, out[-3000:]  # process 0 logs, once
    _train_in_this_process(tmp_path / "one", feats)  # one process, one device, the same config
    two, one = _export_params(workdir), _export_params(tmp_path / "one")
    assert sorted(two) == sorted(one)
    for key in one:  # cross-process gradient sums (gloo) add in another order than one process's
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def preempted_run(slurm_cluster, feats, tmp_path_factory):  # noqa: F811
    """A job cancelled with scancel once it has a checkpoint, then resubmitted unchanged:
    (workdir, first checkpoint, resumed job's output, cache entries the resumed job added).

    The victim is set to run far past STOP, so it cannot finish before the cancel lands and the
    test has no race; its checkpoints after the first are removed (the state of a preemption
    right after the first checkpoint), so the resumed job always redoes STOP - EVERY steps.
    Both jobs load with a Grain worker process per task: its iterator state is part of the
    checkpoint (the uninterrupted reference loads in-process: the batches are the same)."""
    workdir = tmp_path_factory.mktemp("preempt") / "run"
    job = _submit(slurm_cluster, "hipt_jax.pretrain", _pretrain_args(workdir, feats, stop=1000, workers=1),
                  workdir.parent, wait=False)
    deadline, polled = time.monotonic() + 300, 0.0
    while not _checkpoints(workdir):  # watch the checkpoint folder, not the clock
        if time.monotonic() - polled > 1:
            state, polled = slurm_cluster.job_state(job.job_id), time.monotonic()
            assert state in ("PENDING", "RUNNING"), f"job {state} before its first checkpoint: {_job_output(job)[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    slurm_cluster.run("scancel", str(job.job_id))
    assert slurm_cluster.wait_for_state(job.job_id, ("CANCELLED", "PURGED"), timeout=60) in (
        "CANCELLED", "PURGED")  # PURGED: its record gone right after our scancel (it ran to step 1000)
    _wait_until_queue_empty(slurm_cluster)
    assert not os.path.exists(workdir / "export")
    first = _checkpoints(workdir)[0]
    assert first == EVERY, _checkpoints(workdir)
    for step in _checkpoints(workdir)[1:]:
        shutil.rmtree(os.path.join(str(workdir), "checkpoints", str(step)))

    before = _cache_entries()
    again = _submit(slurm_cluster, "hipt_jax.pretrain", _pretrain_args(workdir, feats, workers=1), workdir.parent)
    out = _job_output(again)
    assert again.returncode == 0, out[-3000:]
    return workdir, first, out, _cache_entries() - before


def test_scancel_then_resubmit_equals_uninterrupted(two_task_run, preempted_run):
    """Preemption as a cluster user meets it. scancel's SIGTERM does not stop the tasks (JAX's
    distributed runtime takes SIGTERM as a preemption notice), its SIGKILL KillWait (2 s) later
    does: a hard kill, like test_pretrain_run's SIGKILL test (slow-marked: this one keeps its
    checks fast). Checked: the resumed job restores the checkpoint, metrics.jsonl is cut back
    to it (no repeated step), TensorBoard events are written, the resumed steps' losses and the
    final export equal the uninterrupted job's exactly.
    Plants: the trainer restores the train state but not the data iterator's -> other batches,
    losses and export differ; _truncate_metrics keeps every line -> steps repeat; the trainer
    closes its loader with iterator.close() alone -> Python's resource tracker reports the last
    batches' shared memory as leaked at exit."""
    workdir, first, out, _ = preempted_run
    assert "leaked shared_memory" not in out, out[-3000:]
    assert re.search(rf"resumed from {re.escape(str(workdir))}/checkpoints/{first}\b", out), out[-3000:]
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == list(range(STOP))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir / "tensorboard"))
    reference = {r["step"]: r["loss"] for r in _metrics(two_task_run[0])}
    for r in rows:
        if r["step"] >= first:
            assert r["loss"] == reference[r["step"]], r
    resumed, uninterrupted = _export_params(workdir), _export_params(two_task_run[0])
    assert sorted(resumed) == sorted(uninterrupted)
    for key in uninterrupted:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)


def test_jobs_share_the_compilation_cache(two_task_run, preempted_run):
    """The srun'd tasks inherit JAX_COMPILATION_CACHE_DIR: the first job fills the cache with its
    update step, and the resumed job reuses it (it compiles only what a restore needs on top,
    e.g. Orbax's small restore programs, which a fresh run never compiles).
    Plant: _clean_env drops JAX_COMPILATION_CACHE_DIR -> the first job adds no entry."""
    assert _JOB_DIRS.get("JAX_COMPILATION_CACHE_DIR")
    first, resumed = two_task_run[2], preempted_run[3]
    assert any(e.startswith("jit_update-") for e in first), \
        f"the 2-task job cached no update step: {sorted(first)[:5]}"
    again = sorted(e for e in resumed if e.startswith("jit_update-"))
    assert not again, (f"the resumed job compiled its update step anew: {again}; the first job's: "
                       f"{sorted(e for e in first if e.startswith('jit_update-'))}; in the cache now: "
                       f"{sorted(e for e in _cache_entries() if e.startswith('jit_update-'))}")


def _wait_until_queue_empty(cluster, timeout=60):  # noqa: F811
    deadline = time.monotonic() + timeout
    while cluster.run("squeue", "-h", "-o", "%i").stdout.split():
        assert time.monotonic() < deadline, "cancelled job still in the queue"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 slides of 1, 2 and 1 tissue regions of 512 px (shared 2:1 by the 2 tasks)."""
    from tests.synthetic_cohort import tissue_crop, write_region_shard

    prep = str(tmp_path_factory.mktemp("cohort") / "prep")
    rng = np.random.default_rng(0)
    slide_ids = ["s0", "s1", "s2"]
    for sid, m in zip(slide_ids, (1, 2, 1)):
        write_region_shard(prep, sid, [tissue_crop(rng, 512) for _ in range(m)])
    return prep, slide_ids


@pytest.mark.slow  # `make test-cluster` / `make test-all`; in make test: the same 2-process extraction without
# the scheduler (test_extract_multiprocess) and the sbatch script's per_host tasks (the pretraining jobs above)
def test_two_task_extraction_equals_one_process(slurm_cluster, cohort, tmp_path, capsys):  # noqa: F811
    """The one-process reference runs in this (1-device) pytest process first, so the 2-task job
    loads its programs from the cache. Plant: every process takes the slides of process 0
    (slide_ids[0::count]) -> the other slides have no bag and the test fails. The manifest check
    needs the barrier before process 0 writes it (per-process status merged after a barrier)."""
    from data_prep import bags
    from hipt_jax.cli import extract

    prep, slide_ids = cohort
    args = ["--random-init", "tiny", "--shards", prep, "--no-progress"]
    assert extract.main([*args, "--out", str(tmp_path / "one")]) == 0
    total = int(re.search(r"^hipt-extract: (\d+) regions", capsys.readouterr().out, re.M).group(1))
    assert total == 4
    job = _submit(slurm_cluster, "hipt_jax.cli.extract", [*args, "--out", str(tmp_path / "two")], tmp_path)
    out = _job_output(job)
    assert job.returncode == 0, out[-3000:]
    assert "2 tasks (per_host)" in out, out[-3000:]
    # Each process embedded its own share (its status file): the shares add up to one process's
    # regions, and both processes print the merged total.
    status = os.path.join(str(tmp_path / "two"), "status")
    shares = [json.load(open(os.path.join(status, f)))["run"]["regions"] for f in sorted(os.listdir(status))]
    assert len(shares) == 2 and sum(shares) == total and min(shares) > 0, (shares, total)
    assert [int(n) for n in re.findall(r"^hipt-extract: (\d+) regions", out, re.M)] == [total, total]
    for sid in slide_ids:
        two, one = bags.read_bag(str(tmp_path / "two"), sid), bags.read_bag(str(tmp_path / "one"), sid)
        assert sorted(two) == sorted(one), sid
        for key in one:
            np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=f"{sid} {key}")
    with open(tmp_path / "two" / "manifest.json") as f:
        manifest = json.load(f)
    assert sorted(manifest["slides"]) == sorted(slide_ids)
    assert {s: v["status"] for s, v in manifest["slides"].items()} == {s: "done" for s in slide_ids}
