"""``ringbus top NAME --once`` against a real worker pool with a running task,
and ``--count`` frames with rates."""

from __future__ import annotations

from pathlib import Path

from _ops_support import (
    Worker,
    cli_env,
    ops_bus_fixture,  # noqa: F401 - fixture
    ringbus_cli,
    wait_for,
    workers_fixture,  # noqa: F401 - fixture
)
from _ops_tasks import Hold, Ok
from ringbus import TaskBus
from ringbus.server.pool_state import read_pool_states


def holding_alone(bus_name: str) -> list[int]:
    """[the pid of the worker running the Hold task] once no other worker
    runs anything (a worker shows running until just after its answer)."""
    running = [
        (w.worker_pid, w.task_type)
        for slots in read_pool_states(bus_name).values()
        for w in slots
        if w.state == "running"
    ]
    return [pid for pid, kind in running if kind.endswith(".Hold")] if len(running) == 1 else []


def test_top_once_shows_running_tasks_workers_and_depth(
    ops_bus: TaskBus, workers: list[Worker], tmp_path: Path
) -> None:
    bus = ops_bus
    w = Worker(bus.name, "--workers", "2")
    workers.append(w)
    w.wait_serving()
    assert [f.result(timeout=60) for f in [bus.dispatch(Ok(i)) for i in range(7)]] == list(
        range(7)
    )
    release = tmp_path / "release"
    held = bus.dispatch(Hold(str(release)))
    try:
        (pid,) = wait_for(lambda: holding_alone(bus.name), what="the held task to run alone")
        out = ringbus_cli("top", bus.name, "--once", env=cli_env(bus.name))
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert f"bus {bus.name}" in text and "queue depth 0" in text
        assert "workers 2 live, 1 running" in text
        assert "_ops_tasks.Hold" in text and str(pid) in text and "MiB" in text
        rows = [ln for ln in text.splitlines() if "_ops_tasks.Hold" in ln]
        assert rows and rows[0].split("│")[1].strip().startswith("#")  # the task id
        # the workers table: both pids, the 7 quick tasks in the 'done' column
        pool = read_pool_states(bus.name)
        pids = [s.worker_pid for slots in pool.values() for s in slots]
        assert all(str(p) in text for p in pids)
        assert sum(s.tasks_done for slots in pool.values() for s in slots) == 7

        # refreshed frames: rates appear, and it stops after --count
        out = ringbus_cli(
            "top", bus.name, "--count", "1", "--interval", "0.2", env=cli_env(bus.name)
        )
        assert out.returncode == 0, out.stderr
        assert "tasks/s" in out.stdout
    finally:
        release.touch()
    assert held.result(timeout=60) == "released"
    assert w.stop() == 0


def test_top_of_a_bus_without_servers(ops_bus: TaskBus) -> None:
    ops_bus.dispatch(Ok(1))
    out = ringbus_cli("top", ops_bus.name, "--once", env=cli_env(ops_bus.name))
    assert out.returncode == 0, out.stderr
    assert "queue depth 1" in out.stdout and "no live task server" in out.stdout
    assert "no task running" in out.stdout


def test_top_usage_errors() -> None:
    env = cli_env("x")
    assert ringbus_cli("top", "a/b", "--once", env=env).returncode == 2
    bad = ringbus_cli("top", "x", "--interval", "0", env=env)
    assert bad.returncode == 2 and "--interval" in bad.stderr
