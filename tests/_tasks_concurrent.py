"""Task types and handlers for the concurrency tests: they return start and
finish stamps (time.time()) so a test can count how many ran at once."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ringbus import TaskBus


@dataclass
class Nap:
    """``async def``: sleeps, returns (start, end, pid)."""

    seconds: float
    mark: str = ""  # a file to append one line per run to (counts the runs)


@dataclass
class Doze:
    """A plain handler (runs in the worker's thread pool): time.sleep."""

    seconds: float


@dataclass
class Boom:
    message: str


@dataclass
class Pid:
    pass


def _stamp(mark: str) -> None:
    if mark:
        with open(mark, "a") as f:
            f.write(f"{os.getpid()}\n")


async def nap(task: Nap) -> tuple[float, float, int]:
    _stamp(task.mark)
    start = time.time()
    await asyncio.sleep(task.seconds)
    return start, time.time(), os.getpid()


def doze(task: Doze) -> tuple[float, float, int]:
    start = time.time()
    time.sleep(task.seconds)
    return start, time.time(), os.getpid()


async def boom(task: Boom) -> None:
    await asyncio.sleep(0.01)
    raise ValueError(task.message)


def pid(task: Pid) -> object:
    async def later() -> int:  # a plain function returning an awaitable: awaited too
        return os.getpid()

    return later()


def make_bus(name: str, **kwargs: object) -> TaskBus:
    bus = TaskBus(name, **kwargs)  # type: ignore[arg-type]
    bus.register(Nap, nap)
    bus.register(Doze, doze)
    bus.register(Boom, boom, retries=0)
    bus.register(Pid, pid)
    return bus


def most_at_once(spans: list[tuple[float, float, int]]) -> int:
    """The largest number of (start, end) intervals that overlap."""
    events = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def runs(mark: Path) -> int:
    return len(mark.read_text().splitlines()) if mark.exists() else 0
