"""The machine a benchmark figure was taken on, printed with every figure: CPU model, cores,
cache sizes (hipt_jax.models.minibatch.cpu_info, from sysfs) and XLA_FLAGS."""
from __future__ import annotations

import os


def machine_tag() -> str:
    from hipt_jax.models.minibatch import cpu_info

    info = cpu_info()
    mib = lambda b: f"{b / 2**20:g} MiB"  # noqa: E731
    return (f"[{info['model']}, {info['cores']} cores, L2 {mib(info['l2'])}, L3 {mib(info['l3'])}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}]")
