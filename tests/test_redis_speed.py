"""Scope: the fast paths of the Redis transport (issue 18): pipelines packed
and read by ``redis_wire`` (each reply in its place, errors too; a frozen
server ends a read at its deadline; a killed connection is replaced),
results grouped per reply list (in order, only to listening dispatchers,
acknowledged behind them), a burst of 8 threads sent in shared round trips
as Redis counts them, plain handlers of a concurrent worker overlapping
while their outcomes come back in bursts, a pool SIGKILLed in the middle
of a fast run losing nothing, the results of a concurrent worker's
``async def`` handlers riding its loop's next read, and a concurrent worker
recycled every few tasks answering each exactly once.  Real redis-server, real processes and
SIGKILL/SIGSTOP, no timing asserts (the bounds are for correctness)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _redis_support import RedisServer
from _redis_tasks import TEST_SECRET
from _tasks_support import bus_name_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import TaskBus, TaskServer
from ringbus.testing.redis_server import free_port

redis = pytest.importorskip("redis", reason="redis-py is not installed")

from ringbus.transport.redis import RedisTransport  # noqa: E402
from ringbus.transport.redis_sender import ReplySender  # noqa: E402
from ringbus.transport.redis_wire import pack, pipeline  # noqa: E402

ctx = mp.get_context("fork")


def _conn(url: str, timeout: float = 10.0) -> Any:
    return redis.ConnectionPool.from_url(url, socket_timeout=timeout).make_connection()


# ------------------------------------------------------------ redis_wire


def test_every_reply_of_a_pipeline_comes_back_in_its_place(redis_server: RedisServer) -> None:
    conn = _conn(redis_server.url)
    big = os.urandom(300_000)  # several reads from the socket
    key = f"wire-{os.getpid()}"
    try:
        out = pipeline(
            conn,
            [
                ("SET", key, big),
                ("LPUSH", key, "x"),  # WRONGTYPE: an error reply in its place
                ("GET", key),
                ("DEL", f"{key}:n"),
                ("INCRBY", f"{key}:n", 41),
                ("INCRBY", f"{key}:n", 1),
                ("GET", f"{key}:none"),
            ],
        )
        assert out[0] == b"OK"
        assert isinstance(out[1], redis.ResponseError) and "WRONGTYPE" in str(out[1])
        assert out[2] == big and out[4:] == [41, 42, None]
        assert pipeline(conn, [("PING",)]) == [b"PONG"]  # nothing left half-read
    finally:
        pipeline(conn, [("DEL", key, f"{key}:n")])
        conn.disconnect()


def test_pack_is_the_resp_redis_py_sends() -> None:
    cmds: list[tuple[Any, ...]] = [("XADD", "s", "*", b"d", b"\x00\r\n"), ("EXPIRE", "k", 60)]
    conn = _conn("redis://127.0.0.1:1/0")
    assert pack(cmds) == b"".join(conn.pack_commands(cmds))
    floats: list[tuple[Any, ...]] = [("SET", "k", 1.5), ("SET", "k", 1e20)]  # hiredis packs these
    assert pack(floats) == b"".join(conn.pack_commands(floats))
    mixed: list[tuple[Any, ...]] = [*floats, ("SET", bytearray(b"k"), 0.1, 7)]  # these in Python
    assert pack(mixed) == b"".join(conn.pack_commands(mixed))
    with pytest.raises(TypeError, match="NoneType"):
        pack([("SET", "k", None)])


def test_a_frozen_server_ends_a_read_at_its_deadline() -> None:
    server = RedisServer()
    conn = _conn(server.url)
    assert server.proc is not None
    try:
        assert pipeline(conn, [("PING",)]) == [b"PONG"]
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                pipeline(conn, [("PING",)], time.monotonic() + 0.3)
            assert time.monotonic() - start < 5.0  # bounded by the deadline, not the socket
            assert conn._sock is None  # half-read: dropped, never reused
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert pipeline(conn, [("PING",)]) == [b"PONG"]  # connected again
    finally:
        conn.disconnect()
        server.close()


def test_a_frozen_server_ends_a_read_without_deadline_at_the_socket_timeout() -> None:
    """Reads wait in the kernel (SO_RCVTIMEO), not in poll(): the socket
    timeout of the connection still bounds them, and a deadline read after
    it gets its own bound (and the other way round)."""
    server = RedisServer()
    conn = redis.ConnectionPool.from_url(server.url, socket_timeout=0.4).make_connection()
    assert server.proc is not None
    try:
        big = b"x" * 3_000_000  # a reply of many reads, each under the deadline
        assert pipeline(conn, [("SET", "big", big), ("GET", "big")], time.monotonic() + 30) == [
            b"OK",
            big,
        ]
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            for end in (None, time.monotonic() + 0.2, None):
                start = time.monotonic()
                with pytest.raises(redis.TimeoutError):
                    pipeline(conn, [("PING",)], end)
                assert time.monotonic() - start < 5.0
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert pipeline(conn, [("PING",)]) == [b"PONG"]
    finally:
        conn.disconnect()
        server.close()


def test_a_connection_killed_by_the_server_is_replaced_on_next_use(
    redis_server: RedisServer,
) -> None:
    conn = _conn(redis_server.url)
    admin: Any = redis.Redis.from_url(redis_server.url)
    try:
        (me,) = pipeline(conn, [("CLIENT", "ID")])
        admin.execute_command("CLIENT", "KILL", "ID", me)
        with pytest.raises((redis.ConnectionError, OSError)):
            pipeline(conn, [("PING",)])
        (again,) = pipeline(conn, [("CLIENT", "ID")])
        assert again != me
    finally:
        conn.disconnect()
        admin.close()


# ------------------------------------------------------------ grouped results


def test_results_go_to_their_lists_in_order_and_only_to_listeners(
    redis_server: RedisServer, bus_name: str
) -> None:
    t = RedisTransport(redis_server.url)
    t.bind(bus_name)
    r: Any = redis.Redis.from_url(redis_server.url)
    here, gone = f"{t._prefix}:reply:here", f"{t._prefix}:reply:gone"
    r.set(f"{here}:alive", b"1", ex=60)
    t.put_tasks([b"a", b"b"])
    tags = [tag for _, _, tag in t.take_tasks([bytearray(64), bytearray(64)], timeout=10)]
    sender = ReplySender(t)
    t._sender = sender
    try:
        for i in range(300):
            sender.put(here if i % 3 else gone, b"r%d" % i)
            if i == 150:
                for tag in tags:
                    t.ack_task(tag)  # behind the results queued before them
        assert sender.close(30) == []
        assert r.lrange(here, 0, -1) == [b"r%d" % i for i in range(300) if i % 3]
        assert not r.exists(gone)  # its dispatcher is gone: dropped, not left to pile up
        assert r.xpending(t.stream, "workers")["pending"] == 0
        assert 0 < r.ttl(here) <= 60
    finally:
        t._sender = None
        r.delete(here, f"{here}:alive")
        t.destroy(force=True)
        r.close()


def test_a_dispatch_brings_back_the_results_waiting_for_its_process(
    redis_server: RedisServer, bus_name: str
) -> None:
    """With no reader waiting in BLMPOP, a dispatch's round trip pops the
    results already in its process's reply list; the next read hands them
    out without a round trip.  While a reader waits, dispatches leave the
    list to it."""
    t = RedisTransport(redis_server.url)
    t.bind(bus_name)
    r: Any = redis.Redis.from_url(redis_server.url)
    key = t.reply_address().decode()
    try:
        r.rpush(key, b"r1", b"r2")
        t.put_task(b"task")
        assert r.llen(key) == 0  # came back with the XADD
        r.config_resetstat()
        assert t.recv_replies(10, timeout=0) == [b"r1", b"r2"]
        assert _calls(r, "lmpop") == _calls(r, "blmpop") == 0  # no round trip to read them
        got: list[list[bytes]] = []
        reader = threading.Thread(target=lambda: got.append(t.recv_replies(10, timeout=30)))
        reader.start()
        wait_for(lambda: t._blocked, 30, "the reader to wait in BLMPOP")
        t.put_task(b"task")  # no pop rides it: the waiting reader takes what comes
        assert _calls(r, "lmpop") == 0
        r.rpush(key, b"r3")
        reader.join(30)
        assert got == [[b"r3"]]
    finally:
        t.destroy(force=True)
        r.close()


# ------------------------------------------------------------ whole buses


@dataclass
class Echo:
    n: int
    log: str = ""


def echo(task: Echo) -> int:
    if task.log:
        with open(task.log, "a") as f:
            f.write(f"{task.n} {os.getpid()}\n")
    return task.n


_meet: threading.Barrier | None = None
_meet_lock = threading.Lock()


@dataclass
class Meet:
    """Waits until ``parties`` handlers of the worker process wait at once."""

    parties: int


def meet(task: Meet) -> int:
    global _meet
    with _meet_lock:
        if _meet is None:  # one per worker process
            _meet = threading.Barrier(task.parties, timeout=60)
    return _meet.wait()


def _bus(name: str, url: str) -> TaskBus:
    bus = TaskBus(name, transport=f"{url}?visibility_timeout=1.5", secret=TEST_SECRET)
    bus.register(Echo, echo)
    bus.register(Meet, meet, retries=0)
    return bus


def _calls(r: Any, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_burst_from_8_threads_is_few_round_trips_as_redis_counts_them(
    redis_server: RedisServer, bus_name: str
) -> None:
    """Every dispatch round trip carries one SET of the dispatcher's alive
    key ahead of its XADDs: Redis's own count of SETs is the count of round
    trips, and it is well below the count of tasks."""
    bus = _bus(bus_name, redis_server.url)
    r: Any = redis.Redis.from_url(redis_server.url)
    start = threading.Barrier(8)
    futs: list[list[Any]] = [[] for _ in range(8)]

    def burst(k: int) -> None:
        start.wait(30)
        for i in range(200):
            futs[k].append(bus.dispatch(Echo(k * 1000 + i)))

    try:
        with TaskServer(bus, workers=2, concurrency=8):
            bus.dispatch(Echo(-1)).result(timeout=60)
            r.config_resetstat()
            threads = [threading.Thread(target=burst, args=(k,)) for k in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(120)
            got = sorted(f.result(timeout=120) for fs in futs for f in fs)
            assert got == sorted(k * 1000 + i for k in range(8) for i in range(200))
            assert _calls(r, "xadd") == 1600
            assert _calls(r, "set") < 1600  # round trips shared by several dispatches
    finally:
        bus.destroy(force=True)
        r.close()


def test_plain_handlers_of_a_concurrent_worker_run_at_once(
    redis_server: RedisServer, bus_name: str
) -> None:
    """Eight plain handlers meet at a barrier of their worker process: they
    can only all return if they all run at the same time."""
    bus = _bus(bus_name, redis_server.url)
    try:
        with TaskServer(bus, workers=1, concurrency=8):
            for _ in range(3):
                futs = [bus.dispatch(Meet(8)) for _ in range(8)]
                assert sorted(f.result(timeout=120) for f in futs) == list(range(8))
    finally:
        bus.destroy(force=True)


def _server_group(name: str, url: str, ready: Any) -> None:
    os.setsid()  # its workers share its fate: SIGKILL the group
    TaskServer(_bus(name, url), workers=2, concurrency=64).start()
    ready.set()
    while True:
        time.sleep(1)


def test_a_pool_sigkilled_in_a_fast_run_loses_nothing(
    redis_server: RedisServer, bus_name: str, tmp_path: Path
) -> None:
    """Quick plain handlers at concurrency 64: a SIGKILL finds results in the
    sender's queue and batches half done; every task still completes."""
    log = tmp_path / "runs"
    bus = _bus(bus_name, redis_server.url)
    ready = ctx.Event()
    group = ctx.Process(target=_server_group, args=(bus_name, redis_server.url, ready))
    group.start()
    server: TaskServer | None = None
    n = 3000
    try:
        assert ready.wait(30)
        futs = bus.dispatch_many(Echo(i, str(log)) for i in range(n))
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 300, 60)
        os.killpg(group.pid or 0, signal.SIGKILL)
        group.join(10)
        killed = {int(ln.split()[1]) for ln in log.read_text().splitlines()}
        server = TaskServer(bus, workers=2, concurrency=64).start()
        assert sorted(f.result(timeout=120) for f in futs) == list(range(n))
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
    assert set(counts) == set(range(n))  # none lost
    for key, c in counts.items():
        if c > 1:  # delivered again: only a task the killed pool had in hand
            pids = [p for k, p in runs if k == key]
            assert c == 2 and pids[0] in killed and pids[1] not in killed, (key, pids)


# ------------------------------------------------------------ one at a time


def _results_ride_reads(bus: TaskBus, r: Any, make: Callable[[int], Any]) -> None:
    """After a warm-up, 50 tasks one after the other: the worker reads, and
    no connection whose last command came during them ended on an XACK (or
    the results script) of a separate round trip."""
    for i in range(10):  # warm up: the worker finds out how it takes tasks
        assert bus.dispatch(make(i)).result(timeout=60) == i
    time.sleep(1.5)  # Redis counts idle time in whole seconds
    t0 = time.monotonic()
    for i in range(50):
        assert bus.dispatch(make(i)).result(timeout=60) == i
    clients = r.client_list()
    recent = int(time.monotonic() - t0) + 1  # seconds the 50 tasks took, rounded up
    assert any(c["cmd"] == "xreadgroup" for c in clients)
    assert not [c for c in clients if c["cmd"] in ("xack", "eval") and int(c["idle"]) < recent]


def test_a_one_at_a_time_worker_sends_its_results_with_its_next_read(
    redis_server: RedisServer, bus_name: str
) -> None:
    """Results and acknowledgements of a worker with concurrency 1 ride the
    pipeline of its next XREADGROUP: no connection of the worker's ever ends
    on the XACK a sending thread would end its round trips with."""
    bus = _bus(bus_name, redis_server.url)
    r: Any = redis.Redis.from_url(redis_server.url)
    try:
        with TaskServer(bus, workers=1):
            _results_ride_reads(bus, r, Echo)
            assert r.xpending(bus.transport.stream, "workers")["pending"] == 0  # type: ignore[attr-defined]
    finally:
        bus.destroy(force=True)
        r.close()


@dataclass
class Quick:
    n: int


async def quick(task: Quick) -> int:
    return task.n


def test_a_concurrent_worker_sends_async_results_with_its_next_read(
    redis_server: RedisServer, bus_name: str
) -> None:
    """At concurrency 64, ``async def`` handlers that finish at once: the
    worker's loop reads, and their results and acknowledgements ride its
    next XREADGROUP (no sending thread's connection ends on an XACK)."""
    bus = TaskBus(bus_name, transport=redis_server.url, secret=TEST_SECRET)
    bus.register(Quick, quick)
    r: Any = redis.Redis.from_url(redis_server.url)
    try:
        with TaskServer(bus, workers=1, concurrency=64):
            _results_ride_reads(bus, r, Quick)
            futs = [bus.dispatch(Quick(i)) for i in range(500)]  # batches too
            assert [f.result(timeout=60) for f in futs] == list(range(500))
            assert r.xpending(bus.transport.stream, "workers")["pending"] == 0  # type: ignore[attr-defined]
    finally:
        bus.destroy(force=True)
        r.close()


@pytest.mark.parametrize("handler", ["plain", "async"])
def test_a_concurrent_worker_recycled_often_answers_every_task_once(
    redis_server: RedisServer, bus_name: str, tmp_path: Path, handler: str
) -> None:
    """The loop's last reads carried results, or did not: what the loop did
    not send, closing the worker sends, and acknowledges (none runs twice)."""
    bus = TaskBus(bus_name, transport=redis_server.url, secret=TEST_SECRET)
    bus.register(Echo, echo if handler == "plain" else quick_echo)
    log = tmp_path / "runs"
    try:
        with TaskServer(bus, workers=2, concurrency=4, max_tasks_per_child=3):
            lone = [bus.dispatch(Echo(i, str(log))).result(timeout=60) for i in range(10)]
            futs = [bus.dispatch(Echo(i, str(log))) for i in range(10, 40)]
            assert lone + [f.result(timeout=60) for f in futs] == list(range(40))
            time.sleep(3)  # past the grace after which a dead worker's task is taken over
            assert bus.dispatch(Echo(40, str(log))).result(timeout=60) == 40
    finally:
        bus.destroy(force=True)
    runs = [int(ln.split()[0]) for ln in log.read_text().splitlines()]
    assert sorted(runs) == list(range(41))  # each once: none delivered again


async def quick_echo(task: Echo) -> int:
    return echo(task)


def test_a_worker_that_stops_after_its_task_still_answers(
    redis_server: RedisServer, bus_name: str, tmp_path: Path
) -> None:
    """Recycled after every task: no next read carries the result, closing
    the worker sends it (and acknowledges the task: each runs once)."""
    bus = _bus(bus_name, redis_server.url)
    log = tmp_path / "runs"
    try:
        with TaskServer(bus, workers=1, max_tasks_per_child=1):
            got = [bus.dispatch(Echo(i, str(log))).result(timeout=60) for i in range(5)]
            assert got == list(range(5))
            time.sleep(3)  # past the grace after which a dead worker's task is taken over
            assert bus.dispatch(Echo(5, str(log))).result(timeout=60) == 5
    finally:
        bus.destroy(force=True)
    runs = [int(ln.split()[0]) for ln in log.read_text().splitlines()]
    assert sorted(runs) == list(range(6))  # each once: none delivered again


def test_a_cluster_move_is_recognised_as_redis_py_parses_it() -> None:
    """redis-py's parser (and so redis_wire) turns ``MOVED <slot> <node>``
    into a MovedError without the code: the transport must still find the
    slot's node again (it looked at the text only)."""
    from redis._parsers.base import BaseParser

    t = RedisTransport(f"redis+cluster://127.0.0.1:{free_port()}")
    t.bind("moves")
    for reply in ("MOVED 3999 127.0.0.1:7001", "ASK 3999 127.0.0.1:7001", "CLUSTERDOWN down"):
        assert t._moved(BaseParser.parse_error(reply)), reply
    assert not t._moved(BaseParser.parse_error("WRONGTYPE Operation against a key"))
    t.close()
