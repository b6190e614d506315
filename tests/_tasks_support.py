"""Fixtures and helpers shared by the task-layer tests.

Test modules import the ``*_fixture`` functions; pytest registers them under
the names given in ``@pytest.fixture(name=...)``."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis_tasks import TEST_SECRET
from _tasks_basic import make_bus
from ringbus import TaskBus, TaskServer

SHM = Path("/dev/shm")


def _remove_bus_segments(name: str) -> None:
    for p in SHM.glob(f"ringbus-{name}-*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@pytest.fixture(name="bus_name")
def bus_name_fixture() -> Iterator[str]:
    """A unique bus name; every segment of that bus is removed afterwards."""
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    _remove_bus_segments(name)


@pytest.fixture(name="bus", params=["shm", "redis"])
def bus_fixture(bus_name: str, request: pytest.FixtureRequest) -> Iterator[TaskBus]:
    """A bus with the handlers of _tasks_basic, destroyed after the test: once
    on shared memory, once on a real redis-server (the same test, unchanged).
    Tests marked ``shm_only`` check shared-memory internals and skip Redis."""
    if request.param == "redis":
        mark = request.node.get_closest_marker("shm_only")
        if mark is not None:
            pytest.skip(mark.kwargs.get("reason", "checks shared-memory internals"))
        pytest.importorskip(
            "redis", reason="redis-py is not installed (pip install 'ringbus[redis]')"
        )
        from ringbus.transport.redis import RedisTransport

        server = request.getfixturevalue("redis_server")
        # Signed, as a network bus must be; worker processes a test starts
        # (``ringbus worker --transport``) find the secret in the environment.
        request.getfixturevalue("monkeypatch").setenv("RINGBUS_SECRET", TEST_SECRET)
        # A short visibility timeout: tests that kill workers wait for reclaim.
        transport = RedisTransport(server.url, visibility_timeout=1.5)
        b = make_bus(bus_name, transport=transport, secret=TEST_SECRET)
    else:
        b = make_bus(bus_name)
    try:
        yield b
    finally:
        b.destroy()


@pytest.fixture(name="servers")
def servers_fixture() -> Iterator[list[TaskServer]]:
    """Servers a test starts; any still running afterwards are killed."""
    started: list[TaskServer] = []
    yield started
    for s in started:
        if s.running:
            s.stop(timeout=5)


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy (a bound, not a timing assertion)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
