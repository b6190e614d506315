"""Task types and handlers for the limits tests: each run appends stamps to a
file the task names, so a test counts starts and overlaps after the fact."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from ringbus import TaskBus


@dataclass
class Tick:
    """Rate-limited: appends its start stamp."""

    log: str


@dataclass
class Slot:
    """Capped: appends "start end pid" around an async sleep."""

    log: str
    seconds: float


@dataclass
class Hold:
    """Capped: the first run holds its permit (until its worker is killed)."""

    log: str
    marker: str


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def tick(task: Tick) -> None:
    _append(task.log, f"{time.time()!r}\n")


async def slot(task: Slot) -> None:
    start = time.time()
    await asyncio.sleep(task.seconds)
    _append(task.log, f"{start!r} {time.time()!r} {os.getpid()}\n")


class Capped:
    """The registered type of the capped handler: Slot and Hold share its cap."""


@dataclass
class CappedSlot(Capped, Slot):
    pass


@dataclass
class CappedHold(Capped, Hold):
    pass


async def capped(task: Capped) -> None:
    if isinstance(task, Hold):
        start = time.time()
        if not os.path.exists(task.marker):  # first run: hold the permit until killed
            _append(task.marker + ".tmp", f"{os.getpid()}\n")
            os.rename(task.marker + ".tmp", task.marker)
            await asyncio.sleep(120)
        _append(task.log, f"{start!r} {time.time()!r} {os.getpid()}\n")
    else:
        assert isinstance(task, Slot)
        await slot(task)


def make_bus(name: str) -> TaskBus:
    bus = TaskBus(name)
    bus.register(Tick, tick, rate_limit="20/s")
    bus.register(Capped, capped, max_concurrency=2)
    return bus


def starts(path: str) -> list[float]:
    with open(path) as f:
        return sorted(float(line) for line in f.read().split())


def spans(path: str) -> list[tuple[float, float]]:
    out = []
    with open(path) as f:
        for line in f.read().splitlines():
            s, e, _ = line.split()
            out.append((float(s), float(e)))
    return out


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at once.  At an equal stamp an end counts
    before a start: the end was stamped before its permit was given back,
    the start after the next permit was taken."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best
