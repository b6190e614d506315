"""Task types for the operations tests (``ringbus worker _ops_tasks:bus``).

The bus name comes from ``RINGBUS_TEST_OPS_BUS`` so that each test run (and
the worker subprocess it starts) uses a bus of its own."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ringbus import TaskBus

bus = TaskBus(os.environ.get("RINGBUS_TEST_OPS_BUS", "test-ops-default"))


@dataclass
class Ok:
    n: int


@dataclass
class Boom:
    n: int


@dataclass
class Hold:
    """Runs until its release file exists (at most a minute)."""

    release: str


@bus.handler(Ok)
def _ok(task: Ok) -> int:
    return task.n


@bus.handler(Boom, retries=0)
def _boom(task: Boom) -> int:
    raise RuntimeError(f"boom {task.n}")


@bus.handler(Hold)
def _hold(task: Hold) -> str:
    end = time.monotonic() + 60
    while not os.path.exists(task.release) and time.monotonic() < end:
        time.sleep(0.01)
    return "released"
