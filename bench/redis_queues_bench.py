"""Named queues and priorities over Redis Streams: what the channels cost
and what they buy, on one private redis-server, all rows in one run.

    python -m bench.redis_queues_bench [--quick]

1. Throughput of trivial tasks (``dispatch_many``, 2 workers x concurrency
   16) taken by a server of the default queue alone (one stream:
   ``XREADGROUP`` as before) against servers that serve several channels
   (the ``TAKE`` script per round trip): the cost of named queues.
2. Urgent tasks during a flood of slow-lane tasks (as ``queues_bench`` on
   shared memory): one shared queue, separate queues, priority 9.
Rows are interleaved over ``--reps`` repetitions and reported as medians
and ratios to the first row, so the machine's drift hits all alike.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass

from ringbus import TaskBus, TaskServer
from ringbus.testing.redis_server import RedisServer, RedisServerNotFound


@dataclass
class Tiny:
    n: int


@dataclass
class TinyMail(Tiny):
    """On queue "mail"."""


@dataclass
class TinyReport(Tiny):
    """On queue "reports"."""


@dataclass
class Bulk:
    n: int


@dataclass
class Urgent:
    sent: float


def tiny(task: Tiny) -> int:
    return task.n


def bulk(task: Bulk) -> None:
    end = time.perf_counter() + 50e-6  # the slow lane: some work per task
    while time.perf_counter() < end:
        pass


def urgent(task: Urgent) -> float:
    return time.time() - task.sent


def _bus(url: str, name: str) -> TaskBus:
    # A private redis-server: unsigned pickle, as in bench/redis_peers.py.
    return TaskBus(name, transport=url, allow_unsigned_pickle=True)


# ---------------------------------------------------------------- throughput

THROUGHPUT = {
    "default queue only (one stream, XREADGROUP)": (["default"], "default"),
    "queues mail,default; tasks on default (TAKE over 2 streams)": (["mail", "default"], "default"),
    "queues mail,reports,default; tasks spread over 3 queues x 2 priorities (6 streams)": (
        ["mail", "reports", "default"],
        "spread",
    ),
}


def run_throughput(url: str, row: str, n: int) -> tuple[float, float]:
    """(tasks/s of a pipelined batch, p50 s of a lone dispatch to its result)."""
    queues, where = THROUGHPUT[row]
    bus = _bus(url, f"bench-{os.getpid()}-rq-tp")
    bus.register(Tiny, tiny)
    bus.register(TinyMail, tiny, queue="mail")
    bus.register(TinyReport, tiny, queue="reports")
    kinds = [Tiny, TinyMail, TinyReport]
    try:
        with TaskServer(bus, workers=2, concurrency=16, queues=queues):
            if where == "spread":
                for prio in (0, 5):  # make every channel first, so workers know them
                    for k in kinds:
                        bus.dispatch(k(0), priority=prio).result(60)
                time.sleep(1.2)  # a worker reads the channel set once a slice
            t0 = time.perf_counter()
            futs = []  # six dispatch_many calls in every row: only where they go differs
            for prio in (0, 5):
                for k in kinds:
                    if where == "default":
                        futs += bus.dispatch_many(Tiny(i) for i in range(n // 6))
                    else:
                        futs += bus.dispatch_many((k(i) for i in range(n // 6)), priority=prio)
            for f in futs:
                f.result(300)
            rate = len(futs) / (time.perf_counter() - t0)
            lone = []
            task = Tiny if where == "default" else TinyMail
            for i in range(300):  # one at a time: the idle workers' wake-up
                t1 = time.perf_counter()
                bus.dispatch(task(i)).result(60)
                lone.append(time.perf_counter() - t1)
            return rate, statistics.median(lone)
    finally:
        bus.destroy(force=True)


# ---------------------------------------------------------------- urgent

SETUPS = ("one shared queue", "separate queues", "priority 9")


def _flood_bus(url: str, name: str, separate: bool) -> TaskBus:
    bus = _bus(url, name)
    bus.register(Bulk, bulk, queue="bulk" if separate else None)
    bus.register(Urgent, urgent, queue="urgent" if separate else None)
    return bus


def _flood(url: str, name: str, separate: bool, n: int, go: mp.synchronize.Event) -> None:
    bus = _flood_bus(url, name, separate)
    go.wait()
    futs = []
    for lo in range(0, n, 500):  # pipelined: a backlog builds, as on shared memory
        futs += bus.dispatch_many(Bulk(i) for i in range(lo, min(n, lo + 500)))
    for f in futs:  # stay until the flood ran (its results come here)
        f.result(timeout=600)
    bus.close()


def run_urgent(url: str, setup: str, flood: int, trickle: int) -> list[float]:
    """Latencies (s) of the urgent tasks under one setup."""
    separate = setup == "separate queues"
    name = f"bench-{os.getpid()}-rq-flood"
    bus = _flood_bus(url, name, separate)
    queues = ["urgent", "bulk"] if separate else None
    ctx = mp.get_context("fork")
    go = ctx.Event()
    producer = ctx.Process(target=_flood, args=(url, name, separate, flood, go))
    server = TaskServer(bus, workers=2, queues=queues).start()
    try:
        priority = 9 if setup == "priority 9" else 0
        # Steady state: the urgent channel exists and the workers know it
        # (a channel's first task waits up to a second for idle workers).
        bus.dispatch(Urgent(time.time()), priority=priority).result(timeout=60)
        time.sleep(1.2)
        producer.start()
        go.set()
        time.sleep(0.5)  # let a backlog build first
        futs = []
        for _ in range(trickle):
            futs.append(bus.dispatch(Urgent(time.time()), priority=priority))
            time.sleep(0.02)
        lat = [f.result(timeout=600) for f in futs]
        producer.join()
        while sum(bus.transport.queue_depths().values()):
            time.sleep(0.05)
        return lat
    finally:
        if producer.is_alive():
            producer.kill()
            producer.join()
        server.stop(timeout=30)
        bus.destroy(force=True)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tasks, one repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", choices=["throughput", "urgent"], help="one table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    n, flood, trickle, reps = (
        (6_000, 5_000, 30, 1) if args.quick else (30_000, 20_000, 50, args.reps)
    )
    try:
        server = RedisServer()
    except RedisServerNotFound as exc:
        print(f"n/a: {exc}")
        return 0
    with server:
        rates: dict[str, list[tuple[float, float]]] = {r: [] for r in THROUGHPUT}
        lats: dict[str, list[float]] = {s: [] for s in SETUPS}
        for _ in range(reps):  # interleaved: drift hits every row alike
            for row in THROUGHPUT if args.only != "urgent" else ():
                rates[row].append(run_throughput(server.url, row, n))
            for setup in SETUPS if args.only != "throughput" else ():
                lats[setup] += run_urgent(server.url, setup, flood, trickle)
    if args.only != "urgent":
        _throughput_table(rates, n, reps)
    if args.only != "throughput":
        _urgent_table(lats, flood, trickle, reps)
    return 0


def _throughput_table(rates: dict[str, list[tuple[float, float]]], n: int, reps: int) -> None:
    first = statistics.median(r for r, _ in rates[next(iter(THROUGHPUT))])
    lone0 = statistics.median(t for _, t in rates[next(iter(THROUGHPUT))])
    print(
        f"\n## Taking from channels over Redis ({n:,} tasks in 6 dispatch_many calls, "
        f"2 workers x concurrency 16, median of {reps}; then 300 lone dispatches)\n"
    )
    print("| server | tasks/s | / default only | lone dispatch p50 µs | / default only |")
    print("|---|---:|---:|---:|---:|")
    for row, vals in rates.items():
        med = statistics.median(r for r, _ in vals)
        lone = statistics.median(t for _, t in vals)
        print(f"| {row} | {med:,.0f} | {med / first:.2f} | {lone * 1e6:.0f} | {lone / lone0:.2f} |")


def _urgent_table(lats: dict[str, list[float]], flood: int, trickle: int, reps: int) -> None:
    shared = statistics.median(lats["one shared queue"])
    print(
        f"\n## Urgent tasks during a flood over Redis ({flood:,} slow-lane tasks of ~50 µs, "
        f"{trickle * reps} urgent ones, 2 workers)\n"
    )
    print("| setup | urgent p50 ms | urgent p99 ms | max ms | shared p50 / p50 |")
    print("|---|---:|---:|---:|---:|")
    for setup in SETUPS:
        lat = lats[setup]
        p50 = statistics.median(lat)
        print(
            f"| {setup} | {p50 * 1e3:.2f} | {_pct(lat, 0.99) * 1e3:.2f} | "
            f"{max(lat) * 1e3:.2f} | {shared / p50 if p50 else float('inf'):.0f}x |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
