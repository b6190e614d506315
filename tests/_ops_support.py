"""Helpers of the operations tests: a real ``ringbus worker`` subprocess on a
bus of its own, always stopped and cleaned up (processes and /dev/shm)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ringbus
from ringbus import TaskBus

TESTS = Path(__file__).resolve().parent
SRC = Path(ringbus.__file__).resolve().parents[1]
SHM = Path("/dev/shm")


def cli_env(bus_name: str, **extra: str) -> dict[str, str]:
    """The environment of a ``python -m ringbus.cli`` subprocess: this
    checkout's ringbus first, then the tests folder (task modules)."""
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGBUS_")}
    return {**env, "PYTHONPATH": path, "RINGBUS_TEST_OPS_BUS": bus_name, **extra}


def ringbus_cli(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringbus.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=str(TESTS),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy (a bound, not a timing assertion)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Worker:
    """A ``ringbus worker _ops_tasks:bus`` subprocess and its stderr lines."""

    def __init__(
        self,
        bus_name: str,
        *args: str,
        env: dict[str, str] | None = None,
        target: str = "_ops_tasks:bus",
    ) -> None:
        self.bus_name = bus_name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ringbus.cli", "worker", target, *args],
            env=env or cli_env(bus_name),
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(TESTS),
        )
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        self._reader = threading.Thread(target=lambda: self.lines.extend(stderr), daemon=True)
        self._reader.start()

    def wait_serving(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}: {self.lines}")
            return any("serving bus" in ln for ln in self.lines)

        wait_for(ready, what="the worker to serve")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=10)
        return code


@pytest.fixture(name="ops_bus")
def ops_bus_fixture() -> Iterator[TaskBus]:
    """The ``_ops_tasks`` bus under a fresh name; its segments go afterwards."""
    import _ops_tasks

    name = f"test-ops-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    b = TaskBus(name)
    for cls, fn in _ops_tasks.bus.handlers.items():  # the same types, for dispatch
        b.register(cls, fn, **_policy(_ops_tasks.bus, cls))
    yield b
    b.destroy(force=True)
    for p in SHM.glob(f"ringbus-{name}-*"):
        p.unlink(missing_ok=True)


def _policy(src: TaskBus, cls: type) -> dict[str, Any]:
    p = src.policy(cls)
    return {
        "retries": p.retries,
        "backoff": p.backoff,
        "max_backoff": p.max_backoff,
        "dead_letter": p.dead_letter,
    }


@pytest.fixture(name="workers")
def workers_fixture() -> Iterator[list[Worker]]:
    """``ringbus worker`` subprocesses of a test: stopped (killed if need be)."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()
