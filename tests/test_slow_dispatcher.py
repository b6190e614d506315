"""Scope: a dispatcher that stops reading its results (SIGSTOP, a debugger)
must not stop the pool serving everyone else; its results wait in a spill
file and reach it when it reads again.  Real processes, real signals."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from typing import Any

import pytest

from _tasks_basic import Add, make_bus
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401
from ringbus import ShmTransport, TaskServer

ctx = mp.get_context("fork")
N_STOPPED = 400  # far more than its reply ring holds (maxsize 32)


def _stopped_dispatcher(bus_name: str, out: Any) -> None:
    bus = make_bus(bus_name, transport=ShmTransport(reply_maxsize=32))
    try:
        futs = [bus.dispatch(Add(i, 1)) for i in range(N_STOPPED)]
        out.send("dispatched")  # a pipe: sent before the stop, no feeder thread
        os.kill(os.getpid(), signal.SIGSTOP)  # stops reading until SIGCONT
        out.send(sum(f.result(timeout=120) for f in futs))
    finally:
        bus.close()


def _recv(conn: Any, timeout: float) -> Any:
    assert conn.poll(timeout), "no message from the dispatcher"
    return conn.recv()


def test_a_stopped_dispatcher_does_not_stall_the_pool(
    bus_name: str, servers: list[TaskServer], procs: list[mp.process.BaseProcess]
) -> None:
    bus = make_bus(bus_name)
    server = TaskServer(bus, workers=2)
    servers.append(server)
    server.start()
    mine, out = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_stopped_dispatcher, args=(bus_name, out))
    procs.append(child)
    child.start()
    assert child.pid is not None
    try:
        assert _recv(mine, 60) == "dispatched"
        wait_for(
            lambda: open(f"/proc/{child.pid}/stat").read().split(") ")[1][0] == "T",
            30,
            "the dispatcher to stop",
        )
        # Everyone else is served while it stays stopped (the defect: every
        # worker waited on its full reply ring, forever).
        assert [bus.dispatch(Add(i, 10)).result(timeout=30) for i in range(200)] == [
            i + 10 for i in range(200)
        ]
    finally:
        os.kill(child.pid, signal.SIGCONT)
    # Its own results were kept for it: all of them arrive once it reads again.
    assert _recv(mine, 120) == sum(i + 1 for i in range(N_STOPPED))
    child.join(30)
    assert child.exitcode == 0
    bus.close()
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"ringbus-{bus_name}-reply")]


@pytest.fixture
def procs() -> Any:
    started: list[mp.process.BaseProcess] = []
    yield started
    for p in started:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.join(10)
