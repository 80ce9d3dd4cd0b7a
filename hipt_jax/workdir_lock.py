"""One run per output folder: a lock file holding the owner's pid and host.

    with workdir_lock.hold(workdir):   # LockedError at once if another live run holds it
        ...

The lock is WORKDIR/.hipt-lock, created with O_EXCL (atomic on local filesystems and NFSv3+).
A lock left by a process that no longer exists on this host (killed with SIGKILL, power loss)
is taken over with a note, and so is one naming our own pid on this host (a container restarted
in a new pid namespace: that pid is us, not another run) and one that stays empty or corrupt
(a run killed between creating the file and writing it, a full disk). A lock held from another
host is never taken over (its pid cannot be checked from here): remove the file by hand once
that run is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from typing import Iterator

LOCK = ".hipt-lock"


class LockedError(ValueError):
    """The folder is in use by another run (the message names its pid and host)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD: set[str] = set()  # lock files this process holds
CORRUPT_WAIT_S = 1.0  # how long a lock file may stay unreadable before it is taken as stale


def _read(path: str) -> dict:
    """The holder {"pid": int, "host": str}; {} when the file is gone, unreadable or not that."""
    try:
        with open(path) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return {}
    ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)
    return holder if ok else {}


def _read_settled(path: str) -> dict:
    """``_read``, giving a run that has just created the file (O_EXCL) time to write it: an
    unreadable lock is read again for CORRUPT_WAIT_S before it is judged corrupt ({})."""
    deadline = time.monotonic() + CORRUPT_WAIT_S
    while True:
        holder = _read(path)
        if holder or time.monotonic() >= deadline or not os.path.exists(path):
            return holder
        time.sleep(0.05)


def acquire(workdir: str) -> str:
    """Take the lock of ``workdir`` (created if needed); returns the lock file path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_settled(path)
            pid, host = holder.get("pid"), holder.get("host")
            if not holder:
                if not os.path.exists(path):  # released meanwhile
                    continue
                why = "it is empty or corrupt (a run killed while taking it, or a full disk)"
            elif host == me["host"] and pid == me["pid"]:
                why = f"it names pid {pid}, which is this run (a restart in a new pid namespace)"
            elif host == me["host"] and not _alive(pid):
                why = f"pid {pid} is no longer running"
            else:
                raise LockedError(f"{workdir}: in use by another run (pid {pid} on host {host}; lock file "
                                  f"{path}); wait for it, or remove the file if that run is gone") from None
            print(f"note: {path}: taking over the lock: {why}", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        try:  # one write: a reader never sees half of it
            os.write(fd, json.dumps(me).encode())
        except OSError:
            os.remove(path)  # an empty lock (disk full) must not be left behind
            raise
        finally:
            os.close(fd)
        _HELD.add(path)
        return path
    raise LockedError(f"{workdir}: could not take the lock {path}")


def release(path: str) -> None:
    _HELD.discard(path)
    if _read(path).get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def release_held() -> None:
    """Release every lock this process holds: for an exit that skips ``hold``'s ``finally``
    (the Ctrl-C / SIGTERM watchdog's os._exit), so the next run, on any host, is not refused."""
    for path in list(_HELD):
        release(path)


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of ``workdir`` for a block (``enabled=False``: no lock, e.g. on the
    non-primary processes of a multi-host run that share the folder)."""
    if not enabled:
        yield
        return
    path = acquire(workdir)
    try:
        yield
    finally:
        release(path)
