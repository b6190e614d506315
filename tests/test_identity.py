"""Task identity and control on shared memory, with real worker processes:
ids, status from any process, kept results after the dispatcher exited,
cancel (queued, delayed, running async, running sync, terminate)."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from _identity_tasks import AsyncWait, Coop, Ran, Report, Stubborn, Tiny, make_identity_bus
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import TaskBus, TaskServer
from ringbus._proc import pid_alive

FORK = mp.get_context("fork")


@pytest.fixture(name="ibus")
def ibus_fixture(bus_name: str) -> Iterator[TaskBus]:
    bus = make_identity_bus(bus_name)
    try:
        yield bus
    finally:
        bus.destroy(force=True)


def _dispatch_and_exit(name: str, gate: str, started: str, out: mp.Queue) -> None:
    bus = make_identity_bus(name)
    fut = bus.dispatch(Report(21, gate=gate, started=started))
    out.put(fut.task_id)
    bus.close()


def _result_in_another_process(name: str, task_id: str, out: mp.Queue) -> None:
    bus = make_identity_bus(name)
    try:
        out.put(("ok", bus.result(task_id, timeout=60)))
    except BaseException as exc:
        out.put(("error", repr(exc)))


def test_ids_are_unique_strings(ibus: TaskBus) -> None:
    futs = [ibus.dispatch(Tiny(i)) for i in range(50)]
    ids = [f.task_id for f in futs] + [ibus.send(Tiny(1)), ibus.send(Tiny(2), delay=60)]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, str) and len(i) == 32 for i in ids)
    assert ibus.status(ids[-1]).state == "scheduled"
    assert ibus.status(ids[0]).state == "queued"


def test_bad_ids(ibus: TaskBus) -> None:
    for bad in ("", "xyz", "0" * 31, 42, None, "g" * 32):
        with pytest.raises(ValueError):
            ibus.status(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            ibus.result(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            ibus.cancel(bad)  # type: ignore[arg-type]
    unknown = "ab" * 16
    assert ibus.status(unknown).state == "unknown"
    assert ibus.cancel(unknown) is False
    with pytest.raises(LookupError, match="unknown"):
        ibus.result(unknown)


def test_result_by_id_after_the_dispatcher_exited(
    ibus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    gate, started = str(tmp_path / "gate"), str(tmp_path / "started")
    ids: mp.Queue = FORK.Queue()
    a = FORK.Process(target=_dispatch_and_exit, args=(ibus.name, gate, started, ids))
    a.start()
    task_id = ids.get(timeout=60)
    a.join(60)
    assert a.exitcode == 0
    assert ibus.status(task_id).state == "queued"  # no server yet
    servers.append(TaskServer(ibus, workers=1).start())
    wait_for(lambda: Path(started).exists(), what="the handler to start")
    st = wait_for(lambda: (s := ibus.status(task_id)).progress is not None and s)
    assert (st.state, st.progress, st.message) == ("running", 0.5, "half way")
    assert st.started_at is not None and st.finished_at is None
    assert Path(started).read_text() == task_id  # current_task().id is the id
    out: mp.Queue = FORK.Queue()
    b = FORK.Process(target=_result_in_another_process, args=(ibus.name, task_id, out))
    b.start()
    Path(gate).write_text("go")
    assert out.get(timeout=60) == ("ok", 42)
    b.join(60)
    done = ibus.status(task_id)
    assert done.state == "done" and done.finished_at is not None
    assert ibus.result(task_id) == 42


def test_cancel_a_queued_task(ibus: TaskBus, servers: list[TaskServer], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fut = ibus.dispatch(Ran(str(marker)))
    tid = ibus.send(Ran(str(marker)))
    assert ibus.cancel(fut.task_id) is True
    assert fut.cancelled()
    assert ibus.cancel(tid) is True
    assert ibus.status(tid).state == "cancelled"
    fut2 = ibus.dispatch(Ran(str(marker)))
    assert fut2.cancel() is True  # Future.cancel() does what bus.cancel does
    assert ibus.status(fut2.task_id).state == "cancelled"
    servers.append(TaskServer(ibus, workers=1).start())
    assert ibus.dispatch(Tiny(5)).result(timeout=60) == 5  # after the cancelled ones
    assert not marker.exists()


def test_cancel_a_delayed_task(ibus: TaskBus, servers: list[TaskServer], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    servers.append(TaskServer(ibus, workers=1).start())
    fut = ibus.dispatch(Ran(str(marker)), delay=0.3)
    assert ibus.status(fut.task_id).state == "scheduled"
    assert ibus.cancel(fut.task_id) is True
    assert fut.cancelled()
    later = ibus.dispatch(Tiny(7), delay=0.5)  # due after the cancelled one
    assert later.result(timeout=60) == 7
    assert not marker.exists()


def _cancel_from_another_process(name: str, task_id: str, out: mp.Queue) -> None:
    out.put(make_identity_bus(name).cancel(task_id))


@pytest.mark.parametrize("concurrency", [1, 4])
def test_cancel_a_running_async_handler(
    ibus: TaskBus, servers: list[TaskServer], tmp_path: Path, concurrency: int
) -> None:
    started, outcome = tmp_path / "started", tmp_path / "outcome"
    servers.append(TaskServer(ibus, workers=1, concurrency=concurrency).start())
    fut = ibus.dispatch(AsyncWait(str(started), str(outcome)))
    wait_for(started.exists, what="the handler to start")
    assert ibus.status(fut.task_id).state == "running"
    out: mp.Queue = FORK.Queue()
    p = FORK.Process(target=_cancel_from_another_process, args=(ibus.name, fut.task_id, out))
    p.start()
    assert out.get(timeout=60) is True
    p.join(60)
    with pytest.raises(CancelledError):
        fut.result(timeout=60)
    assert outcome.read_text() == "CancelledError"
    assert ibus.status(fut.task_id).state == "cancelled"
    assert ibus.dispatch(Tiny(1)).result(timeout=60) == 1  # the worker goes on


@pytest.mark.parametrize("concurrency", [1, 4])
def test_cancel_a_running_sync_handler(
    ibus: TaskBus, servers: list[TaskServer], tmp_path: Path, concurrency: int
) -> None:
    started, outcome = tmp_path / "started", tmp_path / "outcome"
    servers.append(TaskServer(ibus, workers=1, concurrency=concurrency).start())
    fut = ibus.dispatch(Coop(str(started), str(outcome)))
    wait_for(started.exists, what="the handler to start")
    assert ibus.cancel(fut.task_id) is True
    with pytest.raises(CancelledError):
        fut.result(timeout=60)
    assert outcome.read_text() == "stopped"
    assert ibus.status(fut.task_id).state == "cancelled"
    with pytest.raises(CancelledError):
        ibus.result(fut.task_id)


def test_cancel_with_terminate_kills_the_worker(
    ibus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    started = tmp_path / "started"
    server = TaskServer(ibus, workers=1).start()
    servers.append(server)
    fut = ibus.dispatch(Stubborn(str(started)))
    wait_for(started.exists, what="the handler to start")
    pid = int(started.read_text())
    assert ibus.cancel(fut.task_id, terminate=True, grace=0.2) is True
    with pytest.raises(CancelledError):  # delivered again, and dropped unrun
        fut.result(timeout=60)
    wait_for(lambda: not pid_alive(pid), what="the worker to die")
    assert int(started.read_text()) == pid  # no other worker ran it
    assert ibus.dispatch(Tiny(3)).result(timeout=60) == 3
    assert server.pids and server.pids[0] != pid
    assert os.getpid() != pid


def test_cancel_of_a_finished_task_is_false(ibus: TaskBus, servers: list[TaskServer]) -> None:
    servers.append(TaskServer(ibus, workers=1).start())
    fut = ibus.dispatch(Report(1))
    assert fut.result(timeout=60) == 2
    assert ibus.cancel(fut.task_id) is False
    assert ibus.status(fut.task_id).state == "done"


def test_an_envelope_of_the_layout_before_ids_still_runs(
    ibus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    import pickle
    import struct

    from ringbus import Queue

    marker = tmp_path / "ran"
    head = struct.pack("<BBHIQddH", 0xB1, 0, 1, os.getpid(), 0, 0.0, 0.0, 0)  # no reply, no id
    ibus.transport.open()
    with Queue.attach(f"/ringbus-{ibus.name}-tasks") as q:
        q.put_bytes(head + pickle.dumps(Ran(str(marker)), 5))
    servers.append(TaskServer(ibus, workers=1).start())
    wait_for(marker.exists, what="the old-layout task to run")
    assert ibus.dead_letters() == []
