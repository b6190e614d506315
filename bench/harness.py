"""The queue cells: producer and consumer processes, their timing, and the plan
that interleaves the cells over the repetitions.

Every cell runs in fresh (forked) processes; every consumer counts what it
received, and a cell that loses messages is an error, not a number.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.peers import Peer, close_handle, ctx

STOP = b""
BATCH = 256


def payload(name: str, size: int) -> Any:
    """The message a cell sends: bytes of the cell's size, or (the rows of
    the default serializer's short forms and of a real pickle) a small
    object of another type; never falsy, which is the consumers' STOP."""
    return {
        "bytes": lambda: b"x" * size,
        "str": lambda: "x" * size,
        "int": lambda: 1234567,
        "tuple": lambda: (1, "abc", 2.5),
        "dict": lambda: {"id": 1, "body": "x" * 40},
    }[name]()


def _producer(
    q: Any, kind: str, n: int, size: int, nproc: int, start: Any, what: str = "bytes"
) -> None:
    msg = payload(what, size)
    if kind == "zmq":
        import zmq

        zc = zmq.Context()
        s = zc.socket(zmq.PUSH)
        for ep in q.endpoints[:nproc]:
            s.connect(ep)
        start.wait()
        send = s.send
        for _ in range(n):
            send(msg)
        s.close(linger=-1)  # delivers everything before the process ends
        zc.term()
        return
    if kind.startswith("redis"):
        import redis

        r = redis.Redis.from_url(q.url)
        start.wait()
        if kind == "redismany":
            for i in range(0, n, BATCH):
                r.rpush(q.key, *([msg] * min(BATCH, n - i)))
        else:
            for _ in range(n):
                r.rpush(q.key, msg)
        return
    start.wait()
    if kind in ("objmany", "bytesmany"):
        put_many = q.put_many if kind == "objmany" else q.put_bytes_many
        for i in range(0, n, BATCH):
            put_many([msg] * min(BATCH, n - i))
    elif kind == "bytes":
        put_bytes = q.put_bytes
        for _ in range(n):
            put_bytes(msg)
    else:  # obj and ffmany put one at a time (faster-fifo has no put_many)
        put = q.put
        for _ in range(n):
            put(msg)


def _consumer(q: Any, kind: str, idx: int, out: Any) -> None:
    count = 0
    if kind == "zmq":
        import zmq

        zc = zmq.Context()
        s = zc.socket(zmq.PULL)
        s.bind(q.endpoints[idx])
        recv = s.recv
        while recv():
            count += 1
        t_end = time.perf_counter()
        # Other producers' pipes may still hold messages: drain them (a
        # second of quiet: on a loaded 2-core machine 200 ms lost some).
        # The quiet second is not the peer's time: t_end is the last message.
        while s.poll(1000):
            if s.recv():
                count += 1
                t_end = time.perf_counter()
        s.close(linger=0)
        zc.term()
        out.put((count, t_end))
        return
    elif kind.startswith("redis"):
        import redis

        r = redis.Redis.from_url(q.url)
        while True:
            first: Any = r.blpop([q.key])
            got = [first[1]]
            if kind == "redismany":
                got += r.lpop(q.key, BATCH * 4 - 1) or []
            stops = sum(1 for m in got if not m)
            count += len(got) - stops
            if stops:
                if stops > 1:
                    r.rpush(q.key, *([STOP] * (stops - 1)))
                break
    elif kind in ("bytesmany", "objmany", "ffmany"):
        get: Callable[[], list[Any]] = {
            "bytesmany": lambda: q.get_bytes_many(BATCH * 4),
            "objmany": lambda: q.get_many(BATCH * 4),
            "ffmany": lambda: _ff_wait(lambda: q.get_many(max_messages_to_get=BATCH * 4)),
        }[kind]
        while True:
            got = get()
            # STOPs are put after every producer finished, so they end a batch:
            # looking at the last item keeps a per-message Python loop (which
            # cost more than ringbus's own get) out of the measurement.
            stops = got.count(STOP) if got and not got[-1] else 0
            count += len(got) - stops
            if stops:  # one STOP stops one consumer: pass the extras on
                for _ in range(stops - 1):
                    q.put_bytes(STOP) if kind == "bytesmany" else q.put(STOP)
                break
    elif kind == "bytes":
        get_bytes = q.get_bytes
        while get_bytes():
            count += 1
    else:
        # faster-fifo's get gives up after a timeout: wait as the others do.
        one = (lambda: _ff_wait(q.get)) if hasattr(q, "get_many_nowait") else q.get
        while one():
            count += 1
    # The STOP came last: the consumer's exit and join are not the peer's time.
    out.put((count, time.perf_counter()))


def _ff_wait(get: Callable[[], Any]) -> Any:
    """faster-fifo raises Empty when its (default 10 s) timeout passes: retry."""
    import queue

    while True:
        try:
            return get()
        except queue.Empty:
            continue


def _stop(q: Any, kind: str, nproc: int) -> None:
    if kind == "zmq":
        import zmq

        zc = zmq.Context()
        for ep in q.endpoints[:nproc]:
            s = zc.socket(zmq.PUSH)
            s.connect(ep)
            s.send(STOP)
            s.close(linger=-1)
        zc.term()
    elif kind.startswith("redis"):
        import redis

        redis.Redis.from_url(q.url).rpush(q.key, *([STOP] * nproc))
    else:
        for _ in range(nproc):
            q.put_bytes(STOP) if kind in ("bytes", "bytesmany") else q.put(STOP)


def throughput(peer: Peer, size: int, nproc: int, n: int) -> float:
    """Messages per second: n messages, nproc producers and nproc consumers."""
    q = peer.make(size)
    start = ctx.Event()
    out = ctx.SimpleQueue()
    per = n // nproc
    cons = [ctx.Process(target=_consumer, args=(q, peer.kind, i, out)) for i in range(nproc)]
    prods = [
        ctx.Process(target=_producer, args=(q, peer.kind, per, size, nproc, start, peer.payload))
        for _ in range(nproc)
    ]
    try:
        for p in cons + prods:
            p.start()
        time.sleep(0.1)  # sockets bound, queues attached
        t0 = time.perf_counter()
        start.set()
        for p in prods:
            p.join()
        _stop(q, peer.kind, nproc)
        for p in cons:
            p.join()
        failed = [p.exitcode for p in cons + prods if p.exitcode]
        if failed:
            raise RuntimeError(f"{peer.name}: a child failed (exit status {failed})")
        counts, ends = zip(*(out.get() for _ in cons), strict=True)
        # perf_counter is CLOCK_MONOTONIC: comparable across processes.
        dt = max(ends) - t0
        got = sum(counts)
        if got != per * nproc:
            raise RuntimeError(f"{peer.name}: {got} of {per * nproc} messages arrived")
        return per * nproc / dt
    finally:
        for p in cons + prods:
            if p.is_alive():
                p.kill()
                p.join()
        close_handle(q)


def _echo(a: Any, b: Any, kind: str, rounds: int) -> None:
    if kind == "zmq":
        import zmq

        zc = zmq.Context()
        pull, push = zc.socket(zmq.PULL), zc.socket(zmq.PUSH)
        pull.connect(a.endpoints[0])
        push.connect(b.endpoints[0])
        for _ in range(rounds):
            push.send(pull.recv())
        push.close(linger=-1)
        pull.close(linger=0)
        zc.term()
    elif kind == "redis":
        import redis

        r = redis.Redis.from_url(a.url)
        for _ in range(rounds):
            item: Any = r.blpop([a.key])
            r.rpush(b.key, item[1])
    elif kind == "bytes":
        for _ in range(rounds):
            b.put_bytes(a.get_bytes())
    else:
        for _ in range(rounds):
            b.put(a.get())


def pingpong(peer: Peer, rounds: int) -> list[float]:
    """64 B round trips through two channels: sorted latencies in µs."""
    kind = peer.kind
    a, b = peer.make(64), peer.make(64)
    warm = 200
    p = ctx.Process(target=_echo, args=(a, b, kind, rounds + warm))
    zc: Any = None
    if kind == "zmq":
        import zmq

        zc = zmq.Context()
        push, pull = zc.socket(zmq.PUSH), zc.socket(zmq.PULL)
        push.bind(a.endpoints[0])
        pull.bind(b.endpoints[0])
        put, get = push.send, pull.recv
    elif kind == "redis":
        import redis

        r = redis.Redis.from_url(a.url)
        ka, kb = a.key, b.key

        def put(m: bytes) -> None:
            r.rpush(ka, m)

        def get() -> Any:
            return r.blpop([kb])

    elif kind == "bytes":
        put, get = a.put_bytes, b.get_bytes
    else:
        put, get = a.put, b.get
    p.start()
    msg = payload(peer.payload, 64)
    lat: list[float] = []
    perf = time.perf_counter_ns
    try:
        for i in range(rounds + warm):
            t0 = perf()
            put(msg)
            get()
            if i >= warm:
                lat.append((perf() - t0) / 1e3)
    finally:
        p.join(60)
        if p.is_alive():
            p.kill()
            p.join()
        if zc is not None:
            push.close(linger=0)
            pull.close(linger=0)
            zc.term()
        close_handle(a)
        close_handle(b)
    lat.sort()
    return lat


@dataclass
class Plan:
    sizes: list[int]
    procs: list[int]
    reps: int
    scale: float
    cells: list[tuple[str, Peer, int, int]] = field(default_factory=list)


def _n(peer: Peer, size: int, scale: float) -> int:
    """Messages per cell: about half a second for each contender at full scale,
    so that process exit and join (milliseconds) stay out of the rate."""
    if peer.ours:
        base = {64: 2_000_000, 1024: 1_000_000, 65536: 60_000, 1 << 20: 3_000}[size]
        if not peer.per_call and size == 64:
            base *= 4  # tens of millions per second
    else:
        fast = not peer.per_call or peer.kind == "zmq"
        base = {64: 300_000, 1024: 150_000, 65536: 6_000, 1 << 20: 400}[size]
        base = int(base * (1.0 if fast else 0.25))
    return max(int(base * scale), 4 * BATCH if size <= 1024 else 64)


def run(plan: Plan, peers: list[Peer], progress: Any) -> dict[tuple[str, str, int, int], list[Any]]:
    results: dict[tuple[str, str, int, int], list[Any]] = {}
    for _ in range(plan.reps):
        for kind, peer, size, nproc in plan.cells:
            progress(f"{kind} {peer.name} {size} B x{nproc}")
            key = (kind, peer.name, size, nproc)
            try:
                if kind == "throughput":
                    val: Any = throughput(peer, size, nproc, _n(peer, size, plan.scale))
                else:
                    val = pingpong(peer, int(20_000 * plan.scale))
            except Exception as exc:  # a broken cell is shown, not fatal
                val = {"error": f"{type(exc).__name__}: {exc}"}
            results.setdefault(key, []).append(val)
    return results
