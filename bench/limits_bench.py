"""Rate limits and concurrency caps: what a limit costs when it never binds.

    python -m bench.limits_bench [--quick]

- acquire in one process, tight loop: the C bucket through the binding
  (``Limits.try_rate``), a permit taken and given back (``try_permit`` +
  ``release_permit``), and the worker's whole pair (``Limiter.acquire`` +
  ``release``) for a rate limit, a cap, and both; ns per call.
- end to end, in the same run: tasks/s of a handler with no limit and of the
  same handler with ``rate_limit`` far above the load (and with
  ``max_concurrency`` as large as allowed), 2 workers, interleaved rounds;
  the best round of each (noise only slows rounds down) and the median; the
  per-task overhead is 1/best(limited) - 1/best(plain).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from ringbus import TaskBus, TaskServer
from ringbus._ring import Limits
from ringbus.server.limiter import Limiter
from ringbus.tasks.limits import limit_key


class Plain(tuple[int, int]):
    __slots__ = ()


class Rated(tuple[int, int]):
    __slots__ = ()


class Capped(tuple[int, int]):
    __slots__ = ()


class Both(tuple[int, int]):
    __slots__ = ()


def add(task: tuple[int, int]) -> int:
    return task[0] + task[1]


FAR = "1000000000/s"  # a token per nanosecond: never binds


def _bus(name: str) -> TaskBus:
    bus = TaskBus(name)
    bus.register(Plain, add)
    bus.register(Rated, add, rate_limit=FAR)
    bus.register(Capped, add, max_concurrency=512)
    bus.register(Both, add, rate_limit=FAR, max_concurrency=512)
    return bus


def _per_call(fn: object, n: int, reps: int = 5) -> float:
    """Best of ``reps`` timings of ``n`` calls of ``fn()``, in ns per call."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn(n)  # type: ignore[operator]
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def micro(n: int) -> list[tuple[str, float]]:
    name = f"/ringbus-bench-{os.getpid()}-limits"
    lim = Limits(name)
    try:
        slot = lim.slot("bench.Rated")
        try_rate, try_permit, give = lim.try_rate, lim.try_permit, lim.release_permit

        def loop_empty(k: int) -> None:
            for _ in range(k):
                pass

        def loop_rate(k: int) -> None:
            for _ in range(k):
                try_rate(slot, 1, 1_000_000_000)

        def loop_permit(k: int) -> None:
            for _ in range(k):
                give(slot, try_permit(slot, 512))

        empty = _per_call(loop_empty, n)
        rows = [
            ("Limits.try_rate (the C bucket: one CAS)", _per_call(loop_rate, n) - empty),
            ("Limits.try_permit + release_permit", _per_call(loop_permit, n) - empty),
        ]
    finally:
        lim.close()
        Limits.unlink(name)
    bus = _bus(f"bench-limits-micro-{os.getpid()}")
    try:
        limiter = Limiter(bus)
        acquire, release = limiter.acquire, limiter.release
        for cls, label in ((Plain, "no limit"), (Rated, "rate_limit"), (Capped, "max_concurrency"),
                           (Both, "both")):
            limiter.limited(cls)

            def loop_pair(k: int, cls: type = cls) -> None:
                for _ in range(k):
                    release(cls, acquire(cls))

            rows.append((f"Limiter.acquire + release, {label}", _per_call(loop_pair, n) - empty))
    finally:
        bus.destroy(force=True)
    return rows


def end_to_end(n: int, rounds: int) -> dict[str, tuple[float, float]]:
    """(best, median) tasks/s of each kind: noise on a shared machine only
    slows a round down, so the best round is the least disturbed."""
    bus = _bus(f"bench-limits-e2e-{os.getpid()}")
    server = TaskServer(bus, workers=2).start()
    rates: dict[str, list[float]] = {"Plain": [], "Rated": [], "Both": []}
    try:
        for cls in (Plain, Rated, Both):  # warm up: handlers resolved, segment open
            for f in bus.dispatch_many(cls((i, 1)) for i in range(2000)):
                f.result(timeout=120)
        order: list[type[Plain | Rated | Both]] = [Plain, Rated, Both]
        for _ in range(rounds):
            order.reverse()  # ABC CBA ...: no kind always runs first after a pause
            for kind in order:
                tasks = [kind((i, 1)) for i in range(n)]
                t0 = time.perf_counter()
                for f in bus.dispatch_many(tasks):
                    f.result(timeout=300)
                rates[kind.__name__].append(n / (time.perf_counter() - t0))
        stats = Limits(f"/ringbus-{bus.name}-limits")
        granted = stats.stats(stats.slot(limit_key(Rated)))["rate_granted"]
        stats.close()
        assert granted >= n * rounds, granted  # the limited runs went through the bucket
    finally:
        server.stop(timeout=30)
        bus.destroy(force=True)
    return {k: (max(v), statistics.median(v)) for k, v in rates.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer calls and tasks (seconds)")
    args = p.parse_args(argv)
    n_calls = 200_000 if args.quick else 2_000_000
    n_tasks, rounds = (5_000, 2) if args.quick else (30_000, 9)
    rows = micro(n_calls)
    print(f"\n## Acquire, one process, tight loop ({n_calls:,} calls, best of 5)\n")
    print("| call | ns per call |\n|---|---:|")
    for label, ns in rows:
        print(f"| {label} | {ns:,.0f} |")
    e2e = end_to_end(n_tasks, rounds)
    plain = e2e["Plain"][0]
    print(f"\n## End to end ({n_tasks:,} tasks x {rounds} rounds, 2 workers, interleaved)\n")
    print("| handler | best tasks/s | median tasks/s | overhead per task (best) |")
    print("|---|---:|---:|---:|")
    for key, label in (("Plain", "no limit"), ("Rated", f'rate_limit="{FAR}"'),
                       ("Both", f'rate_limit="{FAR}", max_concurrency=512')):
        best, median = e2e[key]
        extra = (1 / best - 1 / plain) * 1e6
        print(f"| {label} | {best:,.0f} | {median:,.0f} | {extra:+.2f} us |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
