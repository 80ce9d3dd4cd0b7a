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
# LLVM at its lowest optimization level for the programs tests compile (and, through the
# environment, the CLI subprocesses they start): compiling is most of the suite's time on a
# 2-core machine and this cuts it by about a third (the stage-1 sharding test: 32 s -> 20 s),
# while the tests' programs are tiny, so running them unoptimized costs little. XLA's HLO passes
# (fusion, sharding, what the HLO checks look at) are unchanged; results move by rounding only
# (every cross-program comparison has a tolerance). A caller's own level in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
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

# Longest files first (longest-processing-time order): pytest-xdist's --dist loadfile hands out
# whole files in collection order as workers free up, so a long file dispatched last (the
# alphabetical order puts test_vit*.py there) leaves the other worker idle at the end. Measured
# per-file seconds of `make test` on a 2-core CPU, 2026-11-30: slurm 245, pretrain_recipe 111,
# finetune 101, hipt4k 73, pretrain_sharding 70, pretrain_run 68, cli 61, selection_predict 61,
# vit 60, heatmap 60, lgp 42, vitwsi 40; every other file is under 40 s.
_HEAVY_FIRST = ("test_slurm.py", "test_pretrain_recipe.py", "test_finetune.py", "test_hipt4k.py",
                "test_pretrain_sharding.py", "test_pretrain_run.py", "test_cli.py", "test_selection_predict.py",
                "test_vit.py", "test_heatmap.py", "test_lgp.py", "test_vitwsi.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    # stable sort: tests keep their order inside a file, the remaining files their collection order
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, excluded from `make test`")
