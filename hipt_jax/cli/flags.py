"""Flag groups shared by the console scripts, their deprecated spellings, and the exit codes.

Every command builds its parser with ``Parser`` and the ``add_*`` groups below, so a flag has
one name, one meaning and one help text everywhere:

    region      --target-mpp  --assume-mpp  --size (hipt-prep regions: --region)
                [--image --slide --x --y: the region a single-region command reads]
    model       --vit256  --vit4k  --random-init {none,tiny,full}  --seed
    compute     --compute-dtype  --batch-per-device  --patch-batch
    storage     --store-dtype
    progress    --no-progress

Old spellings still work for one release and print a deprecation line on stderr:
``--mpp`` (-> --target-mpp), ``--dtype`` (-> --compute-dtype in hipt-embed, --store-dtype in
hipt-prep features), a bare ``--random-init`` and ``--tiny`` (-> --random-init full|tiny),
``--batch`` (-> --batch-per-device).

Exit codes, the same for every command:
    0  everything succeeded
    1  some items (slides, shards, bags) failed; each is named, with its error, in the output
       manifest or results file and on stderr (also: a training run that diverged, a result
       file that could not be written, e.g. disk full: one line naming it, no partial copy of it)
    2  bad usage or bad input (unknown flag, invalid value, missing or unreadable input file,
       bad checkpoint): one line "PROG: error: ..." on stderr, no traceback
    130 / 143  stopped by Ctrl-C / SIGTERM (preemption): one line, finished outputs kept, the
       workdir lock released; rerunning the same command continues
Library exceptions are mapped to these codes in one place, ``run_command``; HIPT_DEBUG=1 in
the environment re-raises them with their traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
from typing import Callable, Iterator, Optional

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # Ctrl-C: one line, the work so far kept (128 + SIGINT, the shell's convention)
EXIT_TERMINATED = 143  # SIGTERM (a scheduler's preemption, `kill`): as Ctrl-C (128 + SIGTERM)
INTERRUPT_GRACE_S = 10.0  # after Ctrl-C, a process still busy in native code (compiling) is ended
EXIT_TIDY_S = 5.0  # a stopped run's last tidying (finalizers, child processes) before it ends
CLEANUP_GRACE_S = 120.0  # after a SIGTERM Python has seen: time for its cleanup (finishing a checkpoint)

RANDOM_INIT = ("none", "tiny", "full")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")  # = hipt_jax.models.precision.COMPUTE_DTYPES


class UsageError(ValueError):
    """A flag combination the parser cannot check by itself (exit 2)."""


# ------------------------------------------------------------------------------ exit codes
# The library exceptions that mean "bad input" (exit 2) and "the run failed" (exit 1): the one
# list of them. Looked up among the modules already imported (an exception cannot come from a
# module that was never loaded), so mapping an error imports nothing heavy.
INPUT_ERRORS = (
    ("data_prep.runner", "InputError"), ("data_prep.slide_io", "SlideError"),
    ("data_prep.shards", "ShardError"), ("data_prep.bags", "BagError"),
    ("hipt_jax.models.checkpoint", "CheckpointError"), ("hipt_jax.evaluation.cohort", "CohortError"),
    ("hipt_jax.extraction", "ExtractError"), ("hipt_jax.finetune.main", "FinetuneError"),
    ("hipt_jax.evaluation.tiles", "TileDatasetError"),
    ("hipt_jax.provenance", "ProvenanceError"), ("hipt_jax.workdir_lock", "LockedError"),
    ("hipt_jax.pretrain.trainer", "CheckpointRestoreError"),
)
FAILURE_ERRORS = (("hipt_jax.pretrain.trainer", "NonFiniteLossError"),  # training diverged
                  ("hipt_jax.outputs", "OutputWriteError"))  # disk full while writing results


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    found = (getattr(sys.modules.get(module), name, None) for module, name in names)
    return tuple(cls for cls in found if cls is not None)


def input_errors() -> tuple[type[BaseException], ...]:
    return (UsageError, ValueError, OSError) + _loaded(INPUT_ERRORS)


def failure_errors() -> tuple[type[BaseException], ...]:
    return _loaded(FAILURE_ERRORS)


# A full disk, a quota or a file size limit shows only when something is written, so never
# before the work started: a failed run (exit 1, its provenance record kept for the rerun that
# resumes), not bad input, even where no writer turned it into an OutputWriteError naming the file.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def one_line(error: BaseException | str) -> str:
    """An exception (or text) as one line: OSErrors as "FILE: reason", multi-line messages as
    their first and last lines (a config file's traceback ends with the actual error)."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def print_error(prog: str, error: BaseException | str) -> None:
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)


def _catch_sigterm() -> Callable[[], None]:
    """Route SIGTERM to hipt_jax.interrupts (raised as Terminated, the Ctrl-C path); returns what
    puts the previous handling back (nothing to do outside the main thread: no handler there)."""
    import threading

    from hipt_jax import interrupts

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    return interrupts.install()


def _stopped_line(prog: str, terminated: bool) -> str:
    what = "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"
    return f"{prog}: {what}; finished outputs are kept, rerun the same command to continue"


_RUNNING: list[str] = []  # the commands run_command is inside (the watchdog acts only then)


def _still_running_after(seconds: float) -> bool:
    """Wait up to ``seconds`` for the running command to return; True when it has not."""
    import time

    end = time.monotonic() + seconds
    while _RUNNING and time.monotonic() < end:
        time.sleep(0.05)
    return bool(_RUNNING)


def _interrupt_watchdog(prog: str) -> None:
    """Ctrl-C while the main thread is inside native code (XLA compiling, a long device call)
    reaches Python only when that call returns. CPython's C-level handler writes the signal
    number to the wakeup fd at once, so a thread reading it can end the process cleanly
    (one line, exit 130) when the main thread has not unwound within INTERRUPT_GRACE_S.
    Finished outputs are already on disk (every writer renames complete files into place)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or getattr(_interrupt_watchdog, "on", False):
        return
    try:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        return
    _interrupt_watchdog.on = True

    def watch() -> None:
        while True:
            data = os.read(read_fd, 64)
            if not data or (signal.SIGINT not in data and signal.SIGTERM not in data):
                continue
            # Only a signal that lands while a command runs is ours to enforce: the process may
            # be a Python session (a notebook, a test runner) that called a command earlier and
            # handles its own signals now.
            if not _RUNNING:
                continue
            terminated = signal.SIGTERM in data
            if not _still_running_after(INTERRUPT_GRACE_S):
                continue  # the command unwound and returned in time
            interrupts = sys.modules.get("hipt_jax.interrupts")
            if terminated and interrupts is not None and interrupts.requested():
                # Python has it: let the main thread finish its cleanup (a checkpoint in flight)
                if not _still_running_after(CLEANUP_GRACE_S):
                    continue
            lock = sys.modules.get("hipt_jax.workdir_lock")
            if lock is not None:  # os._exit skips the `finally` that releases it
                lock.release_held()
            print(_stopped_line(_RUNNING[-1] if _RUNNING else prog, terminated), file=sys.stderr, flush=True)
            os._exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)

    threading.Thread(target=watch, name="hipt-interrupt-watchdog", daemon=True).start()


# ------------------------------------------------------------------------------ devices
ACCELERATOR_HINT = ('pip install -e ".[cuda12]" (NVIDIA GPU) or -e ".[tpu]" (TPU VM); see the '
                    "README's installation section")


def visible_accelerators(dev: str = "/dev", which: Callable[[str], Optional[str]] = None) -> list[str]:
    """What the operating system shows of GPUs/TPUs, whatever JAX sees: ``nvidia-smi`` on PATH,
    NVIDIA device files (``/dev/nvidia0`` ...), TPU device files (``/dev/accel0`` ...)."""
    import glob
    import shutil

    found = []
    if (which or shutil.which)("nvidia-smi"):
        found.append("nvidia-smi on PATH")
    for pattern in ("nvidia[0-9]*", "accel*"):
        files = sorted(glob.glob(os.path.join(dev, pattern)))
        if files:
            found.append(", ".join(files[:2]) + (" ..." if len(files) > 2 else ""))
    return found


def report_devices(prog: str, *, visible: Optional[list[str]] = None) -> str:
    """At start-up: one line on stdout naming JAX's backend and device kinds, and a warning on
    stderr when the system shows an accelerator but JAX sees only CPUs (the CPU-only jaxlib
    installed on a GPU/TPU machine). Initializes JAX's backends: commands that start
    jax.distributed call this after it (``run_command(..., devices_at_start=False)``).
    Returns the backend name."""
    import collections
    import logging

    import jax

    # jax logs every platform it could not start at INFO ("Unable to initialize backend 'tpu'"),
    # which absl programs print: the line below says what JAX did find, and the warning after it
    # covers an accelerator that JAX missed.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    devices = jax.devices()
    backend = jax.default_backend()
    kinds = collections.Counter(d.device_kind for d in devices)
    listed = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
    where = f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""
    print(f"{prog}: JAX {jax.__version__}, backend {backend}: {listed}{where}", flush=True)
    chosen_cpu = os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"  # asked for, not missed
    visible = visible_accelerators() if visible is None else visible
    if backend == "cpu" and visible and not chosen_cpu:
        print(f"{prog}: warning: an accelerator is visible to the system ({'; '.join(visible)}) but JAX "
              f"sees only CPU devices: running on CPU. Install the accelerator build: {ACCELERATOR_HINT}",
              file=sys.stderr, flush=True)
    return backend


def run_command(prog: str, fn: Callable[[], int], *, devices_at_start: bool = True,
                exit_on_stop: bool = False) -> int:
    """``fn()``'s exit code, with library exceptions mapped to the policy in the docstring, and
    Ctrl-C (KeyboardInterrupt) to one line and exit code 130, SIGTERM (raised as Terminated, the
    same cleanup) to one line and 143; ``exit_on_stop`` (a command-line run, not a call from
    Python): the process then ends there (``_end_process``). ``devices_at_start``: report the
    JAX backend and devices first (``report_devices``); commands that start jax.distributed
    pass False and call ``report_devices`` right after starting it. In a multi-process run an
    exception also arms ``_exit_if_peers_hang``."""
    from hipt_jax import interrupts, provenance

    _interrupt_watchdog(prog)
    restore_sigterm = _catch_sigterm()
    _RUNNING.append(prog)
    _CREATED_DIRS.clear()
    provenance._NEW_RECORDS.clear()
    try:
        if devices_at_start:
            report_devices(prog)
        return fn()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        terminated = isinstance(e, interrupts.Terminated)
        print(_stopped_line(prog, terminated), file=sys.stderr, flush=True)
        code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        if exit_on_stop:
            _end_process(code)
        return code
    except Exception as e:  # noqa: BLE001 -- narrowed right below, everything else re-raised
        if os.environ.get("HIPT_DEBUG"):
            _exit_if_peers_hang(prog, 1)
            raise
        if isinstance(e, failure_errors()) or is_disk_full(e):
            print_error(prog, e)
            return _exit_if_peers_hang(prog, EXIT_ITEMS_FAILED)
        if isinstance(e, input_errors()):
            print_error(prog, e)
            provenance.forget_new_records()
            remove_empty_created_dirs()
            return _exit_if_peers_hang(prog, EXIT_BAD_INPUT)
        _exit_if_peers_hang(prog, 1)
        raise
    finally:
        _RUNNING.pop()
        restore_sigterm()  # in-process callers (tests) get their handling back


def _end_process(code: int) -> None:
    """End a stopped command-line run without the interpreter's teardown. A stop that lands while
    XLA compiles abandons the compile, which goes on in XLA's threads: the teardown then destroyed
    the JAX client under it and the process died of SIGSEGV (exit -11, not 130/143). What must
    happen on a stop already did, in the `finally` blocks the exception ran through (lock
    released, worker pools and loaders stopped, checkpoint finished); the collection below runs
    the finalizers that unlink multiprocessing's semaphores, which os._exit would skip."""
    import gc
    import threading

    def tidy() -> None:
        gc.collect()
        util = sys.modules.get("multiprocessing.util")
        if util is not None:
            with contextlib.suppress(Exception):  # private, but what a normal exit runs
                util._exit_function()

    # Bounded: a finalizer or a child that does not end must not keep a stopped run alive.
    worker = threading.Thread(target=tidy, name="hipt-exit-tidy", daemon=True)
    worker.start()
    worker.join(EXIT_TIDY_S)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


PEER_EXIT_GRACE_S = 30.0  # see _exit_if_peers_hang


def _exit_if_peers_hang(prog: str, code: int) -> int:
    """After an error in one process of a multi-process run (jax.distributed started), end this
    process with ``code`` if it has not exited normally within PEER_EXIT_GRACE_S; returns ``code``.

    Why: a normal exit waits in jax.distributed's shutdown barrier for every other process, and
    a peer blocked in a collective that needs this process (the next training step's all-reduce)
    never arrives: both would sit there until the barrier's 5-minute timeout and then abort.
    Exiting lets the launcher (``srun --kill-on-bad-exit``, launch/local_multiprocess.py) stop
    the others at once. The grace keeps the clean path for errors every process meets together
    (a diverged loss, a bad config): they finish their last writes and pass the barrier."""
    import threading

    distributed = sys.modules.get("hipt_jax.distributed")
    if distributed is None or not distributed.started():
        return code

    def exit_now() -> None:
        print(f"{prog}: the other processes did not finish within {PEER_EXIT_GRACE_S:.0f} s of this "
              "process's error (they may be waiting for it in a collective): exiting now",
              file=sys.stderr, flush=True)
        os._exit(code)

    timer = threading.Timer(PEER_EXIT_GRACE_S, exit_now)
    timer.daemon = True
    timer.start()
    return code


def command(prog: str, build_parser: Callable[[], argparse.ArgumentParser],
            run: Callable[[argparse.Namespace], int], *,
            devices_at_start: bool = True) -> Callable[[Optional[list[str]]], int]:
    """``main(argv) -> exit code`` of an argparse command: parse, then ``run(args)`` under
    ``run_command``."""
    def main(argv: Optional[list[str]] = None) -> int:
        args = build_parser().parse_args(argv)
        return run_command(prog, lambda: run(args), devices_at_start=devices_at_start,
                           exit_on_stop=argv is None)  # argv None: the command line

    main.__doc__ = f"{prog}: parse argv (default sys.argv[1:]) and run; returns the exit code."
    return main


def report_failed(prog: str, failed: dict[str, str]) -> int:
    """Name every failed item on stderr; 1 if there is any, else 0."""
    for item, error in sorted(failed.items()):
        print(f"{prog}: FAILED {item}: {error}", file=sys.stderr)
    return EXIT_ITEMS_FAILED if failed else EXIT_OK


# ------------------------------------------------------------------------------ argparse
class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and checks that run after parsing (``finish``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._finishers: list[Callable[["Parser", argparse.Namespace], None]] = []

    def finish(self, fn: Callable[["Parser", argparse.Namespace], None]) -> None:
        """Run ``fn(parser, args)`` after every parse (resolve old spellings, cross-checks)."""
        self._finishers.append(fn)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        namespace.given = self._given(sys.argv[1:] if args is None else [str(a) for a in args])
        for fn in self._finishers:
            fn(self, namespace)
        return namespace, extra

    def _given(self, argv: list[str]) -> set[str]:
        """Destinations of the flags the command line spelled out (``--size 4096`` even when 4096
        is the default), so a check can tell "asked for" from "left at the default". Matches
        ``--flag``, ``--flag=value`` and argparse's unambiguous prefixes."""
        options = {o: a.dest for a in self._actions for o in a.option_strings}
        given = set()
        for token in argv:
            if token == "--":
                break
            name = token.split("=", 1)[0]
            if not name.startswith("-") or name == "-":
                continue
            hits = [o for o in options if o == name] or [o for o in options if o.startswith(name) and name.startswith("--")]
            if len({options[o] for o in hits}) == 1:
                given.add(options[hits[0]])
        return given

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def warn_deprecated(prog: str, old: str, new: str) -> None:
    print(f"{prog}: warning: {old} is deprecated and will be removed in the next release; use {new}",
          file=sys.stderr)


class _Deprecated(argparse.Action):
    """An old spelling: stores into the new flag's destination and warns on stderr."""

    def __init__(self, option_strings, dest, use: str = "", **kwargs):
        self.use = use
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warn_deprecated(parser.prog, option_string, self.use)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated(p, old: str, new: str, dest: str, **kwargs) -> None:
    """``old`` (hidden from --help) sets ``dest`` like ``new`` does, with a warning."""
    p.add_argument(old, dest=dest, action=_Deprecated, use=new, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS, **kwargs)


MAX_BATCH = 65536  # batch sizes: beyond this no device holds the batch (MemoryError, not a result)


def _positive_int(text: str) -> int:
    """argparse type of batch sizes: an integer in [1, MAX_BATCH]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_BATCH}], got {text!r}") from None
    if not 1 <= value <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_BATCH}], got {value}")
    return value


def int_at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer >= ``low`` (and <= ``high`` when given)."""
    what = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what
    return parse


def auto_or_int_at_least(low: int) -> Callable[[str], int]:
    """config type: -1 ("auto": decided by the run) or an integer >= ``low``."""
    at_least = int_at_least(low)

    def parse(text: str) -> int:
        try:
            if int(text) == -1:
                return -1
        except ValueError:
            pass
        try:
            return at_least(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected -1 (auto) or an integer >= {low}, got {text!r}") from None
    return parse


def int_multiple_of(step: int, low: int) -> Callable[[str], int]:
    """argparse/config type: an integer >= ``low`` that is a multiple of ``step`` (a region
    side in whole 256 px patches)."""
    at_least = int_at_least(low)
    what = f"a multiple of {step} >= {low}"

    def parse(text: str) -> int:
        value = at_least(text)
        if value % step:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what
    return parse


def float_in(low: float, high: float = float("inf"), *, low_open: bool = True,
             high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in the interval (low, high] (ends as given)."""
    lo, hi = ("(" if low_open else "["), (")" if high_open or high == float("inf") else "]")
    what = f"a number in {lo}{low:g}, {high:g}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = value == value and abs(value) != float("inf")
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


positive_float = float_in(0.0)


def path_arg(text: str) -> str:
    """argparse type of every flag that names a file or folder: ``~`` expanded. The shell leaves
    it alone after ``=`` (``--out=~/e.npz``), and a folder literally named ``~`` in the working
    directory is one ``rm -rf ~`` away from the user's home. A URL is refused (``url_refusal``)."""
    refusal = url_refusal(text)
    if refusal:
        raise argparse.ArgumentTypeError(refusal)
    return os.path.expanduser(text)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def url_refusal(text: str) -> str:
    """Why ``text`` cannot be a path here ("" when it can). Every command reads and writes
    through the operating system's files, so ``gs://b/run`` would be taken as a local folder
    named ``gs:`` (a multi-host run then writes one per host): an object store is used through
    a mount, which every host of a pod or cluster sees as one folder."""
    if not _URL.match(text):
        return ""
    return (f"{text}: a URL, not a path: commands read and write files, so mount the bucket "
            "(e.g. gcsfuse BUCKET /mnt/BUCKET, s3fs, or the cluster's shared filesystem) and give "
            "the path inside the mount")


def add_reuse_flags(p) -> None:
    """--overwrite / --resume-anyway: what to do with an output folder made by another run
    (hipt_jax.provenance)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true",
                   help="delete this command's outputs in the output folder and start over")
    g.add_argument("--resume-anyway", action="store_true",
                   help="keep outputs made with other inputs/weights/parameters and continue")


MIN_FREE_BYTES = 16 * 2**20  # every command: room for its manifests and one item's output


def check_output_file(path: str, need_bytes: int = MIN_FREE_BYTES) -> None:
    """check_output_dir for the folder of an output file, and the file itself not a folder."""
    if os.path.isdir(path):
        raise UsageError(f"{path}: output file is a folder")
    check_output_dir(os.path.dirname(os.path.abspath(path)), need_bytes)


# Output folders check_output_dir created in this process. A command that then refuses its
# input (exit 2) removes those still empty, so a rejected run leaves nothing behind.
_CREATED_DIRS: list[str] = []


def remove_empty_created_dirs() -> None:
    while _CREATED_DIRS:
        path = _CREATED_DIRS.pop(0)
        try:
            os.rmdir(path)  # only an empty folder: anything written there stays
        except OSError:
            pass


# Endings of files a user may give where a command wants a folder to write into.
FILE_EXTENSIONS = frozenset((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".pdf", ".svg", ".npz", ".npy", ".csv",
                             ".tsv", ".json", ".txt", ".h5", ".pt", ".pth", ".pkl", ".svs"))


def check_output_dir(path: str, need_bytes: int = MIN_FREE_BYTES) -> None:
    """Before any work: ``path`` can be created, is a folder, is writable, and its filesystem has
    at least ``need_bytes`` free (an estimate the caller states). UsageError naming it if not."""
    import shutil
    import tempfile

    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{path}: output location exists and is not a folder")
    ext = os.path.splitext(path.rstrip("/\\"))[1].lower()
    if not os.path.exists(path) and ext in FILE_EXTENSIONS:  # `--out maps.png` made a folder of that name
        raise UsageError(f"{path}: names a {ext} file, but this is an output folder (the command writes "
                         "several files into it); give a folder name")
    new, up = [], os.path.abspath(path)
    while up and not os.path.exists(up) and up != os.path.dirname(up):
        new.append(up)  # deepest first: removed in this order if the command refuses its input
        up = os.path.dirname(up)
    _CREATED_DIRS.extend(new)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"{path}: output folder is not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise UsageError(f"{path}: {free / 2**20:.0f} MiB free, this run needs about "
                         f"{need_bytes / 2**20:.0f} MiB")


# ------------------------------------------------------------------------------ groups
MAX_REGION_PX = 65536  # a region side beyond this is a whole slide, not a region
MPP = float_in(0.0, 1000.0)  # microns per pixel: > 0 (a slide scanned at 1 mm/px is not a slide)


def add_region_flags(p, *, size_flag: str = "--size", size_default: int = 4096,
                     mpp_tolerance: bool = False, deprecated_mpp: bool = False) -> None:
    """Region side and resolution: --target-mpp, --assume-mpp and the side in px."""
    g = p.add_argument_group("region and resolution")
    g.add_argument(size_flag, dest=size_flag.lstrip("-"), type=int_at_least(256, MAX_REGION_PX), default=size_default,
                   help=f"region side in px at --target-mpp (default {size_default})")
    g.add_argument("--target-mpp", type=MPP, default=0.5,
                   help="microns per pixel of the region (default 0.5 = 20x)")
    g.add_argument("--assume-mpp", type=MPP, default=None,
                   help="level-0 mpp for slides whose metadata has none")
    if mpp_tolerance:
        g.add_argument("--mpp-tolerance", type=float_in(0.0, 0.5, low_open=False, high_open=True), default=0.1,
                       help="relative mpp error treated as an exact integer scale (0.499 -> 0.5)")
    if deprecated_mpp:
        add_deprecated(g, "--mpp", "--target-mpp", "target_mpp", type=MPP)


def add_region_source_flags(p, *, required: bool, xy_default: Optional[int]) -> None:
    """The one region a single-region command reads: an image file, or a slide at (--x, --y)."""
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--image", type=path_arg, help="region image file (PNG/JPEG/TIFF), >= 256 px per side")
    src.add_argument("--slide", type=path_arg, help="whole-slide image (anything OpenSlide reads)")
    p.add_argument("--x", type=int_at_least(0), default=xy_default, help="level-0 x of the region's top-left corner")
    p.add_argument("--y", type=int_at_least(0), default=xy_default, help="level-0 y of the region's top-left corner")
    p.add_argument("--allow-upsample", action="store_true",
                   help="accept a --slide coarser than --target-mpp (the region is upsampled)")


def add_model_flags(p, *, vit4k: bool = True, vit4k_help: str = "ViT-4K checkpoint",
                    required: bool = True) -> None:
    """--vit256 [--vit4k] | --random-init {tiny,full}, and --seed of the random weights.

    ``required``: after parsing, one of --vit256 or --random-init must be given."""
    g = p.add_argument_group("model")
    g.add_argument("--vit256", type=path_arg, help="ViT-256 checkpoint: converted/exported directory or released .pth")
    if vit4k:
        g.add_argument("--vit4k", type=path_arg, help=f"{vit4k_help}: directory or .pth")
    g.add_argument("--random-init", nargs="?", const=None, default="none", type=_random_init,
                   metavar="{none,tiny,full}",
                   help="random weights instead of checkpoints (demos, smoke tests): tiny = the "
                        "small test architectures, full = the paper's sizes")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="seed of --random-init weights")
    g.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # old; warned in _finish_model
    p.finish(lambda parser, args: _finish_model(parser, args, required))


def _random_init(text: str) -> str:
    if text not in RANDOM_INIT:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(RANDOM_INIT)})")
    return text


def _finish_model(parser: Parser, args: argparse.Namespace, required: bool) -> None:
    if args.random_init is None:  # the old bare switch, with or without --tiny
        args.random_init = "tiny" if args.tiny else "full"
        warn_deprecated(parser.prog, "--random-init" + (" --tiny" if args.tiny else "") + " (no value)",
                        f"--random-init {args.random_init}")
    elif args.tiny and args.random_init == "none":
        parser.error("--tiny needs --random-init (use --random-init tiny)")
    elif args.tiny:
        warn_deprecated(parser.prog, "--tiny", "--random-init tiny")
        args.random_init = "tiny"
    if args.random_init != "none" and args.vit256:
        parser.error("give --vit256 or --random-init, not both")
    if args.random_init != "none" and getattr(args, "vit4k", None):
        # the checkpoint would be replaced by random weights without a word
        parser.error("give --vit4k or --random-init, not both")
    if required and args.random_init == "none" and not args.vit256:
        parser.error("give --vit256 CHECKPOINT (and usually --vit4k), or --random-init tiny|full")


def add_compute_flags(p, *, compute_dtype: bool = True, batch_per_device: Optional[int] = None,
                      batch_help: str = "regions per device per step", patch_batch: bool = False,
                      deprecated_dtype: bool = False) -> None:
    """--compute-dtype, --batch-per-device (when the command batches), --patch-batch."""
    g = p.add_argument_group("compute")
    if compute_dtype:
        g.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="auto",
                       help="dtype of the matmuls; auto (default): bfloat16 on GPU/TPU, float32 on "
                            "CPU. Parameters, softmax, norms and losses stay float32")
        if deprecated_dtype:
            add_deprecated(g, "--dtype", "--compute-dtype", "compute_dtype", choices=COMPUTE_DTYPES)
    if batch_per_device is not None:
        g.add_argument("--batch-per-device", type=_positive_int, default=batch_per_device, help=batch_help)
        add_deprecated(g, "--batch", "--batch-per-device", "batch_per_device", type=_positive_int)
    if patch_batch:
        g.add_argument("--patch-batch", type=_positive_int, default=None,
                       help="ViT-256 patches per minibatch (default: auto, chosen for this machine: "
                            "hipt-profile --calibrate measures it once, else the CPU's cache sizes decide)")


def add_storage_flags(p, *, choices: tuple[str, ...], default: str, deprecated_dtype: bool = False) -> None:
    """--store-dtype: the dtype features are written in."""
    g = p.add_argument_group("storage")
    g.add_argument("--store-dtype", choices=choices, default=default,
                   help=f"dtype of the stored features (default {default})")
    if deprecated_dtype:
        add_deprecated(g, "--dtype", "--store-dtype", "store_dtype", choices=choices)


def add_progress_flag(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@contextlib.contextmanager
def progress(enabled: bool) -> Iterator[None]:
    """Progress bars (tqdm, in this process and its workers) on or off for a block."""
    if enabled:
        yield
        return
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


# ------------------------------------------------------------------------------ using the groups
def compute_dtype(args):
    """--compute-dtype as a dtype ("auto" resolved for the backend JAX runs on)."""
    from hipt_jax.models.precision import resolve_dtype

    return resolve_dtype(args.compute_dtype)


def compute_dtype_name(name: str) -> str:
    """A --compute-dtype value with "auto" resolved: "float32" or "bfloat16"."""
    from hipt_jax.models.precision import dtype_name

    return dtype_name(name)


def load_hipt4k(args, *, need_vit4k: bool = False):
    """The HIPT4K the model (and compute) flags name."""
    from hipt_jax.models.hipt4k import HIPT4K

    kwargs = dict(patch_batch=args.patch_batch, dtype=compute_dtype(args))
    if args.random_init != "none":
        return HIPT4K.random_init(seed=args.seed, tiny=args.random_init == "tiny", **kwargs)
    if need_vit4k and not args.vit4k:
        raise UsageError("give --vit256 and --vit4k checkpoints (or --random-init tiny|full)")
    for path in (args.vit256, args.vit4k):
        if path and not os.path.exists(path):
            raise UsageError(f"{path}: no such checkpoint")
    return HIPT4K.from_checkpoints(vit256=args.vit256, vit4k=args.vit4k, **kwargs)


# PIL modes that hold 8-bit colour or grey, and what becoming RGB does to them.
_EIGHT_BIT_MODES = {"RGB": None, "L": "grayscale, copied to R, G and B", "P": "palette colours",
                    "RGBA": "alpha composited over white", "LA": "alpha composited over white",
                    "PA": "alpha composited over white", "CMYK": "CMYK converted", "YCbCr": "YCbCr converted",
                    "1": "1-bit, black and white", "RGBX": None}


def _stored_channel_bits(im, path: str) -> int:
    """Bits per channel as the file stores them. PIL opens 16-bit-per-channel RGB(A) PNGs and
    TIFFs as 8-bit mode "RGB"/"RGBA" and keeps each value's high byte: 12-bit camera data came out
    near black with exit 0. The depth shows in the decoder's raw mode ('RGB;16B'), the TIFF's
    BitsPerSample and the PNG's IHDR."""
    bits = 8
    for tile in (getattr(im, "tile", None) or [])[:1]:
        args = tile[3]
        raw = args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else "")
        if re.search(r";(16|32)", raw):
            bits = max(bits, 16)
    tiff_bits = getattr(im, "tag_v2", {}).get(258) if im.format == "TIFF" else None  # BitsPerSample
    if tiff_bits:
        bits = max(bits, *(tiff_bits if isinstance(tiff_bits, tuple) else (tiff_bits,)))
    if im.format == "PNG":
        with open(path, "rb") as f:
            header = f.read(25)  # signature (8), IHDR length/type (8), width, height, bit depth
        if len(header) == 25 and header[12:16] == b"IHDR":
            bits = max(bits, header[24])
    return int(bits)


def read_image(path: str):
    """An 8-bit image file -> uint8 [H,W,3] RGB, as a viewer shows it: EXIF orientation applied,
    transparency composited over white (a slide's background), grey expanded. Every conversion is
    said on stderr; 16-bit, 32-bit and float images are refused (rescaling them to 8 bits is a
    choice the user has to make: an H&E model expects 8-bit RGB)."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory; --image takes one image file")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    Image.MAX_IMAGE_PIXELS = None  # regions are large on purpose; the size check is ours
    try:
        with Image.open(path) as im:
            notes = []
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"first of its {im.n_frames} pages/frames")
            if im.mode not in _EIGHT_BIT_MODES:
                raise UsageError(f"{path}: {im.mode} image (not 8-bit); convert it to 8-bit RGB first")
            bits = _stored_channel_bits(im, path)
            if bits > 8:
                raise UsageError(f"{path}: {bits}-bit-per-channel {im.mode} image (not 8-bit; it would be cut "
                                 "to its high byte); convert it to 8-bit RGB first")
            orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation; 1 = upright
            upright = ImageOps.exif_transpose(im) if orientation not in (0, 1) else im
            if orientation not in (0, 1):
                notes.append(f"rotated/flipped by its EXIF orientation {orientation}")
            if _EIGHT_BIT_MODES[upright.mode]:
                notes.append(f"{upright.mode} -> RGB: {_EIGHT_BIT_MODES[upright.mode]}")
            if upright.mode in ("RGBA", "LA", "PA") or (upright.mode == "P" and "transparency" in upright.info):
                rgba = upright.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                rgb = upright.convert("RGB")
            if notes:
                print(f"{path}: {'; '.join(notes)}", file=sys.stderr)
            return np.asarray(rgb)
    except UsageError:
        raise
    except UnidentifiedImageError:
        raise UsageError(f"{path}: not an image file PIL can read") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable image ({e})") from None


def _plain_image_format(path: str) -> Optional[str]:
    """"PNG", "JPEG", ... for an image file PIL reads that is not a TIFF (a TIFF may be a damaged
    slide: slide_io names that case), else None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt = im.format
    except Exception:  # noqa: BLE001 -- only used to improve an error message
        return None
    return None if fmt in (None, "TIFF") else fmt


def open_slide(path: str, *, image_hint: str = "give it as --image (used whole, as the region)"):
    """data_prep.slide_io.open_slide; a plain image file OpenSlide cannot read (a PNG or JPEG
    crop) is refused with the flag that takes such files (``image_hint``)."""
    from data_prep.slide_io import SlideError
    from data_prep.slide_io import open_slide as open_wsi

    try:
        return open_wsi(path)
    except SlideError:
        fmt = _plain_image_format(path) if os.path.isfile(path) else None
        if fmt is None:
            raise
        raise UsageError(f"{path}: a plain {fmt} image, not a whole-slide format OpenSlide can read; "
                         f"{image_hint}") from None


def _note_outside(path: str, slide, x: int, y: int, read_px: int) -> None:
    """A region reaching past the slide's edge is padded with white; the model embeds the
    padding like tissue, so say how much of the region it is."""
    width, height = slide.dimensions
    inside = max(0, min(x + read_px, width) - x) * max(0, min(y + read_px, height) - y)
    outside = 1.0 - inside / float(read_px * read_px)
    if outside > 0:
        share = f"{outside:.0%}" if outside >= 0.01 else "<1%"
        print(f"{path}: note: {share} of the region ({read_px} x {read_px} level-0 px at ({x}, {y})) lies outside "
              f"the slide ({width} x {height} px) and is white padding", file=sys.stderr)


def _note_assume_mpp_unused(path: str, assume_mpp: Optional[float], mpp: float, source: str) -> None:
    """--assume-mpp is for slides without an mpp: given for one whose metadata has one, it was
    dropped without a word and the region read at another scale than the user asked for."""
    if assume_mpp is None or source != "slide property" or abs(mpp - assume_mpp) <= 1e-6 * assume_mpp:
        return
    print(f"{path}: note: --assume-mpp {assume_mpp:g} is not used: the slide's metadata gives {mpp:.4g} um/px "
          "(--assume-mpp is only for slides without one)", file=sys.stderr)


WSI_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".czi", ".isyntax",
                  ".qptiff", ".dcm")
WHOLE_SLIDE_PX = 4 * 4096 * 4096  # a multi-page TIFF beyond a few regions' pixels is a pyramid slide


def _refuse_whole_slide(path: str) -> None:
    """--image takes one region: a whole-slide file was decoded whole (level 0 of a 100k px slide)
    and embedded as one "region" with exit 0. UsageError pointing to --slide."""
    hint = "a whole-slide image; give it as --slide with --x/--y (one region), or use hipt-extract for every region"
    if path.lower().endswith(WSI_EXTENSIONS):
        raise UsageError(f"{path}: {hint}")
    from PIL import Image

    try:
        with Image.open(path) as im:
            pages, (width, height) = getattr(im, "n_frames", 1), im.size
            is_tiff = im.format == "TIFF"
    except Exception:  # noqa: BLE001 -- read_image names an unreadable file
        return
    if is_tiff and pages > 1 and width * height > WHOLE_SLIDE_PX:
        raise UsageError(f"{path}: a {pages}-page {width} x {height} px TIFF pyramid, {hint}")


def _refuse_colourless_image(path: str, region) -> None:
    """A greyscale --image (mode L, or RGB with R = G = B) was expanded to grey RGB and embedded
    by the H&E models with exit 0, where the same pixels from --slide are refused: the features
    mean nothing. A TIFF whose pages are its R, G and B planes (numpy/ImageJ channel stacks)
    reads as its first page, the red plane in grey: said, since that is the likely cause."""
    from PIL import Image

    from data_prep.slide_io import colour_counts, colourless_problem

    grey = colourless_problem(colour_counts(region, step=4), path)
    if not grey:
        return
    try:
        with Image.open(path) as im:
            pages = getattr(im, "n_frames", 1)
    except Exception:  # noqa: BLE001 -- only used to improve the message
        pages = 1
    if pages > 1:
        grey += (f"; its first page was read, of {pages}: if they are its colour channels, save it as "
                 "one RGB image")
    raise UsageError(grey)


def read_region(args):
    """The region the region-source flags name, as uint8 [H,W,3] (>= 256 px per side)."""
    if bool(args.image) == bool(args.slide):
        raise UsageError("give exactly one of --image or --slide")
    if args.image:
        slide_only = [f for f in ("x", "y", "size", "target_mpp", "assume_mpp", "allow_upsample")
                      if f in getattr(args, "given", ())]
        if slide_only:  # the whole image was embedded as it is, with exit 0
            raise UsageError(f"{', '.join('--' + f.replace('_', '-') for f in slide_only)}: choose a region "
                             "of --slide; --image is used whole, as the region")
        _refuse_whole_slide(args.image)
        region = read_image(args.image)
        _refuse_colourless_image(args.image, region)
        if max(region.shape[:2]) > 2 * 4096:
            print(f"{args.image}: note: a {region.shape[0]}x{region.shape[1]} px region, far beyond the 4096 px "
                  "regions the ViT-4K was trained on (a whole slide goes to --slide with --x/--y, or hipt-extract)",
                  file=sys.stderr)
    else:
        from data_prep.slide_io import (check_upsample, colour_counts, colourless_problem, read_region_geometry,
                                        region_geometry, resolve_mpp)

        if args.x is None or args.y is None:
            raise UsageError("--slide needs --x and --y (level-0 top-left of the region)")
        slide = open_slide(args.slide)
        width, height = slide.dimensions
        if args.x >= width or args.y >= height:  # it would read nothing but white padding
            raise UsageError(f"{args.slide}: (--x {args.x}, --y {args.y}) is outside the slide "
                             f"({width} x {height} level-0 px)")
        mpp, source = resolve_mpp(slide, args.assume_mpp, args.slide)  # as read_region_at_mpp reads it
        _note_assume_mpp_unused(args.slide, args.assume_mpp, mpp, source)
        # refused as in hipt-prep and hipt-extract --slides: upsampled pixels pass for the target mpp
        check_upsample(mpp, args.target_mpp, allow_upsample=getattr(args, "allow_upsample", False),
                       path=args.slide)
        geom = region_geometry(slide, mpp, args.size, args.target_mpp)
        _note_outside(args.slide, slide, args.x, args.y, geom.read_px)
        region = read_region_geometry(slide, args.x, args.y, geom)
        grey = colourless_problem(colour_counts(region, step=4), args.slide)  # OpenSlide serves it as grey RGB
        if grey:
            raise UsageError(grey)
    if min(region.shape[:2]) < 256:
        raise UsageError(f"{args.image or args.slide}: region is {region.shape[0]}x{region.shape[1]} px; "
                         "a region needs >= 256 px per side")
    return region


# ------------------------------------------------------------------------------ absl commands
def absl_main(prog: str, body: Callable[[], int], argv: Optional[list[str]] = None, *,
              devices_at_start: bool = True, doc: str = "",
              override_example: str = "--config.optim.lr=1e-3") -> None:
    """Run an absl / ml-collections command under the exit-code policy: flag errors (unknown
    flag, missing --config, a config file that fails to load) exit 2 with one line. ``-h`` /
    ``--help`` print ``doc`` (the command's module docstring) and its flags (``absl_usage``)."""
    from absl import app
    from absl import flags as absl_flags

    def parse(args: list[str]) -> list[str]:
        args = _expand_user_flags(args, ABSL_PATH_FLAGS)
        asked = _help_asked(args[1:])
        if asked == "short":
            print(absl_usage(prog, doc, override_example))
            sys.exit(EXIT_OK)
        if asked == "full":  # absl's own listing, but a help that was asked for is not a failure
            app.usage(writeto_stdout=True)
            sys.exit(EXIT_OK)
        missing = _positional_config(args) or _missing_config_file(args)
        if missing:
            print_error(prog, missing)
            sys.exit(EXIT_BAD_INPUT)
        # A second main() in one process (a notebook, a test) must not inherit the first call's
        # flags: absl keeps every parsed value until it is parsed again, so a flag the second
        # call leaves out would silently keep the first call's value.
        absl_flags.FLAGS.unparse_flags()
        try:
            return absl_flags.FLAGS(args)
        except absl_flags.Error as e:
            message = config_override_error(args, e) if "--config." in str(e) else one_line(e)
            print_error(prog, message)
            sys.exit(EXIT_BAD_INPUT)
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # a bad --config.FIELD override
            print_error(prog, _no_get_config(args, e) or config_override_error(args, e))
            sys.exit(EXIT_BAD_INPUT)
        except Exception as e:  # noqa: BLE001 -- a config file that is not Python (binary, syntax error)
            if os.environ.get("HIPT_DEBUG"):
                raise
            print_error(prog, f"{_config_spec(args) or '--config'}: cannot load the config file "
                              f"({type(e).__name__}: {one_line(e)})")
            sys.exit(EXIT_BAD_INPUT)

    def main(rest: list[str]) -> None:
        if len(rest) > 1:
            print_error(prog, f"unexpected arguments {rest[1:]} (flags are --name=value)")
            sys.exit(EXIT_BAD_INPUT)
        sys.exit(run_command(prog, body, devices_at_start=devices_at_start, exit_on_stop=cli))

    cli = argv is None  # the command line, not a call from Python
    app.run(main, argv=argv, flags_parser=parse)


# The absl flags that name files or folders (config fields: ``expand_user_paths``).
ABSL_PATH_FLAGS = ("config", "workdir", "plan_json")


def _expand_user_flags(args: list[str], names: tuple[str, ...]) -> list[str]:
    """``--NAME=~/x`` (and ``--NAME ~/x``) with ``~`` expanded, for each NAME in ``names``: the
    shell does not expand it after ``=`` (see ``path_arg``)."""
    out = list(args[:1])
    for i, arg in enumerate(args[1:], start=1):
        if arg == "--":
            return out + list(args[i:])
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in names and eq:
            arg = f"{arg[:len(arg) - len(value)]}{os.path.expanduser(value)}"
        elif out[-1].startswith("-") and out[-1].lstrip("-") in names and not arg.startswith("-"):
            arg = os.path.expanduser(arg)
        out.append(arg)
    return out


def _help_asked(args: list[str]) -> Optional[str]:
    """"short" for -h/--help (absl's own prints only a bare USAGE line and exits 1; -h was an
    unknown flag), "full" for --helpfull, else None. A -h that is the value of the flag before
    it (``--config.data.label_column -h``) is not a help: absl reads it as that value."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        if arg in ("-h", "--help", "-help", "--helpshort", "-helpshort", "-?"):
            return "short"
        if arg in ("--helpfull", "-helpfull"):
            return "full"
        i += 2 if _takes_next_as_value(arg) else 1
    return None


def _takes_next_as_value(arg: str) -> bool:
    """Whether absl reads the token after ``arg`` as its value: a flag given without "=" that
    is not boolean. A --config.FIELD flag is taken to take one (its fields are defined only
    when the config loads; a boolean field followed by -h then fails as an unknown flag -h,
    one line, rather than doing nothing)."""
    if not arg.startswith("-") or "=" in arg or arg in ("-", "--"):
        return False
    name = arg.lstrip("-")
    if name.startswith("config."):
        return True
    from absl import flags as absl_flags

    defined = absl_flags.FLAGS
    for candidate in (name, name[2:] if name.startswith("no") else ""):
        if candidate and candidate in defined and defined[candidate].boolean:
            return False
    return True


def _positional_config(args: list[str]) -> str:
    """One line for a config file given without --config (``hipt-pretrain configs/x.py:runlocal
    --config.a=b``, as a demo table wrote it): absl then named only the first override, "Unknown
    command line flag 'config.a'"; else ""."""
    if _config_spec(args):
        return ""
    for arg in args[1:]:
        if arg == "--":
            break
        if not arg.startswith("-") and arg.partition(":")[0].endswith(".py"):
            return (f"{arg}: a config file is given with --config: --config {arg} "
                    "(then --config.FIELD=VALUE overrides)")
    return ""


def _no_get_config(args: list[str], error: BaseException) -> str:
    """One line for a --config FILE that defines no get_config, else "": ml_collections' own
    ("module 'config_config' has no attribute 'get_config'") named neither the file nor the fix."""
    if not isinstance(error, AttributeError) or "'get_config'" not in str(error):
        return ""
    path = (_config_spec(args) or "--config").partition(":")[0]
    return f"{path}: defines no get_config(); a config file returns its ml_collections.ConfigDict from get_config(arg)"


def _missing_config_file(args: list[str]) -> str:
    """One line for a --config FILE that is not there (ml_collections' own says "Configuration
    is not available because of an earlier failure to load ..."), else ""."""
    spec = _config_spec(args)
    if not spec:
        return ""
    path = spec.partition(":")[0]
    if os.path.isdir(path):
        return f"config file is a folder: {path}"
    return "" if os.path.isfile(path) else f"config file not found: {path}"


_ABSL_METAVARS = {"config": "FILE[:SWITCHES]", "workdir": "DIR", "plan_json": "FILE"}


def absl_usage(prog: str, doc: str, override_example: str) -> str:
    """What -h/--help print for an absl command: its docstring, then its own flags and the shared
    ones with their help, how to set a config field, and where the rest is."""
    from absl import flags as absl_flags

    by_module = absl_flags.FLAGS.flags_by_module_dict()
    own = [m for m in by_module if (m == "__main__" or m.startswith("hipt_jax.")) and m != __name__]
    listed, lines = set(), []
    for module in own + [__name__]:
        for flag in by_module.get(module, []):
            if flag.name in listed:
                continue
            listed.add(flag.name)
            default = flag.default
            if flag.flag_type() == "bool":
                spelled, default = (f"--[no]{flag.name}", "on") if default else (f"--{flag.name}", None)
            else:
                spelled = f"--{flag.name}={_ABSL_METAVARS.get(flag.name, 'VALUE')}"
                default = ",".join(map(str, default)) if isinstance(default, list) else default
            default = "" if default in (None, "") else f" (default {default})"
            lines.append(f"  {spelled:<26} {flag.help}{default}")
    lines.append(f"  {'--config.FIELD=VALUE':<26} set one field of the config, e.g. {override_example}")
    lines.append(f"  {'--helpfull':<26} every absl flag, the libraries' own included")
    usage = (doc or f"{prog}").strip()
    return f"{usage}\n\nflags:\n" + "\n".join(lines)


# The config fields (configs/*.py) that name a file or folder. Only these are expanded: a class
# column or class name may well start with "~" ("~root" read as /root, a bare "~" as HOME).
CONFIG_PATH_FIELDS = frozenset({
    "data.embeddings", "data.labels", "data.splits", "data.path",   # splits: "kfold:N" is left alone
    "model.pretrained_vit4k", "model.pretrained_global", "warm_start",
    "export_dir", "eval.knn.path", "eval.knn.labels",
    "trace_dir", "json",
})


def expand_user_paths(config, _prefix: str = "") -> None:
    """``~`` expanded in the path fields of an absl command's config (CONFIG_PATH_FIELDS: data
    paths, labels, splits, checkpoints, export and output files; see ``path_arg``), from the
    config file and from --config.FIELD overrides alike, in place; a URL there is refused
    (``url_refusal``). Other fields are left as they are."""
    for key in list(config.keys()):
        value, field = config[key], f"{_prefix}{key}"
        if hasattr(value, "keys"):
            expand_user_paths(value, f"{field}.")
        elif field in CONFIG_PATH_FIELDS and isinstance(value, str):
            if url_refusal(value):
                raise UsageError(f"config.{field}={url_refusal(value)}")
            if value.startswith("~"):
                config[key] = os.path.expanduser(value)


def define_absl_shared_flags(*, seed: bool = False, compute_dtype: bool = False, reuse: bool = False) -> None:
    """The shared flags an absl command accepts (each overrides its config field when given).
    Their names are spelled with hyphens, as in the argparse commands."""
    from absl import flags as absl_flags

    if "no-progress" in absl_flags.FLAGS:
        return
    absl_flags.DEFINE_bool("no-progress", False, "no progress bars")
    if seed:
        absl_flags.DEFINE_integer("seed", None, "sets config.seed")
    if compute_dtype:
        absl_flags.DEFINE_enum("compute-dtype", None, list(COMPUTE_DTYPES), "sets the config's compute dtype")
    if reuse:  # what to do with a workdir made by another run (hipt_jax.provenance)
        absl_flags.DEFINE_bool("overwrite", False, "delete this command's outputs in the workdir and start over")
        absl_flags.DEFINE_bool("resume-anyway", False, "keep outputs made with other inputs or config and continue")


def absl_progress() -> bool:
    """False when --no-progress was given."""
    from absl import flags as absl_flags

    return not absl_flags.FLAGS["no-progress"].value


def absl_config(prog: str, fields: dict[str, str]):
    """The loaded --config with the shared flags applied: ``fields`` maps a shared flag name
    ("seed", "compute-dtype") to the config field it sets."""
    from absl import flags as absl_flags

    config = absl_flags.FLAGS["config"].value  # a config file that failed to load raises OSError here
    if config is None:
        raise UsageError("--config is required")
    for flag, field in fields.items():
        value = absl_flags.FLAGS[flag].value
        if value is not None:
            config[field] = value
    expand_user_paths(config)
    for flag in ABSL_PATH_FLAGS:  # --workdir, --plan_json: the config fields' rule
        value = absl_flags.FLAGS[flag].value if flag in absl_flags.FLAGS else None
        if isinstance(value, str) and url_refusal(value):
            raise UsageError(f"--{flag}={url_refusal(value)}")
    return config


# ------------------------------------------------------------------------------ config checks
def _closest_field(config, path: str) -> str:
    """'unknown config field a.b.x (did you mean a.b.y?)' for the first part of ``path`` that
    the config lacks; "" when every part exists."""
    import difflib

    node, done = config, []
    for part in path.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = ".".join(done + [part])
            close = difflib.get_close_matches(part, keys, n=1, cutoff=0.0)
            hint = f" (did you mean config.{'.'.join(done + close[:1])}?)" if close else ""
            return f"unknown config field config.{where}{hint}"
        node, done = node[part], done + [part]
    return ""


def _config_spec(argv: list[str]) -> Optional[str]:
    """FILE[:ARG] of a --config argument (None when there is none)."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg[len("--config="):]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _load_config_file(argv: list[str]):
    """The config a --config=FILE[:ARG] argument names, loaded the way ml_collections does
    (None when it cannot be loaded: the caller then reports the raw error)."""
    import importlib.util

    spec = _config_spec(argv)
    if not spec:
        return None
    path, _, config_arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("_hipt_config_for_error", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(config_arg) if config_arg else module.get_config()
    except Exception:  # noqa: BLE001 -- only used to improve an error message
        return None


def config_override_error(argv: list[str], error: BaseException) -> str:
    """One line for a --config.FIELD=VALUE override the config rejected: an unknown field names
    the closest valid one; a bad value names the field."""
    from absl import flags as absl_flags

    flag = absl_flags.FLAGS._flags().get("config")  # a half-parsed flag may hold the loaded config
    config = getattr(flag, "_value", None)
    if config is None:
        config = _load_config_file(argv)
    for arg in argv:
        if arg.startswith("--config."):
            path = arg[len("--config."):].split("=", 1)[0]
            if config is not None:
                message = _closest_field(config, path)
                if message:
                    return message
    return one_line(error).replace("\\n", " ")


def _missing_field(path: str) -> str:
    """One line for a config without a field the command reads: another command's config file
    (hipt-pretrain --config configs/lgp_subtyping.py) was a KeyError traceback, exit 1."""
    spec = ""
    try:
        from absl import flags as absl_flags
        from ml_collections import config_flags

        spec = config_flags.get_config_filename(absl_flags.FLAGS["config"]) or ""
    except Exception:  # noqa: BLE001 -- no absl --config flag: a config built in Python
        pass
    return (f"{spec or 'the config'}: has no field config.{path}, which this command reads; "
            "is it a config file of another command?")


def check_config(config, rules: dict) -> None:
    """Range-check config fields before any work: ``rules`` maps a dotted field to an argparse
    type of this module (int_at_least, float_in, ...). UsageError naming the field."""
    for path, check in rules.items():
        node = config
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node:
                raise UsageError(_missing_field(path))
            node = node[part]
        try:
            check(str(node))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"config.{path}={node!r}: {e}") from None
