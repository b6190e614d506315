"""Concurrency inside a worker: ``TaskServer(concurrency=C)`` against the stdlib
pools, in one run.

    python -m bench.concurrency [--quick] [--reps 3]

- I/O-bound: every task waits 50 ms (``asyncio.sleep`` in an ``async def``
  handler; ``time.sleep`` in a plain one, run in the worker's threads).
  4 workers x concurrency 64 can finish at most 4 * 64 / 0.05 = 5,120 tasks/s;
  ``multiprocessing.Pool(4)`` and ``ProcessPoolExecutor(4)`` run one task per
  process, 4 / 0.05 = 80 tasks/s (they get fewer tasks, same rate).  Each row
  shows tasks/s and its share of its own ideal.
- Short tasks: the tuple-task ``add`` of ``bench.tasks`` (its helpers: a lone
  task's round trip, ``dispatch_many`` throughput), with concurrency 1 (plain
  handler, the one-at-a-time loop) and 64 (``async def`` handler, and plain
  handler in threads): what concurrency costs a task that does not wait.
- Memory: VmRSS of one worker, idle and with 64 tasks in flight (async sleeps).

Cells are interleaved (all once, then again) and the tables show the median
of the repetitions with the min-max; every repetition goes to
``bench/results/concurrency.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import machine
from bench.tasks import _results, handle_tuple, round_trip, throughput
from ringbus import ShmTransport, TaskBus, TaskServer
from ringbus.server.pool_state import read_pool_states

RESULTS = Path(__file__).resolve().parent / "results" / "concurrency.json"
WAIT = 0.05  # seconds an I/O-bound task waits
WORKERS = 4
CONCURRENCY = 64


@dataclass
class AsyncWait:
    seconds: float


@dataclass
class ThreadWait:
    seconds: float


async def async_wait(task: AsyncWait) -> None:
    await asyncio.sleep(task.seconds)


def thread_wait(task: ThreadWait) -> None:
    time.sleep(task.seconds)


async def async_add(task: tuple[int, int]) -> int:
    return task[0] + task[1]


_seq = iter(range(1_000_000))


@contextmanager
def serving(
    handlers: dict[type, Callable[[Any], Any]], workers: int, concurrency: int
) -> Iterator[tuple[TaskBus, TaskServer]]:
    """A bus with ``handlers`` and its server; both gone afterwards, also on error.
    64 KiB messages: each of the workers x concurrency task slots reserves a
    journal of the largest message in /dev/shm (1 MiB by default)."""
    bus = TaskBus(
        f"bench-{os.getpid()}-conc{next(_seq)}",
        transport=ShmTransport(max_message_size=64 * 1024),
    )
    for cls, fn in handlers.items():
        bus.register(cls, fn)
    try:
        with TaskServer(bus, workers=workers, concurrency=concurrency) as server:
            yield bus, server
    finally:
        bus.destroy(force=True)


# ---------------------------------------------------------------- I/O-bound


def _warm(bus: TaskBus, task: Any, n: int) -> None:
    _results(bus.dispatch_many([task] * n))


def io_ringbus(kind: str, n: int) -> float:
    """tasks/s of ``n`` 50 ms waits on 4 workers x 64."""
    cls, fn = (AsyncWait, async_wait) if kind == "async" else (ThreadWait, thread_wait)
    with serving({cls: fn}, WORKERS, CONCURRENCY) as (bus, _):
        _warm(bus, cls(0.001), WORKERS * CONCURRENCY)  # every slot (and thread) once
        return throughput(lambda k: bus.dispatch_many([cls(WAIT)] * k), _results, n)


def io_pool(n: int) -> float:
    with mp.get_context("fork").Pool(WORKERS) as pool:
        pool.map(time.sleep, [0.001] * WORKERS)
        a = pool.apply_async
        return throughput(
            lambda k: [a(time.sleep, (WAIT,)) for _ in range(k)],
            lambda rs: [r.get() for r in rs],
            n,
        )


def io_ppe(n: int) -> float:
    with ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("fork")) as ex:
        list(ex.map(time.sleep, [0.001] * WORKERS))
        return throughput(lambda k: [ex.submit(time.sleep, WAIT) for _ in range(k)], _results, n)


# ---------------------------------------------------------------- short tasks


def short_ringbus(
    handler: Callable[[Any], Any], workers: int, concurrency: int, n_lat: int, n_tp: int
) -> dict[str, float]:
    """The tuple-task row of ``bench.tasks``: a lone task's round trip, then
    ``dispatch_many`` of ``n_tp`` tasks."""
    with serving({tuple: handler}, workers, concurrency) as (bus, _):
        d = bus.dispatch
        p50, p99, _p999 = round_trip(lambda i: d((i, 1)).result(), n_lat, n_lat // 10)
        rate = throughput(lambda k: bus.dispatch_many([(i, 1) for i in range(k)]), _results, n_tp)
    return {"p50_us": p50, "p99_us": p99, "rate": rate}


# ---------------------------------------------------------------- memory


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, RssAnon) of ``pid`` in MiB, from /proc/<pid>/status: RssAnon
    leaves out file and shared-memory pages (the interpreter's libraries,
    the rings, the pool state's journals)."""
    got: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                got[key] = int(value.split()[0]) / 1024
    return got["VmRSS"], got["RssAnon"]


def _running(bus: TaskBus) -> int:
    return sum(w.state == "running" for ws in read_pool_states(bus.name).values() for w in ws)


def worker_rss() -> dict[str, float]:
    """RSS of one worker of concurrency 64: idle (after 64 tasks), and with 64
    async tasks in flight; and of an idle concurrency-1 worker.  Call it in a
    fresh interpreter: a worker is forked, and counts the pages it shares with
    its parent."""
    out: dict[str, float] = {}
    with serving({AsyncWait: async_wait, tuple: handle_tuple}, 1, 1) as (bus, server):
        _warm(bus, (1, 2), 10)
        time.sleep(0.2)
        out["idle_c1"], out["idle_c1_anon"] = rss_mib(server.pids[0])
    with serving({AsyncWait: async_wait}, 1, CONCURRENCY) as (bus, server):
        _warm(bus, AsyncWait(0.001), CONCURRENCY)
        time.sleep(0.2)
        pid = server.pids[0]
        out["idle_c64"], out["idle_c64_anon"] = rss_mib(pid)
        futs = bus.dispatch_many([AsyncWait(2.0)] * CONCURRENCY)
        end = time.monotonic() + 30
        while _running(bus) < CONCURRENCY:
            if time.monotonic() > end:
                raise RuntimeError(f"only {_running(bus)} of {CONCURRENCY} tasks started")
            time.sleep(0.01)
        out["busy_c64"], out["busy_c64_anon"] = rss_mib(pid)
        _results(futs)
    return out


def worker_rss_fresh() -> dict[str, float]:
    """``worker_rss`` in a fresh interpreter (a session of its own: killed
    whole if it fails or hangs, its segments removed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import json; from bench.concurrency import worker_rss as f; "
         "print(json.dumps(f()))"],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            for seg in Path("/dev/shm").glob(f"ringbus-bench-{proc.pid}-*"):
                seg.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory cell failed: {stderr[-800:]}")
    result: dict[str, float] = json.loads(stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- the run


def _cells(quick: bool) -> dict[str, Callable[[], Any]]:
    n_io, n_slow = (2_000, 200) if quick else (10_000, 400)
    n_lat, n_tp = (1_000, 20_000) if quick else (5_000, 100_000)
    sw = 2  # short tasks: the workers of bench.tasks's rows (2 cores here)
    return {
        "io/ringbus async": lambda: {"n": n_io, "rate": io_ringbus("async", n_io)},
        "io/ringbus threads": lambda: {"n": n_io, "rate": io_ringbus("threads", n_io)},
        "io/Pool": lambda: {"n": n_slow, "rate": io_pool(n_slow)},
        "io/PPE": lambda: {"n": n_slow, "rate": io_ppe(n_slow)},
        "short/c1 plain": lambda: short_ringbus(handle_tuple, sw, 1, n_lat, n_tp),
        "short/c64 async": lambda: short_ringbus(async_add, sw, CONCURRENCY, n_lat, n_tp),
        "short/c64 threads": lambda: short_ringbus(handle_tuple, sw, CONCURRENCY, n_lat, n_tp),
        "memory": worker_rss_fresh,
    }


def _med(reps: list[dict[str, float]], key: str) -> tuple[float, float, float]:
    vals = [r[key] for r in reps]
    return statistics.median(vals), min(vals), max(vals)


def render(res: dict[str, Any]) -> str:
    c = res["cells"]
    ideal = WORKERS * CONCURRENCY / WAIT
    pool_ideal = WORKERS / WAIT
    out = [
        f"I/O-bound: tasks that wait {WAIT * 1000:.0f} ms, {WORKERS} workers; ringbus with "
        f"concurrency {CONCURRENCY} (ideal {ideal:,.0f} tasks/s), the pools one task per "
        f"process (ideal {pool_ideal:,.0f} tasks/s)",
        "",
        "| contender | tasks | tasks/s (min-max) | % of its ideal | vs Pool |",
        "|---|---:|---:|---:|---:|",
    ]
    pool_rate = _med(c["io/Pool"], "rate")[0]
    for key, name, top in (
        ("io/ringbus async", "ringbus, `async def` handler (`asyncio.sleep`)", ideal),
        ("io/ringbus threads", "ringbus, plain handler in threads (`time.sleep`)", ideal),
        ("io/Pool", "`multiprocessing.Pool(4).apply_async`", pool_ideal),
        ("io/PPE", "`ProcessPoolExecutor(4).submit`", pool_ideal),
    ):
        m, lo, hi = _med(c[key], "rate")
        out.append(
            f"| {name} | {c[key][0]['n']:,} | {m:,.0f} ({lo:,.0f}-{hi:,.0f}) | "
            f"{100 * m / top:.0f} % | {m / pool_rate:.1f}x |"
        )
    out += [
        "",
        "Short tasks: the tuple task `add` (`bench.tasks`), 2 workers",
        "",
        "| ringbus worker | lone task p50 µs (min-max) | p99 µs "
        "| `dispatch_many` tasks/s (min-max) |",
        "|---|---:|---:|---:|",
    ]
    for key, name in (
        ("short/c1 plain", "concurrency 1, plain handler"),
        ("short/c64 async", f"concurrency {CONCURRENCY}, `async def` handler"),
        ("short/c64 threads", f"concurrency {CONCURRENCY}, plain handler (threads)"),
    ):
        p, plo, phi = _med(c[key], "p50_us")
        p99 = _med(c[key], "p99_us")[0]
        r, rlo, rhi = _med(c[key], "rate")
        out.append(
            f"| {name} | {p:.1f} ({plo:.1f}-{phi:.1f}) | {p99:.1f} | "
            f"{r:,.0f} ({rlo:,.0f}-{rhi:,.0f}) |"
        )
    mem = c["memory"]
    out += [
        "",
        "Memory of one worker process, MiB (VmRSS counts the shared-memory and",
        "library pages it touched; RssAnon its own heap and stacks)",
        "",
        "| worker | VmRSS (min-max) | RssAnon |",
        "|---|---:|---:|",
    ]
    for key, name in (
        ("idle_c1", "concurrency 1, idle"),
        ("idle_c64", f"concurrency {CONCURRENCY}, idle"),
        ("busy_c64", f"concurrency {CONCURRENCY}, {CONCURRENCY} async tasks in flight"),
    ):
        m, lo, hi = _med(mem, key)
        anon = _med(mem, key + "_anon")[0]
        out.append(f"| {name} | {m:.1f} ({lo:.1f}-{hi:.1f}) | {anon:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-size runs (2,000 I/O tasks)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (3; quick: 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results path")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    cells = _cells(args.quick)
    results: dict[str, list[Any]] = {k: [] for k in cells}
    t0 = time.monotonic()
    for rep in range(reps):
        for key, cell in cells.items():
            print(f"[{rep + 1}/{reps}] {key}...", file=sys.stderr, flush=True)
            results[key].append(cell())
    res = {
        "machine": machine(),
        "command": " ".join(["python -m bench.concurrency", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "reps": reps,
        "seconds": round(time.monotonic() - t0, 1),
        "cells": results,
    }
    m = res["machine"]
    print(
        f"\nConcurrency inside a worker, {m['cores']} CPUs, Python {m['python']}, "
        f"{m['date']}, median of {reps}\n"
    )
    print(render(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\nresults: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
