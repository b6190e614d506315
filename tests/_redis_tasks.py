"""Handlers for tests/test_redis.py, importable by ``ringbus worker
_redis_tasks:bus --transport URL`` (the bus name comes from
RINGBUS_TEST_BUS) and by dispatcher processes (``redis_bus``)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ringbus import TaskBus, Unrecoverable
from ringbus.transport import Transport


@dataclass
class Double:
    n: int


@dataclass
class FirstRunHangs:
    """The first run writes its pid to ``marker`` and hangs (to be killed or
    frozen); a later run returns its own pid."""

    marker: str


@dataclass
class Nap:
    seconds: float
    n: int


@dataclass
class Poison:
    """Kills the worker that runs it, every time."""


@dataclass
class Bad:
    """Fails for good (no retry): straight to dead letters."""


def double(task: Double) -> tuple[int, int]:
    return task.n * 2, os.getpgid(0)  # the value and the pool (process group) that ran it


def first_run_hangs(task: FirstRunHangs) -> int:
    marker = Path(task.marker)
    try:
        with marker.open("x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        return os.getpid()
    time.sleep(3600)
    return -1


def nap(task: Nap) -> int:
    time.sleep(task.seconds)
    return task.n


def poison(task: Poison) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def bad(task: Bad) -> None:
    raise Unrecoverable("bad task")


def register(bus: TaskBus) -> TaskBus:
    bus.handler(Double)(double)
    bus.handler(FirstRunHangs)(first_run_hangs)
    bus.handler(Nap)(nap)
    bus.handler(Poison, retries=1)(poison)  # two deaths, then dead letters
    bus.handler(Bad)(bad)
    return bus


TEST_SECRET = "ringbus-test-secret"
"""Redis tests run signed: unsigned pickle over a network is refused."""


def redis_bus(name: str, transport: Transport | str, **kwargs: object) -> TaskBus:
    """A dispatching side of the test bus on ``transport`` (signed with
    ``TEST_SECRET`` unless ``kwargs`` say otherwise)."""
    kwargs.setdefault("secret", TEST_SECRET)
    return register(TaskBus(name, transport=transport, **kwargs))  # type: ignore[arg-type]


bus = register(TaskBus(os.environ.get("RINGBUS_TEST_BUS", "redis-tasks")))
