"""Scope: the Redis side of time (issue 15) below the scheduler: due
envelopes move once and in due order while processes race, and the leader
lease (taken over at once from a provably dead holder, only after expiry
from one that might live elsewhere).  Real redis-server, real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from _redis_support import RedisServer

pytest.importorskip("redis", reason="redis-py is not installed (pip install 'ringbus[redis]')")

from ringbus.transport.redis import RedisTransport
from ringbus.transport.redis_time import LEASE_MS, leader_pid

ctx = mp.get_context("fork")


@pytest.fixture
def transport(redis_server: RedisServer) -> Iterator[RedisTransport]:
    t = RedisTransport(redis_server.url)
    t.bind(f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    yield t
    t.destroy(force=True)


def _race(t: RedisTransport, start: Any) -> None:
    start.wait(30)
    end = time.monotonic() + 2
    while time.monotonic() < end and t.scheduled()[0]:
        t.move_due()
    os._exit(0)


def test_due_envelopes_move_once_in_due_order_while_processes_race(
    transport: RedisTransport,
) -> None:
    now = time.time()
    for i in range(2000):
        # Due in the past, in reverse order of i: the stream must hold 1999 first.
        transport.put_delayed(i.to_bytes(4, "big"), now - 10 + (2000 - i) / 1000)
    start = ctx.Event()
    procs = [ctx.Process(target=_race, args=(transport, start)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        start.set()
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    r: Any = transport._redis()
    moved = [int.from_bytes(f[b"d"], "big") for _, f in r.xrange(transport.stream)]
    assert moved == list(range(1999, -1, -1))  # each once, in due order
    assert transport.scheduled() == (0, None)


def test_the_lease_of_a_dead_local_leader_is_taken_at_once(
    transport: RedisTransport,
) -> None:
    child = ctx.Process(target=lambda: os._exit(0 if transport.try_lead() else 1))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    token = transport.leader()
    assert token is not None and leader_pid(token) == child.pid
    assert transport.try_lead()  # its pid is gone on this host: no wait for expiry
    assert leader_pid(transport.leader() or "") == os.getpid()
    transport.resign()
    assert transport.leader() is None


def test_the_lease_of_a_leader_elsewhere_runs_out_first(transport: RedisTransport) -> None:
    r: Any = transport._redis()
    key = f"{transport._prefix}:leader"
    r.set(key, "otherhost:4242:abc.1.2#00ff", px=LEASE_MS)
    assert not transport.try_lead()  # it may live: its lease stands
    deadline = time.monotonic() + 30
    while not transport.try_lead():
        assert time.monotonic() < deadline, "the lease never ran out"
        time.sleep(0.1)
    assert leader_pid(transport.leader() or "") == os.getpid()
    transport.retire(keep_state=False)
    assert transport.leader() is None


def test_a_delayed_task_is_never_due_before_its_time(transport: RedisTransport) -> None:
    """Due times are kept in whole milliseconds: rounded up, never down (a
    truncated 1234.9 ms ran a task up to a millisecond early)."""
    due = (int(time.time() * 1000) + 60_000 + 0.9) / 1000  # a fraction of a ms past
    transport.put_delayed(b"late", due)
    r: Any = transport._redis()
    [(_, score)] = r.zrange(transport._delayed_key, 0, -1, withscores=True)
    assert score >= due * 1000
    next_due = transport.scheduled()[1]
    assert next_due is not None and next_due >= due
