"""The bus over Redis Streams with real processes and a real redis-server:
worker pools in process groups of their own (``ringbus worker --transport``),
dispatcher processes, SIGKILL and SIGSTOP of workers, a Redis restart, dead
letters.  Every process group and key is removed afterwards, also on failure."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis_support import RedisServer
from _redis_tasks import TEST_SECRET, Bad, Double, FirstRunHangs, Nap, Poison, redis_bus
from _tasks_support import bus_name_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import TaskBus, TaskServer, Unrecoverable, WorkerLost
from ringbus.tasks.dead_letters import DeadLetterStore

redis = pytest.importorskip("redis", reason="redis-py is not installed")

from ringbus.transport.redis import BrokerUnavailable, RedisTransport  # noqa: E402

TESTS = Path(__file__).resolve().parent
ctx = mp.get_context("fork")


class Pool:
    """``ringbus worker _redis_tasks:bus --transport URL`` in a session (and
    process group) of its own, its stderr collected."""

    def __init__(self, bus_name: str, url: str, workers: int) -> None:
        env = dict(
            os.environ,
            RINGBUS_TEST_BUS=bus_name,
            RINGBUS_SECRET=TEST_SECRET,
            PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]),
        )
        cmd = [sys.executable, "-m", "ringbus.cli", "worker", "_redis_tasks:bus"]
        self.proc = subprocess.Popen(
            [*cmd, "--workers", str(workers), "--transport", url],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.pgid = self.proc.pid
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        self._pump = threading.Thread(target=lambda: self.lines.extend(stderr), daemon=True)
        self._pump.start()
        wait_for(lambda: self.serving or self.proc.poll() is not None, 60, "the pool to start")
        assert self.serving, "".join(self.lines)

    @property
    def serving(self) -> bool:
        return any("serving bus" in ln for ln in self.lines)

    def log(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        """SIGKILL the whole process group (a machine that died)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # and whatever of its group is left
        self._pump.join(timeout=5)


@pytest.fixture(name="pools")
def pools_fixture(bus_name: str) -> Iterator[list[Pool]]:
    """Pools a test starts; all stopped (and their groups killed) afterwards."""
    started: list[Pool] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture(name="url")
def url_fixture(redis_server: RedisServer) -> str:
    return redis_server.url + "?visibility_timeout=2"


@pytest.fixture(name="rbus")
def rbus_fixture(bus_name: str, url: str) -> Iterator[TaskBus]:
    """The dispatching side in the test process; the bus's keys are deleted
    afterwards and none may be left."""
    b = redis_bus(bus_name, url)
    try:
        yield b
    finally:
        b.destroy()
        r = redis.Redis.from_url(url.partition("?")[0])
        try:
            left = r.keys(f"ringbus:{{{bus_name}}}*")
            if left:
                r.delete(*left)
        finally:
            r.close()
        assert not left, f"keys left behind: {left}"


def _dispatcher(name: str, url: str, start: int, count: int, report: Any) -> None:
    """A dispatcher process: its own bus object and reply key."""
    bus = redis_bus(name, url)
    try:
        futs = []
        for lo in range(start, start + count, 1000):
            futs += bus.dispatch_many(Double(n) for n in range(lo, min(lo + 1000, start + count)))
        wrong = 0
        pools: set[int] = set()
        for n, f in zip(range(start, start + count), futs, strict=True):
            value, pgid = f.result(timeout=120)
            wrong += value != 2 * n
            pools.add(pgid)
        st = bus._st
        assert st is not None
        report.put((start, len(futs), wrong, st.results, st.unmatched, sorted(pools)))
    except BaseException as exc:
        report.put((start, -1, repr(exc), 0, 0, []))
    finally:
        bus.close()


def test_two_pools_three_dispatchers_100k_tasks(
    rbus: TaskBus, pools: list[Pool], url: str, bus_name: str
) -> None:
    pools += [Pool(bus_name, url, workers=2), Pool(bus_name, url, workers=2)]
    total, per = 100_000, 33_334
    report = ctx.Queue()
    children = [
        ctx.Process(
            target=_dispatcher, args=(bus_name, url, i * per, min(per, total - i * per), report)
        )
        for i in range(3)
    ]
    try:
        for c in children:
            c.start()
        results = [report.get(timeout=300) for _ in children]
        for c in children:
            c.join(timeout=30)
            assert c.exitcode == 0
    finally:
        for c in children:
            if c.is_alive():
                c.kill()
                c.join()
    served: set[int] = set()
    for start, n, wrong, received, unmatched, pgids in results:
        assert n == min(per, total - start), f"dispatcher {start} failed: {wrong}"
        assert wrong == 0
        assert received == n  # none lost
        assert unmatched == 0  # none answered twice
        served.update(pgids)
    assert sum(r[1] for r in results) == total
    assert served == {p.pgid for p in pools}  # both pools took part
    assert rbus.pending_tasks() == 0


def test_sigkilled_pool_task_is_reclaimed_by_the_other_pool(
    rbus: TaskBus, pools: list[Pool], url: str, bus_name: str, tmp_path: Path
) -> None:
    first = Pool(bus_name, url, workers=1)
    pools.append(first)
    marker = tmp_path / "hangs"
    fut = rbus.dispatch(FirstRunHangs(str(marker)))
    wait_for(lambda: marker.exists() and marker.read_text(), what="the task to start")
    victim = int(marker.read_text())
    second = Pool(bus_name, url, workers=1)
    pools.append(second)
    first.kill()  # the worker dies mid-task with its whole pool
    pid = fut.result(timeout=60)
    assert pid != victim and os.getpgid(pid) == second.pgid
    wait_for(lambda: "took over task entry" in second.log(), 10, "the take-over in its log")
    assert [f.result(timeout=30)[0] for f in rbus.dispatch_many(Double(i) for i in range(50))] == [
        2 * i for i in range(50)
    ]


def test_frozen_worker_loses_its_task_after_the_visibility_timeout(
    rbus: TaskBus, pools: list[Pool], url: str, bus_name: str, tmp_path: Path
) -> None:
    first = Pool(bus_name, url, workers=1)
    pools.append(first)
    marker = tmp_path / "hangs"
    fut = rbus.dispatch(FirstRunHangs(str(marker)))
    wait_for(lambda: marker.exists() and marker.read_text(), what="the task to start")
    frozen = int(marker.read_text())
    os.kill(frozen, signal.SIGSTOP)  # alive but silent: only the timeout can tell
    try:
        second = Pool(bus_name, url, workers=1)
        pools.append(second)
        pid = fut.result(timeout=60)
        assert pid != frozen and os.getpgid(pid) == second.pgid
        assert "idle past the timeout" in second.log()
    finally:
        first.kill()


def test_a_running_task_longer_than_the_visibility_timeout_is_not_taken_over(
    rbus: TaskBus, pools: list[Pool], url: str, bus_name: str
) -> None:
    pools += [Pool(bus_name, url, workers=1), Pool(bus_name, url, workers=1)]
    futs = [rbus.dispatch(Nap(5.0, 1)), rbus.dispatch(Nap(5.0, 2))]  # 2.5 visibility timeouts
    assert [f.result(timeout=60) for f in futs] == [1, 2]
    assert not any("took over" in p.log() for p in pools)
    assert rbus._st is not None and rbus._st.unmatched == 0  # none ran twice


def test_redis_restart_mid_run(
    redis_aof_server: RedisServer, pools: list[Pool], bus_name: str
) -> None:
    url = redis_aof_server.url + "?visibility_timeout=2"
    bus = redis_bus(bus_name, url)
    try:
        pool = Pool(bus_name, url, workers=2)
        pools.append(pool)
        futs = [bus.dispatch(Nap(0.01, i)) for i in range(400)]  # ~2 s of work queued
        redis_aof_server.stop()
        with pytest.raises(
            BrokerUnavailable, match=r"Redis at redis://127\.0\.0\.1:\d+/0 is unavailable"
        ):
            bus.dispatch(Nap(0, -1))
        time.sleep(1.0)  # the pool and the reader notice
        redis_aof_server.start()  # same port, same AOF: the queued tasks are back
        assert [f.result(timeout=120) for f in futs] == list(range(400))
        assert bus.dispatch(Nap(0, 7)).result(timeout=30) == 7
        log = pool.log()
        assert "unavailable while reading tasks" in log and "reachable again" in log
    finally:
        bus.destroy()


def test_dead_letters_on_redis(rbus: TaskBus, pools: list[Pool], url: str, bus_name: str) -> None:
    pools.append(Pool(bus_name, url, workers=2))
    with pytest.raises(Unrecoverable, match="bad task"):
        rbus.dispatch(Bad()).result(timeout=30)
    # Kills every worker that takes it: counted from the delivery count, then buried.
    with pytest.raises(WorkerLost, match=r"reached attempt 3 of at most 2"):
        rbus.dispatch(Poison()).result(timeout=60)
    letters = rbus.dead_letters()
    assert [d.task_type.rsplit(".", 1)[-1] for d in letters] == ["Bad", "Poison"]
    assert "Unrecoverable: bad task" in letters[0].reason and letters[1].attempts == 3
    # The commands, from another process, with --transport.
    cli = [sys.executable, "-m", "ringbus.cli"]
    listed = subprocess.run(
        [*cli, "dead-letters", bus_name, "--transport", url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert [r["id"] for r in json.loads(listed.stdout)["dead_letters"]] == [d.id for d in letters]
    stats = subprocess.run(
        [*cli, "stats", bus_name, "--transport", url, "--json", "--interval", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stats.returncode == 0, stats.stderr
    broker = json.loads(stats.stdout)["broker"]
    assert broker["dead_letters"] == 2 and broker["pending_tasks"] == 0
    # A second transport object (e.g. the CLI elsewhere) sees the same store.
    transport = RedisTransport(url)
    transport.bind(bus_name)
    other = DeadLetterStore(transport, rbus.codec.signer)  # signed letters need the key
    try:
        assert [d.id for d in other.letters()] == [d.id for d in letters]
        assert other.purge([letters[1].id]) == 1
        assert other.retry() == 1  # Bad again: fails again, buried again
        wait_for(lambda: len(rbus.dead_letters()) == 1, 30, "the retried letter")
        assert rbus.dead_letters()[0].id != letters[0].id
        assert other.purge() == 1 and rbus.dead_letters() == []
    finally:
        transport.close()


def test_trimming_never_drops_unacknowledged_entries(
    redis_server: RedisServer, bus_name: str
) -> None:
    transport = RedisTransport(redis_server.url, stream_maxlen=20, visibility_timeout=30)
    bus = redis_bus(bus_name, transport)
    r = redis.Redis.from_url(redis_server.url)
    try:
        with TaskServer(bus, workers=2):
            slow = bus.dispatch(Nap(2.0, -1))
            held = wait_for(
                lambda: r.xpending_range(transport.stream, "workers", "-", "+", 1),
                what="the slow task to be taken",
            )[0]["message_id"]
            assert [
                f.result(timeout=60) for f in [bus.dispatch(Nap(0, i)) for i in range(600)]
            ] == list(range(600))
            # Trimmed while the slow task ran, but never its entry (nor a later one).
            assert r.xrange(transport.stream, held, held)
            assert slow.result(timeout=30) == -1
            more = bus.dispatch_many(Nap(0, i) for i in range(600))
            assert [f.result(timeout=60) for f in more] == list(range(600))
        assert r.xlen(transport.stream) < 300  # acknowledged history was trimmed
        assert bus.pending_tasks() == 0
    finally:
        r.close()
        bus.destroy()
