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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, excluded from `make test`")
