"""Task round trip and throughput: ringbus against the stdlib pools, in one run.

    python -m bench.tasks [--quick] [--workers 2]

Every contender runs the same work, ``add(a, b)`` in a worker process with
the result back in the caller, with the same number of worker processes:

- round trip: one task at a time (submit, wait for its result), p50 / p99 / p99.9;
- throughput: submit N tasks as fast as possible, then wait for all results.

Ratios are against ``multiprocessing.Pool.apply_async`` (higher is better).
The idle cost of a parked pool of 4 workers is measured at the end.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import pickle
import platform
import resource
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from ringbus import RingExecutor, TaskBus, TaskServer


def add(a: int, b: int) -> int:
    return a + b


@dataclass
class Add:
    """The ringbus way: a task object, a handler per type."""

    a: int
    b: int


def handle_add(task: Add) -> int:
    return task.a + task.b


def handle_tuple(task: tuple[int, int]) -> int:
    return task[0] + task[1]


@dataclass
class Row:
    name: str
    p50: float
    p99: float
    p999: float
    rate: float


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * q))] / 1000.0


def round_trip(call: Callable[[int], Any], n: int, warmup: int) -> tuple[float, float, float]:
    for i in range(warmup):
        call(i)
    lat: list[int] = []
    perf = time.perf_counter_ns
    gc.disable()
    try:
        for i in range(n):
            t0 = perf()
            call(i)
            lat.append(perf() - t0)
    finally:
        gc.enable()
    lat.sort()
    return _percentile(lat, 0.50), _percentile(lat, 0.99), _percentile(lat, 0.999)


def throughput(
    submit_all: Callable[[int], list[Any]], wait_all: Callable[[list[Any]], Any], n: int
) -> float:
    t0 = time.perf_counter()
    handles = submit_all(n)
    wait_all(handles)
    return n / (time.perf_counter() - t0)


def _results(futs: list[Future[Any]]) -> None:
    for f in futs:
        f.result()


def bench_ringbus(workers: int, n_lat: int, n_tp: int, warmup: int) -> list[Row]:
    bus = TaskBus(f"bench-{os.getpid()}")
    bus.register(Add, handle_add)
    bus.register(tuple, handle_tuple)
    rows = []
    try:
        with TaskServer(bus, workers=workers):
            d = bus.dispatch
            p = round_trip(lambda i: d(Add(i, 1)).result(), n_lat, warmup)
            rate = throughput(lambda n: [d(Add(i, 1)) for i in range(n)], _results, n_tp)
            rows.append(Row("ringbus `dispatch` (dataclass task)", *p, rate))
            p = round_trip(lambda i: d((i, 1)).result(), n_lat, warmup)
            rate = throughput(lambda n: [d((i, 1)) for i in range(n)], _results, n_tp)
            rows.append(Row("ringbus `dispatch` (tuple task)", *p, rate))
            rate = throughput(
                lambda n: bus.dispatch_many([(i, 1) for i in range(n)]), _results, n_tp
            )
            rows.append(
                Row(
                    "ringbus `dispatch_many` (tuple task)",
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    rate,
                )
            )
    finally:
        bus.destroy()
    return rows


def bench_ringbus_redis(workers: int, n_lat: int, n_tp: int, warmup: int, url: str) -> list[Row]:
    """The same bus over Redis Streams (a broker in the path: for scale, not speed)."""
    bus = TaskBus(f"bench-redis-{os.getpid()}", transport=url, allow_unsigned_pickle=True)
    bus.register(tuple, handle_tuple)
    try:
        with TaskServer(bus, workers=workers):
            d = bus.dispatch
            p = round_trip(lambda i: d((i, 1)).result(), n_lat, warmup)
            rate = throughput(
                lambda n: bus.dispatch_many([(i, 1) for i in range(n)]), _results, n_tp
            )
            return [Row("ringbus `dispatch` over Redis Streams (tuple task)", *p, rate)]
    finally:
        bus.destroy()


def _redis_list_worker(url: str, tasks_key: str, replies_key: str) -> None:
    import redis

    r: Any = redis.Redis.from_url(url)  # replies are bytes: no str decoding
    loads, dumps = pickle.loads, pickle.dumps
    while True:
        _, raw = r.brpop([tasks_key])
        if not raw:
            return
        tid, task = loads(raw)
        r.lpush(replies_key, dumps((tid, handle_tuple(task)), 5))


def bench_redis_list(workers: int, n_lat: int, n_tp: int, warmup: int, url: str) -> list[Row]:
    """The Celery way on Redis: LPUSH a pickled task on a list, workers BRPOP
    it, the result comes back on a reply list the caller BRPOPs (one round
    trip to the server per step, as Celery's Redis broker and backend do)."""
    import redis

    r: Any = redis.Redis.from_url(url)
    key = f"rb-bench-tasks-{os.getpid()}"
    tasks_key, replies_key = key, key + "-replies"
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=_redis_list_worker, args=(url, tasks_key, replies_key))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    dumps, loads = pickle.dumps, pickle.loads

    def call(i: int) -> Any:
        r.lpush(tasks_key, dumps((i, (i, 1)), 5))
        _, raw = r.brpop([replies_key])
        return loads(raw)

    def submit_all(n: int) -> list[int]:
        for i in range(n):
            r.lpush(tasks_key, dumps((i, (i, 1)), 5))
        return [n]

    def wait_all(handles: list[int]) -> None:
        got = {loads(r.brpop([replies_key])[1])[0] for _ in range(handles[0])}
        assert len(got) == handles[0], "a result went missing"

    try:
        p50 = round_trip(call, n_lat, warmup)
        rate = throughput(submit_all, wait_all, n_tp)
    finally:
        r.lpush(tasks_key, *([b""] * workers))
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        r.delete(tasks_key, replies_key)
    return [Row("Celery-style Redis lists: LPUSH task, BRPOP result (tuple task)", *p50, rate)]


def bench_ring_executor(workers: int, n_lat: int, n_tp: int, warmup: int) -> list[Row]:
    with RingExecutor(max_workers=workers) as ex:
        s = ex.submit
        p = round_trip(lambda i: s(add, i, 1).result(), n_lat, warmup)
        rate = throughput(lambda n: [s(add, i, 1) for i in range(n)], _results, n_tp)
        row = Row("`RingExecutor.submit`", *p, rate)
        rate = throughput(
            lambda n: [ex.map(add, range(n), [1] * n)], lambda its: list(its[0]), n_tp
        )
        row2 = Row("`RingExecutor.map`", float("nan"), float("nan"), float("nan"), rate)
    return [row, row2]


def bench_ppe(workers: int, n_lat: int, n_tp: int, warmup: int) -> list[Row]:
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as ex:
        s = ex.submit
        p = round_trip(lambda i: s(add, i, 1).result(), n_lat, warmup)
        rate = throughput(lambda n: [s(add, i, 1) for i in range(n)], _results, n_tp)
    return [Row("`ProcessPoolExecutor.submit`", *p, rate)]


def bench_pool(workers: int, n_lat: int, n_tp: int, warmup: int) -> list[Row]:
    with mp.get_context("fork").Pool(workers) as pool:
        a = pool.apply_async
        p = round_trip(lambda i: a(add, (i, 1)).get(), n_lat, warmup)
        rate = throughput(
            lambda n: [a(add, (i, 1)) for i in range(n)], lambda rs: [r.get() for r in rs], n_tp
        )
    return [Row("`multiprocessing.Pool.apply_async`", *p, rate)]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cost(seconds: float) -> tuple[float, float]:
    """CPU used by a parked pool of 4 (workers; and this process: reader +
    supervisor threads), in % of one core."""
    bus = TaskBus(f"bench-idle-{os.getpid()}")
    bus.register(tuple, handle_tuple)
    try:
        with TaskServer(bus, workers=4) as server:
            bus.dispatch((1, 2)).result()  # a reader thread exists too
            time.sleep(0.5)
            pids = server.pids
            w0 = sum(_cpu_seconds(p) for p in pids)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            time.sleep(seconds)
            w1 = sum(_cpu_seconds(p) for p in pids)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        bus.destroy()
    own = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return 100 * (w1 - w0) / seconds, 100 * own / seconds


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle measurement")
    args = parser.parse_args(argv)
    n_lat, n_tp, warmup = (2_000, 20_000, 200) if args.quick else (20_000, 200_000, 2_000)
    slow_tp = n_tp // 5  # the stdlib pools are slow: fewer tasks, same rate
    w = args.workers
    rows: list[Row] = []
    rows += bench_ringbus(w, n_lat, n_tp, warmup)
    rows += bench_ring_executor(w, n_lat, n_tp, warmup)
    rows += bench_ppe(w, n_lat // 4, slow_tp, warmup // 4)
    rows += bench_pool(w, n_lat // 4, slow_tp, warmup // 4)
    base = rows[-1]
    print(
        f"\nTask round trip and throughput, {w} workers, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}\n"
    )
    print("| contender | p50 µs | p99 µs | p99.9 µs | tasks/s | p50 vs Pool | tasks/s vs Pool |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lat_ratio = "–" if r.p50 != r.p50 else f"{base.p50 / r.p50:.1f}x"
        print(
            f"| {r.name} | {_fmt(r.p50)} | {_fmt(r.p99)} | {_fmt(r.p999)} | {r.rate:,.0f} | "
            f"{lat_ratio} | {r.rate / base.rate:.1f}x |"
        )
    workers_pct, own_pct = idle_cost(args.idle)
    print(
        f"\nIdle pool of 4 workers over {args.idle:.0f} s: workers {workers_pct:.2f} % of a core "
        f"in total; server + reader process {own_pct:.2f} %."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
