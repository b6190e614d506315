"""Task types and handlers for the named-queue tests (importable by workers
and by ``ringbus worker _tasks_queues:bus``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ringbus import TaskBus
from ringbus.errors import Unrecoverable


@dataclass
class Mail:
    """Appends ``mail <n>`` to ``log`` and returns the worker's pid."""

    log: str
    n: int = 0


@dataclass
class Report:
    log: str
    n: int = 0


@dataclass
class Job:
    """A default-queue task: appends ``job <n>`` to ``log``."""

    log: str
    n: int = 0


@dataclass
class UrgentMail(Mail):
    """Resolved along the MRO: a Mail, so on the mail queue."""


@dataclass
class LimitedMail(Mail):
    """Registered by a test with a rate limit, on the mail queue."""


@dataclass
class Gate:
    """Holds its worker until ``open_path`` exists (writes ``started`` first)."""

    open_path: str
    started: str


@dataclass
class DieOnce:
    """On the mail queue: the first attempt writes its pid and hangs (to be
    SIGKILLed), the next returns its pid."""

    marker: str


@dataclass
class Doomed:
    """On the mail queue: always fails for good (into dead letters)."""


def _append(log: str, line: str) -> int:
    with open(log, "a") as f:
        f.write(line + "\n")
    return os.getpid()


def mail(task: Mail) -> int:
    return _append(task.log, f"mail {task.n}")


def report(task: Report) -> int:
    return _append(task.log, f"report {task.n}")


def job(task: Job) -> int:
    return _append(task.log, f"job {task.n}")


def gate(task: Gate) -> int:
    Path(task.started).write_text(str(os.getpid()))
    while not os.path.exists(task.open_path):
        time.sleep(0.01)
    return os.getpid()


def die_once(task: DieOnce) -> int:
    if not os.path.exists(task.marker):
        Path(task.marker).write_text(str(os.getpid()))
        time.sleep(600)
    return os.getpid()


def doomed(task: Doomed) -> None:
    raise Unrecoverable("never works")


def make_bus(name: str, **kwargs: object) -> TaskBus:
    bus = TaskBus(name, **kwargs)  # type: ignore[arg-type]
    bus.register(Mail, mail, queue="mail")
    bus.register(Report, report, queue="reports")
    bus.register(Job, job)
    bus.register(Gate, gate)
    bus.register(DieOnce, die_once, queue="mail", retries=2)
    bus.register(Doomed, doomed, queue="mail")
    return bus


def lines(path: str | Path) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


bus = make_bus(os.environ.get("RINGBUS_TEST_BUS", "ringbus-test-queues"))
