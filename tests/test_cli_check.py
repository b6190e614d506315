"""``ringbus stats NAME --check``: a real worker pool, a bus without workers
and a deep queue, judged by the command run as a subprocess."""

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


def check(bus: TaskBus, *flags: str) -> tuple[int, str]:
    out = ringbus_cli("stats", bus.name, "--check", *flags, env=cli_env(bus.name))
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, (out.stdout + out.stderr).strip()


def test_healthy_pool_and_a_task_running_too_long(
    ops_bus: TaskBus, workers: list[Worker], tmp_path: Path
) -> None:
    bus = ops_bus
    w = Worker(bus.name, "--workers", "2")
    workers.append(w)
    w.wait_serving()
    assert [f.result(timeout=60) for f in [bus.dispatch(Ok(i)) for i in range(5)]] == list(
        range(5)
    )
    assert check(bus) == (0, "ok: 2 workers, depth 0")
    assert check(bus, "--min-workers", "2", "--max-depth", "0")[0] == 0
    code, line = check(bus, "--min-workers", "3")
    assert (code, line) == (1, "unhealthy: 2 live workers (min 3)")

    release = tmp_path / "release"
    held = bus.dispatch(Hold(str(release)))
    try:
        code, line = wait_for(
            lambda: (r := check(bus, "--max-age", "0.001"))[0] == 1 and r,
            what="the held task to be judged too old",
        )
        assert line.startswith("unhealthy: task #")
        assert "(_ops_tasks.Hold) running for" in line and line.endswith("> 0.001")
        code, line = check(bus, "--max-age", "3600")
        assert code == 0 and line == "ok: 2 workers, depth 0, 1 running"
    finally:
        release.touch()
    assert held.result(timeout=60) == "released"
    assert w.stop() == 0
    # The pool is gone: nobody serves the bus any more.
    assert check(bus) == (1, "unhealthy: 0 live workers (min 1)")


def test_bus_without_workers(ops_bus: TaskBus) -> None:
    bus = ops_bus
    bus.dispatch(Ok(1))  # the task ring exists, no server runs
    assert check(bus) == (1, "unhealthy: 0 live workers (min 1)")
    assert check(bus, "--min-workers", "0") == (0, "ok: 0 workers, depth 1")


def test_a_bus_that_never_existed_has_no_workers(ops_bus: TaskBus) -> None:
    never = TaskBus(ops_bus.name + "-never")
    assert check(never) == (1, "unhealthy: 0 live workers (min 1)")


def test_deep_queue(ops_bus: TaskBus) -> None:
    bus = ops_bus
    for i in range(20):
        bus.dispatch(Ok(i))
    code, line = check(bus, "--max-depth", "10", "--min-workers", "0")
    assert (code, line) == (1, "unhealthy: queue depth 20 > 10")
    code, line = check(bus, "--max-depth", "10")
    assert code == 1
    assert line == "unhealthy: 0 live workers (min 1); queue depth 20 > 10"
    assert check(bus, "--max-depth", "20", "--min-workers", "0") == (0, "ok: 0 workers, depth 20")


def test_bad_usage_exits_2(ops_bus: TaskBus) -> None:
    bus = ops_bus
    assert check(bus, "--max-depth", "-1")[0] == 2
    assert check(bus, "--max-age", "soon")[0] == 2
    out = ringbus_cli("stats", "no/such/thing", "--check", env=cli_env(bus.name))
    assert out.returncode == 2 and out.stderr.startswith("unknown:")
