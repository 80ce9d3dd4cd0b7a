"""Running our commands from tests: in-process (argparse's SystemExit included) or as a
``python -m`` subprocess with the checkout first on PYTHONPATH."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def call_main(main, argv, capsys) -> tuple[int, str, str]:
    """main(argv) in-process -> (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_module(module: str, *argv, timeout: float = 300) -> tuple[int, str, str]:
    """``python -m module argv`` -> (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr
