"""Scope: Redis at broker speed (issue 18): batched takes bounded by the
journals given, a worker pool SIGKILLed with batches in hand (every task
runs, each once unless it was in the killed pool's hands), dispatches of 8
threads combined into shared round trips, errors reaching every caller of a
combined round trip.  Real redis-server, real processes, no timing asserts."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _redis_support import RedisServer
from _redis_tasks import TEST_SECRET
from _tasks_support import bus_name_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import TaskBus, TaskServer
from ringbus.testing.redis_server import free_port
from ringbus.transport.base import JOURNAL_DATA_AT

redis = pytest.importorskip("redis", reason="redis-py is not installed")

from ringbus.transport.redis import BrokerUnavailable, RedisTransport  # noqa: E402

ctx = mp.get_context("fork")


@dataclass
class Mark:
    """Appends ``key pid`` to ``log``, naps, returns ``key``."""

    log: str
    key: int


def mark(task: Mark) -> int:
    with open(task.log, "a") as f:
        f.write(f"{task.key} {os.getpid()}\n")
    time.sleep(0.02)
    return task.key


def _bus(name: str, url: str) -> TaskBus:
    bus = TaskBus(name, transport=f"{url}?visibility_timeout=1.5", secret=TEST_SECRET)
    bus.register(Mark, mark)
    return bus


@pytest.fixture
def transport(redis_server: RedisServer, bus_name: str) -> Iterator[RedisTransport]:
    t = RedisTransport(redis_server.url)
    t.bind(bus_name)
    yield t
    t.destroy(force=True)


def test_a_batched_take_is_bounded_by_the_journals_given(transport: RedisTransport) -> None:
    transport.put_tasks([f"task {i}".encode() for i in range(10)])
    journals = [bytearray(256) for _ in range(4)]
    got = transport.take_tasks(journals, timeout=10)
    assert [d for d, _, _ in got] == [f"task {i}".encode() for i in range(4)]
    for j, (data, deliveries, _) in zip(journals, got, strict=True):
        n = int.from_bytes(j[:4], "little")
        assert bytes(j[JOURNAL_DATA_AT : JOURNAL_DATA_AT + n]) == data and deliveries == 1
    assert len({tag for _, _, tag in got}) == 4
    assert transport.pending_tasks() == 6
    for _, _, tag in reversed(got):  # any order
        transport.ack_task(tag)
    rest = transport.take_tasks([bytearray(256) for _ in range(64)], timeout=10)
    assert len(rest) == 6
    for _, _, tag in rest:
        transport.ack_task(tag)
    transport.close()
    r: Any = redis.Redis.from_url(transport.url)
    assert r.xpending(transport.stream, "workers")["pending"] == 0


def _server_group(name: str, url: str, ready: Any) -> None:
    os.setsid()  # its workers share its fate: SIGKILL the group
    TaskServer(_bus(name, url), workers=2, concurrency=16).start()
    ready.set()
    while True:
        time.sleep(1)


def test_a_pool_sigkilled_mid_batch_loses_nothing(
    redis_server: RedisServer, bus_name: str, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    bus = _bus(bus_name, redis_server.url)
    ready = ctx.Event()
    group = ctx.Process(target=_server_group, args=(bus_name, redis_server.url, ready))
    group.start()
    server: TaskServer | None = None
    try:
        assert ready.wait(30)
        futs = bus.dispatch_many(Mark(str(log), i) for i in range(400))
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 60, 60)
        os.killpg(group.pid or 0, signal.SIGKILL)  # 32 slots, batches in hand
        group.join(10)
        killed = {int(ln.split()[1]) for ln in log.read_text().splitlines()}
        server = TaskServer(bus, workers=2, concurrency=16).start()
        assert sorted(f.result(timeout=120) for f in futs) == list(range(400))
    finally:
        if group.pid is not None:
            try:
                os.killpg(group.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        group.join(10)
        if server is not None:
            server.stop(timeout=10)
        bus.destroy(force=True)
    runs = [tuple(map(int, ln.split())) for ln in log.read_text().splitlines()]
    counts = Counter(k for k, _ in runs)
    assert set(counts) == set(range(400))  # none lost
    for key, n in counts.items():
        if n > 1:  # delivered again: only a task the killed pool had in hand
            pids = [p for k, p in runs if k == key]
            assert n == 2 and pids[0] in killed and pids[1] not in killed, (key, pids)


def test_a_burst_from_8_threads_shares_round_trips(
    redis_server: RedisServer, bus_name: str, tmp_path: Path
) -> None:
    bus = _bus(bus_name, redis_server.url)
    log = str(tmp_path / "runs")
    start = threading.Barrier(8)
    futs: list[list[Any]] = [[] for _ in range(8)]

    def burst(k: int) -> None:
        start.wait(30)
        for i in range(200):
            futs[k].append(bus.dispatch(Mark(log, k * 1000 + i)))

    try:
        with TaskServer(bus, workers=2, concurrency=8):
            bus.dispatch(Mark(log, -1)).result(timeout=60)
            combiner = bus.transport._dispatches  # type: ignore[attr-defined]
            rounds = combiner.rounds
            bus.dispatch(Mark(log, -2)).result(timeout=60)
            assert combiner.rounds == rounds + 1  # a lone dispatch goes out by itself
            threads = [threading.Thread(target=burst, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            got = sorted(f.result(timeout=120) for fs in futs for f in fs)
            assert got == sorted(k * 1000 + i for k in range(8) for i in range(200))
            assert combiner.combined > 0  # some dispatches rode another's round trip
            assert combiner.rounds - rounds - 1 < 1600
    finally:
        bus.destroy(force=True)
    keys = Counter(int(ln.split()[0]) for ln in Path(log).read_text().splitlines())
    assert all(n == 1 for n in keys.values())  # each queued once


def test_every_caller_of_a_combined_round_trip_gets_its_error() -> None:
    t = RedisTransport(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=2)
    t.bind("nobody-listens")
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def put() -> None:
        start.wait(30)
        try:
            t.put_task(b"x")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(errors) == 8 and all(isinstance(e, BrokerUnavailable) for e in errors)
    t.close()


def test_coroutines_dispatching_at_once_share_round_trips(
    redis_server: RedisServer, bus_name: str, tmp_path: Path
) -> None:
    import asyncio

    bus = _bus(bus_name, redis_server.url)
    log = str(tmp_path / "runs")

    async def burst() -> list[int]:
        return list(await asyncio.gather(*(bus.dispatch_async(Mark(log, i)) for i in range(400))))

    try:
        with TaskServer(bus, workers=2, concurrency=8):
            assert sorted(asyncio.run(burst())) == list(range(400))
            assert bus.transport._dispatches.combined > 0  # type: ignore[attr-defined]
    finally:
        bus.destroy(force=True)


def test_an_async_dispatch_to_a_dead_redis_fails_its_future() -> None:
    import asyncio

    bus = TaskBus(
        "nobody-listens", transport=f"redis://127.0.0.1:{free_port()}/0", secret=TEST_SECRET
    )
    bus.register(Mark, mark)

    async def once() -> None:
        await bus.dispatch_async(Mark("/dev/null", 1))

    with pytest.raises(BrokerUnavailable):
        asyncio.run(once())
    bus.close()
