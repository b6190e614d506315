"""What a transport offers for handlers' rate limits and concurrency caps.

A backend hands out one gate per limited handler; a worker asks the gate
before it starts a task of that handler and tells it when the task is done.
Shared memory: ``shm_limits`` (one machine).  Redis: ``redis_limits`` (every
machine on the broker).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["LimitGate", "LimitsBackend"]


class LimitGate(Protocol):
    """One handler's limits, as seen by one process."""

    def try_start(self) -> int:
        """May a task start now?  ``>= 0``: yes (a permit number to give back
        with ``finish``, 0 for none); ``< 0``: not now, try again in ``-n``
        nanoseconds.  Never blocks."""

    def finish(self, permit: int) -> bool:
        """The task started with ``permit`` (> 0) is done: give the permit
        back.  False when it was no longer this process's (taken back by a
        recoverer that judged it dead)."""


class LimitsBackend(Protocol):
    def gate(self, key: str, interval_ns: int, burst: int, cap: int) -> LimitGate:
        """The gate of handler ``key``: a token bucket of ``burst`` tokens, one
        more every ``interval_ns`` (0: no rate limit), and at most ``cap``
        running at once (0: no cap)."""

    def close(self) -> None:
        """Release this process's handles."""
