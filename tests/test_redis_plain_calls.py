"""Scope: plain handlers of a concurrent worker that reads Redis on its
event loop (issue 18): every call runs in a task thread, however quick the
handler has been, so blocking calls overlap and never stall the loop; a
handler may run its own event loop (``asyncio.run``) or wait for a task
that its own worker takes.  Real redis-server and worker processes."""

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


def _bus(name: str, url: str) -> TaskBus:
    bus = TaskBus(name, transport=url, secret=TEST_SECRET)
    bus.register(Where, where)
    bus.register(OwnLoop, own_loop)
    bus.register(Parent, parent)
    _bus_of[:] = [bus]  # the workers fork with it
    return bus


def test_plain_calls_stay_in_threads_and_overlap_however_quick_they_were(
    redis_server: RedisServer, bus_name: str
) -> None:
    """200 quick calls, then four that block until all four run at once:
    they meet only if each has a thread of its own (a handler moved onto
    the loop after quick calls, as once tried, ran them one at a time)."""
    bus = _bus(bus_name, redis_server.url)
    try:
        with TaskServer(bus, workers=1, concurrency=8):
            quick = [bus.dispatch(Where()) for _ in range(200)]
            assert all(f.result(timeout=60).startswith("ringbus-task") for f in quick)
            futs = [bus.dispatch(Where(meet=4)) for _ in range(4)]
            names = [f.result(timeout=60) for f in futs]
            assert all(n.startswith("ringbus-task") for n in names)
            assert len(set(names)) == 4
    finally:
        bus.destroy(force=True)


def test_a_plain_handler_may_run_its_own_event_loop(
    redis_server: RedisServer, bus_name: str
) -> None:
    bus = _bus(bus_name, redis_server.url)
    try:
        with TaskServer(bus, workers=1, concurrency=8):
            got: list[Any] = [bus.dispatch(OwnLoop(i)).result(timeout=60) for i in range(12)]
            assert [v for v, _ in got] == [2 * i for i in range(12)]
            assert all(name.startswith("ringbus-task") for _, name in got)
    finally:
        bus.destroy(force=True)


def test_a_handler_may_wait_for_a_task_its_own_worker_takes(
    redis_server: RedisServer, bus_name: str
) -> None:
    """The worker's loop keeps reading while a plain handler waits for the
    result of a task it dispatched: that task runs in another thread."""
    bus = _bus(bus_name, redis_server.url)
    try:
        with TaskServer(bus, workers=1, concurrency=8):
            for _ in range(100):
                bus.dispatch(Where()).result(timeout=60)
            assert bus.dispatch(Parent()).result(timeout=60).startswith("ringbus-task")
    finally:
        bus.destroy(force=True)
