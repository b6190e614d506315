"""Redis transport defects of issue 12, each with a real redis-server: a
foreign pid namespace, a worker whose keeper cannot run, a Redis restarted
without persistence, entries without an envelope, a stream deleted under
live workers, a Redis that stops answering.  Processes and servers are
cleaned up also when a test fails; no test asserts a timing."""

from __future__ import annotations

import os
import queue
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from _redis_support import RedisServer
from _redis_tasks import Double, Nap, redis_bus
from _tasks_support import bus_name_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import TaskServer

redis = pytest.importorskip("redis", reason="redis-py is not installed")

from ringbus.transport.redis import BrokerUnavailable, RedisTransport  # noqa: E402

GROUP = "workers"


@pytest.fixture(name="r")
def r_fixture(redis_server: RedisServer, bus_name: str) -> Iterator[Any]:
    """A plain client of the test server; the bus's keys are removed afterwards."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        left = client.keys(f"ringbus:{{{bus_name}}}*")
        if left:
            client.delete(*left)
        client.close()


def _consumer(url: str, bus_name: str, monkeypatch: pytest.MonkeyPatch, vis: float) -> Any:
    """A bare consumer whose claim keeper never runs (a handler holding the
    GIL past the visibility timeout)."""
    t = RedisTransport(url, visibility_timeout=vis)
    t.bind(bus_name)
    monkeypatch.setattr(t, "_start_keeper", lambda: None)
    t.open()
    return t


def _pending(r: Any, stream: str) -> list[tuple[str, int]]:
    """(consumer, delivery count) of every pending entry, oldest first."""
    return [
        (p["consumer"].decode(), int(p["times_delivered"]))
        for p in r.xpending_range(stream, GROUP, "-", "+", 100)
    ]


# ----------------------------------------------------------- item 4


def test_a_finished_task_is_acknowledged_before_any_reclaim(
    redis_server: RedisServer, r: Any, bus_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler held the GIL past the visibility timeout, then finished:
    its worker's next take must not hand the same task out again."""
    vis = 0.4
    t = _consumer(redis_server.url, bus_name, monkeypatch, vis)
    journal = bytearray(4096)
    try:
        t.put_task(b"first")
        assert t.take_task(journal, timeout=10) == b"first" and t.deliveries == 1
        time.sleep(vis * 2)  # idle past the visibility timeout: nothing refreshed it
        t.ack_tasks(1)
        t.put_task(b"second")
        assert t.take_task(journal, timeout=10) == b"second"
        assert t.deliveries == 1
        assert _pending(r, t.stream) == [(t._consumer, 1)]  # only "second"
    finally:
        t.close()


def test_a_worker_never_takes_back_a_task_it_holds(
    redis_server: RedisServer, r: Any, bus_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    vis = 0.4
    t = _consumer(redis_server.url, bus_name, monkeypatch, vis)
    journal = bytearray(4096)
    try:
        t.put_task(b"first")
        assert t.take_task(journal, timeout=10) == b"first"
        time.sleep(vis * 2)  # still in hand, idle past the visibility timeout
        t.put_task(b"second")
        assert t.take_task(journal, timeout=10) == b"second"
        assert t.deliveries == 1
        assert _pending(r, t.stream) == [(t._consumer, 1), (t._consumer, 1)]
    finally:
        t.close()


def test_a_task_taken_over_from_a_silent_worker_does_not_bounce_back(
    redis_server: RedisServer, r: Any, bus_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two live workers whose keepers cannot run: the second takes the task
    over (the first was silent too long); the first, done with it, acknowledges
    it and does not take it back from the second."""
    vis = 0.4
    a = _consumer(redis_server.url, bus_name, monkeypatch, vis)
    b = _consumer(redis_server.url, bus_name, monkeypatch, vis)
    b._consumer = a._consumer + "-b"  # two workers of one test process
    journal = bytearray(4096)
    try:
        a.put_task(b"first")
        assert a.take_task(journal, timeout=10) == b"first"
        time.sleep(vis * 2)
        assert b.take_task(journal, timeout=10) == b"first" and b.deliveries == 2
        time.sleep(vis * 2)  # the second worker is silent past the timeout as well
        a.ack_tasks(1)
        with pytest.raises(queue.Empty):
            a.take_task(journal, timeout=vis * 3)
        assert _pending(r, a.stream) == []
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------- deliveries


def test_deliveries_is_the_count_of_the_envelope_taken_last(
    redis_server: RedisServer, r: Any, bus_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = _consumer(redis_server.url, bus_name, monkeypatch, 0.3)
    journal = bytearray(4096)
    try:
        for data in (b"a", b"b", b"c"):
            t.put_task(data)
        # Another host's worker took all three; "b" was delivered twice more.
        r.xreadgroup(GROUP, "elsewhere:1", {t.stream: ">"}, count=3)
        ids = [e[0] for e in r.xrange(t.stream)]
        r.xclaim(t.stream, GROUP, "elsewhere:1", 0, [ids[1]])
        r.xclaim(t.stream, GROUP, "elsewhere:1", 0, [ids[1]])
        time.sleep(0.6)
        t.put_task(b"d")
        got = []
        for _ in range(4):
            data = t.take_task(journal, timeout=10)
            got.append((data, t.deliveries))
            assert bytes(journal[8 : 8 + len(data)]) == data
            assert int.from_bytes(journal[0:4], "little") == len(data)
        assert sorted(got) == [(b"a", 2), (b"b", 4), (b"c", 2), (b"d", 1)]
    finally:
        t.close()


# ----------------------------------------------------------- item 10


def test_entries_without_an_envelope_are_dead_lettered_not_fatal(
    redis_server: RedisServer, r: Any, bus_name: str
) -> None:
    """One entry without the field ``d`` pending at a worker that died on
    another host (taken over after the visibility timeout), one new: both
    end in dead letters, acknowledged, and the workers keep serving."""
    t = RedisTransport(redis_server.url, visibility_timeout=1)
    bus = redis_bus(bus_name, t)
    try:
        r.xgroup_create(t.stream, GROUP, id="0", mkstream=True)
        r.xadd(t.stream, {"x": "not an envelope"})
        r.xreadgroup(GROUP, "elsewhere:1", {t.stream: ">"}, count=1)
        with TaskServer(bus, workers=2) as server:
            r.xadd(t.stream, {"y": "nor this"})
            wait_for(lambda: len(bus.dead_letters()) == 2, 60, "two dead letters")
            assert all("malformed task envelope" in d.reason for d in bus.dead_letters())
            assert [
                f.result(timeout=60)[0] for f in bus.dispatch_many(Double(i) for i in range(20))
            ] == [2 * i for i in range(20)]
            wait_for(lambda: not _pending(r, t.stream), 30, "every entry acknowledged")
            assert server.restarts == 0  # no worker died
    finally:
        bus.destroy()


# ----------------------------------------------------------- item 11


def _delete_stream(how: str, r: Any, url: str, bus_name: str, stream: str) -> None:
    if how == "del":
        r.delete(stream)
    elif how == "flushdb":
        r.flushdb()
    else:  # destroy() from another process's transport object
        other = RedisTransport(url)
        other.bind(bus_name)
        other.destroy()


@pytest.mark.parametrize("how", ["del", "flushdb", "destroy"])
def test_workers_recreate_a_stream_deleted_under_them(
    redis_server: RedisServer, r: Any, bus_name: str, how: str
) -> None:
    t = RedisTransport(redis_server.url, visibility_timeout=5)
    bus = redis_bus(bus_name, t)
    try:
        with TaskServer(bus, workers=2) as server:
            assert bus.dispatch(Double(1)).result(timeout=60)[0] == 2
            pids = sorted(server.pids)
            time.sleep(0.5)  # both workers idle in XREADGROUP BLOCK
            _delete_stream(how, r, redis_server.url, bus_name, t.stream)
            futs = [bus.dispatch(Double(i)) for i in range(20)]
            assert [f.result(timeout=60)[0] for f in futs] == [2 * i for i in range(20)]
            assert server.restarts == 0 and sorted(server.pids) == pids
    finally:
        bus.destroy()


def test_a_stream_deleted_before_a_reclaim_is_created_again(
    redis_server: RedisServer, r: Any, bus_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reclaim path (XINFO CONSUMERS: 'no such key'; the claim: NOGROUP)."""
    t = _consumer(redis_server.url, bus_name, monkeypatch, 0.4)
    journal = bytearray(4096)
    try:
        t.put_task(b"one")
        assert t.take_task(journal, timeout=10) == b"one"
        t.ack_tasks(1)
        for how in ("missing key", "missing group"):
            r.delete(t.stream)
            if how == "missing group":
                r.xadd(t.stream, {"d": b"ungrouped"})
            time.sleep(0.3)  # the next take reclaims first
            t._next_claim = 0.0
            if how == "missing key":
                with pytest.raises(queue.Empty):
                    t.take_task(journal, timeout=0.5)
            else:
                assert t.take_task(journal, timeout=10) == b"ungrouped"
                t.ack_tasks(1)
            assert r.xinfo_groups(t.stream)[0]["name"] == GROUP.encode()
    finally:
        t.close()


# ----------------------------------------------------------- item 3


def _free_pid() -> int:
    """A pid no process of this pid namespace has."""
    with open("/proc/sys/kernel/pid_max") as f:
        top = int(f.read())
    for pid in range(top - 1, 300, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free pid")


def _local_token() -> str:
    """``<boot>.<pidns>`` of this host and pid namespace (the consumer name's token)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip().replace("-", "")
    return f"{boot}.{os.stat('/proc/self/ns/pid').st_ino}"


def _start_ticks(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2 :].split()[19].decode()


def _taken_by(r: Any, stream: str, names: list[str]) -> None:
    """Each name: a worker that took one queued entry with XREADGROUP."""
    for name in names:
        assert r.xreadgroup(GROUP, name, {stream: ">"}, count=1)


def test_a_worker_of_another_pid_namespace_keeps_its_task(
    redis_server: RedisServer, r: Any, bus_name: str
) -> None:
    """Same host name, a pid that does not exist here: an old-style name and a
    name of another boot / pid namespace.  Neither is provably dead, so their
    tasks wait for the visibility timeout (they were taken over after 1 s)."""
    vis = 12.0
    t = RedisTransport(redis_server.url, visibility_timeout=vis)
    bus = redis_bus(bus_name, t)
    host, pid = socket.gethostname(), _free_pid()
    names = [f"{host}:{pid}", f"{host}:{pid}:{'0' * 32}.4026531836.{12345}"]
    try:
        t.open()
        futs = [bus.dispatch(Nap(0, i)) for i in range(2)]
        _taken_by(r, t.stream, names)
        taken_at = time.monotonic()
        with TaskServer(bus, workers=1):
            # Well past the same-host grace of 1 s, well before the timeout.
            time.sleep(max(0.0, taken_at + 3.0 - time.monotonic()))
            assert sorted(c for c, _ in _pending(r, t.stream)) == sorted(names)
            assert not any(f.done() for f in futs)
            # Still served: once idle past the visibility timeout.
            assert sorted(f.result(timeout=60) for f in futs) == [0, 1]
    finally:
        bus.destroy()


def test_a_provably_dead_local_worker_loses_its_task_at_once(
    redis_server: RedisServer, r: Any, bus_name: str
) -> None:
    """This boot and pid namespace: a pid that is gone, and a pid that now
    belongs to another process (another start time) are dead."""
    t = RedisTransport(redis_server.url, visibility_timeout=600)
    bus = redis_bus(bus_name, t)
    host, local = socket.gethostname(), _local_token()
    me = os.getpid()
    names = [
        f"{host}:{_free_pid()}:{local}.{12345}",
        f"{host}:{me}:{local}.{int(_start_ticks(me)) + 1}",  # pid reused by this process
    ]
    try:
        t.open()
        futs = [bus.dispatch(Nap(0, i)) for i in range(2)]
        _taken_by(r, t.stream, names)
        with TaskServer(bus, workers=1):
            assert sorted(f.result(timeout=60) for f in futs) == [0, 1]  # not after 600 s
            wait_for(lambda: not _pending(r, t.stream), 30, "both entries acknowledged")
    finally:
        bus.destroy()


def test_consumer_names_tell_this_namespace_and_start_time(
    redis_server: RedisServer, bus_name: str
) -> None:
    t = RedisTransport(redis_server.url)
    t.bind(bus_name)
    me = os.getpid()
    assert t._consumer == f"{socket.gethostname()}:{me}:{_local_token()}.{_start_ticks(me)}"


# ----------------------------------------------------------- item 5


def test_results_of_tasks_dispatched_after_a_restart_without_persistence_arrive(
    bus_name: str,
) -> None:
    """The restarted Redis has lost the dispatcher's alive key: the next
    dispatch sets it again before its task (it used to wait for the reader's
    refresh, every reply_ttl / 4, and the results were dropped meanwhile)."""
    server = RedisServer()  # of its own: restarted empty
    bus = redis_bus(bus_name, RedisTransport(server.url, visibility_timeout=5))
    try:
        with TaskServer(bus, workers=1) as pool:
            assert bus.dispatch(Double(1)).result(timeout=60)[0] == 2
            server.restart()  # no AOF, no RDB: every key is gone
            assert bus.dispatch(Double(2)).result(timeout=60)[0] == 4
            futs = bus.dispatch_many(Double(i) for i in range(10))
            assert [f.result(timeout=60)[0] for f in futs] == [2 * i for i in range(10)]
            assert pool.restarts == 0
    finally:
        bus.destroy()
        server.close()


# ----------------------------------------------------------- item 12


def test_a_dispatch_honours_its_timeout_when_redis_does_not_answer(bus_name: str) -> None:
    """A frozen redis-server (SIGSTOP) accepts connections and answers
    nothing: dispatches with a timeout raise well within a few times it (a
    correctness bound, not a benchmark), on a pooled and on a new connection."""
    server = RedisServer()
    bus = redis_bus(bus_name, RedisTransport(server.url))
    fresh = redis_bus(bus_name, RedisTransport(server.url))
    assert server.proc is not None
    pid = server.proc.pid
    try:
        bus.dispatch(Nap(0, 0))  # connected, reply key made; stays queued (no worker)
        calls = [
            lambda: bus.dispatch(Nap(0, 1), timeout=0.5),
            lambda: bus.dispatch_many([Nap(0, 2), Nap(0, 3)], timeout=0.5),
            lambda: bus.send(Nap(0, 4), timeout=0.5),
            lambda: fresh.dispatch(Nap(0, 5), timeout=0.5),  # first dispatch of a process
        ]
        os.kill(pid, signal.SIGSTOP)
        try:
            for call in calls:
                start = time.monotonic()
                with pytest.raises((BrokerUnavailable, queue.Full)):
                    call()
                assert time.monotonic() - start < 5.0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert bus.transport.pending_tasks() >= 1  # Redis answers again
    finally:
        fresh.close()
        bus.destroy()
        server.close()
