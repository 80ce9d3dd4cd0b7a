"""Crash records: what is left behind when a native crash kills the process reading one slide.

OpenSlide, libtiff and libjpeg are C libraries. A damaged slide can make them segfault or
abort, and no Python ``except`` catches that: where slides are read in the main process
(``hipt-prep --workers 1``, ``hipt-extract --slides``) the whole run ends, and a rerun
resumes the finished slides only to die on the same one again, so the cohort never finishes.

``watch(status_dir, item_id, source)`` covers the reading of one item: it writes
STATUS/<item_id>.crash (one JSON line naming the item and its input) and points
:mod:`faulthandler` at it, so a fatal signal appends the Python stacks of every thread. The
record is removed when the item ends in any Python way (done, failed, interrupted).
``earlier`` reads what a previous run left:

- a fatal error whose crashing thread was in the slide reader: the slide crashed it, so it is
  reported failed and not read again (the message names the record to delete to retry);
- no fatal error: that run was killed while on the item (``kill -9``, the out-of-memory
  killer, a scheduler's time limit), which says nothing about the slide: it is read again;
- a fatal error elsewhere (the model, a bug), or while other items were read by threads of
  the same process (Beam's multi-threaded runner: whose slide it was is unknown): also read
  again, said on stderr;
- a record made from other input (the slide was replaced since): dropped, read again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import os
import re
import sys
import threading
from typing import Iterator, Optional

SUFFIX = ".crash"
FATAL = "Fatal Python error:"
# A crashing thread whose stack passes through these files was reading the slide.
READER_FILES = (os.sep + os.path.join("openslide", ""), os.path.join("data_prep", "slide_io.py"))

SHARED = "# shared:"  # in a record: other items were read in this process meanwhile

_lock = threading.Lock()
_holder: list = [None]  # the open record of the watch in progress (faulthandler has one file)


def record_path(status_dir: str, item_id: str) -> str:
    return os.path.join(status_dir, item_id + SUFFIX)


@dataclasses.dataclass(frozen=True)
class Earlier:
    """What a previous run's record of one item says (``earlier``)."""
    record: str
    fatal: Optional[str]  # "Fatal Python error: Segmentation fault"; None: killed, no error
    where: Optional[str]  # the crashing thread's innermost frame in the reader, else innermost
    in_reader: bool  # that thread was inside the slide reader

    @property
    def blames_slide(self) -> bool:
        return self.fatal is not None and self.in_reader


@contextlib.contextmanager
def watch(status_dir: str, item_id: str, source=None) -> Iterator[None]:
    """Record a native crash while the body runs (see the module docstring). Never stops the
    work: when the record cannot be written the body runs unwatched. Items read at the same
    time by threads of one process (Beam's multi-threaded runner) share faulthandler's one
    file: the second runs unwatched and marks the first's record shared, so a crash then is
    blamed on no slide (``earlier``)."""
    f, previous = None, faulthandler.is_enabled()
    with _lock:
        holder = _holder[0]
        if holder is not None:
            with contextlib.suppress(OSError, ValueError):
                holder.write(f"{SHARED} {item_id} was read in this process too\n")
                holder.flush()
        else:
            try:
                os.makedirs(status_dir, exist_ok=True)
                f = open(record_path(status_dir, item_id), "w")
                f.write(json.dumps({"item": item_id, "source": source, "pid": os.getpid()}) + "\n")
                f.flush()
            except OSError:
                f = None
            _holder[0] = f
            if f is not None:
                faulthandler.enable(file=f, all_threads=True)
    try:
        yield
    finally:
        if f is not None:
            with _lock:
                faulthandler.disable()
                if previous:  # as it was (pytest's, python -X faulthandler): on stderr
                    with contextlib.suppress(Exception):
                        faulthandler.enable(file=sys.__stderr__, all_threads=True)
                _holder[0] = None
                f.close()
            with contextlib.suppress(OSError):
                os.remove(record_path(status_dir, item_id))


def _crashing_stack(lines: list[str]) -> list[str]:
    """The frames of the thread that took the fatal signal ("Current thread ..." in
    faulthandler's dump; the only stack when it dumped one thread)."""
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Current thread")), None)
    if start is None:
        start = next((i for i, ln in enumerate(lines) if ln.startswith(("Thread", "Stack"))), None)
    if start is None:
        return []
    frames = []
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        if ln.strip().startswith("File "):
            frames.append(ln.strip())
    return frames


def earlier(status_dir: str, item_id: str, source=None) -> Optional[Earlier]:
    """The record a previous run left for ``item_id`` (None: none, or it was made from other
    input than ``source`` and is dropped)."""
    path = record_path(status_dir, item_id)
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:  # none, or unreadable: nothing to go on, the item is read
        return None
    head, _, rest = text.partition("\n")
    try:
        recorded = json.loads(head).get("source")
    except (ValueError, AttributeError):
        recorded = source  # a record cut off mid-header still names this item
    if source is not None and recorded is not None and recorded != source:
        with contextlib.suppress(OSError):
            os.remove(path)
        return None
    lines = rest.splitlines()
    fatal = next((ln.strip() for ln in lines if ln.startswith(FATAL)), None)
    stack = _crashing_stack(lines) if fatal else []
    shared = any(ln.startswith(SHARED) for ln in lines)  # the crashing thread may have read another item
    reader = [frame for frame in stack if any(part in frame for part in READER_FILES)]
    where = (reader or stack or [None])[0]  # the innermost reader frame: what read which slide
    return Earlier(record=path, fatal=fatal, where=where, in_reader=bool(reader) and not shared)


def _frame(line: str) -> str:
    """'File "/x/data_prep/slide_io.py", line 484 in read_rgb' -> 'read_rgb, /x/data_prep/slide_io.py:484'."""
    m = re.match(r'File "(.*)", line (\d+) in (.*)$', line)
    return f"{m.group(3)}, {m.group(1)}:{m.group(2)}" if m else line


def _what(crash: Earlier) -> str:
    fatal = crash.fatal.removeprefix(FATAL).strip() if crash.fatal else "killed"
    return f"{fatal} in {_frame(crash.where)}" if crash.where else fatal


def failure(item: str, crash: Earlier) -> str:
    """The error of a slide the reader crashed on in an earlier run (it is not read again)."""
    return (f"{item}: the slide reader crashed on it in an earlier run ({_what(crash)}): a damaged "
            f"file? Not read again; to retry it (a new copy of the file), delete {crash.record}")


def retrying(item: str, crash: Earlier) -> str:
    """The stderr line of an item an earlier run died on, read again."""
    if crash.fatal is None:
        return (f"{item}: an earlier run was killed while on it (kill -9, out of memory, a time "
                "limit?); reading it again")
    return (f"{item}: an earlier run died on it with a fatal error outside the slide reader "
            f"({_what(crash)}); reading it again")


def clear(status_dir: str, item_id: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(record_path(status_dir, item_id))
