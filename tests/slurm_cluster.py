"""A real one-node SLURM cluster on localhost, for tests and scripts.

    with start_cluster() as cluster:            # plain context manager (scripts)
        job = cluster.sbatch("#!/bin/bash\\nsrun hostname\\n", ntasks=2, wait=True)

    def test_x(slurm_cluster): ...              # session-scoped pytest fixture

What it does: installs the Debian packages ``slurm-wlm`` and ``munge`` with apt-get when the
daemons are missing, writes a fresh munge key and a minimal ``slurm.conf`` into a temporary
directory (one node named after this machine's hostname, address 127.0.0.1, 2 CPUs, process
tracking through /proc, no cgroups, no accounting, every state/spool/log file in the temporary
directory, free TCP ports), starts ``munged``, ``slurmctld`` and ``slurmd`` as child processes,
waits until ``sinfo`` reports the node idle and hands back a ``SlurmCluster`` whose ``env`` runs
the SLURM client commands (sbatch, srun, squeue, scancel, scontrol) against it. On exit every
job is cancelled, the daemons are stopped and the directory is removed, also when the body failed.

Needs root (the daemons run as root, jobs run as root). ``SlurmUnavailable`` is raised (and the
fixture skips) only when the packages are missing and cannot be installed; a cluster that does
not come up is an error, with the daemon logs in the message.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pytest

_DAEMONS = ("munged", "slurmctld", "slurmd")
_CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
_PACKAGES = ("slurm-wlm", "munge")
_INSTALL_TIMEOUT = 900
_START_TIMEOUT = 60.0
_installed: Optional[bool] = None  # apt-get runs at most once per Python process


class SlurmUnavailable(RuntimeError):
    """The SLURM/munge packages are missing and could not be installed."""


# ---------------------------------------------------------------- packages

def _missing_programs() -> list[str]:
    return [p for p in _DAEMONS + _CLIENTS if _which(p) is None]


def _which(program: str) -> Optional[str]:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")


def _apt_get(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=300", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=_INSTALL_TIMEOUT)


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt-get when a daemon or client is missing."""
    global _installed
    missing = _missing_programs()
    if not missing:
        return
    if _installed is False:
        raise SlurmUnavailable(f"tests/slurm_cluster.py: {', '.join(missing)} missing and apt-get failed before")
    _installed = False
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SlurmUnavailable(f"tests/slurm_cluster.py: {', '.join(missing)} missing; "
                               f"install {' '.join(_PACKAGES)} (needs apt-get as root)")
    for args in (("update",), ("install", "-y", "--no-install-recommends", *_PACKAGES)):
        try:
            res = _apt_get(*args)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"tests/slurm_cluster.py: apt-get {args[0]} timed out") from None
        if res.returncode != 0:
            last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SlurmUnavailable(f"tests/slurm_cluster.py: apt-get {args[0]} failed: {last[0]}")
    if _missing_programs():
        raise SlurmUnavailable(f"tests/slurm_cluster.py: still missing after install: {_missing_programs()}")
    _installed = True


# ---------------------------------------------------------------- configuration

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: str, node: str, cpus: int, ctld_port: int, slurmd_port: int, user: str) -> str:
    """The text of a minimal one-node slurm.conf whose files all live under ``root``."""
    return f"""\
ClusterName=hiptci
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
# 0: finished jobs stay visible to scontrol, and `sbatch --wait` polls every 2 s (it backs off
# to 32 s between polls when MinJobAge is large).
MinJobAge=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _write_munge_key(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))


def client_env(conf: str) -> dict[str, str]:
    """This process's environment without any outer job's SLURM_* variables, pointed at ``conf``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    sbin = "/usr/sbin:/sbin"
    env["PATH"] = f"{env.get('PATH', '/usr/bin:/bin')}:{sbin}"
    env["SLURM_CONF"] = conf
    return env


# ---------------------------------------------------------------- the running cluster

@dataclass
class Job:
    job_id: int
    returncode: Optional[int]  # of `sbatch` (with wait=True: the job's exit code)
    output: str  # path of the job's stdout/stderr file


@dataclass
class SlurmCluster:
    root: str  # temporary directory with slurm.conf, munge key, state, spool and logs
    node: str  # the node's name (this machine's hostname)
    conf: str  # path of slurm.conf
    env: dict[str, str] = field(repr=False)  # environment for SLURM client commands
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``cluster.run("squeue", "-h")``) against this cluster."""
        res = subprocess.run(list(cmd), env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"tests/slurm_cluster.py: {' '.join(cmd)} exited {res.returncode}: "
                               f"{res.stderr.strip()}")
        return res

    def sbatch(self, script: str, *args: str, ntasks: int = 1, wait: bool = False, workdir: str,
               timeout: float = 120, env: Optional[dict[str, str]] = None,
               options: tuple[str, ...] = ()) -> Job:
        """Submit ``script`` (its text) with ``args``; ``wait`` blocks until the job ended.
        ``options`` are extra sbatch options (they override the script's #SBATCH lines)."""
        path = os.path.join(workdir, f"job-{time.monotonic_ns()}.sh")
        with open(path, "w") as f:
            f.write(script)
        output = os.path.join(workdir, "slurm-%j.out")
        cmd = ["sbatch", "--parsable", f"--ntasks={ntasks}", "--time=10", f"--chdir={workdir}",
               f"--output={output}", *options, *(["--wait"] if wait else []), path, *args]
        try:
            res = subprocess.run(cmd, env=env or self.env, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            queue = self.run("squeue", "-h", "-o", "%i %T %r", check=False).stdout.strip()
            raise RuntimeError(f"tests/slurm_cluster.py: sbatch did not return in {timeout:.0f} s "
                               f"(queue: {queue or 'empty'})") from None
        match = re.match(r"(\d+)", res.stdout.strip())
        if not match:
            raise RuntimeError(f"tests/slurm_cluster.py: sbatch gave no job id: {res.stderr.strip()}")
        job_id = int(match.group(1))
        return Job(job_id, res.returncode, output.replace("%j", str(job_id)))

    def job_state(self, job_id: int) -> str:
        """RUNNING, PENDING, COMPLETED, CANCELLED, FAILED ..., or PURGED when the controller no
        longer knows the job (MinJobAge=0 should keep finished jobs, but a cancelled job's record
        was seen to vanish once under load: "Invalid job id specified")."""
        res = self.run("scontrol", "show", "job", str(job_id), check=False)
        if res.returncode != 0 and "Invalid job id" in res.stderr:
            return "PURGED"
        if res.returncode != 0:
            raise RuntimeError(f"tests/slurm_cluster.py: scontrol show job {job_id} exited {res.returncode}: "
                               f"{res.stderr.strip()}")
        out = res.stdout
        match = re.search(r"JobState=(\S+)", out)
        if not match:
            raise RuntimeError(f"tests/slurm_cluster.py: no JobState for job {job_id}: {out[:200]}")
        return match.group(1)

    def wait_for_state(self, job_id: int, states: tuple[str, ...], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states or time.monotonic() > deadline:
                return state
            time.sleep(0.2)

    def node_state(self) -> str:
        res = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False, timeout=20)
        return res.stdout.strip() if res.returncode == 0 else f"unreachable ({res.stderr.strip()})"

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            with open(os.path.join(self.root, "log", name), errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
            parts.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(parts)


def _die_with_parent() -> None:
    """In the daemon, before exec: get SIGTERM when the starting process dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _start_daemon(cluster: SlurmCluster, name: str, cmd: list[str]) -> None:
    log = open(os.path.join(cluster.root, "log", f"{name}.out"), "w")
    with log:  # the child keeps its own copy of the descriptor
        cluster.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                               stderr=subprocess.STDOUT, env=cluster.env,
                                               start_new_session=True, preexec_fn=_die_with_parent)


def _check_alive(cluster: SlurmCluster) -> None:
    dead = {n: p.returncode for n, p in cluster.procs.items() if p.poll() is not None}
    if dead:
        raise RuntimeError(f"tests/slurm_cluster.py: daemon exited early {dead}\n{cluster.logs()}")


def _wait_for_munge(cluster: SlurmCluster, timeout: float = 20) -> None:
    socket_path = os.path.join(cluster.root, "munge", "munge.socket")
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket_path):
        _check_alive(cluster)
        if time.monotonic() > deadline:
            raise RuntimeError(f"tests/slurm_cluster.py: munged made no socket in {timeout:.0f} s\n"
                               f"{cluster.logs()}")
        time.sleep(0.1)


def _wait_for_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = "?"
    while True:
        _check_alive(cluster)
        state = cluster.node_state()
        if state == "idle":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"tests/slurm_cluster.py: node {cluster.node} not idle after "
                               f"{timeout:.0f} s (state {state})\n{cluster.logs()}")
        time.sleep(0.3)


def _cancel_all_jobs(cluster: SlurmCluster, timeout: float = 30) -> None:
    """scancel every job and wait until none is left (a job's slurmstepd outlives slurmd)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = cluster.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
        jobs = res.stdout.split()
        if res.returncode != 0 or not jobs:
            return
        cluster.run("scancel", *jobs, check=False, timeout=20)
        time.sleep(0.3)


def _stop(cluster: SlurmCluster) -> None:
    for name in reversed(list(cluster.procs)):  # slurmd, slurmctld, then munged
        proc = cluster.procs[name]
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def start_cluster(cpus: int = 2, timeout: float = _START_TIMEOUT) -> Iterator[SlurmCluster]:
    """Install if needed, start munged + slurmctld + slurmd, yield the cluster, tear it all down."""
    ensure_installed()
    import pwd

    root = tempfile.mkdtemp(prefix="hipt-slurm-")
    os.chmod(root, 0o711)  # jobs and munge clients traverse it; nothing in it is world-readable
    node = socket.gethostname().split(".")[0]
    conf = os.path.join(root, "slurm.conf")
    cluster = SlurmCluster(root=root, node=node, conf=conf, env=client_env(conf))
    try:
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(root, sub), mode=0o711)
        _write_munge_key(os.path.join(root, "munge", "munge.key"))
        with open(conf, "w") as f:
            f.write(slurm_conf(root, node, cpus, free_port(), free_port(), pwd.getpwuid(os.geteuid()).pw_name))
        m = os.path.join(root, "munge")
        _start_daemon(cluster, "munged", [_which("munged"), "--foreground", "--force",
                                          f"--key-file={m}/munge.key", f"--socket={m}/munge.socket",
                                          f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                                          f"--log-file={root}/log/munged.log"])
        _wait_for_munge(cluster)
        _start_daemon(cluster, "slurmctld", [_which("slurmctld"), "-D", "-i", "-f", conf])
        _start_daemon(cluster, "slurmd", [_which("slurmd"), "-D", "-N", node, "-f", conf])
        _wait_for_idle(cluster, timeout)
        yield cluster
    finally:
        try:
            if cluster.procs.get("slurmctld") is not None and cluster.procs["slurmctld"].poll() is None:
                _cancel_all_jobs(cluster)
        finally:
            _stop(cluster)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The running one-node cluster; skips only when SLURM/munge cannot be installed."""
    try:
        ensure_installed()
    except SlurmUnavailable as err:
        pytest.skip(str(err))
    with start_cluster() as cluster:
        yield cluster
