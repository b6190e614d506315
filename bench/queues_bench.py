"""Named queues and priorities: urgent tasks during a flood of slow-lane tasks.

    python -m bench.queues_bench [--quick]

A producer process floods the bus with N slow-lane tasks (each ~50 µs of
CPU in the handler, fire-and-forget) while this process dispatches a trickle
of urgent tasks (one every 20 ms); the urgent ones' latency is from dispatch
to their handler's start.  Same run, fresh bus per setup, 2 workers each:

- one shared queue: both task types on the default queue (FIFO);
- separate queues: ``queue="urgent"`` / ``queue="bulk"``, one server with
  ``queues=["urgent", "bulk"]`` (strict order, the same 2 workers);
- priority: one queue, the urgent ones at ``priority=9``.
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


@dataclass
class Bulk:
    n: int


@dataclass
class Urgent:
    sent: float


def bulk(task: Bulk) -> None:
    end = time.perf_counter() + 50e-6  # the slow lane: some work per task
    while time.perf_counter() < end:
        pass


def urgent(task: Urgent) -> float:
    return time.time() - task.sent


def make_bus(name: str, separate: bool) -> TaskBus:
    bus = TaskBus(name)
    bus.register(Bulk, bulk, queue="bulk" if separate else None)
    bus.register(Urgent, urgent, queue="urgent" if separate else None)
    return bus


def _flood(name: str, separate: bool, n: int, go: mp.synchronize.Event) -> None:
    bus = make_bus(name, separate)
    go.wait()
    for i in range(n):
        bus.send(Bulk(i))
    bus.close()


def run_setup(setup: str, flood: int, trickle: int) -> list[float]:
    """Latencies (s) of the urgent tasks under one setup."""
    separate = setup == "separate queues"
    name = f"bench-{os.getpid()}-queues"
    bus = make_bus(name, separate)
    queues = ["urgent", "bulk"] if separate else None
    ctx = mp.get_context("fork")
    go = ctx.Event()
    producer = ctx.Process(target=_flood, args=(name, separate, flood, go))
    server = TaskServer(bus, workers=2, queues=queues).start()
    try:
        producer.start()
        go.set()
        time.sleep(0.2)  # let a backlog build first
        priority = 9 if setup == "priority 9" else 0
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
    p.add_argument("--quick", action="store_true", help="a smaller flood (about 20 s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    flood, trickle, reps = (20_000, 50, 1) if args.quick else (100_000, 100, 2)
    setups = ("one shared queue", "separate queues", "priority 9")
    results: dict[str, list[float]] = {s: [] for s in setups}
    for _ in range(reps):  # interleaved: the machine's drift hits every setup alike
        for setup in setups:
            results[setup] += run_setup(setup, flood, trickle)
    shared = statistics.median(results["one shared queue"])
    print(
        f"\n## Urgent tasks during a flood ({flood:,} slow-lane tasks of ~50 µs, "
        f"{trickle * reps} urgent ones, 2 workers, shared memory)\n"
    )
    print("| setup | urgent p50 ms | urgent p99 ms | max ms | shared p50 / p50 |")
    print("|---|---:|---:|---:|---:|")
    for setup in setups:
        lat = results[setup]
        p50 = statistics.median(lat)
        print(
            f"| {setup} | {p50 * 1e3:.2f} | {_pct(lat, 0.99) * 1e3:.2f} | "
            f"{max(lat) * 1e3:.2f} | {shared / p50 if p50 else float('inf'):.0f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
