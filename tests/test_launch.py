"""Launch scripts: the local multi-process launcher runs a 2-process runlocal pretraining; the
SLURM and TPU scripts parse and wire the environment as documented."""
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
REAL_SLIDE = os.path.join(ROOT, "data_prep", "testdata", "cmu_small_region.svs")


@pytest.fixture(scope="module")
def png_patches(tmp_path_factory):
    """8 real-tissue 256 px PNG patches (the reference's stage-1 input format)."""
    import openslide

    folder = tmp_path_factory.mktemp("patches")
    slide = openslide.OpenSlide(REAL_SLIDE)
    for i in range(8):
        rgb = np.asarray(slide.read_region((600 + 128 * i, 1700), 0, (256, 256)))[:, :, :3]
        Image.fromarray(np.ascontiguousarray(rgb)).save(folder / f"p{i}.png")
    return str(folder)


def _pretrain_cmd(workdir, patches):
    return [sys.executable, "-m", "hipt_jax.pretrain", "--config",
            os.path.join(ROOT, "configs", "pretrain_vit256.py") + ":runlocal", "--workdir", str(workdir),
            f"--config.data.path={patches}", "--config.total_steps=4", "--config.checkpoint.every_steps=4"]


def _launch(args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(LAUNCH, "local_multiprocess.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def _losses(text, prefix=""):
    return [float(m) for m in re.findall(rf"^{re.escape(prefix)}step\s+\d+/\d+\s+loss ([-\d.naninf]+)", text, re.M)]


@pytest.mark.slow  # two JAX processes also start under srun in test_slurm (fast) and match one process in the slow tests
def test_two_process_runlocal_pretraining(png_patches, tmp_path):
    res = _launch(["-n", "2", "--devices-per-process", "1", "--timeout", "500", "--",
                   *_pretrain_cmd(tmp_path / "run", png_patches)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    # Both ranks joined one gloo group; process 0 logged every step with a finite loss.
    assert "[1] [Gloo] Rank 1 is connected to 1 peer ranks" in res.stdout
    losses = _losses(res.stdout, "[0] ")
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert _losses(res.stdout, "[1] ") == []  # only process 0 logs
    from hipt_jax.models.checkpoint import load_backbone

    variables, config = load_backbone(str(tmp_path / "run" / "export"), expect_arch="vit256")
    assert config.depth == 2 and "cls_token" in variables["params"]


@pytest.mark.slow
def test_two_processes_equal_one_process_two_devices(png_patches, tmp_path):
    res2 = _launch(["-n", "2", "--devices-per-process", "1", "--", *_pretrain_cmd(tmp_path / "a", png_patches)])
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    res1 = subprocess.run(_pretrain_cmd(tmp_path / "b", png_patches), capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert res2.returncode == 0 and res1.returncode == 0, res1.stderr[-2000:]
    np.testing.assert_allclose(_losses(res2.stdout, "[0] "), _losses(res1.stdout), atol=2e-4)


def test_launcher_propagates_failure_and_stops_peers(tmp_path):
    # Rank 1 fails only once rank 2 has printed (a file says so): under load rank 2 could start
    # after rank 1 had already failed and been stopped before its line (seen in a full run).
    ready = str(tmp_path / "rank2-printed")
    code = ("import os, sys, time\n"
            "rank = int(os.environ['JAX_PROCESS_ID'])\n"
            "assert os.environ['JAX_NUM_PROCESSES'] == '3'\n"
            "assert os.environ['JAX_COORDINATOR_ADDRESS'].startswith('127.0.0.1:')\n"
            "print('hello', rank, flush=True)\n"
            f"open({ready!r}, 'w').close() if rank == 2 else None\n"
            f"deadline = time.time() + 50\n"
            f"while rank == 1 and not os.path.exists({ready!r}) and time.time() < deadline: time.sleep(0.05)\n"
            "sys.exit(7) if rank == 1 else time.sleep(120)\n")
    res = _launch(["-n", "3", "--", sys.executable, "-c", code], timeout=60)
    assert res.returncode == 7
    assert "[1] hello 1" in res.stdout and "[2] hello 2" in res.stdout
    res = _launch(["-n", "2"], timeout=60)
    assert res.returncode == 2 and "after --" in res.stderr


def test_an_error_in_one_process_ends_the_run_without_the_shutdown_barrier():
    """Process 1 fails (bad input) while process 0 waits for it in a collective. Without
    hipt_jax.cli.flags._exit_if_peers_hang process 1 would sit in jax.distributed's shutdown
    barrier for its 5-minute timeout (process 0 never arrives) and the job would hang that long:
    the run must end within seconds, with process 1's error and exit code."""
    code = ("import sys\n"
            "from hipt_jax import distributed\n"
            "from hipt_jax.cli import flags\n"
            "flags.PEER_EXIT_GRACE_S = 2.0\n"
            "def main():\n"
            "    distributed.initialize()\n"
            "    import jax\n"
            "    from jax.experimental import multihost_utils\n"
            "    multihost_utils.process_allgather(jax.numpy.ones(1))  # both: the gloo group is up\n"
            "    if jax.process_index() == 1:\n"
            "        raise ValueError('feats/region2.npy: cannot read features')\n"
            "    multihost_utils.process_allgather(jax.numpy.ones(1))  # a gloo all-gather, never joined\n"
            "    return 0\n"
            "sys.exit(flags.run_command('t', main, devices_at_start=False))\n")
    res = _launch(["-n", "2", "--", sys.executable, "-c", code], timeout=60)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "[1] t: error: feats/region2.npy: cannot read features" in res.stdout + res.stderr
    assert "exiting now" in res.stdout + res.stderr


def _stub(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("mode", ["per_gpu", "per_host"])
def test_slurm_script_environment(tmp_path, mode):
    """Run the sbatch script with stub srun/scontrol/python: per_host must pass the coordinator
    explicitly and hide SLURM_LOCALID; per_gpu leaves detection to jax (SLURM variables)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", 'echo node-a; echo node-b\n')
    # srun stub: run the given command once as task 1 of 2 (drop srun's own options).
    _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                            'SLURM_PROCID=1 SLURM_NTASKS=2 SLURM_LOCALID=0 exec "$@"\n')
    _stub(bin_dir / "fakepython", 'echo "ARGS=$*"; echo "COORD=${JAX_COORDINATOR_ADDRESS:-}"; '
                                  'echo "PID=${JAX_PROCESS_ID:-}"; echo "LOCALID=${SLURM_LOCALID:-unset}"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", MODE=mode, PYTHON=str(bin_dir / "fakepython"),
               SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2", SLURM_JOB_ID="42")
    res = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "--config", "c.py", "--workdir", "w"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "ARGS=-m hipt_jax.pretrain --config c.py --workdir w" in res.stdout
    if mode == "per_host":
        assert "COORD=node-a:20042" in res.stdout and "PID=1" in res.stdout and "LOCALID=unset" in res.stdout
    else:
        assert "COORD=\n" in res.stdout and "LOCALID=0" in res.stdout


def test_tpu_script_usage(tmp_path):
    assert subprocess.run(["bash", "-n", os.path.join(LAUNCH, "tpu_pod.sh")]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "gcloud", 'echo "gcloud $*"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="t", ZONE="z")
    res = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "run", "--config", "configs/x.py",
                          "--workdir", "gs://b/r"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "tpu-vm ssh t --worker=all" in res.stdout and "hipt_jax.pretrain --config configs/x.py" in res.stdout
    res = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh")], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "usage" in res.stderr


# ---------------------------------------------------------------- tpu_pod.sh --dry-run
_SHELL_OPS = {">", ">>", "2>&1", "&&", "&", ";", "|", "||"}


def _documented_tpu_commands() -> list[list[str]]:
    """The `launch/tpu_pod.sh SUBCOMMAND ...` examples of the script's header, as argv lists."""
    import shlex

    lines, joined = [], ""
    with open(os.path.join(LAUNCH, "tpu_pod.sh")) as f:
        for line in f:
            if not line.startswith("#"):
                if lines or joined:
                    break
                continue
            text = line[1:].split("  #")[0].strip()
            joined += " " + text.rstrip("\\").strip()
            if not text.endswith("\\"):
                lines.append(joined.strip())
                joined = ""
    found = [shlex.split(l)[1:] for l in lines if l.startswith("launch/tpu_pod.sh ") and "..." not in l
             and "|" not in l]
    return found + [["logs"], ["ssh", "1"], ["stop"], ["delete"]]


def _project_invocations(printed: str) -> list[tuple[str, list[str]]]:
    """(module, args) of every `python -m hipt_jax...` inside the printed (and remote) commands."""
    import shlex

    found = []
    for line in printed.splitlines():
        words = shlex.split(line)
        words += [w for c in words if c.startswith("--command=") for w in shlex.split(c[len("--command="):])]
        for i, word in enumerate(words[:-1]):
            if word == "-m" and words[i + 1].startswith("hipt_jax"):
                args = []
                for w in words[i + 2:]:
                    if w in _SHELL_OPS:
                        break
                    args.append(w)
                found.append((words[i + 1], args))
    return found


def _check_flags(module: str, args: list[str]) -> None:
    """Parse ``args`` with the command's own parser (in a fresh process, from the checkout root
    as a TPU worker runs it); unknown flags or config fields fail."""
    if module in ("hipt_jax.pretrain", "hipt_jax.cli.pretrain"):
        code = ("import sys\nfrom absl import flags\nfrom hipt_jax.cli import pretrain\n"
                "pretrain.define_flags()\nflags.FLAGS(sys.argv)\nflags.FLAGS.config\n")
    elif module.startswith("hipt_jax.cli."):
        code = f"import sys\nfrom {module} import build_parser\nbuild_parser().parse_args(sys.argv[1:])\n"
    else:
        raise AssertionError(f"tpu_pod.sh runs {module}: no parser known to this test")
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"), timeout=120)
    assert res.returncode == 0, f"{module} {' '.join(args)}:\n{res.stderr[-1500:]}"


def test_tpu_script_dry_run_passes_only_existing_flags(tmp_path):
    """--dry-run prints every command and runs none (a gcloud/tar that fails is never called);
    each documented example's hipt_jax command parses with that command's own parser.
    Plant: --config.global_batchx=1024 in the header's run example -> the config parse fails;
    DRY_RUN ignored by tar -> the failing stub tar makes the setup example fail."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "tar"):
        _stub(bin_dir / tool, "echo CALLED >&2; exit 99\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="t", ZONE="z")
    examples = _documented_tpu_commands()
    assert {e[0] for e in examples} >= {"create", "setup", "mount", "run", "logs", "ssh", "stop", "delete"}
    invocations = []
    for example in examples:
        res = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", *example],
                             capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0 and "CALLED" not in res.stderr, (example, res.stderr)
        assert res.stdout.strip(), example
        assert all(line.split()[0] in ("gcloud", "tar") for line in res.stdout.splitlines()), res.stdout
        invocations += _project_invocations(res.stdout)
    run = [args for module, args in invocations if module == "hipt_jax.pretrain"]
    assert len(run) == 1 and "--config.global_batch=1024" in run[0], invocations
    for module, args in invocations:
        _check_flags(module, args)


def test_a_process_killed_by_a_signal_exits_128_plus_n():
    """A child killed by SIGKILL made the launcher sys.exit(-9): exit 247, an ordinary-looking
    failure code. Now 137 (128 + 9), as a shell reports it. Plant: return the raw returncode
    -> 247 (fails)."""
    code = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    res = _launch(["-n", "1", "--", sys.executable, "-c", code], timeout=60)
    assert res.returncode == 137 and "exit code 137" in res.stderr, (res.returncode, res.stderr)


def test_tpu_script_quotes_the_remote_folder_and_runs_the_chosen_module(tmp_path):
    """REMOTE_DIR went unquoted into the workers' command lines (a space split it), setup used
    one fixed /tmp/hipt-jax.tgz for every user and run, and only hipt_jax.pretrain could run.
    Now REMOTE_DIR is quoted like the run's arguments, the tarball name is per user and
    invocation, and MODULE picks the module (a non-hipt_jax one refused).
    Plants: $REMOTE_DIR instead of the quoted $RDIR -> "my" and "runs/hipt" split (fails); the
    fixed tarball name (fails)."""
    import shlex

    env = dict(os.environ, TPU_NAME="t", ZONE="z", REMOTE_DIR="my runs/hipt jax", MODULE="hipt_jax.cli.extract")

    def remote(*argv):
        res = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", *argv],
                             capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        lines = [shlex.split(line) for line in res.stdout.splitlines()]
        commands = [shlex.split(w[len("--command="):]) for words in lines for w in words if w.startswith("--command=")]
        return lines, commands

    _, [run] = remote("run", "--out", "a b")
    assert run[:2] == ["cd", "my runs/hipt jax"], run
    assert run[run.index("-m") + 1:run.index(">")] == ["hipt_jax.cli.extract", "--out", "a b"]
    assert run[run.index(">") + 1] == "extract.log"
    lines, [setup] = remote("setup")
    tarball = lines[0][lines[0].index("-czf") + 1]
    assert tarball != "/tmp/hipt-jax.tgz" and tarball.startswith("/tmp/hipt-jax-") and tarball.endswith(".tgz")
    assert f"t:{tarball}" in lines[1] and setup[:3] == ["mkdir", "-p", "my runs/hipt jax"], setup
    assert ["rm", "-f", tarball] == setup[setup.index("rm"):setup.index("rm") + 3]
    _, [logs] = remote("logs")
    assert logs == ["tail", "-f", "my runs/hipt jax/extract.log"]
    env["MODULE"] = "hipt_jax.pretrain; rm -rf ~"
    res = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "stop"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "not a hipt_jax module" in res.stderr and not res.stdout
