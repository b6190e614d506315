"""TaskBus: handler resolution, dispatch, results, errors, deadlines, asyncio,
fire-and-forget, and many dispatcher processes at once (real worker processes)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import pytest

from _tasks_basic import (
    Add,
    Animal,
    Circle,
    Dog,
    Echo,
    Fail,
    NeedsTwoArgs,
    Puppy,
    Sleep,
    Touch,
    animal,
    dog,
    make_bus,
    shape,
)
from _tasks_support import (  # noqa: F401 - fixtures
    bus_fixture,
    bus_name_fixture,
    servers_fixture,
    wait_for,
)
from ringbus import (
    NoHandlerError,
    Queue,
    RemoteTraceback,
    ShmTransport,
    TaskBus,
    TaskFailed,
    TaskServer,
    TaskTimeout,
)

ctx = mp.get_context("fork")


def _serve(bus: TaskBus, servers: list[TaskServer], workers: int = 2, **kw: Any) -> TaskServer:
    server = TaskServer(bus, workers=workers, **kw)
    servers.append(server)
    return server.start()


def _stop(servers: list[TaskServer]) -> None:
    """Before destroying a bus: a live pool makes destroy() refuse."""
    for server in servers:
        server.stop(timeout=10)


# ---------------------------------------------------------------- handlers


def test_mro_resolution_most_specific_wins(bus: TaskBus) -> None:
    assert bus.resolve(Animal) is animal
    assert bus.resolve(Dog) is dog
    assert bus.resolve(Puppy) is dog  # inherits Dog's handler, not Animal's
    assert bus.resolve(Circle) is shape  # virtual subclass of a registered ABC


def test_resolution_cache_follows_new_registrations(bus: TaskBus) -> None:
    assert bus.resolve(Puppy) is dog

    def puppy(task: Puppy) -> str:
        return "puppy"

    bus.register(Puppy, puppy)
    assert bus.resolve(Puppy) is puppy
    assert bus.resolve(Dog) is dog


def test_handler_decorator_returns_the_function(bus_name: str) -> None:
    b = TaskBus(bus_name)
    try:

        @b.handler(int)
        def double(x: int) -> int:
            return 2 * x

        assert double(4) == 8
        assert b.resolve(bool) is double  # bool subclasses int
        with pytest.raises(TypeError):
            b.register("not a type", double)  # type: ignore[arg-type]
    finally:
        b.destroy()


def test_no_handler_raises_in_the_caller_before_queueing(bus: TaskBus) -> None:
    class Unknown:
        pass

    with pytest.raises(NoHandlerError, match="Unknown"):
        bus.dispatch(Unknown())
    with pytest.raises(NoHandlerError):
        bus.send(Unknown())
    with pytest.raises(NoHandlerError):
        bus.dispatch_many([Add(1, 2), Unknown()])
    assert bus.pending_tasks() == 0  # nothing was queued, not even the Add


def test_invalid_bus_names() -> None:
    for bad in ("", "a/b", "x" * 200, "sp ace"):
        with pytest.raises(ValueError, match="invalid bus name"):
            TaskBus(bad)


def test_unpicklable_task_raises_in_the_caller(bus: TaskBus) -> None:
    import threading

    with pytest.raises((TypeError, pickle.PicklingError)):
        bus.dispatch(Echo(threading.Lock()))
    assert bus.pending_tasks() == 0


# ---------------------------------------------------------------- results


def test_dispatch_results_and_mro_in_workers(bus: TaskBus, servers: list[TaskServer]) -> None:
    _serve(bus, servers)
    assert bus.dispatch(Add(2, 3)).result(timeout=30) == 5
    assert bus.dispatch(Puppy()).result(timeout=30) == "dog"
    assert bus.dispatch(Animal()).result(timeout=30) == "animal"
    assert bus.dispatch(Circle()).result(timeout=30) == "shape 3.0"
    futs = bus.dispatch_many(Add(i, i) for i in range(500))
    assert [f.result(timeout=30) for f in futs] == [2 * i for i in range(500)]
    big = b"x" * 300_000  # a multi-slot task and result
    assert bus.dispatch(Echo(big)).result(timeout=30) == big


def test_handler_exception_keeps_type_and_remote_traceback(
    bus: TaskBus, servers: list[TaskServer]
) -> None:
    _serve(bus, servers)
    fut = bus.dispatch(Fail("value"))
    with pytest.raises(ValueError, match="boom from the handler") as info:
        fut.result(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "Traceback" in str(cause)
    assert 'raise ValueError("boom from the handler")' in str(cause)
    assert "_tasks_basic.py" in str(cause)
    assert isinstance(fut.exception(), ValueError)


def test_exceptions_and_results_that_cannot_travel(bus: TaskBus, servers: list[TaskServer]) -> None:
    _serve(bus, servers)
    with pytest.raises(TaskFailed) as info:
        bus.dispatch(Fail("unpicklable")).result(timeout=30)
    text = str(info.value)
    assert "Unpicklable" in text and "cannot travel" in text and "Traceback" in text
    with pytest.raises(TaskFailed, match="could not be unpickled"):
        bus.dispatch(Fail("needs-two")).result(timeout=30)
    with pytest.raises(TaskFailed, match="could not be pickled"):
        bus.dispatch(Fail("result")).result(timeout=30)
    with pytest.raises(SystemExit):
        bus.dispatch(Fail("exit")).result(timeout=30)
    # The workers survived all of it.
    assert bus.dispatch(Add(1, 1)).result(timeout=30) == 2
    assert NeedsTwoArgs.__name__  # the class the worker raised exists here too


def test_future_callbacks_and_wait(bus: TaskBus, servers: list[TaskServer]) -> None:
    _serve(bus, servers)
    seen: list[int] = []
    futs = [bus.dispatch(Add(i, 0)) for i in range(50)]
    for f in futs:
        f.add_done_callback(lambda f: seen.append(f.result()))
    done, not_done = wait(futs, timeout=30)
    assert not not_done and len(done) == 50
    wait_for(lambda: len(seen) == 50, what="callbacks")
    assert sorted(seen) == list(range(50))


# ---------------------------------------------------------------- deadlines


def test_task_queued_past_its_deadline_is_not_run(
    bus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    _serve(bus, servers, workers=1)
    started = tmp_path / "started"
    blocker = bus.dispatch(Sleep(1.0, started=str(started)))
    wait_for(started.exists, what="the blocking task to start")
    marker = tmp_path / "must-not-exist"
    late = bus.dispatch(Touch(str(marker)), timeout=0.2)
    with pytest.raises(TaskTimeout):
        late.result(timeout=30)
    assert blocker.result(timeout=30) > 0
    # The worker took the expired task after the blocker and dropped it.
    wait_for(lambda: bus.pending_tasks() == 0, what="the queue to drain")
    assert bus.dispatch(Add(1, 2)).result(timeout=30) == 3  # it is behind us in FIFO order
    assert not marker.exists()


def test_future_fails_at_the_deadline_of_a_running_task(
    bus: TaskBus, servers: list[TaskServer]
) -> None:
    server = _serve(bus, servers, workers=1)
    # An idle worker and a deadline it can meet on a loaded machine: the task
    # must be running, not still queued, when the deadline passes.
    wait_for(lambda: [w.state for w in server.worker_info()] == ["idle"], what="an idle worker")
    fut = bus.dispatch(Sleep(2.5), timeout=1.0)
    with pytest.raises(TaskTimeout, match="no result within"):
        fut.result(timeout=30)
    assert [w.state for w in server.worker_info()] == ["running"]
    # The late result is ignored; the next task gets its own answer.
    assert bus.dispatch(Add(20, 22)).result(timeout=30) == 42


def test_deadline_fires_with_no_waiter(bus: TaskBus, servers: list[TaskServer]) -> None:
    """The reader thread fails the future by itself (nobody calls result())."""
    _serve(bus, servers, workers=1)
    fut = bus.dispatch(Sleep(1.0), timeout=0.2)
    wait_for(fut.done, what="the deadline")
    assert isinstance(fut.exception(), TaskTimeout)


def test_negative_timeout_is_refused(bus: TaskBus) -> None:
    with pytest.raises(ValueError):
        bus.dispatch(Add(1, 2), timeout=-1)
    assert bus.pending_tasks() == 0


# ---------------------------------------------------------------- asyncio


def test_dispatch_async_from_a_running_loop(bus: TaskBus, servers: list[TaskServer]) -> None:
    _serve(bus, servers)

    async def main() -> tuple[list[Any], BaseException | None, BaseException | None]:
        results = await asyncio.gather(*(bus.dispatch_async(Add(i, 1)) for i in range(200)))
        try:
            await bus.dispatch_async(Fail("value"))
            err = None
        except ValueError as exc:
            err = exc
        try:
            await bus.dispatch_async(Sleep(1.0), timeout=0.1)
            late = None
        except TaskTimeout as exc:
            late = exc
        return results, err, late

    results, err, late = asyncio.run(main())
    assert results == [i + 1 for i in range(200)]
    assert isinstance(err, ValueError) and isinstance(err.__cause__, RemoteTraceback)
    assert isinstance(late, TaskTimeout)


def test_dispatch_async_needs_a_running_loop(bus: TaskBus) -> None:
    with pytest.raises(RuntimeError):
        bus.dispatch_async(Add(1, 2))


# ---------------------------------------------------------------- fire and forget


def test_send_fire_and_forget(bus: TaskBus, servers: list[TaskServer], tmp_path: Path) -> None:
    _serve(bus, servers)
    target = tmp_path / "sent"
    bus.send(Touch(str(target), "hello"))
    bus.send(Fail("value"))  # only logged by the worker
    wait_for(target.exists, what="the fire-and-forget side effect")
    wait_for(lambda: target.read_text() == "hello", what="the file content")
    assert bus.dispatch(Add(1, 1)).result(timeout=30) == 2  # the failing one broke nothing


# ---------------------------------------------------------------- dispatchers


def _dispatcher(name: str, index: int, count: int, report: Queue) -> None:
    """A process that imports the bus and never created the server."""
    bus = make_bus(name)
    try:
        futs: list[Future[Any]] = []
        half = count // 2
        for i in range(half):
            futs.append(bus.dispatch(Add(index, i)))
        futs.extend(bus.dispatch_many(Add(index, i) for i in range(half, count)))
        wrong = sum(1 for i, f in enumerate(futs) if f.result(timeout=120) != index + i)
        # Every reply taken from this process's reply ring: exactly one per task.
        st = bus._st
        assert st is not None
        # Results received (none lost) and results that matched no pending
        # task (an answer twice): counted by the reader(s) of this process.
        report.put((index, len(futs), wrong, st.results, st.unmatched, len(st.pending)))
    except BaseException as exc:
        report.put((index, -1, repr(exc), 0, 0, 0))
    finally:
        bus.close()


@pytest.mark.shm_only(
    reason="its dispatcher processes build shared-memory buses and it reads the ring's "
    "stats; tests/test_redis.py runs the same load over Redis"
)
def test_four_dispatcher_processes_four_workers_100k_tasks(
    bus: TaskBus, servers: list[TaskServer], procs: list[mp.process.BaseProcess]
) -> None:
    server = _serve(bus, servers, workers=4)
    per = 25_000
    report = Queue()
    try:
        for i in range(4):
            child = ctx.Process(target=_dispatcher, args=(bus.name, i * 1_000_000, per, report))
            procs.append(child)
            child.start()
        results = sorted(report.get(timeout=300) for _ in range(4))
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        report.close()
    for index, n, wrong, received, unmatched, left in results:
        assert n == per, f"dispatcher {index} failed: {wrong}"
        assert wrong == 0
        assert received == per  # none lost
        assert unmatched == 0  # none answered twice
        assert left == 0
    stats = bus.transport._producer().stats()  # type: ignore[attr-defined]
    assert stats["depth"] == 0
    # Each worker counts a task once its result is sent: all of them ran once.
    wait_for(lambda: sum(w.tasks_done for w in server.worker_info()) == 4 * per, what="counts")
    # The dispatchers closed their buses: their reply rings are gone.
    assert not list(Path("/dev/shm").glob(f"ringbus-{bus.name}-reply-*"))


def test_forked_child_gets_its_own_reply_ring(
    bus: TaskBus, servers: list[TaskServer], procs: list[mp.process.BaseProcess]
) -> None:
    """The parent dispatched before the fork; the child must not read the
    parent's replies (a fresh reply ring, reader and task ids after fork)."""
    _serve(bus, servers)
    assert bus.dispatch(Add(1, 1)).result(timeout=30) == 2
    parent_reply = bus._st.reply  # type: ignore[union-attr]
    report = Queue()
    try:

        def child() -> None:
            st_reply = b""
            try:
                value = bus.dispatch(Add(2, 2)).result(timeout=30)
                st_reply = bus._st.reply  # type: ignore[union-attr]
                report.put((value, st_reply != parent_reply))
            finally:
                bus.close()

        p = ctx.Process(target=child)
        procs.append(p)
        p.start()
        assert bus.dispatch(Add(3, 3)).result(timeout=30) == 6
        assert report.get(timeout=30) == (4, True)
        p.join(timeout=30)
        assert p.exitcode == 0
    finally:
        report.close()


def test_dead_dispatcher_does_not_block_workers(
    bus_name: str, servers: list[TaskServer], procs: list[mp.process.BaseProcess]
) -> None:
    """A dispatcher dies with its (tiny) reply ring full: workers drop its
    results instead of blocking forever, and keep serving everybody else."""
    bus = make_bus(bus_name)
    try:
        _serve(bus, servers, workers=2)

        def doomed() -> None:
            small = make_bus(bus_name, transport=ShmTransport(reply_maxsize=4))
            for i in range(40):  # more results than its reply ring holds
                small.dispatch(Add(i, i))
            os.kill(os.getpid(), signal.SIGKILL)

        p = ctx.Process(target=doomed)
        procs.append(p)
        p.start()
        p.join(timeout=30)
        assert p.exitcode == -signal.SIGKILL
        futs = [bus.dispatch(Add(i, 1)) for i in range(100)]
        assert [f.result(timeout=60) for f in futs] == [i + 1 for i in range(100)]
    finally:
        _stop(servers)
        bus.destroy()  # also removes the dead dispatcher's reply ring
    assert not list(Path("/dev/shm").glob(f"ringbus-{bus_name}-reply-*"))


def _dispatch_adds(bus_name: str, base: int, n: int, out: Any) -> None:
    bus = make_bus(bus_name)
    try:
        out.put([bus.dispatch(Add(base + i, 1)).result(timeout=60) for i in range(n)])
    finally:
        bus.close()


def test_the_direct_reply_put_follows_the_reply_address(
    bus_name: str,
    servers: list[TaskServer],
    procs: list[mp.process.BaseProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker keeps a direct put for the reply ring it used last.  With a
    cache of one reply handle and three dispatchers taking turns, every
    change of address evicts (closes) a handle: each result still reaches
    its own dispatcher."""
    from ringbus.transport import shm as transport_mod

    monkeypatch.setattr(transport_mod, "_REPLY_CACHE_SIZE", 1)  # forked workers inherit it
    bus = make_bus(bus_name)
    try:
        _serve(bus, servers, workers=1)
        out = ctx.Queue()
        for k in range(2):
            p = ctx.Process(target=_dispatch_adds, args=(bus_name, 1000 * (k + 1), 300, out))
            procs.append(p)
            p.start()
        mine = [bus.dispatch(Add(i, 1)).result(timeout=60) for i in range(300)]
        theirs = sorted([out.get(timeout=120), out.get(timeout=120)])
        assert mine == [i + 1 for i in range(300)]
        assert theirs == [[b + i + 1 for i in range(300)] for b in (1000, 2000)]
    finally:
        _stop(servers)
        bus.destroy()


def _slow_reader(bus_name: str, n: int, ready: Any, out: Any) -> None:
    bus = make_bus(bus_name, transport=ShmTransport(reply_maxsize=4))
    try:
        futs = [bus.dispatch(Sleep(0.005)) for _ in range(n)]
        ready.set()  # the test stops this process now: its reply ring fills up
        done, _ = wait(futs, timeout=60)  # a lost result stays pending
        out.put(sum(1 for f in done if f.result() > 0))  # worker pids
    finally:
        bus.close()


def test_a_full_reply_ring_makes_the_worker_wait_not_drop(
    bus_name: str, servers: list[TaskServer], procs: list[mp.process.BaseProcess]
) -> None:
    """The direct reply put never blocks: when the dispatcher's ring is full
    (here: the dispatcher is stopped) the worker falls back to the careful
    send (wait while the dispatcher reads, spill while it does not), and no
    result is lost."""
    bus = make_bus(bus_name)
    try:
        _serve(bus, servers, workers=1)
        ready, out = ctx.Event(), ctx.Queue()
        p = ctx.Process(target=_slow_reader, args=(bus_name, 40, ready, out))
        procs.append(p)
        p.start()
        assert ready.wait(30)
        assert p.pid is not None
        os.kill(p.pid, signal.SIGSTOP)
        try:
            time.sleep(1.0)  # 40 x 5 ms of work: results pile up against 4 slots
        finally:
            os.kill(p.pid, signal.SIGCONT)
        assert out.get(timeout=120) == 40
        p.join(30)
        assert p.exitcode == 0
    finally:
        _stop(servers)
        bus.destroy()


def test_close_fails_pending_futures(bus: TaskBus) -> None:
    """No server: closing the dispatching side answers what is pending."""
    from ringbus import BusClosed

    fut = bus.dispatch(Add(1, 2))
    bus.close()
    with pytest.raises(BusClosed):
        fut.result(timeout=30)


def test_queue_full_at_dispatch_deadline(bus_name: str) -> None:
    b = make_bus(bus_name, transport=ShmTransport(maxsize=2))
    try:
        b.dispatch(Add(1, 1))
        b.dispatch(Add(1, 1))
        with pytest.raises(queue.Full):
            b.dispatch(Add(1, 1), timeout=0.05)
        futs = b.dispatch_many([Add(2, 2), Add(3, 3)], timeout=0.05)
        with pytest.raises(TaskTimeout, match="stayed full"):
            futs[1].result(timeout=30)
    finally:
        b.destroy()


def test_dispatch_many_past_a_full_channel_fails_only_what_was_not_queued(
    bus_name: str,
) -> None:
    """dispatch_many queues in chunks: when the channel fills in a later
    chunk, exactly the tail that found no room fails with "not queued"; what
    went in stays pending (here until its own timeout, with no workers)."""
    b = make_bus(bus_name, transport=ShmTransport(maxsize=600))
    try:
        futs = b.dispatch_many([Add(i, 1) for i in range(1500)], timeout=0.3)
        assert len(futs) == 1500
        not_queued = [
            i for i, f in enumerate(futs) if f.done() and "not queued" in str(f.exception())
        ]
        queued = 1500 - len(not_queued)
        assert queued == 600 and not_queued == list(range(600, 1500))
        for f in futs[:600]:
            with pytest.raises(TaskTimeout, match="no result within"):
                f.result(timeout=30)
    finally:
        b.destroy()


def test_a_waiter_is_not_woken_early_by_other_futures_results(
    bus: TaskBus, servers: list[TaskServer]
) -> None:
    """Futures of a process share one condition: results of other tasks
    arriving while a caller waits must neither end its wait early nor lose it."""
    import concurrent.futures
    import threading

    _serve(bus, servers, workers=2)
    slow = bus.dispatch(Sleep(1.5))
    others: list[Any] = []
    stop = threading.Event()

    def churn() -> None:  # results keep arriving during the wait below
        while not stop.is_set():
            others.extend(bus.dispatch_many([Add(i, 1) for i in range(50)]))
            wait(others[-50:], timeout=30)

    t = threading.Thread(target=churn)
    t.start()
    try:
        # Two waiters: one reads the replies itself, the other sleeps on the
        # shared condition while the churn's results keep notifying it.
        outcomes: list[tuple[str, float]] = []

        def wait_slow() -> None:
            t0 = time.monotonic()
            try:
                slow.result(timeout=0.5)
                outcomes.append(("done", time.monotonic() - t0))
            except concurrent.futures.TimeoutError:
                outcomes.append(("timeout", time.monotonic() - t0))

        waiters = [threading.Thread(target=wait_slow) for _ in range(2)]
        for w in waiters:
            w.start()
        for w in waiters:
            w.join()
        # A lower bound only (load cannot shorten a correct wait): a wake-up
        # for another future must not end a wait early.
        assert [o[0] for o in outcomes] == ["timeout", "timeout"]
        assert all(elapsed >= 0.5 for _, elapsed in outcomes), outcomes
        assert not slow.done()
        done, not_done = wait([slow, *others[:100]], timeout=30)
        assert not not_done and slow in done
        assert isinstance(slow.result(timeout=0), int)
    finally:
        stop.set()
        t.join()
    assert [f.result(timeout=30) for f in others] == [
        i + 1 for _ in others[::50] for i in range(50)
    ]


def test_no_result_is_lost_between_reader_threads(bus: TaskBus, servers: list[TaskServer]) -> None:
    """Caller threads read replies for their own futures while the bus's
    reader thread reads too: every result reaches its caller.  (A stress
    test: it did not reproduce the lost wake-up fixed in _resolve, whose
    window is a few bytecodes wide; the fix rests on the ordering argument
    in its comment.)"""
    import threading

    _serve(bus, servers, workers=2)
    errors: list[BaseException] = []

    def caller(k: int) -> None:
        try:
            for i in range(1500):
                assert bus.dispatch(Add(i, k)).result(timeout=20) == i + k
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
