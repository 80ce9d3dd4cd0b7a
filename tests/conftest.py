"""Shared pytest set-up: the `slow` marker and the repository root on sys.path (so tests and
benchmarks can import the in-tree PyTorch reference as `tests.reference_torch`)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, excluded from `make test`")
