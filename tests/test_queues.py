"""Scope: named queues and priorities (issue 16, part A) on shared memory.
Real servers and workers, real SIGKILL, real rings in /dev/shm (every one of
the bus removed afterwards); orders are checked from what the handlers
logged, never from timings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _tasks_queues import (
    DieOnce,
    Doomed,
    Gate,
    Job,
    LimitedMail,
    Mail,
    Report,
    UrgentMail,
    lines,
    make_bus,
)
from _tasks_queues import mail as mail_handler
from _tasks_support import TEST_SECRET, bus_name_fixture, servers_fixture, wait_for  # noqa: F401
from ringbus import TaskBus, TaskServer

SHM = Path("/dev/shm")


@pytest.fixture
def qbus(bus_name: str) -> Iterator[TaskBus]:
    bus = make_bus(bus_name)
    yield bus
    bus.destroy(force=True)


def _gate(bus: TaskBus, tmp_path: Path) -> tuple[Any, Path]:
    """Occupy the one worker of a default-queue server until the gate opens."""
    started, open_path = tmp_path / "gate-started", tmp_path / "gate-open"
    fut = bus.dispatch(Gate(str(open_path), str(started)))
    wait_for(started.exists, what="the gate task to start")
    return fut, open_path


def test_a_server_runs_only_its_queues_and_other_queues_wait(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    reports = TaskServer(qbus, workers=1, queues=["reports"]).start()
    servers.append(reports)
    mail = qbus.dispatch(Mail(log, 1))
    assert qbus.dispatch(Report(log, 2)).result(timeout=30) in reports.pids
    # The report ran after the mail was queued: the reports worker passed it by.
    assert lines(log) == ["report 2"]
    assert qbus.transport.queue_depths()[("mail", 0)] == 1
    assert not mail.done()
    mailer = TaskServer(qbus, workers=1, queues=["mail"]).start()
    servers.append(mailer)
    assert mail.result(timeout=30) in mailer.pids
    # A subclass goes where its handler's queue is (resolved along the MRO).
    assert qbus.queue_of(UrgentMail) == "mail"
    assert qbus.dispatch(UrgentMail(log, 3)).result(timeout=30) in mailer.pids
    assert lines(log) == ["report 2", "mail 1", "mail 3"]


def test_higher_priorities_run_first(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    server = TaskServer(qbus, workers=1, queues=["default"]).start()
    servers.append(server)
    gate, open_path = _gate(qbus, tmp_path)
    low = [qbus.dispatch(Job(log, i)) for i in range(100)]
    high = [qbus.dispatch(Job(log, 1000 + i), priority=9) for i in range(10)]
    # The priority-9 ring is new: the busy worker is told to look for it
    # (the supervisor watches the bus's rings); wait until it has been.
    def seen() -> bool:
        key: Any = server._watch.key if server._watch is not None else ()
        return any(len(group) > 1 for group in key)

    wait_for(seen, what="the supervisor to see the priority ring")
    time.sleep(0.2)  # the signal reaches the worker in its sleep loop; not an assertion
    open_path.write_text("")
    gate.result(timeout=30)
    for f in high + low:
        f.result(timeout=60)
    ran = lines(log)
    assert ran[:10] == [f"job {1000 + i}" for i in range(10)]  # FIFO within a priority
    assert ran[10:] == [f"job {i}" for i in range(100)]


def test_strict_queue_order(qbus: TaskBus, servers: list[TaskServer], tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    servers.append(TaskServer(qbus, workers=1, queues=["mail", "default"]).start())
    gate, open_path = _gate(qbus, tmp_path)
    jobs = [qbus.dispatch(Job(log, i)) for i in range(20)]
    mails = [qbus.dispatch(Mail(log, i)) for i in range(20)]
    open_path.write_text("")
    for f in [gate, *jobs, *mails]:
        f.result(timeout=60)
    ran = lines(log)
    assert ran == [f"mail {i}" for i in range(20)] + [f"job {i}" for i in range(20)]


def test_a_killed_workers_task_goes_back_to_its_queue(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    # A default-only server runs beside: a task put back on the default ring
    # would run there (its handler is registered) and the check below fails.
    default = TaskServer(qbus, workers=1, queues=["default"]).start()
    mailer = TaskServer(qbus, workers=1, queues=["mail"]).start()
    servers.extend([default, mailer])
    marker = tmp_path / "marker"
    fut = qbus.dispatch(DieOnce(str(marker)))
    victim = int(wait_for(lambda: marker.exists() and marker.read_text(), what="the victim"))
    os.kill(victim, signal.SIGKILL)
    pid = fut.result(timeout=30)
    assert pid != victim and pid in mailer.pids
    assert mailer.redelivered == 1


def test_delayed_tasks_land_in_their_queue_and_priority(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    # The leader (this server) moves due tasks; it serves neither channel.
    servers.append(TaskServer(qbus, workers=1, queues=["reports"]).start())
    mail = qbus.dispatch(Mail(log, 1), delay=0.2)
    qbus.send(Job(log, 2), delay=0.2, priority=7)
    depths = wait_for(
        lambda: (d := qbus.transport.queue_depths()).get(("mail", 0)) == 1
        and d.get(("default", 7)) == 1
        and d,
        what="the due tasks in their channels",
    )
    assert depths.get(("default", 0), 0) == 0
    mailer = TaskServer(qbus, workers=1, queues=["mail"]).start()
    servers.append(mailer)
    assert mail.result(timeout=30) in mailer.pids


def test_dead_letters_retry_into_their_queue(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    server = TaskServer(qbus, workers=1, queues=["mail"]).start()
    with pytest.raises(Exception, match="never works"):
        qbus.dispatch(Doomed()).result(timeout=30)
    server.stop()
    assert qbus.retry_dead_letters() == 1
    assert qbus.transport.queue_depths()[("mail", 0)] == 1
    assert qbus.transport.queue_depths().get(("default", 0), 0) == 0


def test_bad_input(qbus: TaskBus, servers: list[TaskServer], tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    for bad in (10, -1, "9", 1.5, True):
        with pytest.raises(ValueError, match="priority"):
            qbus.dispatch(Job(log), priority=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="priority"):
            qbus.send(Mail(log), priority=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority"):
        qbus.dispatch_many([Job(log), Mail(log)], priority=10)
    with pytest.raises(ValueError, match="priority"):
        qbus.dispatch(Mail(log), delay=1, priority=10)
    assert qbus.transport.queue_depths().get(("mail", 0), 0) == 0
    for name in ("bad name", "", "a/b", "x" * 121):
        with pytest.raises(ValueError, match="queue name"):
            qbus.register(Job, lambda t: None, queue=name)
    with pytest.raises(ValueError, match=r"its queues are \['default', 'mail', 'reports'\]"):
        TaskServer(qbus, workers=1, queues=["mail", "nope"]).start()
    with pytest.raises(ValueError, match="list of queue names"):
        TaskServer(qbus, workers=1, queues="mail")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="twice"):
        TaskServer(qbus, workers=1, queues=["mail", "mail"])
    with pytest.raises(ValueError, match="invalid queue name"):
        TaskServer(qbus, workers=1, queues=["bad name"])
    assert not any(s.running for s in servers)


def test_dispatch_many_routes_each_task(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    futs = qbus.dispatch_many([Job(log, 0), Mail(log, 1), Mail(log, 2), Report(log, 3)])
    depths = qbus.transport.queue_depths()
    assert (depths[("default", 0)], depths[("mail", 0)], depths[("reports", 0)]) == (1, 2, 1)
    servers.append(TaskServer(qbus, workers=2).start())  # every queue of the bus
    assert [type(f.result(timeout=30)) for f in futs] == [int] * 4
    assert sorted(lines(log)) == ["job 0", "mail 1", "mail 2", "report 3"]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_workers_on_several_queues_sleep(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    a = TaskServer(qbus, workers=2, queues=["mail", "reports"]).start()
    b = TaskServer(qbus, workers=2, queues=["mail", "default"], concurrency=2).start()
    servers.extend([a, b])
    # Serve once each, so every worker has built its taker and sleeps.
    for f in [qbus.dispatch(Mail(log, i)) for i in range(4)] + [qbus.dispatch(Job(log))]:
        f.result(timeout=30)
    time.sleep(0.5)
    pids = a.pids + b.pids
    before = {p: _cpu_seconds(p) for p in pids}
    time.sleep(2.0)
    used = {p: _cpu_seconds(p) - before[p] for p in pids}
    # A spinning worker burns ~2 s here; a sleeping one a few ms.
    assert all(u < 0.3 for u in used.values()), used


def test_destroy_removes_every_queue_ring(qbus: TaskBus, tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    qbus.send(Mail(log), priority=3)
    qbus.send(Report(log))
    qbus.send(Job(log), priority=1)
    names = {p.name for p in SHM.glob(f"ringbus-{qbus.name}-*")}
    assert {f"ringbus-{qbus.name}-tasks.mail.3", f"ringbus-{qbus.name}-tasks.default.1"} <= names
    qbus.destroy()
    assert not list(SHM.glob(f"ringbus-{qbus.name}-tasks*"))
    assert not list(SHM.glob(f"ringbus-{qbus.name}-qbell"))


def test_worker_cli_queues_and_stats(bus_name: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "RINGBUS_TEST_BUS": bus_name,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
    }
    bad = subprocess.run(
        [sys.executable, "-m", "ringbus", "worker", "_tasks_queues:bus", "-w", "1", "-Q", "x,y"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "its queues are" in bad.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringbus", "worker", "_tasks_queues:bus", "-w", "1", "-Q", "mail"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    bus = make_bus(bus_name)
    try:
        log = str(tmp_path / "log")
        assert isinstance(bus.dispatch(Mail(log, 1)).result(timeout=60), int)
        bus.send(Report(log, 2), priority=4)
        out = subprocess.run(
            [sys.executable, "-m", "ringbus", "stats", bus_name, "--json"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        doc = json.loads(out.stdout)["bus"]
        assert [s["queues"] for s in doc["servers"]] == [["mail"]]
        rows = {(q["queue"], q["priority"]): q for q in doc["queues"]}
        assert rows[("reports", 4)]["depth"] == 1 and rows[("reports", 4)]["served_by"] == []
        assert rows[("mail", 0)]["served_by"] == [proc.pid]
        human = subprocess.run(
            [sys.executable, "-m", "ringbus", "stats", bus_name],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "queues (strict order" in human.stdout and "(queues mail)" in human.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        bus.destroy(force=True)


def test_a_default_only_worker_blocks_on_the_task_ring_itself(bus_name: str) -> None:
    """The hot path stays as it was: the taker of a worker serving only the
    default queue (no priority rings) is the ring's own take, nothing around it."""
    from ringbus.transport.shm import ShmTransport

    bus = make_bus(bus_name)
    try:
        t = bus.transport
        assert isinstance(t, ShmTransport)
        t.serve(["default"])
        journal = bytearray(1 << 21)
        take = t.task_taker(journal)
        assert getattr(take, "func", None) is not None
        assert take.func.__name__ == "get_bytes_recorded"  # type: ignore[attr-defined]
        assert take.func.__self__ is t._in  # type: ignore[attr-defined]
        bus.send(Job("/dev/null"), priority=2)  # a priority ring: now several rings
        assert getattr(t.task_taker(journal), "func", None) is None
    finally:
        bus.destroy(force=True)


@pytest.mark.parametrize("codec", ["signed pickle", "msgpack", "signed json"])
def test_routes_with_every_codec(
    bus_name: str, servers: list[TaskServer], tmp_path: Path, codec: str
) -> None:
    """The route trailer sits before a signature's tag (which covers it) and
    is no part of a msgpack/JSON document."""
    pytest.importorskip("msgspec")
    kwargs: dict[str, Any] = {}
    if "signed" in codec:
        kwargs["secret"] = TEST_SECRET
    if codec != "signed pickle":
        kwargs["serializer"] = codec.split()[-1]
    bus = make_bus(bus_name, **kwargs)
    try:
        log = str(tmp_path / "log")
        mailer = TaskServer(bus, workers=1, queues=["mail", "default"]).start()
        servers.append(mailer)
        assert bus.dispatch(Mail(log, 1), priority=4).result(timeout=30) in mailer.pids
        assert bus.dispatch(Job(log, 2), priority=9).result(timeout=30) in mailer.pids
        assert bus.dispatch(Mail(log, 3), delay=0.1).result(timeout=30) in mailer.pids
        with pytest.raises(Exception, match="never works"):
            bus.dispatch(Doomed(), priority=2).result(timeout=30)
        mailer.stop()
        assert bus.retry_dead_letters() == 1
        assert bus.transport.queue_depths()[("mail", 2)] == 1  # signed again, same channel
        assert sorted(lines(log)) == ["job 2", "mail 1", "mail 3"]
    finally:
        bus.destroy(force=True)


def test_rate_limited_tasks_go_back_to_their_queue(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    """A task its rate limit refuses waits in the timer store and comes back
    to its own queue (a default-only server beside would run it otherwise)."""
    qbus.register(LimitedMail, mail_handler, queue="mail", rate_limit="5/s")
    default = TaskServer(qbus, workers=1, queues=["default"]).start()
    mailer = TaskServer(qbus, workers=1, queues=["mail"]).start()
    servers.extend([default, mailer])
    log = str(tmp_path / "log")
    futs = [qbus.dispatch(LimitedMail(log, i)) for i in range(8)]
    assert {f.result(timeout=60) for f in futs} <= set(mailer.pids)
