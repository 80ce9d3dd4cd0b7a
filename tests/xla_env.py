"""XLA_FLAGS for the subprocesses tests start."""
import os


def xla_flags(devices: int = 0) -> str:
    """This pytest process's XLA_FLAGS (tests/conftest.py's LLVM level among them), with
    ``devices`` fake CPU devices in place of any device count it held (0: none).

    A subprocess given only ``--xla_force_host_platform_device_count=N`` compiled at LLVM's full
    optimization level, the slowest compile of the suite's tiny programs."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)
