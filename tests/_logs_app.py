"""Handlers that log while they run, for tests/test_task_logs.py
(``ringbus worker _logs_app:bus``; the bus name comes from
``RINGBUS_TEST_LOGS_BUS``).  Each logs three lines with a pause between
them, so that the lines of tasks running at once interleave."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from ringbus import TaskBus

bus = TaskBus(os.environ.get("RINGBUS_TEST_LOGS_BUS", "test-logs-default"))
log = logging.getLogger("app.jobs")


@dataclass
class AsyncJob:
    n: int


@dataclass
class ThreadJob:
    n: int


@bus.handler(AsyncJob)
async def async_job(task: AsyncJob) -> int:
    for step in range(3):
        log.info("job n=%d step=%d", task.n, step)
        await asyncio.sleep(0.02)
    return task.n


@bus.handler(ThreadJob)
def thread_job(task: ThreadJob) -> int:
    for step in range(3):
        log.info("job n=%d step=%d", task.n, step)
        time.sleep(0.02)
    return task.n
