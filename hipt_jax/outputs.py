"""Writing result files so that a failed write (disk full, quota, I/O error, Ctrl-C) leaves
nothing a later command could take for a result.

Every file (or directory) is written under a temporary name next to its place and renamed into
place when complete; on failure the temporary is removed and an OSError becomes an
``OutputWriteError`` naming the path ("PATH: write failed (No space left on device)"), which
the commands report in one line with exit code 1.

    with atomic_path("out/results.json") as tmp:   # write tmp (a file or a directory)
        ...
    write_json("out/results.json", result)         # the usual case
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator


class OutputWriteError(OSError):
    """An output could not be written (the message names it; nothing partial is left)."""


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path next to ``path`` to write to; renamed to ``path`` when the block ends
    normally (replacing an old file; an old directory is removed first), removed when it raises."""
    path = os.fspath(path)
    base, ext = os.path.splitext(path)
    tmp = f"{base}.tmp-{os.getpid()}{ext}"  # the extension kept: writers that go by it still work
    _remove(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if isinstance(e, OutputWriteError):
            raise
        raise OutputWriteError(f"{path}: write failed ({e.strerror or e}); nothing partial was left") from None
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str, text: str) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_json(path: str, obj: Any, **dump_kwargs) -> str:
    """``obj`` as JSON at ``path`` (json.dump keyword arguments: indent, default, ...)."""
    return write_text(path, json.dumps(obj, **dump_kwargs))
