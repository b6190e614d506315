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
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ctx = mp.get_context("fork")
STOP = b""
BATCH = 256
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- peers
# A peer: make(size) -> a handle the forked children inherit; the kind
# says how producers put and consumers get.


@dataclass(frozen=True)
class Peer:
    name: str
    make: Callable[[int], Any]
    kind: str
    ours: bool = False
    per_call: bool = True  # one call per message (else batched)
    pickled: bool = True  # objects through the peer's serializer (else raw bytes)
    needs: str = ""  # module that must import


def _ringbus_make(size: int) -> Any:
    import ringbus

    return ringbus.Queue(
        maxsize=max(8192, 8 * 1024 * 1024 // max(size, 256)),
        max_message_size=max(1 << 20, 2 * size + 64),
    )


def _ff_make(size: int) -> Any:
    import faster_fifo

    return faster_fifo.Queue(max_size_bytes=max(64 << 20, 8 * size))


def _mpq_make(size: int) -> Any:
    return ctx.Queue()


def _sq_make(size: int) -> Any:
    return ctx.SimpleQueue()


@dataclass
class ZmqHandle:
    endpoints: list[str]


def _zmq_make(size: int) -> ZmqHandle:
    import zmq  # noqa: F401 - availability

    base = tempfile.mkdtemp(prefix="rb-zmq-")
    return ZmqHandle([f"ipc://{base}/c{i}" for i in range(8)])


@dataclass
class RedisHandle:
    url: str
    key: str


_REDIS_URL: list[str] = []


def _redis_make(size: int) -> RedisHandle:
    import redis  # noqa: F401 - availability

    if not _REDIS_URL:
        raise ImportError("no redis-server")
    return RedisHandle(_REDIS_URL[0], f"rb-bench-{os.getpid()}-{time.monotonic_ns()}")


PEERS = [
    Peer("ringbus put/get (pickled)", _ringbus_make, "obj", True),
    Peer("ringbus put_bytes/get_bytes", _ringbus_make, "bytes", True, pickled=False),
    Peer("ringbus put_many/get_many (pickled)", _ringbus_make, "objmany", True, per_call=False),
    Peer(
        "ringbus put_bytes_many/get_bytes_many",
        _ringbus_make,
        "bytesmany",
        True,
        per_call=False,
        pickled=False,
    ),
    Peer("multiprocessing.Queue", _mpq_make, "obj"),
    Peer("multiprocessing.SimpleQueue", _sq_make, "obj"),
    Peer("faster-fifo put/get", _ff_make, "obj", needs="faster_fifo"),
    Peer("faster-fifo get_many", _ff_make, "ffmany", per_call=False, needs="faster_fifo"),
    Peer("pyzmq PUSH/PULL ipc", _zmq_make, "zmq", pickled=False, needs="zmq"),
    Peer("Redis list RPUSH/BLPOP", _redis_make, "redis", pickled=False, needs="redis"),
    Peer(
        "Redis list batched",
        _redis_make,
        "redismany",
        per_call=False,
        pickled=False,
        needs="redis",
    ),
]


def available(peer: Peer) -> bool:
    if peer.needs:
        try:
            __import__(peer.needs)
        except ImportError:
            return False
    if peer.kind.startswith("redis") and not _REDIS_URL:
        return False
    return True


def _close(q: Any) -> None:
    if hasattr(q, "close"):
        with contextlib.suppress(Exception):
            q.close()
    if isinstance(q, ZmqHandle):
        shutil.rmtree(os.path.dirname(q.endpoints[0][len("ipc://") :]), ignore_errors=True)
    if isinstance(q, RedisHandle):
        import redis

        with contextlib.suppress(Exception):
            redis.Redis.from_url(q.url).delete(q.key)


# ---------------------------------------------------------------- children


def _producer(q: Any, kind: str, n: int, size: int, nproc: int, start: Any) -> None:
    msg = b"x" * size
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
        ctx.Process(target=_producer, args=(q, peer.kind, per, size, nproc, start))
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
        _close(q)


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
    msg = b"x" * 64
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
        _close(a)
        _close(b)
    lat.sort()
    return lat


def _pct(lat: list[float], q: float) -> float:
    return lat[min(len(lat) - 1, int(len(lat) * q))]


# ---------------------------------------------------------------- redis-server


@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    """A private redis-server on a free loopback port (None if not installed)."""
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tempfile.mkdtemp(prefix="rb-bench-redis-")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            d,
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- C reference


def c_reference(quick: bool) -> dict[str, Any]:
    """ringbus's C core with no Python (bench/cref/ring_ref.c), in processes:
    the best of three runs of each."""
    build = Path(tempfile.mkdtemp(prefix="rb-cref-"))
    try:
        subprocess.run(
            ["make", "-s", "-C", str(ROOT / "csrc"), f"BUILD={build}", f"{build}/ring_ref"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(build, ignore_errors=True)
        return {"error": f"could not build the C reference: {exc}"}
    secs = "0.3" if quick else "1.0"
    out: dict[str, Any] = {}
    try:
        runs = {
            "1to1_per_call": ["throughput", "procs", "1", "1", "64", "1", secs],
            "1to1_batch256": ["throughput", "procs", "1", "1", "64", "256", secs],
            "4to4_per_call": ["throughput", "procs", "4", "4", "64", "1", secs],
            "pingpong": ["pingpong", "procs", "64", "20000" if quick else "100000"],
        }
        for key, args in runs.items():
            # The machine's limit: the best of three (noise only ever slows it down).
            tries = []
            for _ in range(3):
                res = subprocess.run(
                    [str(build / "ring_ref"), *args], capture_output=True, text=True, timeout=120
                )
                tries.append(json.loads(res.stdout))
            if key == "pingpong":
                out[key] = min(tries, key=lambda d: d["p50_ns"])
            else:
                out[key] = max(tries, key=lambda d: d["msg_per_s"])
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out


# ---------------------------------------------------------------- tasks, idle, memory


def _task_rows_once(quick: bool, redis_url: str | None) -> list[dict[str, Any]]:
    """One repetition of every task contender (run in a fresh interpreter)."""
    from bench import tasks

    n_lat, n_tp, warm = (1000, 10_000, 200) if quick else (10_000, 100_000, 1000)
    rows = []
    rows += tasks.bench_ringbus(2, n_lat, n_tp, warm)
    rows += tasks.bench_ring_executor(2, n_lat, n_tp, warm)
    rows += tasks.bench_ppe(2, n_lat // 4, n_tp // 5, warm // 4)
    rows += tasks.bench_pool(2, n_lat // 4, n_tp // 5, warm // 4)
    if redis_url:
        rows += tasks.bench_ringbus_redis(2, n_lat // 4, n_tp // 10, warm // 4, redis_url)
        rows += tasks.bench_redis_list(2, n_lat // 4, n_tp // 10, warm // 4, redis_url)
    return [r.__dict__ for r in rows]


def task_rows(
    quick: bool, redis_url: str | None, reps: int, hangs: list[str]
) -> list[dict[str, Any]]:
    """Task contenders, each repetition in a fresh interpreter (no state left over
    from the queue cells); median of the repetitions with the min-max of p50 and
    tasks/s, every repetition kept under "reps"."""
    code = (
        "import json, sys; from bench.compare import _task_rows_once as f; "
        f"print(json.dumps(f({quick!r}, {redis_url!r})))"
    )
    runs: list[list[dict[str, Any]]] = []
    for _ in range(reps):
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=60 if quick else 180)
        except subprocess.TimeoutExpired:
            # A hung contender (a lost wake-up) must not stall the run: kill the
            # repetition and its workers, remove its segments, report the hang.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            for pat in (
                f"ringbus-bench-{proc.pid}-*",
                f"ringbus-bench-redis-{proc.pid}-*",
                f"ringbus-x-{proc.pid}-*",
            ):
                for seg in Path("/dev/shm").glob(pat):
                    seg.unlink(missing_ok=True)
            hangs.append("a task repetition hung and was killed")
            print("task round trips: a repetition hung, killed", file=sys.stderr)
            continue
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        if proc.returncode == 0:
            runs.append(json.loads(stdout.strip().splitlines()[-1]))
        else:
            print(f"task round trips failed: {stderr[-500:]}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for name in dict.fromkeys(r["name"] for run in runs for r in run):
        got = [r for run in runs for r in run if r["name"] == name]
        row: dict[str, Any] = {"name": name, "reps": got}
        for key in ("p50", "p99", "p999", "rate"):
            vals = [r[key] for r in got]
            row[key] = statistics.median(vals)
            row[key + "_min"], row[key + "_max"] = min(vals), max(vals)
        rows.append(row)
    return rows


def _rss_of(path: str) -> int:
    """Resident bytes of this process's mapping of ``path`` (from smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and ":" not in line.split(" ", 1)[0]:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_per_slot() -> dict[str, Any]:
    import ringbus

    out = {}
    for slot in (64, 256):
        q = ringbus.Queue(8192, slot_size=slot, max_message_size=64 * 1024)
        st = q.stats()
        seg = int(st.get("segment_size", 0))
        path = "/dev/shm" + q.name
        rss_new = _rss_of(path)
        msg = b"x" * 64
        with contextlib.suppress(Exception):  # queue.Full: one full pass of 64 B messages
            while True:
                q.put_bytes(msg, block=False)
        while q.qsize():
            q.get_bytes_many(4096)
        rss_used = _rss_of(path)
        out[f"slot_size={slot}"] = {
            "capacity": q.capacity,
            "segment_bytes": seg,
            "bytes_per_slot": round(seg / q.capacity, 1),
            "rss_after_create": rss_new,
            "rss_after_full_pass": rss_used,
            "rss_per_slot": round(rss_used / q.capacity, 1),
        }
        q.close()
    return out


# ---------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("ringbus", "faster-fifo", "pyzmq", "redis"):
        try:  # the installed distribution: faster-fifo has no __version__
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "n/a"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "versions": versions,
    }


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


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1024 else f"{n} B"


def _median(vals: list[Any]) -> float | None:
    nums = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(nums) if nums else None


def render(
    results: dict[tuple[str, str, int, int], list[Any]],
    peers: list[Peer],
    missing: list[str],
    plan: Plan,
    extra: dict[str, Any],
    m: dict[str, Any],
) -> str:
    out = [
        f"ringbus vs peers, {m['date']}: {m['cpu']}, {m['cores']} cores, Python "
        f"{m['python']}, Linux {m['kernel']}. Median of {plan.reps} (min-max); ratios to "
        "multiprocessing.Queue and to the best peer that is not ringbus, same payload and mode.",
        "",
        "| scenario | peer | msg/s (min-max) | MB/s | vs mp.Queue | vs best peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size in plan.sizes:
        for nproc in plan.procs:
            med = {
                p.name: _median(results.get(("throughput", p.name, size, nproc), [])) for p in peers
            }
            base = med.get("multiprocessing.Queue")
            for p in peers:
                vals = results.get(("throughput", p.name, size, nproc), [])
                v = med[p.name]
                if v is None:
                    err = next((x["error"] for x in vals if isinstance(x, dict)), "n/a")
                    out.append(f"| {nproc}→{nproc} {_size(size)} | {p.name} | {err} | | | |")
                    continue
                rivals = [
                    med[q.name]
                    for q in peers
                    if not q.ours and q.per_call == p.per_call and med[q.name] is not None
                ]
                best = max(rivals, default=None)  # type: ignore[type-var]
                nums = [x for x in vals if isinstance(x, (int, float))]
                mode = "per call" if p.per_call else "batched"
                out.append(
                    f"| {nproc}→{nproc} {_size(size)} {mode} | {p.name} | {v:,.0f} "
                    f"({min(nums):,.0f}-{max(nums):,.0f}) | {v * size / 1e6:,.1f} | "
                    + (f"{v / base:.2f}x | " if base else "– | ")
                    + (f"{v / best:.2f}x |" if best else "– |")
                )
    out += ["", "| 64 B ping-pong RTT | p50 µs | p99 µs | p99.9 µs |", "|---|---:|---:|---:|"]
    for p in peers:
        runs = [r for r in results.get(("pingpong", p.name, 64, 1), []) if isinstance(r, list)]
        if runs:
            cols = [statistics.median(_pct(r, q) for r in runs) for q in (0.5, 0.99, 0.999)]
            out.append(f"| {p.name} | {cols[0]:.2f} | {cols[1]:.2f} | {cols[2]:.2f} |")
    cref = extra.get("c_reference", {})
    if "1to1_per_call" in cref:
        ours_call = _median(results.get(("throughput", "ringbus put_bytes/get_bytes", 64, 1), []))
        ours_batch = _median(
            results.get(("throughput", "ringbus put_bytes_many/get_bytes_many", 64, 1), [])
        )
        c1, cb = cref["1to1_per_call"]["msg_per_s"], cref["1to1_batch256"]["msg_per_s"]
        out += [
            "",
            "| C reference (no Python, processes) | msg/s or µs | Python API reaches |",
            "|---|---:|---:|",
            f"| 1→1 64 B per call | {c1:,.0f} | "
            + (f"{ours_call / c1:.0%} (put_bytes/get_bytes) |" if ours_call else "– |"),
            f"| 1→1 64 B batch 256 | {cb:,.0f} | "
            + (f"{ours_batch / cb:.0%} (put_bytes_many) |" if ours_batch else "– |"),
            f"| 4→4 64 B per call | {cref['4to4_per_call']['msg_per_s']:,.0f} | |",
            f"| ping-pong p50 / p99 | {cref['pingpong']['p50_ns'] / 1e3:.2f} / "
            f"{cref['pingpong']['p99_ns'] / 1e3:.2f} µs | |",
        ]
    if extra.get("tasks"):
        rows = extra["tasks"]
        pool = next((r for r in rows if "Pool" in r["name"] and "apply" in r["name"]), None)
        out += [
            "",
            "| task round trip, 2 workers | p50 µs (min-max) | p99 µs | p99.9 µs "
            "| tasks/s (min-max) | p50 vs Pool | tasks/s vs Pool |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lat = r["p50"] == r["p50"]
            out.append(
                f"| {r['name']} | "
                + (
                    f"{r['p50']:.1f} ({r.get('p50_min', r['p50']):.1f}-"
                    f"{r.get('p50_max', r['p50']):.1f}) | {r['p99']:.1f} | {r['p999']:.1f} | "
                    if lat
                    else "– | – | – | "
                )
                + f"{r['rate']:,.0f} ({r.get('rate_min', r['rate']):,.0f}-"
                f"{r.get('rate_max', r['rate']):,.0f}) | "
                + (f"{pool['p50'] / r['p50']:.1f}x | " if pool and lat else "– | ")
                + (f"{r['rate'] / pool['rate']:.1f}x |" if pool else "– |")
            )
    if extra.get("task_hangs"):
        out += [
            "",
            f"Task round trips: {len(extra['task_hangs'])} repetition(s) hung and were "
            "killed (not counted in the medians).",
        ]
    if "idle" in extra:
        w, own = extra["idle"]
        out += [
            "",
            f"Idle pool of 4 workers over {extra['idle_seconds']:.0f} s: workers "
            f"{w:.2f} % of a core in total, server + reader process {own:.2f} %.",
        ]
    if "memory" in extra:
        out += [
            "",
            "| ring memory | capacity | segment bytes | bytes per slot | RSS after create "
            "| RSS after a full pass of 64 B | RSS per slot |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for k, v in extra["memory"].items():
            out.append(
                f"| {k} | {v['capacity']} | {v['segment_bytes']:,} | {v['bytes_per_slot']} | "
                f"{v.get('rss_after_create', 0):,} | {v.get('rss_after_full_pass', 0):,} | "
                f"{v.get('rss_per_slot', '–')} |"
            )
    for name in missing:
        out.append(f"\n{name}: n/a (not installed)")
    return "\n".join(out)


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plots(
    results: dict[tuple[str, str, int, int], list[Any]], peers: list[Peer], plan: Plan, outdir: Path
) -> list[Path]:
    """Throughput by payload size, latency CDF and scaling by process count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in peers:
        ys = [_median(results.get(("throughput", p.name, s, 1), [])) for s in plan.sizes]
        pts = [(s, y * s / 1e6) for s, y in zip(plan.sizes, ys, strict=True) if y]
        if pts:
            ax.plot(*zip(*pts, strict=False), marker="o", label=p.name, lw=2.5 if p.ours else 1.2)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="payload bytes",
        ylabel="MB/s (1→1)",
        title="Throughput by payload size",
    )
    made.append(_save(plt, fig, ax, outdir / "throughput_by_size.png"))
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in peers:
        runs = [r for r in results.get(("pingpong", p.name, 64, 1), []) if isinstance(r, list)]
        if runs:
            lat = runs[-1]
            ax.plot(
                lat,
                [i / len(lat) for i in range(len(lat))],
                label=p.name,
                lw=2.5 if p.ours else 1.2,
            )
    ax.set(
        xscale="log",
        xlabel="round trip µs (64 B)",
        ylabel="fraction",
        title="Ping-pong latency CDF",
    )
    made.append(_save(plt, fig, ax, outdir / "latency_cdf.png"))
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in peers:
        ys = [_median(results.get(("throughput", p.name, 64, n), [])) for n in plan.procs]
        pts = [(n, y) for n, y in zip(plan.procs, ys, strict=True) if y]
        if pts:
            ax.plot(*zip(*pts, strict=False), marker="o", label=p.name, lw=2.5 if p.ours else 1.2)
    ax.set(
        yscale="log",
        xlabel="producers = consumers",
        ylabel="msg/s (64 B)",
        title="Scaling by process count",
        xticks=plan.procs,
    )
    made.append(_save(plt, fig, ax, outdir / "scaling.png"))
    return made


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
        if url:
            _REDIS_URL[:] = [url]
        peers = [p for p in PEERS if available(p)]
        if args.tiny:
            peers = [p for p in peers if p.kind in ("bytes", "obj")][:3]
        missing = [p.name for p in PEERS if p not in peers and not args.tiny]
        for size in plan.sizes:
            for nproc in plan.procs:
                plan.cells += [("throughput", p, size, nproc) for p in peers]
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
    command = "python -m bench.compare" + (" --quick" if args.quick else "")
    (outdir / "results.md").write_text(f"{table}\n\nReproduce: `{command}`\n")
    doc = {
        "machine": m,
        "command": command,
        "reps": plan.reps,
        "cells": [
            {
                "kind": k[0],
                "peer": k[1],
                "size": k[2],
                "procs": k[3],
                "reps": [v[:: max(1, len(v) // 200)] if isinstance(v, list) else v for v in vals],
            }
            for k, vals in results.items()
        ],
        **extra,
    }
    (outdir / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    made = [] if args.tiny else plots(results, peers, plan, outdir)
    print(
        f"\nwrote {outdir}/results.md, results.json" + "".join(f", {p.name}" for p in made),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
