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

import json
import logging
import os
import sys
from typing import Any, Callable, Optional, Union

import jax
import numpy as np

from hipt_jax import provenance

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


class ProcessMismatchError(ValueError):
    """The processes of one multi-process run were started with different output-affecting
    arguments (another model file, another seed, another format...)."""


def _allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's ``payload``, in process order (two fixed-size collectives: the lengths,
    then the bytes padded to the longest)."""
    from jax.experimental import multihost_utils

    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(payload)], np.int32))).reshape(-1)
    buf = np.zeros(max(int(lengths.max()), 1), np.uint8)
    buf[:len(payload)] = np.frombuffer(payload, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
    return [rows[i, :int(n)].tobytes() for i, n in enumerate(lengths)]


OUTPUT_TOKEN = ".hipt-output-token"  # in an output folder while the processes compare it


def output_identity(folder: str, *, process: Optional[int] = None, sync: Optional[Callable[[], None]] = None) -> str:
    """What says every process writes into one output folder, whatever path it sees it at (one
    shared filesystem mounted at /mnt/x on one host and /data/x on another, or a relative --out
    under two working directories, was refused when the absolute paths were compared): process
    0 creates the folder and writes a fresh random token into it, all sync, then each reads the
    token through its own path. Returns the token, or for a process that cannot see it a line
    naming its path (so it differs from process 0's). Two folders never share a token, nor do
    two hosts' local disks at one path. ``process``, ``sync``: stand-ins for tests."""
    import secrets

    path = os.path.join(folder, OUTPUT_TOKEN)
    if (jax.process_index() if process is None else process) == 0:
        try:
            os.makedirs(folder, exist_ok=True)
            with open(f"{path}.tmp-{os.getpid()}", "w") as f:
                f.write(secrets.token_hex(16))
            os.replace(f"{path}.tmp-{os.getpid()}", path)
        except OSError:
            pass  # every process then reports the token unseen at its own path
    (sync or _sync_output_token)()
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:  # the mismatch message shortens values: this process names its path itself
        print(f"{folder}: this process ({jax.process_index() if process is None else process}) does not see "
              f"the {OUTPUT_TOKEN} process 0 wrote into its output folder: another folder than "
              "process 0's?", file=sys.stderr)
        return f"not seen at {os.path.abspath(folder)}"


def _sync_output_token() -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("hipt output token")


def drop_output_token(folder: str) -> None:
    """Process 0, once every process compared its fields (they were exchanged, so each has read
    the token): the folder keeps only the command's outputs."""
    if jax.process_index() == 0:
        try:
            os.remove(os.path.join(folder, OUTPUT_TOKEN))
        except OSError:
            pass


def check_same_everywhere(fields: Union[dict, Callable[[], dict]], *,
                          gather: Optional[Callable[[bytes], list[bytes]]] = None) -> None:
    """Refuse (ProcessMismatchError, in every process alike) unless every process of this run
    holds the same ``fields`` (JSON-able: content hashes of the models, seeds, formats, the
    identity of the data (provenance.data_identity, not its path: hosts may mount it apart),
    the output folder...), or the same result of ``fields()``, called only when there are
    several processes (a listing of the data costs a single-process run nothing).

    Why every process and not process 0 alone: each process embeds or trains its own share with
    its own arguments, and only process 0's are recorded; another model copy or seed on one host
    would silently make part of the output with another model. Every process receives every
    process's fields, so all reach the same decision and none is left waiting in a collective.
    ``gather`` (tests): stands in for the cross-process exchange."""
    if gather is None:
        if jax.process_count() == 1:
            return
        gather = _allgather_bytes
    mine = json.dumps(fields() if callable(fields) else fields, sort_keys=True, default=str)
    everyone = [provenance.flat_fields(json.loads(b.decode())) for b in gather(mine.encode())]
    reference = everyone[0]
    differing = {p: sorted(k for k in set(reference) | set(f) if reference.get(k) != f.get(k))
                 for p, f in enumerate(everyone) if f != reference}
    if not differing:
        return
    def named(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    listed = "; ".join(f"process {p} differs from process 0 in {named(keys)}"
                       for p, keys in list(differing.items())[:4])
    if len(differing) > 4:
        listed += f"; {len(differing) - 4} more processes differ"
    example_p, example_keys = next(iter(differing.items()))
    shown = everyone[example_p]
    values = ", ".join(f"{k}: {provenance.short_value(reference.get(k), 40)} (process 0) vs "
                       f"{provenance.short_value(shown.get(k), 40)} (process {example_p})"
                       for k in example_keys[:3])
    raise ProcessMismatchError(
        f"the {len(everyone)} processes were started with different arguments ({listed}; "
        f"{values}); give every process the same command, model files and data")
