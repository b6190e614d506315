"""The Redis task table (transport/redis_status.py) through the real
RedisTransport on a real redis-server: status, progress, kept results and
cancel; a dispatch's record in the round trip of its task; a Redis that is
stopped under dispatchers and workers.  Servers and keys are removed
afterwards, also when a test fails; no test asserts a timing."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest

from _identity_tasks import AsyncWait, Mail, Outage, Ran, Report, Tiny, mail, make_identity_bus
from _redis_support import RedisServer
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import TaskBus, TaskServer

redis = pytest.importorskip("redis", reason="redis-py is not installed")

from ringbus.transport.redis import BrokerUnavailable, RedisTransport  # noqa: E402

SECRET = "identity-test-secret"  # a broker bus refuses unsigned pickle


def _bus(name: str, url: str) -> TaskBus:
    return make_identity_bus(
        name, transport=RedisTransport(url, visibility_timeout=5), secret=SECRET
    )


def _task_keys(bus: TaskBus) -> set[str]:
    r = bus.transport._redis()  # type: ignore[attr-defined]
    prefix = bus.transport._prefix  # type: ignore[attr-defined]
    return {k.decode().rsplit(":", 1)[1] for k in r.scan_iter(f"{prefix}:task:*")}


@pytest.fixture(name="rbus")
def rbus_fixture(bus_name: str, redis_server: Any) -> Iterator[TaskBus]:
    bus = _bus(bus_name, redis_server.url)
    try:
        yield bus
    finally:
        bus.destroy(force=True)  # the task hashes too


def test_status_progress_and_kept_result(
    rbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    fut = rbus.dispatch(Report(4, gate=str(gate), started=str(started)))
    assert rbus.status(fut.task_id).state == "queued"
    servers.append(TaskServer(rbus, workers=1).start())
    wait_for(started.exists, what="the handler to start")
    st = wait_for(lambda: (s := rbus.status(fut.task_id)).progress is not None and s)
    assert (st.state, st.progress, st.message) == ("running", 0.5, "half way")
    gate.write_text("go")
    assert fut.result(timeout=60) == 8
    assert rbus.status(fut.task_id).state == "done"
    assert rbus.result(fut.task_id) == 8
    ran = rbus.dispatch(Ran(str(tmp_path / "ran")))  # no keep_result: gone with its result
    assert ran.result(timeout=60) is None and rbus.status(ran.task_id).state == "unknown"
    tid = rbus.send(Tiny(3))  # keep_result=1
    assert rbus.result(tid, timeout=60) == 3
    wait_for(lambda: rbus.status(tid).state == "unknown", what="the 1 s keep to pass")
    with pytest.raises(LookupError):
        rbus.result(tid)


def test_cancel_queued_and_running(
    rbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    queued = rbus.dispatch(Ran(str(marker)))
    assert rbus.cancel(queued.task_id) is True and queued.cancelled()
    delayed = rbus.dispatch(Ran(str(marker)), delay=0.5)
    assert rbus.cancel(delayed.task_id) is True and delayed.cancelled()
    r = rbus.transport._redis()  # type: ignore[attr-defined]
    waiting = f"{rbus.transport._prefix}:cancelled"  # type: ignore[attr-defined]
    assert r.zcard(waiting) == 2  # what workers read with their tasks
    started, outcome = tmp_path / "started", tmp_path / "outcome"
    servers.append(TaskServer(rbus, workers=1, concurrency=2).start())
    fut = rbus.dispatch(AsyncWait(str(started), str(outcome)))
    wait_for(started.exists, what="the handler to start")
    assert rbus.cancel(fut.task_id) is True
    with pytest.raises(CancelledError):
        fut.result(timeout=60)
    # The future may be cancelled first: a cancel within a few ms of the
    # start finds the task still queued in its record (README, "On Redis").
    wait_for(outcome.exists, 60, "the handler to get CancelledError")
    assert outcome.read_text() == "CancelledError"
    assert rbus.dispatch(Tiny(1)).result(timeout=60) == 1
    wait_for(lambda: r.zcard(waiting) == 0, 60, "the worker to meet both cancelled tasks")
    assert not marker.exists()
    assert rbus.status("ab" * 16).state == "unknown"


def test_a_task_cancelled_on_a_named_queue_never_runs(
    rbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    """A worker serving several channels takes with one script (TAKE): the
    cancelled set is read behind it too."""
    rbus.register(Mail, mail, queue="mail")
    cancelled, later = tmp_path / "cancelled", tmp_path / "later"
    fut = rbus.dispatch(Mail(str(cancelled)), priority=3)
    assert rbus.cancel(fut.task_id) is True and fut.cancelled()
    servers.append(TaskServer(rbus, workers=1, queues=["mail", "default"]).start())
    assert rbus.dispatch(Mail(str(later)), priority=3).result(timeout=60) is None
    r = rbus.transport._redis()  # type: ignore[attr-defined]
    waiting = f"{rbus.transport._prefix}:cancelled"  # type: ignore[attr-defined]
    wait_for(lambda: r.zcard(waiting) == 0, 60, "the worker to meet the cancelled task")
    assert later.exists() and not cancelled.exists()


def test_a_dispatch_sends_its_status_record_in_the_round_trip_of_its_task(
    rbus: TaskBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dispatch, send and a delayed dispatch each make one round trip from
    the caller's thread, their queued/scheduled record included; destroy
    removes the records."""
    rbus.dispatch(Tiny(0))  # the reply key, the connection: made once
    me = threading.get_ident()
    sent: list[int] = []
    real = redis.connection.Connection.send_packed_command

    def counted(conn: Any, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == me:  # not the reader thread's reads
            sent.append(1)
        real(conn, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counted)
    import ringbus.transport.redis_wire as wire  # dispatches go out through redis_wire

    real_pack = wire.pack

    def packed(cmds: Any) -> bytes:
        if threading.get_ident() == me:
            sent.append(1)
        return real_pack(cmds)

    monkeypatch.setattr(wire, "pack", packed)
    fut = rbus.dispatch(Tiny(1))
    tid = rbus.send(Tiny(2))
    later = rbus.dispatch(Tiny(3), delay=3600)
    assert len(sent) == 3
    monkeypatch.undo()
    states = [rbus.status(t).state for t in (fut.task_id, tid, later.task_id)]
    assert states == ["queued", "queued", "scheduled"]
    assert {fut.task_id, tid, later.task_id} <= _task_keys(rbus)
    rbus.destroy(force=True)
    assert not _task_keys(rbus)


def test_a_failed_dispatch_leaves_no_record_and_raises_broker_unavailable(
    bus_name: str, redis_aof_server: RedisServer
) -> None:
    """Redis stopped: dispatch, send, status and cancel raise BrokerUnavailable
    (not a redis-py error); back up, the failed dispatches left no record and
    the records made before the stop are there."""
    bus = _bus(bus_name, redis_aof_server.url)
    try:
        before = bus.dispatch(Tiny(1))
        redis_aof_server.stop()
        with pytest.raises(BrokerUnavailable):
            bus.dispatch(Tiny(2))
        with pytest.raises(BrokerUnavailable):
            bus.send(Tiny(3), timeout=5)
        with pytest.raises(BrokerUnavailable):
            bus.status(before.task_id)
        with pytest.raises(BrokerUnavailable):
            bus.cancel(before.task_id)
        redis_aof_server.start()  # same port, same AOF
        after = bus.dispatch(Tiny(4))
        assert _task_keys(bus) == {before.task_id, after.task_id}
        assert bus.status(before.task_id).state == "queued"
    finally:
        with contextlib.suppress(BrokerUnavailable):  # a failure with Redis stopped
            bus.destroy(force=True)


def test_a_worker_rides_out_a_redis_outage(
    bus_name: str, redis_aof_server: RedisServer, servers: list[TaskServer], tmp_path: Path
) -> None:
    """Redis stops while a handler runs: its progress and end writes wait in
    the worker's sending thread with its result; the handler is neither
    failed nor stalled, the worker does not die, and once Redis is back the
    result arrives with the status already ``done``."""
    bus = _bus(bus_name, redis_aof_server.url)
    try:
        gate, after = tmp_path / "gate", tmp_path / "after"
        server = TaskServer(bus, workers=1).start()
        servers.append(server)
        fut = bus.dispatch(Outage(7, str(gate), str(after)))
        wait_for(lambda: bus.status(fut.task_id).progress == 0.1, 60, "the first progress")
        redis_aof_server.stop()
        gate.write_text("go")
        wait_for(after.exists, 60, "the handler to pass its progress write")
        redis_aof_server.start()
        assert fut.result(timeout=60) == 7
        st = bus.status(fut.task_id)
        assert (st.state, st.progress, st.message) == ("done", 1.0, "after the gate")
        assert bus.result(fut.task_id) == 7
        assert bus.dispatch(Tiny(1)).result(timeout=60) == 1 and server.restarts == 0
    finally:
        with contextlib.suppress(BrokerUnavailable):
            bus.destroy(force=True)
