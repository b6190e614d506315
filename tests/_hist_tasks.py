"""Task types of the histogram tests (``ringbus worker _hist_tasks:bus``).

The bus name comes from ``RINGBUS_TEST_OPS_BUS`` (as in ``_ops_tasks``), so
each test and the worker subprocess it starts share a bus of their own.
Sleeping handlers report when they ran, on both clocks, so a test can bound
what the worker must have observed."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ringbus import TaskBus

bus = TaskBus(os.environ.get("RINGBUS_TEST_OPS_BUS", "test-hist-default"))

Ran = tuple[int, float, float, float, float]
"""(worker pid, monotonic start, monotonic end, wall start, wall end)."""


@dataclass
class Short:
    i: int


@dataclass
class Long:
    i: int


@dataclass
class Quick:
    i: int


@dataclass
class Block:
    """Runs until its release file exists (at most a minute)."""

    release: str


@dataclass
class Touch:
    path: str


@dataclass
class Flaky:
    """Always raises: one retry, after a backoff long enough to outlast a test."""

    i: int


def _sleep(seconds: float) -> Ran:
    m0, w0 = time.monotonic(), time.time()
    time.sleep(seconds)
    return os.getpid(), m0, time.monotonic(), w0, time.time()


@bus.handler(Short)
def _short(task: Short) -> Ran:
    return _sleep(0.05)


@bus.handler(Long, queue="slow")
def _long(task: Long) -> Ran:
    return _sleep(0.2)


@bus.handler(Quick)
def _quick(task: Quick) -> int:
    return task.i


@bus.handler(Block)
def _block(task: Block) -> str:
    end = time.monotonic() + 60
    while not os.path.exists(task.release) and time.monotonic() < end:
        time.sleep(0.01)
    return "released"


@bus.handler(Touch)
def _touch(task: Touch) -> None:
    Path(task.path).touch()


@bus.handler(Flaky, retries=1, backoff=60.0, max_backoff=60.0)
def _flaky(task: Flaky) -> None:
    raise RuntimeError(f"flaky {task.i}")


@dataclass
class Boom:
    """Always raises, no retry: failed for good and dead-lettered."""

    i: int


@bus.handler(Boom, queue="mail")
def _boom(task: Boom) -> None:
    raise ValueError(f"boom {task.i}")
