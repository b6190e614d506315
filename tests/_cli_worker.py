"""A ``ringbus worker MODULE:bus`` subprocess of a test, its stderr lines
collected; the ``start_worker`` fixture stops every one it started."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from _ops_support import TESTS, cli_env, wait_for


class CliWorker:
    def __init__(self, target: str, bus_name: str, args: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ringbus.cli", "worker", target, *args],
            env=cli_env(bus_name, **env),
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
        """SIGTERM (drain), then the exit status; killed if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=10)
        return code


@pytest.fixture(name="start_worker")
def start_worker_fixture() -> Iterator[Any]:
    """``start_worker(target, bus_name, *args, **env) -> CliWorker`` (serving)."""
    started: list[CliWorker] = []

    def start(target: str, bus_name: str, *args: str, **env: str) -> CliWorker:
        w = CliWorker(target, bus_name, list(args), env)
        started.append(w)
        w.wait_serving()
        return w

    yield start
    for w in started:
        w.stop()
