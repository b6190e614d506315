"""Scope: the status of a task whose worker dies is the supervisor's to keep
true: queued again (a redelivery) or failed (no deliveries left), never a
"running" record left behind.  Real workers, real SIGKILL."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from _tasks_basic import Sleep, make_bus, sleep
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401
from ringbus import TaskServer, WorkerLost


def test_a_task_whose_worker_died_for_good_reads_failed(
    bus_name: str, servers: list[TaskServer], tmp_path: Path
) -> None:
    bus = make_bus(bus_name)
    bus.register(Sleep, sleep, retries=0)  # no redelivery: one delivery allowed
    try:
        server = TaskServer(bus, workers=1)
        servers.append(server)
        server.start()
        started = tmp_path / "started"
        fut = bus.dispatch(Sleep(60, started=str(started)))
        wait_for(started.exists, 30, "the task to start")
        assert bus.status(fut.task_id).state == "running"
        os.kill(int(started.read_text()), signal.SIGKILL)
        with pytest.raises(WorkerLost):
            fut.result(timeout=60)
        # Finished for good: its record goes (no keep_result), as for any task; it
        # used to read "running" forever and hold its slot of the table.
        wait_for(lambda: bus.status(fut.task_id).state in ("failed", "unknown"), 30, "the status")
        server.stop(timeout=10)
    finally:
        bus.destroy(force=True)
