"""Scope: how workers start under every start method, and a pool whose workers
keep stopping on their own right after they start (a failing start).

Real TaskServers with real worker processes; no timing is asserted, only
counts bounded far from what the defect produced."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from _tasks_basic import Add, WhoAmI
from _tasks_support import bus_fixture, bus_name_fixture, servers_fixture  # noqa: F401
from ringbus import TaskBus, TaskServer


@pytest.mark.shm_only(reason="start methods are the server's, the same on every transport")
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_started_by_a_fork_server_or_spawn_serve(
    bus: TaskBus, servers: list[TaskServer], method: str
) -> None:
    """A forkserver worker's parent is the fork server, not the TaskServer: it
    used to judge its parent dead and SIGTERM itself at once, forever."""
    server = TaskServer(bus, workers=2, start_method=method)
    servers.append(server)
    server.start()
    assert [bus.dispatch(Add(i, 1)).result(timeout=60) for i in range(20)] == [
        i + 1 for i in range(20)
    ]
    pids = {bus.dispatch(WhoAmI()).result(timeout=60) for _ in range(20)}
    assert pids <= set(server.pids)
    assert server.restarts == 0


def _stop_myself() -> None:
    # What the forkserver defect did: the worker's own stop signal at start.
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.shm_only(reason="supervision is the server's, the same on every transport")
def test_workers_that_stop_by_themselves_are_a_failing_start(
    bus: TaskBus, servers: list[TaskServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Exit status 0 with no stop asked and no recycling is a failing start:
    logged, and restarted with a growing delay instead of in a tight loop."""
    caplog.set_level(logging.WARNING, logger="ringbus.server")
    server = TaskServer(bus, workers=1, initializer=_stop_myself)
    servers.append(server)
    server.start()
    time.sleep(2.0)
    restarts = server.restarts
    server.stop(timeout=10)
    # Delays of 0.1, 0.2, 0.4, 0.8 s: a handful of restarts in 2 s (the
    # defect restarted it as fast as it could fork: dozens).
    assert 1 <= restarts <= 8, restarts
    assert "stopped by itself" in caplog.text
