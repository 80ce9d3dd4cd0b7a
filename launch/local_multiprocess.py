#!/usr/bin/env python3
"""Start N JAX processes on this machine, as a multi-host job would (tests, laptops, one big box).

    python launch/local_multiprocess.py --num-processes 2 --devices-per-process 4 -- \
        python -m hipt_jax.pretrain --config configs/pretrain_vit256.py:runlocal \
        --workdir /tmp/run --config.data.path=/tmp/patches

Every process gets the same command plus the environment that ``hipt_jax.distributed.initialize``
reads: JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (process 0
hosts the coordinator; CPU collectives go through gloo). ``--devices-per-process K`` gives each
process K fake CPU devices (XLA_FLAGS), so the global mesh has N*K devices, exactly like N hosts
with K accelerators each. Output lines are prefixed with ``[i]``. If one process fails the others
are stopped; the exit code is the first non-zero one (a process killed by signal N: 128 + N, as
a shell reports it).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(rank: int, num: int, port: int, devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num),
               JAX_PROCESS_ID=str(rank), JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"))
    if devices > 0:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    # Workers of one machine must not each grab every core for their thread pools.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _pump(rank: int, stream, sink, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sink.write(f"[{rank}] {line}")
            sink.flush()
    stream.close()


def exit_code(returncode: int) -> int:
    """A child's Popen returncode as this launcher's exit code: killed by signal N (returncode
    -N) is 128 + N, as a shell says it; sys.exit(-9) would have exited 247, which reads as an
    ordinary failure code of the command."""
    return 128 - returncode if returncode < 0 else returncode


def launch(command: list[str], num_processes: int, devices_per_process: int = 0, port: int = 0,
           timeout: float | None = None) -> int:
    """Run ``command`` as ``num_processes`` cooperating JAX processes; returns the exit code."""
    if not command:
        raise ValueError("no command given (put it after --)")
    port = port or free_port()
    lock = threading.Lock()
    procs, pumps = [], []
    for rank in range(num_processes):
        proc = subprocess.Popen(command, env=process_env(rank, num_processes, port, devices_per_process),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(rank, proc.stdout, sys.stdout, lock), daemon=True)
        pump.start()
        pumps.append(pump)
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    try:
        while True:
            codes = [p.poll() for p in procs]  # poll every process: any() would stop early
            if all(c is not None for c in codes):
                break
            failed = [c for c in codes if c not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                code = failed[0] if failed else 124
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # a dead peer leaves the others blocked in a collective: stop them
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    if code == 0:
        code = next((p.returncode for p in procs if p.returncode != 0), 0)
    return exit_code(code)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        ours, command = argv[:split], argv[split + 1 :]
    else:
        ours, command = argv, []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-processes", "-n", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=0,
                   help="fake CPU devices per process (0: leave XLA_FLAGS alone)")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    args = p.parse_args(ours)
    if not command:
        p.error("give the command to run after --")
    if args.num_processes < 1:
        p.error("--num-processes must be >= 1")
    code = launch(command, args.num_processes, args.devices_per_process, args.port, args.timeout)
    print(f"local_multiprocess: {args.num_processes} processes finished, exit code {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
