"""Prometheus metrics: a real ``ringbus worker --metrics-port`` subprocess is
scraped over HTTP, and ``ringbus stats --format prometheus`` is run as a
subprocess; the exposition is parsed with prometheus_client's own parser."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest

from _ops_support import (
    Worker,
    cli_env,
    free_port,
    ops_bus_fixture,  # noqa: F401 - fixture
    ringbus_cli,
    wait_for,
    workers_fixture,  # noqa: F401 - fixture
)
from _ops_tasks import Boom, Hold, Ok
from ringbus import TaskBus

parser = pytest.importorskip("prometheus_client.parser")
text_string_to_metric_families = parser.text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert found, f"no sample {name} {labels} in {sorted(names(samples))}"
    return sum(found)


def total(samples: Samples, name: str, **labels: str) -> float:
    """As ``value``, 0 when there is no such sample (an empty gauge family)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def names(samples: Iterable[tuple[str, frozenset[tuple[str, str]]]]) -> set[str]:
    return {n for n, _ in samples}


def test_worker_serves_metrics_that_match_the_workload(
    ops_bus: TaskBus, workers: list[Worker], tmp_path: Path
) -> None:
    bus = ops_bus
    port = free_port()
    w = Worker(bus.name, "--workers", "2", "--metrics-port", str(port))
    workers.append(w)
    w.wait_serving()
    assert any(f"127.0.0.1:{port}/metrics" in ln for ln in w.lines)

    ok = [bus.dispatch(Ok(i)) for i in range(50)]
    bad = [bus.dispatch(Boom(i)) for i in range(5)]
    assert [f.result(timeout=60) for f in ok] == list(range(50))
    for f in bad:
        with pytest.raises(RuntimeError):
            f.result(timeout=60)

    release = tmp_path / "release"
    held = bus.dispatch(Hold(str(release)))
    m = wait_for(
        lambda: (s := scrape(port))
        and total(s, "ringbus_tasks_running", bus=bus.name) == 1
        and s,
        what="the held task to show as running",
    )
    server = str(w.proc.pid)
    labels = {"bus": bus.name, "server": server}
    assert value(m, "ringbus_tasks_succeeded_total", **labels) == 50
    assert value(m, "ringbus_tasks_failed_total", **labels) == 5
    assert value(m, "ringbus_tasks_retried_total", **labels) == 0
    assert value(m, "ringbus_tasks_dead_lettered_total", **labels) == 5
    assert value(m, "ringbus_dead_letters", bus=bus.name, task_type="_ops_tasks.Boom") == 5
    assert value(m, "ringbus_dead_letters", bus=bus.name) == 5
    assert value(m, "ringbus_queue_depth", bus=bus.name) == 0
    assert value(m, "ringbus_workers_alive", **labels) == 2
    assert value(m, "ringbus_workers", state="running", **labels) == 1
    assert value(m, "ringbus_workers", state="idle", **labels) == 1
    assert value(m, "ringbus_workers", **labels) == 2
    assert value(m, "ringbus_tasks_running", task_type="_ops_tasks.Hold", **labels) == 1
    assert value(m, "ringbus_task_running_seconds", task_type="_ops_tasks.Hold", **labels) >= 0
    assert value(m, "ringbus_worker_restarts_total", **labels) == 0
    assert value(m, "ringbus_tasks_lost_total", **labels) == 0
    assert value(m, "ringbus_tasks_timed_out_total", **labels) == 0

    # The same numbers from outside, printed once by `ringbus stats`.
    out = ringbus_cli("stats", bus.name, "--format", "prometheus", env=cli_env(bus.name))
    assert out.returncode == 0, out.stderr
    once = parse(out.stdout)
    assert value(once, "ringbus_tasks_succeeded_total", **labels) == 50
    assert value(once, "ringbus_tasks_failed_total", **labels) == 5
    assert value(once, "ringbus_dead_letters", bus=bus.name) == 5
    assert value(once, "ringbus_workers_alive", **labels) == 2
    assert value(once, "ringbus_tasks_running", bus=bus.name) == 1
    # restarts are known to the supervisor only
    assert "ringbus_worker_restarts_total" not in names(once)

    release.touch()
    assert held.result(timeout=60) == "released"
    after = wait_for(
        lambda: (s := scrape(port)) and total(s, "ringbus_tasks_running", bus=bus.name) == 0 and s,
        what="the held task to finish",
    )
    assert value(after, "ringbus_tasks_succeeded_total", **labels) == 51
    assert w.stop() == 0


def test_counters_survive_a_worker_restart(ops_bus: TaskBus, workers: list[Worker]) -> None:
    """A replaced worker's slot starts at zero; the served counters do not."""
    import os
    import signal

    bus = ops_bus
    port = free_port()
    w = Worker(bus.name, "--workers", "1", "--metrics-port", str(port))
    workers.append(w)
    w.wait_serving()
    assert [f.result(timeout=60) for f in [bus.dispatch(Ok(i)) for i in range(10)]] == list(
        range(10)
    )
    labels = {"bus": bus.name, "server": str(w.proc.pid)}
    assert value(scrape(port), "ringbus_tasks_succeeded_total", **labels) == 10
    (pid,) = wait_for(lambda: _idle_worker_pids(bus.name), what="the worker's pid")
    os.kill(pid, signal.SIGKILL)
    m = wait_for(
        lambda: (s := scrape(port))
        and value(s, "ringbus_worker_restarts_total", **labels) == 1
        and value(s, "ringbus_workers_alive", **labels) == 1
        and s,
        what="the worker to be replaced",
    )
    assert value(m, "ringbus_tasks_succeeded_total", **labels) == 10
    assert [f.result(timeout=60) for f in [bus.dispatch(Ok(i)) for i in range(3)]] == [0, 1, 2]
    assert value(scrape(port), "ringbus_tasks_succeeded_total", **labels) == 13
    assert w.stop() == 0


def _idle_worker_pids(bus_name: str) -> list[int]:
    from ringbus.server.pool_state import read_pool_states

    return [
        info.worker_pid
        for slots in read_pool_states(bus_name).values()
        for info in slots
        if info.worker_pid and info.state == "idle"
    ]


def test_stats_prometheus_of_a_bus_without_server(ops_bus: TaskBus) -> None:
    bus = ops_bus
    bus.dispatch(Ok(1))
    bus.dispatch(Ok(2))
    out = ringbus_cli("stats", bus.name, "--format", "prometheus", env=cli_env(bus.name))
    assert out.returncode == 0, out.stderr
    m = parse(out.stdout)
    assert value(m, "ringbus_queue_depth", bus=bus.name) == 2
    assert value(m, "ringbus_scheduled_tasks", bus=bus.name) == 0
    assert "ringbus_workers_alive" not in names(m)  # no server: no per-server series
    bus.dispatch(Ok(3), delay=3600)  # held by the timer store: scheduled, not queued
    bus.send(Ok(4), delay=3600)
    out = ringbus_cli("stats", bus.name, "--format", "prometheus", env=cli_env(bus.name))
    m = parse(out.stdout)
    assert value(m, "ringbus_scheduled_tasks", bus=bus.name) == 2
    assert value(m, "ringbus_queue_depth", bus=bus.name) == 2


def test_metrics_port_in_use_is_a_usage_error(ops_bus: TaskBus) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = ringbus_cli(
            "worker", "_ops_tasks:bus", "--metrics-port", str(port), env=cli_env(ops_bus.name)
        )
    assert out.returncode == 2
    assert "cannot serve metrics" in out.stderr
