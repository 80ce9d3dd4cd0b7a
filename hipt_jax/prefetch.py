"""Device prefetch: keep the next batches' host-to-device copies in flight while the device
runs the current step.

``jax.device_put`` returns at once and copies in the background, so putting batch i+1 and i+2
before the caller dispatches step i means the device never waits for a copy that could have
started earlier. One helper for pretraining, fine-tuning and extraction.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
U = TypeVar("U")

IN_FLIGHT = 2  # batches on their way to the device while the current one is used


def prefetch_to_device(batches: Iterable[T], put: Callable[[T], U],
                       size: int = IN_FLIGHT) -> Iterator[U]:
    """``put(batch)`` for every batch, in order, with ``size`` batches put ahead of the one
    the caller holds (``put`` should be asynchronous: jax.device_put or a function of it).

    The source is read lazily: at most ``size + 1`` batches have left it at any time, so a
    caller that stops early (a checkpoint boundary) loses at most that many.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    queue: collections.deque = collections.deque()
    source = iter(batches)
    for batch in source:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
