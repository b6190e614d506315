"""ringbus against its peers, side by side in one run.

    python -m bench.compare [--quick] [--reps N] [--out DIR]
    ringbus bench                      (the --quick mode of the same)

Peers: multiprocessing.Queue and SimpleQueue, faster-fifo (per call and
get_many), pyzmq PUSH/PULL over ipc, Redis lists on a redis-server this
script starts on a free loopback port (and stops), plus the task pools
(ProcessPoolExecutor, multiprocessing.Pool) against TaskBus/RingExecutor and
the C reference (ringbus's core with no Python).  A peer that is not
installed shows as n/a.

Every cell runs in fresh processes, cells are interleaved (all cells once,
then again) and tables show the median of the repetitions with the min-max
spread, and ratios to multiprocessing.Queue and to the best peer.  Every
consumer counts what it received: a cell that loses messages is an error,
not a number.  Writes results.md, results.json (every repetition and the
machine) and PNG plots into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.extras import c_reference, memory_per_slot, task_rows
from bench.harness import Plan, run
from bench.peers import PEERS, available, set_redis_url
from bench.report import machine, plots, render, write_results
from ringbus.testing.redis_server import RedisServer, RedisServerNotFound


@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    """A private redis-server for the Redis peers: its URL (None if not installed)."""
    try:
        server = RedisServer()
    except RedisServerNotFound:
        yield None
        return
    with server:
        yield server.url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer sizes, 1 rep (under a minute)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument(
        "--out",
        default=None,
        help="directory for md, json and png (bench/results; quick: bench/results/quick)",
    )
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test
    args = ap.parse_args(argv)
    if args.tiny:
        plan = Plan([64], [1], 1, 0.02)
    elif args.quick:
        plan = Plan([64, 65536], [1, 2], args.reps or 1, 0.2)
    else:
        plan = Plan([64, 1024, 65536, 1 << 20], [1, 2, 4], args.reps or 3, 1.0)
    outdir = Path(args.out or ("bench/results/quick" if args.quick else "bench/results"))
    outdir.mkdir(parents=True, exist_ok=True)
    with redis_server() as url:
        set_redis_url(url)
        peers = [p for p in PEERS if available(p)]
        if args.tiny:
            peers = [p for p in peers if p.kind in ("bytes", "obj") and not p.variant][:3]
        missing = [p.name for p in PEERS if p not in peers and not args.tiny]
        for size in plan.sizes:
            for nproc in plan.procs:
                plan.cells += [
                    ("throughput", p, size, nproc)
                    for p in peers
                    if p.payload == "bytes" or size == 64
                ]
        plan.cells += [("pingpong", p, 64, 1) for p in peers if p.per_call]
        total = len(plan.cells) * plan.reps
        extra: dict[str, Any] = {}
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("cells", total=total + (0 if args.tiny else 3))

            def step(what: str) -> None:
                bar.update(task, advance=1, description=what[:60])

            results = run(plan, peers, step)
            if not args.tiny:
                step("C reference")
                extra["c_reference"] = c_reference(args.quick)
                step("task round trips")
                extra["task_hangs"] = []
                extra["tasks"] = task_rows(args.quick, url, plan.reps, extra["task_hangs"])
                step("idle pool")
                from bench import tasks

                extra["idle_seconds"] = 1.0 if args.quick else 5.0
                extra["idle"] = tasks.idle_cost(extra["idle_seconds"])
                extra["memory"] = memory_per_slot()
        m = machine()
        table = render(results, peers, missing, plan, extra, m)
    print(table)
    write_results(outdir, table, results, plan, extra, m, args.quick)
    made = [] if args.tiny else plots(results, peers, plan, outdir)
    print(
        f"\nwrote {outdir}/results.md, results.json" + "".join(f", {p.name}" for p in made),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
