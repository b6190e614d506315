"""ringbus against its peers, side by side in one run.

    python -m bench.compare [--quick] [--reps N] [--json out.json]

Every cell runs in fresh processes; cells are interleaved (all cells once,
then again) and the table shows the median of the repetitions with the
min-max spread, and ratios to multiprocessing.Queue and to the best peer.
A peer that is not installed shows as n/a.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ctx = mp.get_context("fork")
STOP_BYTES = b""


# ---------------------------------------------------------------- peers
# Each peer: make() -> queue object, and put/get functions for the variant.


def _ringbus_make(size: int) -> Any:
    import ringbus

    return ringbus.Queue(maxsize=max(8192, 4 * 1024 * 1024 // max(size, 256)),
                         max_message_size=max(1 << 20, 2 * size + 64))


def _ff_make(size: int) -> Any:
    import faster_fifo

    return faster_fifo.Queue(max_size_bytes=64 * 1024 * 1024)


def _mpq_make(size: int) -> Any:
    return ctx.Queue()


def _sq_make(size: int) -> Any:
    return ctx.SimpleQueue()


@dataclass(frozen=True)
class Peer:
    name: str
    make: Callable[[int], Any]
    kind: str  # "obj" per call, "bytes" per call, "objmany", "bytesmany", "ffmany"
    ours: bool = False


PEERS = [
    Peer("ringbus put/get (pickled)", _ringbus_make, "obj", True),
    Peer("ringbus put_bytes/get_bytes", _ringbus_make, "bytes", True),
    Peer("ringbus put_many/get_many (pickled)", _ringbus_make, "objmany", True),
    Peer("ringbus put_bytes_many/get_bytes_many", _ringbus_make, "bytesmany", True),
    Peer("multiprocessing.Queue", _mpq_make, "obj"),
    Peer("multiprocessing.SimpleQueue", _sq_make, "simple"),
    Peer("faster-fifo put/get", _ff_make, "obj"),
    Peer("faster-fifo get_many", _ff_make, "ffmany"),
]
BATCH = 256


def available(peer: Peer) -> bool:
    try:
        q = peer.make(64)
    except ImportError:
        return False
    if hasattr(q, "close"):
        q.close()
    return True


def _producer(q: Any, kind: str, n: int, size: int, start: Any) -> None:
    msg = b"x" * size
    start.wait()
    if kind in ("objmany", "bytesmany"):
        put = q.put_many if kind == "objmany" else q.put_bytes_many
        batch = [msg] * BATCH
        for _ in range(n // BATCH):
            put(batch)
        for _ in range(n % BATCH):
            put([msg])
    elif kind == "bytes":
        for _ in range(n):
            q.put_bytes(msg)
    else:
        put = q.put
        for _ in range(n):
            put(msg)


def _consumer(q: Any, kind: str) -> None:
    if kind in ("bytesmany", "objmany", "ffmany"):
        get: Callable[[], list[Any]] = {
            "bytesmany": lambda: q.get_bytes_many(BATCH * 4),
            "objmany": lambda: q.get_many(BATCH * 4),
            "ffmany": lambda: q.get_many(max_messages_to_get=BATCH * 4, timeout=60),
        }[kind]
        while True:
            stops = sum(1 for m in get() if not m)
            if stops:  # one empty message stops one consumer: pass the rest on
                for _ in range(stops - 1):
                    q.put_bytes(STOP_BYTES) if kind == "bytesmany" else q.put(STOP_BYTES)
                return
    elif kind == "bytes":
        while q.get_bytes():
            pass
    else:
        one = q.get
        while one():
            pass


def throughput(peer: Peer, size: int, nproc: int, n: int) -> float:
    """Messages per second for n messages, nproc producers and consumers."""
    q = peer.make(size)
    start = ctx.Event()
    cons = [ctx.Process(target=_consumer, args=(q, peer.kind)) for _ in range(nproc)]
    prods = [ctx.Process(target=_producer, args=(q, peer.kind, n // nproc, size, start))
             for _ in range(nproc)]
    try:
        for p in cons + prods:
            p.start()
        time.sleep(0.05)
        t0 = time.perf_counter()
        start.set()
        for p in prods:
            p.join()
        for _ in cons:  # an empty message stops one consumer
            if peer.kind in ("bytes", "bytesmany"):
                q.put_bytes(STOP_BYTES)
            else:
                q.put(STOP_BYTES)
        for p in cons:
            p.join()
        return (n // nproc * nproc) / (time.perf_counter() - t0)
    finally:
        for p in cons + prods:
            if p.is_alive():
                p.kill()
                p.join()
        if hasattr(q, "close"):
            q.close()


def _echo(a: Any, b: Any, kind: str, rounds: int) -> None:
    if kind == "bytes":
        for _ in range(rounds):
            b.put_bytes(a.get_bytes())
    else:
        for _ in range(rounds):
            b.put(a.get())


def pingpong(peer: Peer, rounds: int) -> tuple[float, float, float]:
    """64 B round trips through two queues: p50, p99, p99.9 in microseconds."""
    kind = "bytes" if peer.kind in ("bytes", "bytesmany") else "obj"
    a, b = peer.make(64), peer.make(64)
    p = ctx.Process(target=_echo, args=(a, b, kind, rounds + 100))
    p.start()
    msg = b"x" * 64
    lat = []
    try:
        put, get = (a.put_bytes, b.get_bytes) if kind == "bytes" else (a.put, b.get)
        for i in range(rounds + 100):
            t0 = time.perf_counter_ns()
            put(msg)
            get()
            if i >= 100:  # warm-up
                lat.append(time.perf_counter_ns() - t0)
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
        for q in (a, b):
            if hasattr(q, "close"):
                q.close()
    lat.sort()
    return (lat[len(lat) // 2] / 1e3, lat[len(lat) * 99 // 100] / 1e3,
            lat[len(lat) * 999 // 1000] / 1e3)


# ---------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0],
            "kernel": platform.release(), "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer messages and 1 repetition")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--json", default=None, help="write every repetition here")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    scale = 0.2 if args.quick else 1.0
    peers = [p for p in PEERS if available(p)]
    missing = [p.name for p in PEERS if p not in peers]
    sizes = [64, 1024, 65536]
    cells: list[tuple[str, Peer, int, int]] = []
    for size in sizes:
        for nproc in (1, 2):
            for peer in peers:
                cells.append(("throughput", peer, size, nproc))
    for peer in peers:
        if peer.kind in ("obj", "bytes"):
            cells.append(("pingpong", peer, 64, 1))
    results: dict[tuple[str, str, int, int], list[Any]] = {}
    total = len(cells) * reps
    done = 0
    for _ in range(reps):
        for kind, peer, size, nproc in cells:
            done += 1
            print(f"\r[{done}/{total}] {kind} {peer.name} {size} B x{nproc}" + " " * 20,
                  end="", file=sys.stderr, flush=True)
            if kind == "throughput":
                fast = peer.ours or "many" in peer.kind
                base = 400_000 if fast else 100_000
                n = int(base * scale * (1 if size <= 1024 else 0.05))
                n = max(n - n % BATCH, BATCH * 2)
                val: Any = throughput(peer, size, nproc, n)
            else:
                val = pingpong(peer, int(20_000 * scale))
            results.setdefault((kind, peer.name, size, nproc), []).append(val)
    print(file=sys.stderr)
    print(render(results, peers, sizes, reps, missing))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "reps": reps,
                       "results": [{"kind": k[0], "peer": k[1], "size": k[2], "procs": k[3],
                                    "reps": v} for k, v in results.items()]}, f, indent=1)
    return 0


def render(results: dict[tuple[str, str, int, int], list[Any]], peers: list[Peer],
           sizes: list[int], reps: int, missing: list[str]) -> str:
    m = machine()
    out = [f"ringbus vs peers — {m['date']}, {m['cpu']}, {m['cores']} cores, Python "
           f"{m['python']}, Linux {m['kernel']}; median of {reps} (min-max)", ""]
    out.append("| scenario | peer | msg/s | MB/s | vs mp.Queue | vs best peer |")
    out.append("|---|---|---:|---:|---:|---:|")
    for size in sizes:
        for nproc in (1, 2):
            med = {p.name: statistics.median(results[("throughput", p.name, size, nproc)])
                   for p in peers}
            base = med.get("multiprocessing.Queue")
            best = max((v for p in peers if not p.ours for v in [med[p.name]]), default=None)
            for p in peers:
                vals = results[("throughput", p.name, size, nproc)]
                v = med[p.name]
                out.append(
                    f"| {nproc}→{nproc} {size} B | {p.name} | {v:,.0f} ({min(vals):,.0f}-"
                    f"{max(vals):,.0f}) | {v * size / 1e6:,.1f} | "
                    f"{v / base:.2f}x | {v / best:.2f}x |" if base and best else "")
    out += ["", "| 64 B ping-pong | p50 µs | p99 µs | p99.9 µs |", "|---|---:|---:|---:|"]
    for p in peers:
        key = ("pingpong", p.name, 64, 1)
        if key in results:
            runs = results[key]
            p50, p99, p999 = (statistics.median(r[i] for r in runs) for i in range(3))
            out.append(f"| {p.name} | {p50:.2f} | {p99:.2f} | {p999:.2f} |")
    for name in missing:
        out.append(f"\n{name}: n/a (not installed)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
