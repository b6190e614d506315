"""Task types and middleware for tests/test_middleware.py.

``Recorder`` writes one JSON line per hook call (which hook, which
middleware, the process, the task's id, attempt and headers) to a file that
every process of a test appends to, so the test reads the order and the
process of each event after the fact.  ``Raiser`` raises in every hook."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ringbus import Middleware, TaskBus, TaskMessage, Unrecoverable, current_task


@dataclass
class Echo:
    n: int


@dataclass
class AsyncEcho:
    n: int


@dataclass
class FailsTwice:
    """Raises on attempts 1 and 2; attempt 3 returns ``n``."""

    n: int


@dataclass
class AlwaysFails:
    n: int


@dataclass
class Sleepy:
    """Runs far past any test's task_timeout."""

    seconds: float


def sleepy(task: Sleepy) -> None:
    time.sleep(task.seconds)


def echo(task: Echo) -> tuple[int, int]:
    return task.n, os.getpid()


async def async_echo(task: AsyncEcho) -> tuple[int, int]:
    await asyncio.sleep(0.01)
    return task.n, os.getpid()


def fails_twice(task: FailsTwice) -> int:
    if current_task().attempt < 3:
        raise ValueError(f"attempt {current_task().attempt} fails")
    return task.n


def always_fails(task: AlwaysFails) -> int:
    if current_task().attempt > 1:
        raise Unrecoverable(f"attempt {current_task().attempt}: no more")
    raise ValueError("fails")


def make_bus(name: str, middleware: list[Any], **kwargs: Any) -> TaskBus:
    bus = TaskBus(name, middleware=middleware, **kwargs)
    bus.handler(Echo)(echo)
    bus.handler(AsyncEcho)(async_echo)
    bus.handler(FailsTwice, retries=2, backoff=0.01, max_backoff=0.02)(fails_twice)
    bus.handler(AlwaysFails, retries=3, backoff=0.01, max_backoff=0.02)(always_fails)
    bus.handler(Sleepy, retries=0)(sleepy)
    return bus


def _write(path: str, doc: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:  # O_APPEND: one line per write
        f.write(json.dumps(doc) + "\n")


class Recorder(Middleware):
    """Records every hook; adds the header ``x-<label>`` at dispatch."""

    def __init__(self, label: str, path: str) -> None:
        self.label = label
        self.path = path

    def _rec(self, hook: str, msg: TaskMessage | None, **extra: Any) -> None:
        doc: dict[str, Any] = {"hook": hook, "mw": self.label, "pid": os.getpid(), **extra}
        if msg is not None:
            doc.update(
                id=msg.id,
                type=msg.type,
                attempt=msg.attempt,
                queue=msg.queue,
                headers=dict(msg.headers),
                has_task=msg.task is not None,
            )
        _write(self.path, doc)

    def before_dispatch(self, message: TaskMessage) -> None:
        self._rec("before_dispatch", message)
        message.headers[f"x-{self.label}"] = f"{self.label}-{os.getpid()}"

    def after_dispatch(self, message: TaskMessage, exception: BaseException | None = None) -> None:
        self._rec("after_dispatch", message, exception=repr(exception) if exception else None)

    def before_process(self, message: TaskMessage) -> None:
        try:
            task_id = current_task().id
        except RuntimeError:
            task_id = None
        self._rec("before_process", message, current=task_id)

    def after_process(
        self, message: TaskMessage, result: Any = None, exception: BaseException | None = None
    ) -> None:
        self._rec(
            "after_process",
            message,
            result=repr(result),
            exception=type(exception).__name__ if exception is not None else None,
        )

    def on_retry(self, message: TaskMessage, exception: BaseException, delay: float) -> None:
        self._rec("on_retry", message, exception=type(exception).__name__, delay=delay)

    def on_dead_letter(self, message: TaskMessage, reason: str) -> None:
        self._rec("on_dead_letter", message, reason=reason)

    def worker_start(self, bus: TaskBus) -> None:
        self._rec("worker_start", None, bus=bus.name)

    def worker_stop(self, bus: TaskBus) -> None:
        self._rec("worker_stop", None, bus=bus.name)


class Raiser:
    """Duck-typed (no base class): every hook records that it ran, then raises."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _boom(self, hook: str, msg: Any = None) -> None:
        _write(self.path, {"hook": hook, "mw": "raiser", "pid": os.getpid()})
        raise RuntimeError(f"hook {hook} raised on purpose")

    def before_dispatch(self, message: TaskMessage) -> None:
        message.headers["x-raiser"] = "kept"  # added, then the hook raises
        self._boom("before_dispatch")

    def after_dispatch(self, message: TaskMessage, exception: BaseException | None = None) -> None:
        self._boom("after_dispatch")

    def before_process(self, message: TaskMessage) -> None:
        self._boom("before_process")

    def after_process(
        self, message: TaskMessage, result: Any = None, exception: Any = None
    ) -> None:
        self._boom("after_process")

    def on_retry(self, message: TaskMessage, exception: BaseException, delay: float) -> None:
        self._boom("on_retry")

    def on_dead_letter(self, message: TaskMessage, reason: str) -> None:
        self._boom("on_dead_letter")

    def worker_start(self, bus: TaskBus) -> None:
        self._boom("worker_start")

    def worker_stop(self, bus: TaskBus) -> None:
        self._boom("worker_stop")


class BigHeader(Middleware):
    """Adds a header of ``size`` bytes (or a non-str value when ``size`` < 0)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def before_dispatch(self, message: TaskMessage) -> None:
        message.headers["big"] = "x" * self.size if self.size >= 0 else 12345  # type: ignore[assignment]


def log_to(path: str) -> None:
    """TaskServer initializer: the worker's log records also go to ``path``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(process)d %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def read_events(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
