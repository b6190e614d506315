"""Scope: quick plain handlers of a concurrent worker reading Redis on its
loop (issue 18): after enough quick calls in task threads they run on the
loop's own thread (no hand-off); one that then blocks sends its type back
to the threads for good (overlap again); a handler running its own event
loop (``asyncio.run``) works there too; none runs there once its worker
dispatched (it may wait for a task only that loop would take).  Real redis-server and worker
processes; the thresholds are lowered in this process before the workers
fork (no timing asserts)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from _redis_support import RedisServer
from _redis_tasks import TEST_SECRET
from _tasks_support import bus_name_fixture  # noqa: F401 - fixtures
from ringbus import TaskBus, TaskServer
from ringbus.server.task_threads import PlainCalls

pytest.importorskip("redis", reason="redis-py is not installed")


@dataclass
class Where:
    nap: float = 0.0
    meet: int = 0  # wait at a barrier of this many parties (they must overlap)


_barriers: dict[int, threading.Barrier] = {}
_lock = threading.Lock()


def where(task: Where) -> str:
    if task.nap:
        time.sleep(task.nap)
    if task.meet:
        with _lock:
            b = _barriers.setdefault(task.meet, threading.Barrier(task.meet))
        b.wait(30)
    return threading.current_thread().name


@dataclass
class OwnLoop:
    n: int


async def _twice(n: int) -> int:
    return 2 * n


def own_loop(task: OwnLoop) -> tuple[int, str]:
    return asyncio.run(_twice(task.n)), threading.current_thread().name


@dataclass
class Parent:
    """Dispatches a ``Where`` from the worker and waits for its result."""


_bus_of: list[TaskBus] = []


def parent(task: Parent) -> str:
    name: str = _bus_of[0].dispatch(Where()).result(timeout=60)
    return name


@pytest.fixture
def quick_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five calls under a second count as quick (the workers fork with it)."""
    monkeypatch.setattr(PlainCalls, "QUICK_RUNS", 5)
    monkeypatch.setattr(PlainCalls, "QUICK", 1.0)
    monkeypatch.setattr(PlainCalls, "SLOW", 0.02)


def _bus(name: str, url: str) -> TaskBus:
    bus = TaskBus(name, transport=url, secret=TEST_SECRET)
    bus.register(Where, where)
    bus.register(OwnLoop, own_loop)
    bus.register(Parent, parent)
    _bus_of[:] = [bus]  # the workers fork with it
    return bus


def test_a_quick_plain_handler_moves_to_the_loop_and_back_when_it_blocks(
    redis_server: RedisServer, bus_name: str, quick_soon: None
) -> None:
    bus = _bus(bus_name, redis_server.url)
    try:
        with TaskServer(bus, workers=1, concurrency=8):
            first = [bus.dispatch(Where()).result(timeout=60) for _ in range(5)]
            assert all(n.startswith("ringbus-task") for n in first)  # threads first
            later = [bus.dispatch(Where()).result(timeout=60) for _ in range(5)]
            assert not any(n.startswith("ringbus-task") for n in later)  # the loop's thread
            # Blocks on the loop (a sleep: a voluntary switch): threads from now on.
            assert not bus.dispatch(Where(nap=0.05)).result(timeout=60).startswith("ringbus-task")
            futs = [bus.dispatch(Where(meet=4)) for _ in range(4)]  # they overlap again
            names = [f.result(timeout=60) for f in futs]
            assert all(n.startswith("ringbus-task") for n in names)
            again = [bus.dispatch(Where()).result(timeout=60) for _ in range(10)]
            assert all(n.startswith("ringbus-task") for n in again)
    finally:
        bus.destroy(force=True)


def test_a_plain_handler_on_the_loop_may_run_its_own_event_loop(
    redis_server: RedisServer, bus_name: str, quick_soon: None
) -> None:
    bus = _bus(bus_name, redis_server.url)
    try:
        with TaskServer(bus, workers=1, concurrency=8):
            got: list[Any] = [bus.dispatch(OwnLoop(i)).result(timeout=60) for i in range(12)]
            assert [v for v, _ in got] == [2 * i for i in range(12)]
            assert not got[-1][1].startswith("ringbus-task")  # on the loop's thread
    finally:
        bus.destroy(force=True)


def test_no_handler_runs_on_the_loop_once_its_worker_dispatched(
    redis_server: RedisServer, bus_name: str, quick_soon: None
) -> None:
    """A handler that waits for another task's result must not block the
    loop that would take that task: a worker process that dispatched runs
    every plain handler in its threads again."""
    bus = _bus(bus_name, redis_server.url)
    try:
        with TaskServer(bus, workers=1, concurrency=8):
            for _ in range(5):
                bus.dispatch(Where()).result(timeout=60)
            assert not bus.dispatch(Where()).result(timeout=60).startswith("ringbus-task")
            bus.dispatch(Parent()).result(timeout=60)  # served by this same worker
            again = [bus.dispatch(Where()).result(timeout=60) for _ in range(10)]
            assert all(n.startswith("ringbus-task") for n in again)
    finally:
        bus.destroy(force=True)
