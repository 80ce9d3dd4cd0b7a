"""Peak resident memory of a block of benchmark code, for memory figures taken at the same
settings as the speed figure they sit beside."""
from __future__ import annotations

import threading
import time


class PeakRss:
    """Peak RSS (bytes) of this process plus its child processes above the value at entry,
    sampled every ``every_s`` seconds in a thread while the block runs."""

    def __init__(self, every_s: float = 0.005):
        import psutil

        self._proc, self._every, self.peak = psutil.Process(), every_s, 0

    def _rss(self) -> int:
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # noqa: BLE001 -- a child that just exited
                pass
        return total

    def __enter__(self):
        self._base = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self._base)
            time.sleep(self._every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self._base)
