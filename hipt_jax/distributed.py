"""One place that decides single-process vs multi-process JAX start-up.

Call ``initialize(config)`` first thing in a script, before anything touches ``jax.devices()``.
Decision, in order:
1. Explicit: ``config.coordinator_address`` + ``config.num_processes`` (> 1) +
   ``config.process_id``, or the same from the environment (JAX_COORDINATOR_ADDRESS,
   JAX_NUM_PROCESSES, JAX_PROCESS_ID). On CPU the gloo collectives are enabled first, which is
   what several processes on one machine (tests, laptops) need.
2. SLURM with more than one task (SLURM_NTASKS > 1): ``jax.distributed.initialize()`` reads
   everything from the SLURM environment.
3. A multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several hosts):
   ``jax.distributed.initialize()`` auto-detects the topology.
4. Otherwise single-process: nothing to do; the same script runs unchanged.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax

_started = False


def _get(config: Optional[Any], key: str, env: str, default=None):
    value = config.get(key) if config is not None and hasattr(config, "get") else None
    if value in (None, "", -1):
        value = os.environ.get(env, default)
    return value


def started() -> bool:
    """Whether ``initialize`` started jax.distributed in this process."""
    return _started


def initialize(config: Optional[Any] = None) -> bool:
    """Start jax.distributed when config or environment says multi-process.

    ``config`` is any mapping with optional keys coordinator_address, num_processes,
    process_id (e.g. ``config.distributed`` of a training config). Returns True when running
    multi-process. Safe to call twice.
    """
    global _started
    if _started:
        return True
    address = _get(config, "coordinator_address", "JAX_COORDINATOR_ADDRESS")
    num = int(_get(config, "num_processes", "JAX_NUM_PROCESSES", 1) or 1)
    if address and num > 1:
        pid = int(_get(config, "process_id", "JAX_PROCESS_ID", 0))
        # CPU processes exchange collectives through gloo (no effect on GPU/TPU backends).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, num_processes=num, process_id=pid)
        logging.info("jax.distributed: process %d of %d via %s", pid, num, address)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
        logging.info("jax.distributed: SLURM, %d tasks", int(os.environ["SLURM_NTASKS"]))
    elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()
        logging.info("jax.distributed: multi-host TPU slice")
    else:
        return False
    _started = True
    return True
