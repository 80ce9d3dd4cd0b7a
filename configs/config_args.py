"""The ``get_config(arg)`` argument shared by every config: comma-separated switches such as
``runlocal`` (shrink the experiment to CPU seconds) or ``bf16``."""
from __future__ import annotations


def parse_config_arg(arg: str, allowed: set[str]) -> set[str]:
    """'runlocal,bf16' -> {'runlocal', 'bf16'}; unknown switches are an error naming them."""
    flags = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = flags - allowed
    if unknown:
        raise ValueError(f"unknown config arg(s) {sorted(unknown)}: use {' and/or '.join(sorted(allowed))}")
    return flags
