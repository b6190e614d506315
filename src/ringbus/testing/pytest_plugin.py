"""pytest fixtures for apps that use ringbus (the ``pytest11`` entry point).

``ringbus_inline_bus(app_bus)``: a copy of the app's bus (same handlers and
policies) on the inline transport: handlers run in the test's process,
synchronously, through the same bytes, retries, status and dead letters.
Needs neither the C extension nor ``/dev/shm``.

``ringbus_pool(app_bus, workers=2, concurrency=1)``: a copy of the app's bus
under a unique name on shared memory, served by a real ``TaskServer``;
stopped and removed after the test.

The same test, written against the bus it is given, runs both ways.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ringbus.tasks.bus import TaskBus

__all__ = ["clone_bus", "ringbus_inline_bus", "ringbus_pool"]


def clone_bus(app_bus: TaskBus, name: str, transport: Any = None) -> TaskBus:
    """A bus named ``name`` over ``transport`` with ``app_bus``'s handlers,
    policies, limits, type names and codec (serializer, secret): what a
    spawned worker rebuilds (``TaskBus.__reduce__``)."""
    from ringbus.transport.registry import make_transport

    rebuild, args = app_bus.__reduce__()[:2]
    return rebuild(name, make_transport(transport), *args[2:])


def _unique(app_bus: TaskBus | None) -> str:
    base = app_bus.name if app_bus is not None else "app"
    return f"test-{os.getpid()}-{base[:40]}-{secrets.token_hex(4)}"


@pytest.fixture
def ringbus_inline_bus() -> Iterator[Callable[..., TaskBus]]:
    """Factory: ``ringbus_inline_bus(app_bus=None) -> TaskBus`` (inline)."""
    made: list[TaskBus] = []

    def make(app_bus: TaskBus | None = None) -> TaskBus:
        name = _unique(app_bus)
        bus = (
            TaskBus(name, transport="inline")
            if app_bus is None
            else clone_bus(app_bus, name, "inline")
        )
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.destroy()


@pytest.fixture
def ringbus_pool() -> Iterator[Callable[..., TaskBus]]:
    """Factory: ``ringbus_pool(app_bus, workers=2, concurrency=1) -> TaskBus``
    served by a real pool of worker processes for the test."""
    from ringbus.server.supervisor import TaskServer

    started: list[tuple[TaskBus, Any]] = []

    def make(app_bus: TaskBus, workers: int = 2, concurrency: int = 1, **server: Any) -> TaskBus:
        bus = clone_bus(app_bus, _unique(app_bus))
        srv = TaskServer(bus, workers=workers, concurrency=concurrency, **server).start()
        started.append((bus, srv))
        return bus

    yield make
    for bus, srv in started:
        try:
            if srv.running:
                srv.stop(timeout=10)
        finally:
            bus.destroy(force=True)
