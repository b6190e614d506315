"""Delayed tasks and retries: lateness of the timer, and a retry storm.

    python -m bench.time_bench [--quick]

- lateness: N tasks delayed 0-2 s at random (2 workers); for each, the time
  from its due time to the handler's start: p50 / p99 / max, on shared
  memory and on a private redis-server (same run; n/a without redis-server).
- retry storm: 2 workers; 200 tasks that fail twice (backoff 0.5 s) and then
  succeed, while 20,000 short tasks are dispatched: the short tasks' rate
  with retries through the timer (today) and with retries waiting in the
  worker (the old way, kept for a transport without a timer store), against
  the same short tasks with no storm.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringbus import ShmTransport, TaskBus, TaskServer
from ringbus.testing.redis_server import RedisServer, RedisServerNotFound


@dataclass
class Due:
    due: float


@dataclass
class Flaky:
    key: int
    mark_dir: str


def run_due(task: Due) -> float:
    return time.time() - task.due


def add(task: tuple[int, int]) -> int:
    return task[0] + task[1]


def flaky(task: Flaky) -> int:
    mark = Path(task.mark_dir) / str(task.key)
    runs = int(mark.read_text()) if mark.exists() else 0
    mark.write_text(str(runs + 1))
    if runs < 2:
        raise ConnectionError("not yet")
    return task.key


class _NoTimers(ShmTransport):
    """Retries wait in the worker (what every retry did before the timer store)."""

    holds_delayed = False


def _bus(name: str, timers: bool = True, url: str | None = None) -> TaskBus:
    transport: Any = url if url else ShmTransport() if timers else _NoTimers()
    bus = TaskBus(name, transport=transport, allow_unsigned_pickle=True)  # a private server
    bus.register(Due, run_due)
    bus.register(tuple, add)
    bus.register(Flaky, flaky, retries=3, backoff=0.5, max_backoff=0.5)
    return bus


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def lateness(n: int, url: str | None = None) -> dict[str, float]:
    bus = _bus(f"bench-late-{os.getpid()}", url=url)
    server = TaskServer(bus, workers=2).start()
    try:
        rng = random.Random(7)
        futs = []
        for _ in range(n):
            d = rng.uniform(0.0, 2.0)
            futs.append(bus.dispatch(Due(time.time() + d), delay=d))
        late = [f.result(timeout=120) for f in futs]
    finally:
        server.stop(timeout=30)
        bus.destroy()
    return {
        "p50_ms": _pct(late, 0.5) * 1e3,
        "p99_ms": _pct(late, 0.99) * 1e3,
        "max_ms": max(late) * 1e3,
    }


def storm(short: int, flaky_n: int, timers: bool, tmp: Path) -> float:
    """Short tasks per second while ``flaky_n`` tasks retry (0: no storm)."""
    bus = _bus(f"bench-storm-{os.getpid()}-{int(timers)}-{flaky_n}", timers)
    server = TaskServer(bus, workers=2).start()
    try:
        marks = tmp / f"marks-{int(timers)}-{flaky_n}"
        marks.mkdir(exist_ok=True)
        slow = [bus.dispatch(Flaky(i, str(marks))) for i in range(flaky_n)]
        t0 = time.perf_counter()
        futs = bus.dispatch_many((i, 1) for i in range(short))
        for f in futs:
            f.result(timeout=300)
        rate = short / (time.perf_counter() - t0)
        for f in slow:
            f.result(timeout=300)
    finally:
        server.stop(timeout=30)
        bus.destroy()
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tasks (about 10 s)")
    args = p.parse_args(argv)
    logging.getLogger("ringbus").setLevel(logging.ERROR)  # the storm's retries are expected
    n = 2_000 if args.quick else 10_000
    short = 5_000 if args.quick else 20_000
    flaky_n = 50 if args.quick else 200
    tmp = Path(f"/tmp/ringbus-bench-time-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    late = lateness(n)
    try:
        with RedisServer() as server:
            late_redis: dict[str, float] | None = lateness(n, server.url)
    except RedisServerNotFound:
        late_redis = None
    calm = storm(short, 0, True, tmp)
    timer = storm(short, flaky_n, True, tmp)
    in_worker = storm(short, flaky_n, False, tmp)
    print(f"\n## Delayed tasks ({n:,} delayed 0-2 s, 2 workers)\n")
    print("| due -> started | p50 | p99 | max |\n|---|---:|---:|---:|")
    for label, got in (("ringbus, shared memory", late), ("ringbus, Redis", late_redis)):
        if got is None:
            print(f"| {label} | n/a | n/a | n/a |")
            continue
        ms = {k: f"{v:.2f} ms" for k, v in got.items()}
        print(f"| {label} | {ms['p50_ms']} | {ms['p99_ms']} | {ms['max_ms']} |")
    print(f"\n## Retry storm ({flaky_n} tasks failing twice, backoff 0.5 s; {short:,} short tasks)")
    print("\n| short tasks while retrying | tasks/s | vs no storm |\n|---|---:|---:|")
    rows = [
        ("no storm", calm),
        ("retries through the timer (ringbus)", timer),
        ("retries waiting in the worker (old way)", in_worker),
    ]
    for label, rate in rows:
        print(f"| {label} | {rate:,.0f} | {rate / calm:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
