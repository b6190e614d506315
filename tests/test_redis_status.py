"""The Redis task table (transport/redis_status.py) on a real redis-server,
wired into a RedisTransport the way the README asks RedisTransport to."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest

from _identity_tasks import AsyncWait, Ran, Report, Tiny, make_identity_bus
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import TaskBus, TaskServer

pytest.importorskip("redis", reason="redis-py is not installed")

from ringbus.transport.redis import RedisTransport


@pytest.fixture(name="rbus")
def rbus_fixture(bus_name: str, redis_server: Any) -> Iterator[TaskBus]:
    # Signed: a broker bus refuses unsigned pickle (the cancel answers are signed too).
    transport = RedisTransport(redis_server.url, visibility_timeout=5)
    bus = make_identity_bus(bus_name, transport=transport, secret="identity-test-secret")
    try:
        yield bus
    finally:
        r = bus.transport._redis()  # type: ignore[attr-defined]
        for k in r.scan_iter(f"{bus.transport._prefix}:task:*"):  # type: ignore[attr-defined]
            r.delete(k)
        bus.destroy(force=True)


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
    started, outcome = tmp_path / "started", tmp_path / "outcome"
    servers.append(TaskServer(rbus, workers=1, concurrency=2).start())
    fut = rbus.dispatch(AsyncWait(str(started), str(outcome)))
    wait_for(started.exists, what="the handler to start")
    assert rbus.cancel(fut.task_id) is True
    with pytest.raises(CancelledError):
        fut.result(timeout=60)
    assert outcome.read_text() == "CancelledError"
    assert rbus.dispatch(Tiny(1)).result(timeout=60) == 1
    assert not marker.exists()
    assert rbus.status("ab" * 16).state == "unknown"
