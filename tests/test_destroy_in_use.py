"""Scope: removing a bus's task ring under a live pool (``bus.destroy()`` from
another process, ``ringbus rm``): refused unless forced, and a forced removal
does not leave the workers reading a ring nobody else sees.  Real servers."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from _tasks_basic import Add, make_bus
from _tasks_support import bus_name_fixture, servers_fixture  # noqa: F401
from ringbus import TaskServer

ctx = mp.get_context("fork")


def _destroy(bus_name: str, force: bool, out: mp.SimpleQueue) -> None:
    bus = make_bus(bus_name)
    try:
        bus.destroy(force=force)
        out.put("destroyed")
    except Exception as exc:
        out.put(f"{type(exc).__name__}: {exc}")


def _destroy_elsewhere(bus_name: str, force: bool) -> str:
    out: mp.SimpleQueue = ctx.SimpleQueue()
    p = ctx.Process(target=_destroy, args=(bus_name, force, out))
    p.start()
    p.join(60)
    return str(out.get())


def test_destroy_under_a_live_pool_is_refused(bus_name: str, servers: list[TaskServer]) -> None:
    bus = make_bus(bus_name)
    server = TaskServer(bus, workers=2)
    servers.append(server)
    server.start()
    assert bus.dispatch(Add(1, 2)).result(timeout=30) == 3
    said = _destroy_elsewhere(bus_name, force=False)
    assert said.startswith("RingError") and "is in use" in said and "force=True" in said
    assert bus.dispatch(Add(2, 3)).result(timeout=30) == 5  # nothing changed
    server.stop(timeout=10)
    bus.destroy()


def test_workers_follow_a_forced_removal(bus_name: str, servers: list[TaskServer]) -> None:
    """Forced: the workers notice their ring lost its name and move to the
    ring made anew under it (they used to read the old one forever, and every
    new task waited in a ring nobody read)."""
    bus = make_bus(bus_name)
    server = TaskServer(bus, workers=2)
    servers.append(server)
    server.start()
    assert bus.dispatch(Add(1, 2)).result(timeout=30) == 3
    assert _destroy_elsewhere(bus_name, force=True) == "destroyed"
    bus.close()  # our handles still point at the removed ring
    assert [bus.dispatch(Add(i, 1)).result(timeout=30) for i in range(10)] == [
        i + 1 for i in range(10)
    ]
    server.stop(timeout=10)
    bus.destroy()


@pytest.mark.parametrize("force", [False, True])
def test_destroy_with_no_pool_needs_no_force(bus_name: str, force: bool) -> None:
    bus = make_bus(bus_name)
    bus.transport.open()
    bus.destroy(force=force)
