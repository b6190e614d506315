"""Blocked calls sleep: a waiter spins for microseconds, never for its whole wait.

These compare CPU time with the wall time waited (a busy waiter burns about
as much CPU as it waits; a sleeping one a few percent), not speed.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import pytest

from ringbus import JoinableQueue, Queue

WAIT = 1.0


def cpu_while_blocked(call: Callable[[], object], exc: type[BaseException]) -> float:
    t0 = time.process_time()
    with pytest.raises(exc):
        call()
    return time.process_time() - t0


def test_blocked_get_sleeps(shm_name: str) -> None:
    with Queue(8, name=shm_name) as q:
        assert cpu_while_blocked(lambda: q.get(timeout=WAIT), queue.Empty) < WAIT / 4


def test_blocked_put_sleeps(shm_name: str) -> None:
    with Queue(4, name=shm_name) as q:
        for i in range(4):
            q.put(i)
        assert cpu_while_blocked(lambda: q.put(9, timeout=WAIT), queue.Full) < WAIT / 4


def test_blocked_multi_slot_put_under_maxsize_sleeps(shm_name: str) -> None:
    """Room for one slot but not for the 20 this message needs: still a sleep."""
    with Queue(4, name=shm_name) as q:
        q.put(1)
        q.put(2)
        big = "x" * 5000
        assert cpu_while_blocked(lambda: q.put(big, timeout=WAIT), queue.Full) < WAIT / 4
        q.get()
        q.get()
        q.put(big, timeout=5)  # fits once the ring is empty
        assert q.get() == big


def test_blocked_join_sleeps(shm_name: str) -> None:
    with JoinableQueue(4, name=shm_name) as q:
        q.put(1)
        assert cpu_while_blocked(lambda: q.join(timeout=WAIT), TimeoutError) < WAIT / 4
