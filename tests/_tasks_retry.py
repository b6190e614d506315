"""Task types for the retry / redelivery / dead-letter tests.

Handlers leave traces in files (one line per run) so a test can count how
often each task really ran and in which process.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ringbus import Queue, TaskBus, Unrecoverable


@dataclass
class Flaky:
    """Raises ConnectionError until it has run ``fail_times`` times."""

    log: str
    fail_times: int


@dataclass
class Broken:
    """Always raises (ValueError, or Unrecoverable when ``fatal``)."""

    log: str
    fatal: bool = False


@dataclass
class Poison:
    """Kills the worker that runs it, every time."""

    log: str


@dataclass
class DieOnce:
    """Reports its worker's pid on a queue and hangs the first time (the test
    SIGKILLs that worker); any later run returns the pid that ran it."""

    log: str
    report_to: str


@dataclass
class Square:
    n: int


@dataclass
class Hang:
    seconds: float


def _runs(log: str) -> int:
    """Append this run to the log; return how many runs there were before."""
    p = Path(log)
    before = len(p.read_text().splitlines()) if p.exists() else 0
    with p.open("a") as f:
        f.write(f"{os.getpid()}\n")
    return before


def flaky(task: Flaky) -> str:
    n = _runs(task.log)
    if n < task.fail_times:
        raise ConnectionError(f"failure {n + 1} of {task.fail_times}")
    return f"ok after {n} failures"


def broken(task: Broken) -> None:
    n = _runs(task.log)
    if task.fatal:
        raise Unrecoverable(f"bad input (run {n + 1})")
    raise ValueError(f"still broken (run {n + 1})")


def poison(task: Poison) -> None:
    _runs(task.log)
    os.kill(os.getpid(), signal.SIGKILL)


def die_once(task: DieOnce) -> int:
    if _runs(task.log) == 0:
        q = Queue.attach(task.report_to)
        q.put(os.getpid())
        q.close()
        time.sleep(120)
    return os.getpid()


def square(task: Square) -> int:
    return task.n * task.n


def hang(task: Hang) -> None:
    time.sleep(task.seconds)


def make_bus(name: str, **kwargs: object) -> TaskBus:
    bus = TaskBus(name, **kwargs)  # type: ignore[arg-type]
    bus.register(Flaky, flaky, retries=3, backoff=0.01)
    bus.register(Broken, broken, retries=2, backoff=0.01)
    bus.register(Poison, poison, retries=2)
    bus.register(DieOnce, die_once)  # default policy: redelivered after a death
    bus.register(Square, square, retries=20)  # the chaos test: never runs out
    bus.register(Hang, hang)
    return bus


# For `ringbus worker _tasks_retry:bus` in a subprocess: the test picks the name.
bus = make_bus(os.environ.get("RINGBUS_TEST_BUS", "ringbus-test-default"))
