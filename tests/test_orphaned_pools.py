"""Scope: a server killed together with its workers (an OOM kill of the
cgroup, ``systemctl kill -s KILL``): the task in hand is in the dead pool's
segment, and the next server on the bus (or ``ringbus gc``) delivers it
again.  Real processes in their own process group, a real SIGKILL."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401
from ringbus import TaskBus, TaskServer
from ringbus._proc import pid_alive

ctx = mp.get_context("fork")
SHM = Path("/dev/shm")


@dataclass
class SlowOnce:
    """Sleeps long on its first run (then gets killed), returns at once after."""

    mark: str


def slow_once(task: SlowOnce) -> str:
    mark = Path(task.mark)
    if mark.exists():
        return f"ran again, first in {mark.read_text()}"
    tmp = mark.with_suffix(".tmp")  # whole or absent: the test reads it at once
    tmp.write_text(str(os.getpid()))
    tmp.rename(mark)
    time.sleep(120)
    return "never"


def _bus(name: str) -> TaskBus:
    bus = TaskBus(name)
    bus.register(SlowOnce, slow_once, retries=2)
    return bus


def _server_main(bus_name: str, ready: Any) -> None:
    os.setsid()  # a group of its own: server and workers die together
    TaskServer(_bus(bus_name), workers=1).start()
    ready.set()
    while True:
        time.sleep(1)


def _kill_pool(bus_name: str, tmp_path: Path) -> tuple[Any, str]:
    """Start a pool in a child, dispatch, SIGKILL server and worker mid-task."""
    ready = ctx.Event()
    child = ctx.Process(target=_server_main, args=(bus_name, ready))
    child.start()
    assert ready.wait(30)
    bus = _bus(bus_name)
    mark = tmp_path / "first-run"
    fut = bus.dispatch(SlowOnce(str(mark)))
    wait_for(mark.exists, 30, "the task to start")
    worker = int(mark.read_text())
    assert child.pid is not None
    os.killpg(child.pid, signal.SIGKILL)
    child.join(10)
    wait_for(lambda: not pid_alive(worker), 10, "the worker to die")
    pools = [p.name for p in SHM.glob(f"ringbus-{bus_name}-pool-*")]
    assert pools, "the dead server left its pool segment"
    return (bus, fut), pools[0]


def test_the_next_server_delivers_the_dead_pools_task_again(
    bus_name: str, servers: list[TaskServer], tmp_path: Path
) -> None:
    (bus, fut), pool = _kill_pool(bus_name, tmp_path)
    server = TaskServer(bus, workers=1)
    servers.append(server)
    server.start()
    assert fut.result(timeout=60).startswith("ran again")
    assert server.redelivered == 1
    assert not (SHM / pool).exists()
    server.stop(timeout=10)
    bus.destroy()


def test_gc_delivers_the_dead_pools_task_again(bus_name: str, tmp_path: Path) -> None:
    (bus, fut), pool = _kill_pool(bus_name, tmp_path)
    gc = subprocess.run(
        [sys.executable, "-m", "ringbus.cli", "gc"], capture_output=True, text=True, timeout=60
    )
    assert gc.returncode == 0, gc.stderr
    assert not (SHM / pool).exists()
    assert bus.pending_tasks() == 1  # queued again, for the next server
    server = TaskServer(bus, workers=1).start()
    try:
        assert fut.result(timeout=60).startswith("ran again")
    finally:
        server.stop(timeout=10)
    bus.destroy()


@pytest.fixture(autouse=True)
def _no_stray_groups() -> Any:
    yield
    # A failed test may leave the child's group: it has no business outliving us.
    for p in mp.active_children():
        p.kill()
