"""Chaos: 4 dispatcher processes push >= 200,000 tasks through a pool of 4
workers while the test SIGKILLs, at random, workers, extra dispatchers and
bare producers/consumers of a side ring (>= 50 kills in all).

Every task of a surviving dispatcher must come back with the right value (a
``WorkerLost`` would have to match a dead letter; with ``retries=20`` none is
expected); a task runs more than once only if a worker died running it; the
side ring keeps working, and every message read from it (by its consumers,
by the final recovery and drain) is whole: its producers put messages of up to
120 KB with a length and CRC header, so random kills can land mid-copy.  The
figures are printed in every run."""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import queue
import random
import signal
import struct
import time
import zlib
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from _tasks_retry import Counted, make_bus
from _tasks_support import bus_name_fixture, servers_fixture  # noqa: F401
from ringbus import Queue, ShmTransport, TaskServer, WorkerLost

DISPATCHERS = 4
WORKERS = 4
MIN_TASKS = 50_000  # per surviving dispatcher
MIN_KILLS = 50
WINDOW = 1000  # outstanding tasks per dispatcher
CTX = mp.get_context("fork")


def _dispatcher(bus_name: str, idx: int, log_dir: str, stop: Event, out: mp.SimpleQueue) -> None:
    bus = make_bus(bus_name)
    sent = ok = wrong = lost = 0
    base = idx * 10_000_000
    error = ""  # what ended this dispatcher early, with the stuck task's status
    try:
        while sent < MIN_TASKS or not stop.is_set():
            futs = bus.dispatch_many([Counted(base + sent + i, log_dir) for i in range(WINDOW)])
            for i, f in enumerate(futs):
                try:
                    value = f.result(timeout=120)
                except WorkerLost:
                    lost += 1
                    continue
                except BaseException as exc:
                    status = bus.status(getattr(f, "task_id", ""))
                    error = f"task {base + sent + i}: {exc!r}; its status: {status!r}"
                    raise
                if value == (base + sent + i) ** 2:
                    ok += 1
                else:
                    wrong += 1
            sent += WINDOW
    finally:
        bus.close()
        out.put((idx, sent, ok, wrong, lost, error))


def _victim_dispatcher(bus_name: str, idx: int, log_dir: str) -> None:
    """Dispatches until it is killed (its results are never read)."""
    bus = make_bus(bus_name)
    n = 0
    while True:
        bus.dispatch_many([Counted(idx * 10_000_000 + n + i, log_dir) for i in range(200)])
        n += 200
        time.sleep(0.005)


SIDE_MAX = 128 * 1024
TORN = 3  # a bare consumer's exit status when it read a torn or mixed message


def _side_message(rng: random.Random, i: int) -> bytes:
    """Length and CRC first, then a body of one repeated byte (i's own)."""
    n = rng.choice((rng.randrange(200), rng.randrange(200, 3000), rng.randrange(3000, 120_000)))
    body = bytes([i % 251]) * n
    return struct.pack("<II", n, zlib.crc32(body)) + body


# Made once, so the bare processes spend their time in the ring (copies of up
# to 120 KB: long enough for random kills to land between claim and publish
# or free) and a reader checks a message with one memcmp against the original.
SIDE_MESSAGES = [_side_message(random.Random(7), i) for i in range(64)]
SIDE_BY_HEAD = {m[:8]: m for m in SIDE_MESSAGES}


def _side_ok(msg: bytes) -> bool:
    return SIDE_BY_HEAD.get(msg[:8]) == msg


def _bare_producer(ring: str) -> None:
    q = Queue.attach(ring)
    i = random.Random(os.getpid()).randrange(len(SIDE_MESSAGES))
    while True:
        q.put_bytes(SIDE_MESSAGES[i % len(SIDE_MESSAGES)])
        i += 1


def _bare_consumer(ring: str) -> None:
    q = Queue.attach(ring)
    while True:
        if not all(_side_ok(m) for m in q.get_bytes_many(64)):
            os._exit(TORN)


@pytest.mark.parametrize("concurrency", [1, 8])
def test_chaos_sigkill_under_load(
    bus_name: str,
    servers: list[TaskServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    concurrency: int,
) -> None:
    bus = make_bus(bus_name)
    stop = CTX.Event()
    out: mp.SimpleQueue = CTX.SimpleQueue()
    side = Queue(256, name=f"/ringbus-{bus_name}-side", max_message_size=SIDE_MAX)
    rng = random.Random(1234)
    survivors: list[mp.process.BaseProcess] = []
    extras: dict[str, mp.process.BaseProcess] = {}
    kills: collections.Counter[str] = collections.Counter()
    killed_workers: set[int] = set()
    exits: collections.defaultdict[str, list[int | None]] = collections.defaultdict(list)
    next_victim = DISPATCHERS

    def spawn(kind: str) -> None:
        nonlocal next_victim
        if kind == "dispatcher":
            p = CTX.Process(target=_victim_dispatcher, args=(bus_name, next_victim, str(tmp_path)))
            next_victim += 1
        elif kind == "producer":
            p = CTX.Process(target=_bare_producer, args=(side.name,))
        else:
            p = CTX.Process(target=_bare_consumer, args=(side.name,))
        p.start()
        extras[kind] = p

    try:
        server = TaskServer(bus, workers=WORKERS, concurrency=concurrency).start()
        servers.append(server)
        t0 = time.monotonic()
        survivors = [
            CTX.Process(target=_dispatcher, args=(bus_name, i, str(tmp_path), stop, out))
            for i in range(DISPATCHERS)
        ]
        for p in survivors:
            p.start()
        for kind in ("dispatcher", "producer", "consumer"):
            spawn(kind)
        while sum(kills.values()) < MIN_KILLS or any(p.is_alive() for p in survivors):
            time.sleep(rng.uniform(0.01, 0.06))
            if sum(kills.values()) >= MIN_KILLS:
                stop.set()
                if time.monotonic() - t0 > 300:
                    break
                continue
            kind = rng.choices(["worker", "dispatcher", "producer", "consumer"], [6, 2, 1, 1])[0]
            if kind == "worker":
                pids = server.pids
                if not pids:
                    continue
                pid = rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed_workers.add(pid)
            else:
                victim = extras[kind]
                victim.kill()
                victim.join()
                exits[kind].append(victim.exitcode)
                spawn(kind)
            kills[kind] += 1
        for p in survivors:
            p.join(timeout=300)
        elapsed = time.monotonic() - t0
        assert not any(p.is_alive() for p in survivors), "a dispatcher hung"
        for kind, p in extras.items():
            p.kill()
            p.join()
            exits[kind].append(p.exitcode)
        results = sorted(out.get() for _ in survivors)
        sent = sum(r[1] for r in results)
        ok = sum(r[2] for r in results)
        wrong = sum(r[3] for r in results)
        lost = sum(r[4] for r in results)
        # Runs per task, from the per-process logs (a kill may tear a last line).
        runs: dict[int, list[int]] = collections.defaultdict(list)
        for f in tmp_path.glob("runs-*"):
            pid = int(f.name.split("-")[1])
            for line in f.read_text().splitlines():
                if line.isdigit():
                    runs[int(line)].append(pid)
        mine = {n: pids for n, pids in runs.items() if n < DISPATCHERS * 10_000_000}
        duplicates = {n: pids for n, pids in mine.items() if len(pids) > 1}
        assert isinstance(bus.transport, ShmTransport)
        stats = bus.transport._producer().stats()
        # The side ring still works: drain what the killed producers left,
        # then one more message through it.
        # The bare processes are all dead now: repair what the last of them
        # held (the ringbus command's recover), then drain.  Messages of dead
        # consumers come back whole.
        left: list[bytes] = side.recover(requeue=False)["messages"]
        with contextlib.suppress(queue.Empty):
            while True:
                left += side.get_bytes_many(256, timeout=1.0)
        side.put_bytes(b"after the storm", timeout=10)
        assert side.get_bytes(timeout=10) == b"after the storm"
        side_stats = side.stats()
        dead = bus.dead_letters()
        summary = (
            f"\nchaos: {sent} tasks from {DISPATCHERS} dispatchers to {WORKERS} workers "
            f"(concurrency {concurrency}) in "
            f"{elapsed:.1f} s ({sent / elapsed:,.0f} tasks/s); SIGKILLs: {dict(kills)}; "
            f"{server.restarts} worker restarts, {server.redelivered} tasks redelivered, "
            f"{len(duplicates)} tasks ran twice or more; task ring abandoned="
            f"{stats.get('abandoned')} recovered={stats.get('recovered')}; side ring "
            f"abandoned={side_stats.get('abandoned')} recovered={side_stats.get('recovered')}; "
            f"ok={ok} wrong={wrong} lost={lost} dead letters={len(dead)}"
        )
        with capsys.disabled():  # the figures belong in every run's output
            print(summary)
        assert not [r[5] for r in results if r[5]]  # no dispatcher ended early
        assert sum(kills.values()) >= MIN_KILLS and kills["worker"] >= 20
        # Side ring: every message a consumer read, or the test drained, was
        # whole; a killed producer's message was skipped, never half-read.
        assert all(c == -signal.SIGKILL for c in exits["consumer"]), exits["consumer"]
        assert all(_side_ok(m) for m in left)
        assert sent >= DISPATCHERS * MIN_TASKS
        assert (ok, wrong, lost, len(dead)) == (sent, 0, 0, 0)
        # Every task of a surviving dispatcher ran, and nothing else did (a
        # number no one sent would be a task built from two messages' bytes).
        expected = {r[0] * 10_000_000 + k for r in results for k in range(r[1])}
        missing, extra = expected - mine.keys(), mine.keys() - expected
        assert not missing and not extra, (
            sorted(missing)[:10],
            {n: mine[n] for n in sorted(extra)[:10]},
        )
        for n, pids in duplicates.items():  # each extra run follows a worker's death
            assert len([p for p in pids if p in killed_workers]) >= len(pids) - 1, (n, pids)
        assert server.redelivered > 0  # the kills did hit tasks in hand
    finally:
        stop.set()
        for p in [*survivors, *extras.values()]:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        for s in servers:
            s.stop(timeout=5)
        side.close()
        bus.destroy()
