"""Task types for the time tests: handlers append a line per run to a file
(when, which task), so a test can count runs across processes."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ringbus import TaskBus

SECRET = "ringbus-test-secret"


@dataclass
class Stamp:
    """Appends ``time.time() key pid`` to ``log``; returns the time."""

    log: str
    key: int = 0


@dataclass
class FailOnce:
    """Raises on its first run (marked by a file), succeeds after."""

    mark: str


def stamp(task: Stamp) -> float:
    now = time.time()
    with open(task.log, "a") as f:
        f.write(f"{now} {task.key} {os.getpid()}\n")
    return now


def fail_once(task: FailOnce) -> str:
    mark = Path(task.mark)
    if not mark.exists():
        mark.write_text("failed once")
        raise ConnectionError("the first attempt fails")
    return "second attempt"


def make_bus(name: str, transport: str | None = None) -> TaskBus:
    """The time tests' bus: on shared memory, or on ``transport`` (a Redis URL)."""
    # Over Redis the envelopes are signed (a bus that spans hosts refuses unsigned pickle).
    bus = TaskBus(name, transport=transport, secret=SECRET) if transport else TaskBus(name)
    bus.register(Stamp, stamp)
    bus.register(FailOnce, fail_once, retries=2, backoff=2.0, max_backoff=2.0)
    return bus


def lines(log: Path) -> list[list[str]]:
    return [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []
