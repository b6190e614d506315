"""Scope: operating a running pool through ``ringbus worker``'s signals:
SIGHUP rolling restart with the code on disk, SIGTTIN/SIGTTOU one worker
more/fewer, and stack dumps of the workers.  A real `ringbus worker`
subprocess, real signals, a real module rewritten on disk."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _tasks_support import bus_name_fixture, wait_for  # noqa: F401
from ringbus import TaskBus
from ringbus.server.pool_state import read_pool_states

APP = """
import os, time
from ringbus import TaskBus

bus = TaskBus(os.environ["RB_BUS"])
VERSION = "{version}"

@bus.handler(tuple)
def run(task):
    with open(os.environ["RB_LOG"], "a") as f:
        f.write(f"{{task[0]}}\\n")
    if task[1]:
        time.sleep(task[1])
    return VERSION
"""


class Worker:
    """`ringbus worker app_mod:bus` in a process group of its own."""

    def __init__(self, tmp: Path, bus_name: str, *args: str) -> None:
        self.err = tmp / "worker.log"
        env = dict(
            os.environ,
            RB_BUS=bus_name,
            RB_LOG=str(tmp / "runs"),
            PYTHONPATH=os.pathsep.join([str(tmp), *sys.path]),
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ringbus.cli", "worker", "app_mod:bus", *args],
            cwd=tmp,
            env=env,
            stderr=self.err.open("w"),
            start_new_session=True,
        )
        wait_for(lambda: "serving bus" in self.err.read_text(), 60, "the worker to start")

    def pids(self, bus_name: str) -> set[int]:
        return {
            w.worker_pid
            for slots in read_pool_states(bus_name).values()
            for w in slots
            if w.state in ("idle", "running")
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def app(tmp_path: Path, bus_name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    (tmp_path / "app_mod.py").write_text(APP.format(version="first"))
    monkeypatch.setenv("RB_BUS", bus_name)
    monkeypatch.setenv("RB_LOG", str(tmp_path / "runs"))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("app_mod", None)
    mod = importlib.import_module("app_mod")
    workers: list[Worker] = []
    yield mod, workers
    for w in workers:
        w.stop()
    sys.modules.pop("app_mod", None)
    TaskBus(bus_name).destroy(force=True)


def test_sighup_rolls_the_workers_onto_new_code(app: Any, tmp_path: Path, bus_name: str) -> None:
    mod, workers = app
    w = Worker(tmp_path, bus_name, "--workers", "2")
    workers.append(w)
    old = w.pids(bus_name)
    bus = mod.bus
    futs = bus.dispatch_many((i, 0) for i in range(10_000))
    (tmp_path / "app_mod.py").write_text(APP.format(version="second version"))
    w.proc.send_signal(signal.SIGHUP)
    futs += bus.dispatch_many((i, 0) for i in range(10_000, 20_000))
    results = [f.result(timeout=120) for f in futs]
    wait_for(lambda: len(w.pids(bus_name)) == 2 and not (w.pids(bus_name) & old), 60, "the roll")
    assert set(results) <= {"first", "second version"}
    assert bus.dispatch((20_000, 0)).result(timeout=30) == "second version"
    runs = (tmp_path / "runs").read_text().split()
    assert len(runs) == 20_001 and len(set(runs)) == 20_001  # every task once, none twice


def test_sigttin_and_sigttou_change_the_pool_by_one(
    app: Any, tmp_path: Path, bus_name: str
) -> None:
    _, workers = app
    w = Worker(tmp_path, bus_name, "--workers", "1", "--max-workers", "3")
    workers.append(w)
    assert len(w.pids(bus_name)) == 1
    for _ in range(3):  # the third is refused: max-workers 3
        w.proc.send_signal(signal.SIGTTIN)
        time.sleep(0.3)
    wait_for(lambda: len(w.pids(bus_name)) == 3, 30, "three workers")
    w.proc.send_signal(signal.SIGTTOU)
    wait_for(lambda: len(w.pids(bus_name)) == 2, 30, "two workers")
    assert "max_workers=3" in w.err.read_text()


def test_stacks_of_a_stuck_worker(app: Any, tmp_path: Path, bus_name: str) -> None:
    mod, workers = app
    w = Worker(tmp_path, bus_name, "--workers", "1")
    workers.append(w)
    fut = mod.bus.dispatch((1, 3.0))
    wait_for(lambda: (tmp_path / "runs").exists(), 30, "the task to start")
    out = subprocess.run(
        [sys.executable, "-m", "ringbus.cli", "stats", bus_name, "--stacks"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "most recent call first" in w.err.read_text(), 30, "the stack dump")
    assert "app_mod.py" in w.err.read_text()  # the handler's frame, mid-sleep
    assert fut.result(timeout=30) == "first"
