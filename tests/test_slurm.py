"""The real scheduler (a one-node SLURM cluster started by tests/slurm_cluster.py): 2-task jobs see
the scheduler's variables, 2 JAX processes under srun find each other and reduce across
processes, and scancel ends a running job."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

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
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
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


@pytest.mark.parametrize("mode", sorted(_LAUNCH))
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
        assert slurm_cluster.wait_for_state(job_id, ("CANCELLED",), timeout=20) == "CANCELLED"
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
