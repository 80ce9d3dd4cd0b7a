"""One run per output folder: a lock file holding the owner's pid and host.

    with workdir_lock.hold(workdir):   # LockedError at once if another live run holds it
        ...

The lock is WORKDIR/.hipt-lock, created with O_EXCL (atomic on local filesystems and NFSv3+).
A lock left by a process that no longer exists on this host (killed with SIGKILL, power loss)
is taken over with a note; a lock held from another host is never taken over (its pid cannot
be checked from here): remove the file by hand once that run is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
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


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def acquire(workdir: str) -> str:
    """Take the lock of ``workdir`` (created if needed); returns the lock file path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                print(f"note: {path}: taking over the lock of pid {pid}, which is no longer running",
                      file=sys.stderr)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise LockedError(f"{workdir}: in use by another run (pid {pid} on host {host}; lock file "
                              f"{path}); wait for it, or remove the file if that run is gone") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise LockedError(f"{workdir}: could not take the lock {path}")


def release(path: str) -> None:
    if _read(path).get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


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
