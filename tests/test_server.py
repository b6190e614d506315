"""TaskServer: supervision with real processes and real signals (SIGKILL,
SIGTERM, SIGINT), time limits, recycling, graceful stop, and ``ringbus worker``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from _tasks_basic import Add, Sleep, Victim, WhoAmI
from _tasks_support import (  # noqa: F401 - fixtures
    bus_fixture,
    bus_name_fixture,
    servers_fixture,
    wait_for,
)
from ringbus import Queue, TaskBus, TaskServer, TaskTimeout, WorkerLost
from ringbus.server import PoolState, read_pool_states

TESTS = Path(__file__).parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_arguments_are_checked(bus: TaskBus) -> None:
    with pytest.raises(ValueError):
        TaskServer(bus, workers=0)
    with pytest.raises(ValueError):
        TaskServer(bus, workers=1, max_tasks_per_child=0)
    with pytest.raises(ValueError):
        TaskServer(bus, workers=1, task_timeout=0)
    with pytest.raises(TypeError):
        TaskServer("not a bus", workers=1)  # type: ignore[arg-type]


def test_start_twice_and_stop_twice(bus: TaskBus, servers: list[TaskServer]) -> None:
    server = TaskServer(bus, workers=1)
    servers.append(server)
    server.start()
    with pytest.raises(RuntimeError):
        server.start()
    path = server.state_path
    assert path is not None and Path(path).exists()
    server.stop()
    server.stop()
    assert not server.running
    assert not Path(path).exists()  # the pool state segment is removed at stop


@pytest.mark.shm_only(
    reason="checks the supervisor's own redelivery (counters, message); on Redis the "
    "transport redelivers (tests/test_redis.py kills workers there)"
)
def test_sigkill_mid_task_gives_worker_lost_and_the_pool_recovers(
    bus: TaskBus, servers: list[TaskServer]
) -> None:
    server = TaskServer(bus, workers=4)
    servers.append(server)
    server.start()
    report = Queue()
    try:
        doomed = bus.dispatch(Victim(report.name))
        others = [bus.dispatch(Add(i, 1)) for i in range(300)]
        pid = report.get(timeout=30)
        assert pid in server.pids
        info = {w.worker_pid: w for w in server.worker_info()}[pid]
        assert info.state == "running" and info.task_type.endswith("Victim")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerLost, match=rf"worker pid {pid} died .*SIGKILL.*Victim"):
            doomed.result(timeout=30)
        assert [f.result(timeout=30) for f in others] == [i + 1 for i in range(300)]
        # Replaced at once: four live workers again, the dead one not among them.
        wait_for(lambda: len(server.pids) == 4 and pid not in server.pids, what="replacement")
        assert server.lost == 1 and server.restarts == 1
        more = bus.dispatch_many(Add(i, 2) for i in range(100))
        assert [f.result(timeout=30) for f in more] == [i + 2 for i in range(100)]
    finally:
        report.close()


def test_task_timeout_kills_the_worker_and_answers_task_timeout(
    bus: TaskBus, servers: list[TaskServer]
) -> None:
    server = TaskServer(bus, workers=1, task_timeout=0.5)
    servers.append(server)
    server.start()
    before = server.pids[0]
    with pytest.raises(TaskTimeout, match=r"task_timeout=0\.5"):
        bus.dispatch(Sleep(60)).result(timeout=30)
    assert not _alive(before) or before not in server.pids
    assert bus.dispatch(WhoAmI()).result(timeout=30) != before
    assert server.timeouts == 1
    # A task within the limit is untouched.
    assert bus.dispatch(Sleep(0.05)).result(timeout=30) in server.pids


def test_max_tasks_per_child_recycles_workers(bus: TaskBus, servers: list[TaskServer]) -> None:
    server = TaskServer(bus, workers=1, max_tasks_per_child=3)
    servers.append(server)
    server.start()
    pids = [bus.dispatch(WhoAmI()).result(timeout=30) for _ in range(9)]
    assert len(set(pids)) == 3
    assert pids[0:3] == [pids[0]] * 3 and pids[3:6] == [pids[3]] * 3
    assert pids[6:9] == [pids[6]] * 3


def test_graceful_stop_finishes_the_task_in_hand_and_leaves_the_queue(
    bus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    first = TaskServer(bus, workers=1)
    servers.append(first)
    first.start()
    started = tmp_path / "started"
    finished = tmp_path / "finished"
    running = bus.dispatch(Sleep(0.5, marker=str(finished), started=str(started)))
    queued = [bus.dispatch(Add(i, 10)) for i in range(5)]
    wait_for(started.exists, what="the first task to start")
    first.stop()
    assert finished.exists()  # the task in hand was finished, not killed
    assert running.result(timeout=30) > 0
    assert bus.pending_tasks() == 5  # nothing else was taken
    assert not any(f.done() for f in queued)
    second = TaskServer(bus, workers=2)  # the next server on the same bus serves them
    servers.append(second)
    second.start()
    assert [f.result(timeout=30) for f in queued] == [i + 10 for i in range(5)]


def test_stop_timeout_kills_busy_workers(bus: TaskBus, servers: list[TaskServer]) -> None:
    server = TaskServer(bus, workers=1)
    servers.append(server)
    server.start()
    fut = bus.dispatch(Sleep(60))
    wait_for(lambda: any(w.state == "running" for w in server.worker_info()), what="running")
    server.stop(timeout=0.2)
    with pytest.raises(WorkerLost, match="killed at stop"):
        fut.result(timeout=30)


def test_idle_workers_stop_at_once_and_ignore_sigint(
    bus: TaskBus, servers: list[TaskServer]
) -> None:
    server = TaskServer(bus, workers=2)
    servers.append(server)
    server.start()
    assert bus.dispatch(Add(1, 1)).result(timeout=30) == 2
    pid = server.pids[0]
    os.kill(pid, signal.SIGINT)  # Ctrl-C belongs to the parent
    assert [bus.dispatch(Add(i, 0)).result(timeout=30) for i in range(20)] == list(range(20))
    assert _alive(pid) and pid in server.pids
    pids = server.pids
    server.stop()
    for p in pids:
        assert not _alive(p)


def test_pool_state_is_readable_from_outside(bus: TaskBus, servers: list[TaskServer]) -> None:
    server = TaskServer(bus, workers=2)
    servers.append(server)
    server.start()
    fut = bus.dispatch(Sleep(0.5))
    wait_for(lambda: any(w.state == "running" for w in server.worker_info()), what="running")
    path = server.state_path
    assert path is not None
    states = read_pool_states(bus.name)
    assert list(states) == [path]
    slots = states[path]
    assert {w.worker_pid for w in slots} == set(server.pids)
    busy = [w for w in slots if w.state == "running"]
    assert len(busy) == 1 and busy[0].task_type.endswith("Sleep")
    assert busy[0].dispatcher_pid == os.getpid()
    ps = PoolState.attach(path, writable=False)
    try:
        assert ps.bus_name == bus.name and ps.server_pid == os.getpid()
    finally:
        ps.close()
    fut.result(timeout=30)


def test_initializer_runs_in_each_worker(
    bus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    server = TaskServer(bus, workers=2, initializer=_touch_pid, initargs=(str(tmp_path),))
    servers.append(server)
    server.start()
    wait_for(lambda: len(list(tmp_path.iterdir())) == 2, what="initializers")
    assert {int(p.name) for p in tmp_path.iterdir()} == set(server.pids)


def _touch_pid(directory: str) -> None:
    (Path(directory) / str(os.getpid())).write_text("")


def test_server_sigkilled_leaves_no_orphans(bus_name: str, tmp_path: Path) -> None:
    """Workers get a parent-death signal: a killed server's pool drains itself."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(TESTS)!r})\n"
        "from _tasks_basic import make_bus\n"
        "from ringbus import TaskServer\n"
        f"bus = make_bus({bus_name!r})\n"
        "s = TaskServer(bus, workers=2).start()\n"
        "print(' '.join(map(str, s.pids)), flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        proc.kill()
        proc.wait(timeout=30)
        wait_for(lambda: not any(_alive(p) for p in pids), what="orphan workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        b = TaskBus(bus_name)
        b.destroy()
        for p in Path("/dev/shm").glob(f"ringbus-{bus_name}-*"):  # its pool segment
            p.unlink()


def test_ringbus_worker_command_serves_and_drains_on_sigterm(bus: TaskBus, tmp_path: Path) -> None:
    env = dict(
        os.environ,
        RINGBUS_TEST_BUS=bus.name,
        PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]),
    )
    url = getattr(bus.transport, "url", None)  # a Redis bus: serve it with --transport
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringbus.cli", "worker", "_tasks_basic:bus", "--workers", "2"]
        + (["--transport", url] if url else []),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        stderr = proc.stderr

        def pump() -> None:
            for line in stderr:
                lines.append(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        wait_for(lambda: any("serving bus" in ln for ln in lines), what="the worker to start")
        assert [f.result(timeout=30) for f in bus.dispatch_many(Add(i, 5) for i in range(50))] == [
            i + 5 for i in range(50)
        ]
        started = tmp_path / "started"
        busy = bus.dispatch(Sleep(0.5, started=str(started)))
        wait_for(started.exists, what="a task to start")
        proc.send_signal(signal.SIGTERM)
        assert busy.result(timeout=30) > 0  # drained: the task in hand finished
        assert proc.wait(timeout=30) == 0
        reader.join(timeout=10)
        assert any("stopped" in ln for ln in lines)
        assert not list(Path("/dev/shm").glob(f"ringbus-{bus.name}-pool-*"))
        late = bus.dispatch(Add(1, 1))  # no server: it stays queued
        assert bus.pending_tasks() == 1 and not late.done()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ringbus_worker_rejects_bad_targets(capsys: pytest.CaptureFixture[str]) -> None:
    from ringbus.cli.main import main

    assert main(["worker", "no_such_module_xyz:bus", "--workers", "1"]) == 2
    assert main(["worker", "os:path", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "not a TaskBus" in err
