"""Shared pytest set-up: the `slow` marker and the repository root on sys.path (so tests and
benchmarks can import the in-tree PyTorch reference as `tests.reference_torch`)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache per pytest worker, inherited by the subprocesses its
# tests start (CLI runs, fake-device and multi-process checks): many tests compile the same
# tiny programs, and on a 2-core CI machine compiling is most of their time. Set before any
# test module imports jax; an explicit JAX_COMPILATION_CACHE_DIR from the caller wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="hipt-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Machine calibrations (`hipt-profile --calibrate`, stored under $XDG_CACHE_HOME/hipt_jax) of the
# developer's machine must neither change what tests see nor be overwritten by them
# (HIPT_TEST_KEEP_XDG_CACHE=1 keeps the real one, e.g. to test against a stored calibration).
if "HIPT_TEST_KEEP_XDG_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="hipt-jax-test-xdg-cache-")
    atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

# Longest files first: pytest-xdist's --dist loadfile hands out files in collection order, and
# the SLURM launch jobs (several minutes on one worker) would otherwise start last and leave
# the other worker idle at the end.
_HEAVY_FIRST = ("test_slurm.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: 0 if os.path.basename(str(item.fspath)) in _HEAVY_FIRST else 1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, excluded from `make test`")
