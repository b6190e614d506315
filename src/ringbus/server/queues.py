"""The server's side of named queues: which queues it serves, and telling its
workers when a new (queue, priority) ring of those queues appears.

A worker builds its taker from the rings that exist (a worker serving only
the default queue, with no priority rings, blocks directly on the task ring:
no extra work per task).  A priority ring made later by a producer is found
by an idle worker within a second, but a busy worker never looks; so the
supervisor compares the transport's ``channels_key`` now and then (cheap: a
``stat`` of /dev/shm unless it changed) and sends ``RESCAN_SIGNAL`` to its
workers, whose take wakes and is built again.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from ringbus._names import validate_queue_name
from ringbus.server.worker import RESCAN_SIGNAL
from ringbus.transport.base import Transport

__all__ = ["ChannelWatch", "check_queues", "served_queues"]


def check_queues(queues: Any) -> list[str] | None:
    """``queues=`` of a TaskServer: None or a non-empty list of queue names."""
    if queues is None:
        return None
    if isinstance(queues, str) or not all(isinstance(q, str) for q in queues):
        raise ValueError(f"queues must be a list of queue names, not {queues!r}")
    out = [validate_queue_name(q) for q in queues]
    if not out:
        raise ValueError("queues must name at least one queue")
    if len(set(out)) != len(out):
        raise ValueError(f"queues lists a queue twice: {out!r}")
    return out


def served_queues(bus: Any, queues: list[str] | None) -> list[str]:
    """At start: the queues to serve, each one the bus knows (its handlers'
    queues and "default"); the default is all of them."""
    known = list(bus.queues)
    if queues is None:
        return known
    unknown = [q for q in queues if q not in known]
    if unknown:
        raise ValueError(
            f"bus {bus.name!r} has no handler for queue(s) {unknown}: "
            f"its queues are {known}"
        )
    return list(queues)


class ChannelWatch:
    """Supervisor: signal the workers when the served channels change."""

    every = 0.5  # seconds between looks (a stat of /dev/shm on shared memory)

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.key = transport.channels_key()
        self._next = time.monotonic() + self.every

    def poll(self, pids: list[int]) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        key = self.transport.channels_key()
        if key == self.key:
            return
        self.key = key
        for pid in pids:  # our own live children (reaped ones are not listed)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, RESCAN_SIGNAL)
