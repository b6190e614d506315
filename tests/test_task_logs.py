"""Every line a handler logs names its task: a real ``ringbus worker``
subprocess (one task at a time, and ``--concurrency 4`` with ``async def``
handlers on the loop and plain ones in threads, their lines interleaved)
writes its log in text and in JSON; the test parses the lines and matches
each one's task id with the id the dispatch returned.  And the filter for
apps that set up logging themselves."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from _cli_worker import start_worker_fixture  # noqa: F401 - fixture
from _ops_support import SHM, wait_for
from ringbus import TaskBus, TaskLogFilter, current_task
from ringbus.server.pool_state import read_pool_states

TEXT_LINE = re.compile(
    r"^\S+ \S+ (?P<pid>\d+) (?P<level>[A-Z]+) (?P<logger>[\w.]+)"
    r"(?: \[(?P<task_type>\S+) (?P<task_id>\S+)\])?: (?P<message>.*)$"
)
JOB = re.compile(r"^job n=(\d+) step=(\d)$")


@pytest.fixture(name="logs_bus")
def logs_bus_fixture() -> Iterator[TaskBus]:
    """The ``_logs_app`` handlers on a bus of this test's own."""
    import _logs_app

    name = f"test-logs-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bus = TaskBus(name)
    for cls, fn in _logs_app.bus.handlers.items():
        bus.register(cls, fn)
    yield bus
    bus.destroy(force=True)
    for p in SHM.glob(f"ringbus-{name}-*"):
        p.unlink(missing_ok=True)


def _parse(line: str, fmt: str) -> dict[str, Any] | None:
    """A log line's fields (None: a text-mode announcement, not a record)."""
    if fmt == "json":
        doc: dict[str, Any] = json.loads(line)  # every line is an object
        return doc
    m = TEXT_LINE.match(line.rstrip("\n"))
    return None if m is None else {k: v for k, v in m.groupdict().items() if v is not None}


@pytest.mark.parametrize(("fmt", "concurrency"), [("json", 4), ("text", 4), ("text", 1)])
def test_every_line_a_handler_logs_names_its_task(
    logs_bus: TaskBus, start_worker: Any, fmt: str, concurrency: int
) -> None:
    from _logs_app import AsyncJob, ThreadJob

    name = logs_bus.name
    w = start_worker(
        "_logs_app:bus",
        name,
        *("--workers", "1", "--concurrency", str(concurrency), "--log-format", fmt),
        RINGBUS_TEST_LOGS_BUS=name,
    )
    futs = {n: logs_bus.dispatch(AsyncJob(n) if n % 2 else ThreadJob(n)) for n in range(12)}
    assert {n: f.result(timeout=60) for n, f in futs.items()} == {n: n for n in futs}
    w.stop()

    docs = [d for line in w.lines if line.strip() and (d := _parse(line, fmt)) is not None]
    jobs = [(d, JOB.match(d["message"])) for d in docs]
    seen: dict[int, list[int]] = {}
    order: list[int] = []
    for d, m in jobs:
        if m is None:
            assert "task_id" not in d, d  # the supervisor's lines name no task
            continue
        n, step = int(m.group(1)), int(m.group(2))
        kind = "_logs_app.AsyncJob" if n % 2 else "_logs_app.ThreadJob"
        assert d["task_id"] == futs[n].task_id, d
        assert d["task_type"] == kind
        assert d["logger"] == "app.jobs"
        seen.setdefault(n, []).append(step)
        order.append(n)
    assert seen == {n: [0, 1, 2] for n in futs}
    if concurrency > 1:
        # Tasks ran at once (the case a leaking context would get wrong):
        # some task's lines are not all in one run.
        runs = sum(1 for a, b in itertools.pairwise(order) if a != b) + 1
        assert runs > len(futs)


def test_workers_of_a_rolling_restart_log_the_same_way(
    logs_bus: TaskBus, start_worker: Any
) -> None:
    """After SIGHUP the workers are spawned (fresh interpreters): they set up
    the server's log format themselves, task ids included."""
    from _logs_app import ThreadJob

    name = logs_bus.name
    w = start_worker(
        "_logs_app:bus", name, "--workers", "1", "--log-format", "json", RINGBUS_TEST_LOGS_BUS=name
    )

    def pids() -> set[int]:
        states = read_pool_states(name).values()
        return {s.worker_pid for slots in states for s in slots if s.state in ("idle", "running")}

    old = wait_for(pids, what="the first worker")
    w.proc.send_signal(signal.SIGHUP)
    new = wait_for(lambda: (p := pids()) and not p & old and p, what="the rolling restart")
    futs = {n: logs_bus.dispatch(ThreadJob(n)) for n in range(4)}
    assert [f.result(timeout=60) for f in futs.values()] == list(range(4))
    w.stop()
    docs = [json.loads(line) for line in w.lines if line.strip()]
    jobs = [d for d in docs if JOB.match(d["message"])]
    assert len(jobs) == 12
    for d in jobs:
        n = int(JOB.match(d["message"]).group(1))  # type: ignore[union-attr]
        assert d["pid"] in new and d["task_id"] == futs[n].task_id, d
        assert d["task_type"] == "_logs_app.ThreadJob"


class Probe:
    """A task of the in-process test (module level: tasks are pickled)."""


def test_the_filter_for_apps_that_set_up_logging_themselves() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(TaskLogFilter())
    logger = logging.getLogger("app.self_configured")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    bus = TaskBus(f"test-logs-inline-{os.getpid()}", transport="inline")

    @bus.handler(Probe)
    def probe(task: Probe) -> str:
        logger.info("inside")
        return current_task().id

    try:
        logger.info("before")
        task_id = bus.dispatch(Probe()).result(timeout=10)
        logger.info("after")
    finally:
        logger.removeHandler(handler)
        bus.destroy()
    before, inside, after = records
    assert (before.task_id, before.task_type, before.task) == ("", "", "")  # type: ignore[attr-defined]
    assert inside.task_id == task_id and task_id  # type: ignore[attr-defined]
    assert inside.task_type == "test_task_logs.Probe"  # type: ignore[attr-defined]
    assert inside.task == f" [{inside.task_type} {task_id}]"  # type: ignore[attr-defined]
    assert after.task_id == ""  # type: ignore[attr-defined]
