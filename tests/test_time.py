"""Scope: delayed tasks, periodic schedules with one leader per bus, and
retries that wait in the timer store instead of a worker.  Real servers in
process groups of their own, real SIGKILL; times are only compared with
bounds far from what the defects produced.  Every test that applies runs
on shared memory and on a real redis-server (``spec``: None or its URL)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401
from _tasks_time import FailOnce, Stamp, lines, make_bus
from ringbus import TaskBus, TaskServer
from ringbus._proc import pid_alive

ctx = mp.get_context("fork")


@pytest.fixture(params=["shm", "redis"])
def spec(request: pytest.FixtureRequest) -> str | None:
    """None (shared memory) or the URL of the session's redis-server."""
    if request.param == "shm":
        return None
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?visibility_timeout=1.5"


@pytest.fixture
def tbus(bus_name: str, spec: str | None) -> Any:
    bus = make_bus(bus_name, spec)
    yield bus
    bus.destroy(force=True)


def _leader_pid(bus: TaskBus) -> int | None:
    """Who leads: a pid on shared memory, a lease token naming one on Redis."""
    who = bus.transport.leader()
    if who is None or who.isdigit():
        return None if who is None else int(who)
    from ringbus.transport.redis_time import leader_pid

    return leader_pid(who)


def _server_group(
    bus_name: str, ready: Any, periodic_log: str = "", spec: str | None = None
) -> None:
    os.setsid()  # its workers share its fate: SIGKILL the group
    bus = make_bus(bus_name, spec)
    if periodic_log:
        # The key records which process fired it: the leader.
        bus.periodic(lambda: Stamp(periodic_log, os.getpid()), every=0.2, name="stamp")
    TaskServer(bus, workers=1).start()
    ready.set()
    while True:
        time.sleep(1)


def _start_group(
    bus_name: str, periodic_log: str = "", spec: str | None = None
) -> mp.process.BaseProcess:
    ready = ctx.Event()
    p = ctx.Process(target=_server_group, args=(bus_name, ready, periodic_log, spec))
    p.start()
    assert ready.wait(30)
    return p


def _kill_group(p: mp.process.BaseProcess) -> None:
    if p.pid is not None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.join(10)


def test_a_delayed_task_waits_its_delay(
    tbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    servers.append(TaskServer(tbus, workers=1).start())
    t0 = time.time()
    ran = tbus.dispatch(Stamp(str(tmp_path / "log")), delay=0.5).result(timeout=30)
    assert ran >= t0 + 0.5
    t1 = time.time()
    eta = datetime.now(timezone.utc) + timedelta(seconds=0.3)
    assert tbus.dispatch(Stamp(str(tmp_path / "log")), eta=eta).result(timeout=30) >= t1 + 0.29


def test_delayed_tasks_survive_a_killed_server_and_run_once(
    tbus: TaskBus, spec: str | None, servers: list[TaskServer], tmp_path: Path
) -> None:
    group = _start_group(tbus.name, spec=spec)
    log = tmp_path / "log"
    try:
        futs = [tbus.dispatch(Stamp(str(log), i), delay=1.5) for i in range(100)]
        assert tbus.transport.scheduled()[0] == 100
    finally:
        _kill_group(group)  # before any is due
    assert lines(log) == []
    servers.append(TaskServer(tbus, workers=2).start())
    assert len([f.result(timeout=60) for f in futs]) == 100
    keys = sorted(int(k) for _, k, _ in lines(log))
    assert keys == list(range(100))  # every one, exactly once


def test_a_periodic_task_fires_once_per_due_time_with_two_servers(
    bus_name: str, spec: str | None, tmp_path: Path
) -> None:
    log = tmp_path / "periodic"
    groups = [_start_group(bus_name, str(log), spec), _start_group(bus_name, str(log), spec)]
    try:
        time.sleep(2.0)
        runs = lines(log)
        assert 5 <= len(runs) <= 14, runs  # every 0.2 s for 2 s: about 10, not 20
        assert len({k for _, k, _ in runs}) == 1, runs  # one leader fired them all
        leader_pid = _leader_pid(make_bus(bus_name, spec))
        assert leader_pid is not None
        leader = next(g for g in groups if g.pid == os.getpgid(leader_pid))
        _kill_group(leader)
        killed_at = time.time()
        wait_for(lambda: not pid_alive(leader_pid), 10, "the leader to die")
        wait_for(lambda: any(float(t) > killed_at + 0.5 for t, _, _ in lines(log)), 10)
        after = sorted(float(t) for t, _, _ in lines(log) if float(t) > killed_at)
        assert after[0] - killed_at < 2.0  # taken over within a second or so
    finally:
        for g in groups:
            _kill_group(g)
        make_bus(bus_name, spec).destroy(force=True)


def test_a_retry_waits_in_the_timer_not_in_a_worker(
    tbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    servers.append(TaskServer(tbus, workers=1).start())
    retry = tbus.dispatch(FailOnce(str(tmp_path / "mark")))
    wait_for((tmp_path / "mark").exists, 30, "the first attempt")
    others = [tbus.dispatch(Stamp(str(tmp_path / "log"), i)) for i in range(100)]
    assert len([f.result(timeout=30) for f in others]) == 100
    assert not retry.done()  # its 2 s backoff holds no worker
    assert retry.result(timeout=30) == "second attempt"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"delay": 1, "eta": datetime.now(timezone.utc)}, "not both"),
        ({"eta": datetime(2030, 1, 1)}, "timezone-aware"),
        ({"delay": -1}, "negative"),
        ({"delay": "soon"}, "seconds or a timedelta"),
    ],
)
def test_bad_times_are_refused_and_nothing_is_queued(
    tbus: TaskBus, kwargs: dict[str, Any], message: str, tmp_path: Path
) -> None:  # on both transports (tbus)
    with pytest.raises(ValueError, match=message):
        tbus.dispatch(Stamp(str(tmp_path / "log")), **kwargs)
    with pytest.raises(ValueError, match=message):
        tbus.send(Stamp(str(tmp_path / "log")), **kwargs)
    assert tbus.transport.scheduled()[0] == 0 and tbus.pending_tasks() == 0


def test_bad_schedules_are_refused(tbus: TaskBus, tmp_path: Path) -> None:
    task = Stamp(str(tmp_path / "log"))
    with pytest.raises(ValueError, match="exactly one"):
        tbus.periodic(task)
    with pytest.raises(ValueError, match="exactly one"):
        tbus.periodic(task, every=1, cron="* * * * *")
    with pytest.raises(ValueError, match="positive"):
        tbus.periodic(task, every=0)
    with pytest.raises(ValueError, match="invalid cron"):
        tbus.periodic(task, cron="61 * * * *")
    tbus.periodic(task, every=timedelta(minutes=5))
    with pytest.raises(ValueError, match="exists"):
        tbus.periodic(task, every=60)

    @tbus.periodic(cron="0 7 * * mon-fri")
    def digest() -> Stamp:
        return task

    assert set(tbus.schedules) == {"Stamp", "test_bad_schedules_are_refused.<locals>.digest"}


def test_stats_shows_delayed_tasks_and_schedules(
    bus_name: str, spec: str | None, tmp_path: Path
) -> None:
    import json
    import subprocess
    import sys

    log = tmp_path / "periodic"
    group = _start_group(bus_name, str(log), spec)
    bus = make_bus(bus_name, spec)
    on = ["--transport", spec] if spec else []
    try:
        bus.send(Stamp(str(tmp_path / "later")), delay=60)
        wait_for(lambda: len(lines(log)) >= 2, 30, "two periodic runs")
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "ringbus.cli",
                "stats",
                bus_name,
                "--json",
                "--interval",
                "0",
                *on,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        t = doc["broker"]["time"] if spec else doc["bus"]["time"]
        assert t["scheduled"] == 1 and t["next_due"] > time.time() + 30
        assert t["leader"] is not None
        assert _leader_pid(bus) not in (None, os.getpid())  # the server group's
        assert t["schedules"]["stamp"]["last"] is not None
        text = subprocess.run(
            [sys.executable, "-m", "ringbus.cli", "stats", bus_name, "--interval", "0", *on],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "periodic schedules" in text.stdout and "delayed tasks" in text.stdout
    finally:
        _kill_group(group)
        bus.destroy(force=True)


def test_the_scheduler_ends_quietly_when_its_bus_is_closed(
    bus_name: str, servers: list[TaskServer], caplog: pytest.LogCaptureFixture
) -> None:
    """``bus.close()`` under a running server closes the timer store the
    leading scheduler waits on: the scheduler ends, logging no failure (it
    logged "the scheduler of bus ... failed" with a RingClosed traceback)."""
    bus = make_bus(bus_name)
    server = TaskServer(bus, workers=1)
    servers.append(server)
    server.start()
    wait_for(lambda: server.leading, 30, "the server to lead the scheduler")
    caplog.set_level("DEBUG", logger="ringbus.scheduler")
    bus.close()
    wait_for(lambda: not server.leading, 30, "the scheduler to end")
    failed = [r for r in caplog.records if r.name == "ringbus.scheduler" and r.levelno >= 40]
    assert not failed, [r.getMessage() for r in failed]
    assert any("its bus is closed" in r.getMessage() for r in caplog.records)
