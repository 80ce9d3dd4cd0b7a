"""SIGTERM (a scheduler's preemption, `kill`) as an exception, like Ctrl-C's KeyboardInterrupt.

Every command routes SIGTERM here (hipt_jax.cli.flags.run_command): the main thread gets
``Terminated``, a KeyboardInterrupt, so everything that cleans up after Ctrl-C (the workdir lock
released, worker pools and loaders stopped, temporary files removed) does so after a preemption
too, and run_command turns it into one line and exit 143. Without a handler the process died at
once: its lock stayed (a resubmitted job on another host was refused) and its pool workers
printed BrokenPipeError tracebacks.

Code that must not be broken off at an arbitrary point (the pretraining loop, whose checkpoint
saves and deletions run in Orbax threads the main thread waits for) runs inside ``deferred()``:
there a SIGTERM is only recorded, and ``check()`` raises it at the next safe point.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator


class Terminated(KeyboardInterrupt):
    """The process was sent SIGTERM (see the module docstring)."""


_requested = False  # a SIGTERM arrived
_raised = False  # ... and was raised as Terminated
_defer = 0  # depth of deferred() blocks


def reset() -> None:
    global _requested, _raised, _defer
    _requested = _raised = False
    _defer = 0


def requested() -> bool:
    """True once a SIGTERM has reached Python (the main thread is stopping or will at its next
    safe point), False when none did or it is still held up in native code."""
    return _requested


def install() -> Callable[[], None]:
    """Route SIGTERM here (main thread only), and re-deliver a SIGTERM or Ctrl-C that Python
    dropped inside a callback; returns a function that puts the previous handlers back (for
    callers that are not the whole process, e.g. tests)."""
    reset()
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    previous_hook = sys.unraisablehook

    def hook(args) -> None:
        # A handler runs at any bytecode, also inside a garbage-collection callback or a __del__
        # (jax's _xla_gc_callback runs during compilation), where Python prints the exception
        # with a traceback and drops it: the run went on and the stop was lost, or ended later
        # through the watchdog with that traceback above its one line. Deliver the same signal
        # again, from a thread, so that the main thread meets it after this hook (were it
        # dropped again, this hook runs again). Ctrl-C's KeyboardInterrupt alike.
        if isinstance(args.exc_value, KeyboardInterrupt):
            global _requested, _raised
            if isinstance(args.exc_value, Terminated):
                _requested = _raised = False
                signum = signal.SIGTERM
            else:
                signum = signal.SIGINT
            again = threading.Timer(0.01, os.kill, (os.getpid(), signum))
            again.daemon = True
            again.start()
            return
        previous_hook(args)

    sys.unraisablehook = hook

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous_handler)
        sys.unraisablehook = previous_hook

    return restore


def on_sigterm(signum, frame) -> None:
    """The SIGTERM handler (main thread)."""
    global _requested
    if _requested:  # a second SIGTERM must not break off the cleanup the first started
        return
    _requested = True
    if not _defer:
        _raise()


def _raise() -> None:
    global _raised
    _raised = True
    raise Terminated()


def check() -> None:
    """Raise Terminated here if a SIGTERM arrived inside a ``deferred()`` block (a safe point)."""
    if _requested and not _raised:
        _raise()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a SIGTERM does not break into: it is raised by ``check()`` inside, or on leaving."""
    global _defer
    _defer += 1
    try:
        yield
    finally:
        _defer -= 1
    check()  # not reached when the block raised: that exception stops the run anyway
