"""Scope: ``TaskServer(concurrency=N)``: async handlers on each worker's event
loop, plain handlers in its thread pool, every task in flight recoverable,
time limits, graceful stop and recycling.  Real processes and real SIGKILL;
overlaps are counted from stamps the handlers return, never timed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _tasks_concurrent import Boom, Doze, Nap, Pid, make_bus, most_at_once, runs
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401
from ringbus import RemoteTraceback, TaskBus, TaskServer, TaskTimeout


@pytest.fixture
def cbus(bus_name: str) -> Iterator[TaskBus]:
    bus = make_bus(bus_name)
    yield bus
    bus.destroy(force=True)


def _serve(bus: TaskBus, servers: list[TaskServer], **kw: object) -> TaskServer:
    server = TaskServer(bus, **kw)  # type: ignore[arg-type]
    servers.append(server)
    return server.start()


def test_async_handlers_overlap(cbus: TaskBus, servers: list[TaskServer]) -> None:
    _serve(cbus, servers, workers=2, concurrency=50)
    spans = [f.result(timeout=60) for f in [cbus.dispatch(Nap(0.2)) for _ in range(100)]]
    assert len(spans) == 100
    assert most_at_once(spans) >= 50


def test_plain_handlers_overlap_in_threads(cbus: TaskBus, servers: list[TaskServer]) -> None:
    _serve(cbus, servers, workers=1, concurrency=8)
    spans = [f.result(timeout=60) for f in [cbus.dispatch(Doze(0.5)) for _ in range(8)]]
    assert most_at_once(spans) == 8
    assert len({p for _, _, p in spans}) == 1  # one process, eight threads


def test_a_plain_handler_returning_an_awaitable_is_awaited(
    cbus: TaskBus, servers: list[TaskServer]
) -> None:
    server = _serve(cbus, servers, workers=1, concurrency=4)
    assert cbus.dispatch(Pid()).result(timeout=30) in server.pids
    server.stop(timeout=10)
    one = _serve(cbus, servers, workers=1)  # the one-at-a-time loop awaits it too
    assert cbus.dispatch(Pid()).result(timeout=30) in one.pids
    assert cbus.dispatch(Nap(0.01)).result(timeout=30)[2] in one.pids


def test_an_exception_fails_only_its_own_future(cbus: TaskBus, servers: list[TaskServer]) -> None:
    _serve(cbus, servers, workers=1, concurrency=8)
    futs = [cbus.dispatch(Nap(0.2)) for _ in range(5)]
    bad = cbus.dispatch(Boom("only me"))
    with pytest.raises(ValueError, match="only me") as info:
        bad.result(timeout=30)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in boom" in str(info.value.__cause__)
    assert len([f.result(timeout=30) for f in futs]) == 5


def test_an_overrunning_coroutine_times_out_alone(cbus: TaskBus, servers: list[TaskServer]) -> None:
    server = _serve(cbus, servers, workers=1, concurrency=4, task_timeout=1.0)
    slow = cbus.dispatch(Nap(30))
    siblings = [cbus.dispatch(Nap(0.3)) for _ in range(3)]
    with pytest.raises(TaskTimeout):
        slow.result(timeout=30)
    assert all(f.result(timeout=30)[2] in server.pids for f in siblings)
    pid = server.pids[0]
    assert cbus.dispatch(Nap(0.01)).result(timeout=30)[2] == pid  # the same worker goes on
    assert server.restarts == 0


def test_an_overrunning_thread_gets_its_worker_replaced(
    cbus: TaskBus, servers: list[TaskServer]
) -> None:
    """A thread cannot be cancelled: its caller gets TaskTimeout at once, the
    worker's other tasks finish, then the worker is replaced."""
    server = _serve(cbus, servers, workers=1, concurrency=4, task_timeout=1.0)
    first = server.pids[0]
    stuck = cbus.dispatch(Doze(30))
    others = [cbus.dispatch(Doze(0.3)) for _ in range(3)]
    with pytest.raises(TaskTimeout):
        stuck.result(timeout=30)
    assert all(f.result(timeout=30)[2] == first for f in others)
    wait_for(lambda: server.restarts == 1 and server.pids and server.pids[0] != first, 30)
    assert cbus.dispatch(Doze(0.01)).result(timeout=30)[2] == server.pids[0]


def test_a_killed_worker_has_all_its_tasks_delivered_again(
    cbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    server = _serve(cbus, servers, workers=1, concurrency=20)
    marks = [tmp_path / f"t{i}" for i in range(20)]
    futs = [cbus.dispatch(Nap(2.0, str(m))) for m in marks]
    wait_for(lambda: all(m.exists() for m in marks), 30, "20 tasks running")
    victim = server.pids[0]
    os.kill(victim, signal.SIGKILL)
    spans = [f.result(timeout=60) for f in futs]
    assert all(pid != victim for _, _, pid in spans)  # every one finished elsewhere
    assert [runs(m) for m in marks] == [2] * 20  # ran again once, never more
    assert server.redelivered == 20


def test_a_graceful_stop_drains_every_running_task(
    cbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    server = _serve(cbus, servers, workers=1, concurrency=50)
    marks = [tmp_path / f"t{i}" for i in range(50)]
    futs = [cbus.dispatch(Nap(1.0, str(m))) for m in marks]
    wait_for(lambda: all(m.exists() for m in marks), 30, "50 tasks running")
    server.stop(timeout=60)
    assert len([f.result(timeout=30) for f in futs]) == 50
    assert [runs(m) for m in marks] == [1] * 50
    assert server.redelivered == 0


def test_recycling_never_drops_running_tasks(cbus: TaskBus, servers: list[TaskServer]) -> None:
    server = _serve(cbus, servers, workers=1, concurrency=4, max_tasks_per_child=5)
    spans = [f.result(timeout=60) for f in [cbus.dispatch(Nap(0.05)) for _ in range(30)]]
    assert len(spans) == 30
    wait_for(lambda: server.restarts >= 5, 30, "workers recycled")
    assert len({p for _, _, p in spans}) >= 5


def test_a_worker_takes_no_more_than_its_free_slots(
    cbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    """No prefetch: with every slot busy, further tasks stay in the channel."""
    _serve(cbus, servers, workers=1, concurrency=4)
    marks = [tmp_path / f"busy{i}" for i in range(4)]
    busy = [cbus.dispatch(Nap(3.0, str(m))) for m in marks]
    wait_for(lambda: all(m.exists() for m in marks), 30, "4 tasks running")
    queued = [cbus.dispatch(Nap(0.01)) for _ in range(6)]
    time.sleep(0.5)  # lets a greedy worker take them (a bound, not a timing assertion)
    assert cbus.pending_tasks() == 6
    assert len([f.result(timeout=30) for f in busy + queued]) == 10
