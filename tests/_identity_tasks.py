"""Task types and handlers for the task identity tests (importable by workers).

Handlers wait for gate files the test writes, so a test sees each state
(running, progress) for as long as it needs, with no timing assumptions."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ringbus import TaskBus, current_task


@dataclass
class Report:
    n: int
    gate: str = ""  # the handler finishes once this file exists
    started: str = ""  # written when the handler starts


@dataclass
class Coop:
    """A plain handler that stops when told to (current_task().cancelled)."""

    started: str
    outcome: str  # "stopped" or "ran out" is written here


@dataclass
class AsyncWait:
    started: str
    outcome: str


@dataclass
class Stubborn:
    """Ignores cancel requests (terminate=True must kill its worker)."""

    started: str


@dataclass
class Ran:
    marker: str  # written if the handler ever runs


@dataclass
class Tiny:
    n: int


@dataclass
class Mail:
    """For a handler on a named queue (registered by the test): writes ``marker``."""

    marker: str


@dataclass
class Outage:
    """Sets its progress after ``gate`` appears (the test stops Redis first),
    then writes ``after`` and returns ``n``."""

    n: int
    gate: str
    after: str


def _wait_for(path: str, limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    while not Path(path).exists():
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.005)


def report(task: Report) -> int:
    ctx = current_task()
    if task.started:
        Path(task.started).write_text(ctx.id)
    ctx.set_progress(0.5, "half way")
    if task.gate:
        _wait_for(task.gate)
    return task.n * 2


def coop(task: Coop) -> str:
    ctx = current_task()
    Path(task.started).write_text(str(os.getpid()))
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if ctx.cancelled:
            Path(task.outcome).write_text("stopped")
            return "stopped"
        time.sleep(0.01)
    Path(task.outcome).write_text("ran out")
    return "ran out"


async def async_wait(task: AsyncWait) -> str:
    Path(task.started).write_text(str(os.getpid()))
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        Path(task.outcome).write_text("CancelledError")
        raise
    return "ran out"


def stubborn(task: Stubborn) -> None:
    Path(task.started).write_text(str(os.getpid()))
    time.sleep(120)


def ran(task: Ran) -> None:
    Path(task.marker).write_text("ran")


def tiny(task: Tiny) -> int:
    return task.n


def mail(task: Mail) -> None:
    Path(task.marker).write_text("ran")


def outage(task: Outage) -> int:
    ctx = current_task()
    ctx.set_progress(0.1, "before the gate")
    _wait_for(task.gate)
    ctx.set_progress(1.0, "after the gate")  # a status write must never fail a task
    Path(task.after).write_text("after")
    return task.n


def make_identity_bus(name: str, **kwargs: object) -> TaskBus:
    bus = TaskBus(name, **kwargs)  # type: ignore[arg-type]
    bus.register(Report, report, keep_result=60)
    bus.register(Coop, coop, keep_result=60)
    bus.register(AsyncWait, async_wait, keep_result=60)
    bus.register(Stubborn, stubborn, retries=3)
    bus.register(Ran, ran)
    bus.register(Tiny, tiny, keep_result=1)
    bus.register(Outage, outage, keep_result=60)
    return bus
