"""The inline transport (test mode): handlers in the calling process, the
real bytes, retries recorded, status/result/cancel, dead letters, and no C
extension needed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path

import pytest

from ringbus import TaskBus, TaskFailed, current_task

SRC = str(Path(__file__).resolve().parents[1] / "src")


@dataclass
class Job:
    n: int
    fail_until: int = 0  # raise on attempts below this


@dataclass
class AJob:
    n: int


@pytest.fixture(name="ibus")
def ibus_fixture() -> Iterator[TaskBus]:
    bus = TaskBus(f"inline-{os.getpid()}", transport="inline")
    seen: list[tuple[str, int]] = []

    @bus.handler(Job, retries=3, keep_result=30)
    def job(task: Job) -> int:
        ctx = current_task()
        seen.append((ctx.id, ctx.attempt))
        if ctx.attempt < task.fail_until:
            raise ConnectionError(f"attempt {ctx.attempt}")
        ctx.set_progress(1.0, "all done")
        return task.n + 1

    @bus.handler(AJob, keep_result=30)
    async def ajob(task: AJob) -> str:
        await asyncio.sleep(0)
        return f"{current_task().type}:{task.n}"

    bus.seen = seen  # type: ignore[attr-defined]
    yield bus
    bus.destroy()


def test_runs_at_once_with_status_and_result(ibus: TaskBus) -> None:
    fut = ibus.dispatch(Job(1))
    assert fut.done() and fut.result() == 2  # ran inside dispatch
    st = ibus.status(fut.task_id)
    assert (st.state, st.progress, st.message, st.attempt) == ("done", 1.0, "all done", 1)
    assert ibus.result(fut.task_id) == 2
    assert ibus.seen == [(fut.task_id, 1)]  # type: ignore[attr-defined]


def test_retries_are_recorded_not_slept(ibus: TaskBus) -> None:
    fut = ibus.dispatch(Job(1, fail_until=3))
    assert fut.result() == 2
    backoffs = ibus.transport.backoffs  # type: ignore[attr-defined]
    assert [(t, a) for t, a, _ in backoffs] == [(fut.task_id, 1), (fut.task_id, 2)]
    assert ibus.status(fut.task_id).attempt == 3


def test_last_failure_is_dead_lettered(ibus: TaskBus) -> None:
    fut = ibus.dispatch(Job(1, fail_until=99))
    with pytest.raises(ConnectionError, match="attempt 4"):
        fut.result()
    assert ibus.status(fut.task_id).state == "failed"
    with pytest.raises(ConnectionError):
        ibus.result(fut.task_id)
    [letter] = ibus.dead_letters()
    assert letter.attempts == 4 and "ConnectionError" in letter.reason


def test_async_handlers_and_dispatch_async(ibus: TaskBus) -> None:
    assert ibus.dispatch(AJob(3)).result() == f"{__name__}.AJob:3"

    async def main() -> str:
        return await ibus.dispatch_async(AJob(4))

    assert asyncio.run(main()) == f"{__name__}.AJob:4"


def test_delayed_tasks_wait_and_can_be_cancelled(ibus: TaskBus) -> None:
    fut = ibus.dispatch(Job(5), delay=60)
    tid = ibus.send(Job(6), delay=60)
    assert ibus.status(tid).state == "scheduled"
    assert ibus.cancel(fut.task_id) is True and fut.cancelled()
    assert ibus.transport.run_delayed() == 2  # type: ignore[attr-defined]
    assert ibus.result(tid) == 7
    with pytest.raises(CancelledError):
        ibus.result(fut.task_id)
    assert len(ibus.seen) == 1  # type: ignore[attr-defined]


def test_unpicklable_tasks_and_results_fail_as_on_a_pool(ibus: TaskBus) -> None:
    import threading

    with pytest.raises(TypeError, match="pickle"):
        ibus.dispatch(Job(threading.Lock()))  # type: ignore[arg-type]
    ibus.register(AJob, lambda t: threading.Lock())
    with pytest.raises(TaskFailed, match="could not be pickled"):
        ibus.dispatch(AJob(1)).result()


def test_works_without_the_c_extension(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "ringbus._ring":
                    raise ImportError("the C extension cannot load here")
                return None

        sys.meta_path.insert(0, Block())
        from dataclasses import dataclass
        import ringbus
        from ringbus import TaskBus, current_task

        @dataclass
        class T:
            n: int

        bus = TaskBus("no-ext", transport="inline")

        @bus.handler(T, keep_result=5)
        def t(task):
            current_task().set_progress(0.5)
            return task.n * 3

        fut = bus.dispatch(T(2))
        assert fut.result() == 6 and bus.result(fut.task_id) == 6
        assert bus.status(bus.send(T(1))).state == "done"
        try:
            ringbus.Queue
        except ImportError:
            pass
        else:
            raise AssertionError("the extension loaded")
        assert "ringbus._ring" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
