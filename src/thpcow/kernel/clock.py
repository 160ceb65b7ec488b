"""Simulated time: a small deterministic event loop in the spirit of SimPy's core.

Time is an integer number of nanoseconds.  Kernel threads (khugepaged,
kcompactd, kswapd) are callbacks scheduled on one heap of
``(time, priority, sequence, callback)``; the sequence number breaks ties, so
the same program always runs the same events in the same order.  Workloads
move time forward with :meth:`Clock.run_until` (or ``Kernel.advance``), and the
events that fall due run at their own times.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable

NSEC_PER_MSEC = 1_000_000
NSEC_PER_SEC = 1_000_000_000


class Clock:
    """The kernel's clock and its queue of timed events."""

    def __init__(self) -> None:
        self.now = 0
        self._queue: list[tuple[int, int, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def schedule(self, at: int, fn: Callable[[], None], priority: int = 0) -> None:
        """Run ``fn`` at time ``at`` (ns); never in the past."""
        heapq.heappush(self._queue, (max(int(at), self.now), priority, next(self._seq), fn))

    def peek(self) -> int | None:
        return self._queue[0][0] if self._queue else None

    def run_until(self, until: int) -> int:
        """Run every event due at or before ``until``, then set now = until; returns events run."""
        if until < self.now:
            raise ValueError(f"until={until}: time cannot go backwards (now={self.now})")
        n = 0
        while self._queue and self._queue[0][0] <= until:
            at, _prio, _seq, fn = heapq.heappop(self._queue)
            self.now = at
            fn()
            n += 1
        self.now = until
        return n

    def clear(self) -> None:
        self._queue.clear()
