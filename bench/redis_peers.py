"""ringbus over Redis against Celery, huey and Dramatiq, in one run, on one
private redis-server (broker and results alike).

    python -m bench.redis_peers [--quick] [--reps 3]

Every row runs ``add((i, 1))`` in 2 worker processes (each peer's workers
started as subprocesses in a process group of their own, stopped by group
id), with the result back in the caller:

- lone round trip: one task at a time, p50 / p99 (microseconds);
- 128 in flight: one caller keeps 128 tasks outstanding (waiting for the
  oldest before it sends the next), tasks per second;
- ringbus ``dispatch_many`` of N tasks with their results, tasks per second.

The ringbus rows run the same plain function on a worker's task threads
(``concurrency`` 64: up to 64 tasks per process at once, and batched reads),
as an ``async def`` on the worker's event loop, and one task at a time per
process (``concurrency`` 1).

Each row is measured ``--reps`` times, peers interleaved; the medians are
printed, with ratios against Celery.  A peer that is not installed is n/a.
Peers: Celery 5 (prefork -c 2, pickle, Redis broker and result backend),
huey (RedisHuey, 2 process workers, ``notify_result``), Dramatiq (Redis
broker, Results middleware on Redis, 2 processes x 8 threads), and the
Celery-style Redis lists loop of ``bench/tasks.py`` (LPUSH, BRPOP).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from bench.tasks import _redis_list_worker, round_trip
from ringbus import TaskBus, TaskServer
from ringbus.testing.redis_server import RedisServer, RedisServerNotFound

WINDOW = 128
Result = dict[str, float]


def windowed(submit: Callable[[int], Any], wait: Callable[[Any], Any], n: int) -> float:
    """Tasks per second with ``WINDOW`` outstanding, oldest waited first."""
    q: deque[Any] = deque()
    t0 = time.perf_counter()
    for i in range(n):
        if len(q) >= WINDOW:
            wait(q.popleft())
        q.append(submit(i))
    while q:
        wait(q.popleft())
    return n / (time.perf_counter() - t0)


@contextlib.contextmanager
def workers(cmd: list[str], url: str, peer: str) -> Iterator[None]:
    """A peer's worker processes, in a process group stopped by its id."""
    env = dict(os.environ, RINGBUS_BENCH_REDIS_URL=url, RINGBUS_BENCH_PEER=peer)
    env["C_FORCE_ROOT"] = "1"  # Celery refuses pickle as root otherwise (CI runs as root)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=here,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group


def _measure(
    call: Callable[[int], Any], submit: Callable[[int], Any], wait: Callable[[Any], Any], n: Any
) -> Result:
    for i in range(50):  # warm: the workers are up and connected
        call(i)
    p50, p99, _ = round_trip(call, n.lat, 20)
    return {"p50": p50, "p99": p99, "rate": windowed(submit, wait, n.tp)}


def _env_for(url: str, peer: str) -> None:
    os.environ["RINGBUS_BENCH_REDIS_URL"] = url
    os.environ["RINGBUS_BENCH_PEER"] = peer


def run_celery(url: str, n: Any) -> Result:
    _env_for(url, "celery")
    from bench.redis_peer_apps import make_celery

    app = make_celery()
    task = app.tasks["add"]
    cmd = [sys.executable, "-m", "celery", "-A", "bench.redis_peer_apps:celery_app", "worker",
           "-P", "prefork", "-c", "2", "--loglevel=WARNING",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
    with workers(cmd, url, "celery"):
        task.apply_async(((0, 1),)).get(timeout=120)  # up
        return _measure(
            lambda i: task.apply_async(((i, 1),)).get(timeout=60),
            lambda i: task.apply_async(((i, 1),)),
            lambda r: r.get(timeout=60),
            n,
        )


def run_huey(url: str, n: Any) -> Result:
    _env_for(url, "huey")
    from bench.redis_peer_apps import make_huey

    _, task = make_huey()
    cmd = [sys.executable, "-m", "huey.bin.huey_consumer", "bench.redis_peer_apps.huey_app",
           "-w", "2", "-k", "process", "-q"]  # fmt: skip
    with workers(cmd, url, "huey"):
        task((0, 1)).get(blocking=True, timeout=120)
        return _measure(
            lambda i: task((i, 1)).get(blocking=True, timeout=60),
            lambda i: task((i, 1)),
            lambda r: r.get(blocking=True, timeout=60),
            n,
        )


def run_dramatiq(url: str, n: Any) -> Result:
    _env_for(url, "dramatiq")
    from bench.redis_peer_apps import make_dramatiq

    actor = make_dramatiq()
    cmd = [sys.executable, "-m", "dramatiq", "bench.redis_peer_apps", "-p", "2", "-t", "8"]
    with workers(cmd, url, "dramatiq"):
        actor.send((0, 1)).get_result(block=True, timeout=120_000)
        return _measure(
            lambda i: actor.send((i, 1)).get_result(block=True, timeout=60_000),
            lambda i: actor.send((i, 1)),
            lambda m: m.get_result(block=True, timeout=60_000),
            n,
        )


def run_lists(url: str, n: Any) -> Result:
    import pickle

    import redis

    r: Any = redis.Redis.from_url(url)
    key = f"rb-bench-lists-{os.getpid()}"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_redis_list_worker, args=(url, key, key + "-r")) for _ in range(2)]
    for p in procs:
        p.start()
    try:

        def submit(i: int) -> int:
            r.lpush(key, pickle.dumps((i, (i, 1)), 5))
            return i

        def wait(_: int) -> Any:
            return pickle.loads(r.brpop([key + "-r"])[1])  # any result: they are alike

        return _measure(lambda i: wait(submit(i)), submit, wait, n)
    finally:
        r.lpush(key, *([b""] * len(procs)))
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        r.delete(key, key + "-r")


def _add(task: tuple[int, int]) -> int:
    return task[0] + task[1]


async def _add_async(task: tuple[int, int]) -> int:
    return task[0] + task[1]


def run_ringbus(url: str, n: Any, concurrency: int = 64, coroutine: bool = False) -> Result:
    # A private redis-server: unsigned pickle, as the peers' pickle is unsigned too.
    bus = TaskBus(
        f"bench-peers-{os.getpid()}-{concurrency}", transport=url, allow_unsigned_pickle=True
    )
    bus.register(tuple, _add_async if coroutine else _add)
    try:
        with TaskServer(bus, workers=2, concurrency=concurrency):
            out = _measure(
                lambda i: bus.dispatch((i, 1)).result(60),
                lambda i: bus.dispatch((i, 1)),
                lambda f: f.result(60),
                n,
            )
            t0 = time.perf_counter()
            for f in bus.dispatch_many((i, 1) for i in range(n.many)):
                f.result(120)
            out["many"] = n.many / (time.perf_counter() - t0)
            return out
    finally:
        bus.destroy()


PEERS: list[tuple[str, Callable[[str, Any], Result]]] = [
    ("ringbus `dispatch`, Redis Streams (2 workers x concurrency 64)", run_ringbus),
    (
        "ringbus `dispatch`, Redis Streams (2 workers x concurrency 64, `async def` handler)",
        lambda url, n: run_ringbus(url, n, 64, coroutine=True),
    ),
    (
        "ringbus `dispatch`, Redis Streams (2 workers, concurrency 1)",
        lambda url, n: run_ringbus(url, n, 1),
    ),
    ("Celery 5 (prefork -c 2, pickle; Redis broker + backend)", run_celery),
    ("huey (RedisHuey, 2 process workers)", run_huey),
    ("Dramatiq (Redis broker + Results, 2 processes x 8 threads)", run_dramatiq),
    ("Celery-style Redis lists: LPUSH task, BRPOP result", run_lists),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tasks, one repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated row numbers (1-based)")
    args = p.parse_args(argv)
    n = argparse.Namespace(
        lat=300 if args.quick else 1000,
        tp=2_000 if args.quick else 10_000,
        many=20_000 if args.quick else 100_000,
    )
    reps = 1 if args.quick else args.reps
    rows = [(i, *r) for i, r in enumerate(PEERS)]
    if args.only:
        keep = {int(x) - 1 for x in args.only.split(",")}
        rows = [r for r in rows if r[0] in keep]
    got: dict[int, list[Result]] = {i: [] for i, _, _ in rows}
    try:
        server = RedisServer()
    except RedisServerNotFound as exc:
        print(f"n/a: {exc}")
        return 0
    with server:
        import redis

        for rep in range(reps):
            order = rows[rep % len(rows) :] + rows[: rep % len(rows)]  # interleaved
            for i, label, fn in order:
                redis.Redis.from_url(server.url).flushall()
                try:
                    got[i].append(fn(server.url, n))
                except ImportError as exc:
                    print(f"{label}: n/a ({exc})", file=sys.stderr)
                    break
                print(f"rep {rep + 1}: {label}: {got[i][-1]}", file=sys.stderr)
    med = {
        i: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for i, rs in got.items() if rs
    }
    celery = next((med[i]["rate"] for i, _, fn in rows if fn is run_celery and i in med), None)
    print(f"\n## Redis: 2 workers, one redis-server ({reps} runs, medians)\n")
    print(
        "| | lone round trip p50 | p99 | 128 in flight | vs Celery | `dispatch_many` |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    for i, label, _ in rows:
        m = med.get(i)
        if m is None:
            print(f"| {label} | n/a | n/a | n/a | n/a | n/a |")
            continue
        ratio = f"{m['rate'] / celery:.1f}x" if celery else "n/a"
        many = f"{m['many']:,.0f}/s" if "many" in m else "-"
        print(
            f"| {label} | {m['p50']:.0f} µs | {m['p99']:.0f} µs | {m['rate']:,.0f}/s "
            f"| {ratio} | {many} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
