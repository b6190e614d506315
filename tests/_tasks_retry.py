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
class Counted:
    """Squares ``n`` and logs the run to a per-process file in ``log_dir``
    first (the chaos test counts duplicate runs from those files)."""

    n: int
    log_dir: str


_count_fd: list[int] = [-1, -1]  # (pid, fd) of this process's run log


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


def counted(task: Counted) -> int:
    if _count_fd[0] != os.getpid():
        path = os.path.join(task.log_dir, f"runs-{os.getpid()}")
        _count_fd[:] = [os.getpid(), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)]
    os.write(_count_fd[1], b"%d\n" % task.n)
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
    bus.register(Counted, counted, retries=20)
    bus.register(Hang, hang)
    return bus


# For `ringbus worker _tasks_retry:bus` in a subprocess: the test picks the name.
bus = make_bus(os.environ.get("RINGBUS_TEST_BUS", "ringbus-test-default"))
