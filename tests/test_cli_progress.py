"""``ringbus stats`` shows the running tasks' progress (issue 17): a real
worker process sets its progress, then the CLI runs as a subprocess, on
shared memory and on a real redis-server (``--transport``).  Servers and
segments are removed afterwards, also when a test fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _identity_tasks import Report, make_identity_bus
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import TaskBus, TaskServer


def _bus(kind: str, name: str, request: pytest.FixtureRequest) -> tuple[TaskBus, list[str]]:
    """The bus and the ``--transport`` arguments of the CLI for it."""
    if kind == "shm":
        return make_identity_bus(name), []
    pytest.importorskip("redis", reason="redis-py is not installed")
    from ringbus.transport.redis import RedisTransport

    url = request.getfixturevalue("redis_server").url
    transport = RedisTransport(url, visibility_timeout=5)
    bus = make_identity_bus(name, transport=transport, secret="identity-test-secret")
    return bus, ["--transport", url]


def _stats(name: str, extra: list[str], *flags: str) -> Any:
    cmd = [sys.executable, "-m", "ringbus.cli", "stats", name, "--interval", "0", *extra, *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("kind", ["shm", "redis"])
def test_stats_shows_the_progress_of_running_tasks(
    kind: str,
    bus_name: str,
    servers: list[TaskServer],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    bus, extra = _bus(kind, bus_name, request)
    try:
        gate, started = tmp_path / "gate", tmp_path / "started"
        servers.append(TaskServer(bus, workers=1).start())
        fut = bus.dispatch(Report(4, gate=str(gate), started=str(started)))
        wait_for(lambda: bus.status(fut.task_id).progress == 0.5, 60, "the handler's progress")
        rows = json.loads(_stats(bus_name, extra, "--json"))["bus"]["running_tasks"]
        assert [(r["id"], r["state"], r["progress"], r["message"]) for r in rows] == [
            (fut.task_id, "running", 0.5, "half way")
        ]
        assert rows[0]["type"].endswith("Report") and rows[0]["worker_pid"] in servers[0].pids
        text = _stats(bus_name, extra)
        line = next(ln for ln in text.splitlines() if fut.task_id in ln)
        assert "50%" in line and "half way" in line, text
        gate.write_text("go")
        assert fut.result(timeout=60) == 8
        wait_for(  # the worker marks its slot idle just after it sent the result
            lambda: json.loads(_stats(bus_name, extra, "--json"))["bus"]["running_tasks"] == [],
            60,
            "the running task to leave stats",
        )
    finally:
        bus.destroy(force=True)
