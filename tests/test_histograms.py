"""Task run-time and queue-wait histograms (issue 19): kept by the workers in
the pool-state segment, scraped over real HTTP from ``ringbus worker
--metrics-port`` and parsed with prometheus_client's parser; printed by
``ringbus stats``; kept across SIGKILLed workers; and the envelope field
they need (enqueued-at, layout 0xB4) next to the layouts before it."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import struct
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _hist_tasks import Block, Boom, Flaky, Long, Quick, Ran, Short, Touch
from _ops_support import SHM, Worker, cli_env, free_port, ringbus_cli, wait_for
from ringbus import TaskBus, TaskServer
from ringbus.server import histograms as hist
from ringbus.server.pool_state import PoolState, read_pool_states
from ringbus.tasks import envelope as env
from ringbus.tasks.signing import Signer

parser = pytest.importorskip("prometheus_client.parser")

RUN, WAIT = "ringbus_task_run_seconds", "ringbus_task_queue_wait_seconds"
SHORT, LONG = "_hist_tasks.Short", "_hist_tasks.Long"
INF = float("inf")
SLACK = 0.002
"""Seconds of slack on the bounds below: the worker turns a monotonic
interval into a wall-clock instant (clocks slewed by NTP drift apart a little)."""


# ---------------------------------------------------------------- helpers


class HistWorker(Worker):
    """A ``ringbus worker _hist_tasks:bus`` subprocess and its stderr lines."""

    def __init__(self, bus_name: str, *args: str) -> None:
        super().__init__(bus_name, *args, target="_hist_tasks:bus")


@pytest.fixture(name="hbus")
def hbus_fixture() -> Iterator[TaskBus]:
    """The ``_hist_tasks`` bus under a fresh name; its segments go afterwards."""
    import _hist_tasks

    name = f"test-hist-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    b = TaskBus(name)
    src = _hist_tasks.bus
    for cls, fn in src.handlers.items():  # the same types and policies, for dispatch
        p = src.policy(cls)
        b.register(
            cls, fn, retries=p.retries, backoff=p.backoff, max_backoff=p.max_backoff,
            queue=src.queue_of(cls),
        )  # fmt: skip
    yield b
    b.destroy(force=True)
    for path in SHM.glob(f"ringbus-{name}-*"):
        path.unlink(missing_ok=True)


@pytest.fixture(name="hworkers")
def hworkers_fixture() -> Iterator[list[HistWorker]]:
    started: list[HistWorker] = []
    yield started
    for w in started:
        w.stop()


@pytest.fixture(name="servers")
def servers_fixture() -> Iterator[list[TaskServer]]:
    started: list[TaskServer] = []
    yield started
    for s in started:
        if s.running:
            s.stop(timeout=10)


Hist = dict[str | float, Any]  # le -> cumulative count, "count", "sum"


def families(text: str, name: str, **want: str) -> dict[tuple[str, str], Hist]:
    """The histograms ``name`` by (task_type, queue), from exposition text."""
    out: dict[tuple[str, str], Hist] = {}
    for fam in parser.text_string_to_metric_families(text):
        if fam.name != name:
            continue
        for s in fam.samples:
            if any(s.labels.get(k) != v for k, v in want.items()):
                continue
            h = out.setdefault((s.labels["task_type"], s.labels["queue"]), {})
            if s.name.endswith("_bucket"):
                h[float(s.labels["le"])] = s.value
            else:
                h[s.name.rsplit("_", 1)[1]] = s.value
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        assert resp.status == 200
        return resp.read().decode()


def check_bounds(h: Hist, lo: list[float], hi: list[float], what: str) -> None:
    """Each value observed lies in [lo[i], hi[i]] (one pair per task): every
    cumulative bucket must count at least the values surely under its bound
    and at most those possibly under it."""
    assert h["count"] == len(lo), f"{what}: count {h['count']}, {len(lo)} tasks"
    for le in (*hist.BOUNDS, INF):
        surely = sum(1 for v in hi if v + SLACK <= le)
        possibly = sum(1 for v in lo if v - SLACK <= le)
        assert surely <= h[le] <= possibly, (
            f"{what}: le={le}: {h[le]} not in [{surely}, {possibly}]"
        )
    assert sum(lo) - SLACK * len(lo) <= h["sum"] <= sum(hi) + SLACK * len(hi), what


def _idle_worker_pids(bus_name: str) -> list[int]:
    return [
        w.worker_pid
        for slots in read_pool_states(bus_name).values()
        for w in slots
        if w.worker_pid and w.state == "idle"
    ]


def _times(bus_name: str) -> dict[tuple[str, str], hist.TaskTimes]:
    """Task times of the bus's live servers, read as ``ringbus stats`` does."""
    by_path: dict[str, dict[tuple[str, str], hist.TaskTimes]] = {}
    read_pool_states(bus_name, None, by_path)
    out: dict[tuple[str, str], hist.TaskTimes] = {}
    for times in by_path.values():
        for key, t in times.items():
            out[key] = t
    return out


# ---------------------------------------------------------------- the scrape


def test_scrape_matches_a_known_workload(hbus: TaskBus, hworkers: list[HistWorker]) -> None:
    """20 tasks of 50 ms and 10 of 200 ms (on queue "slow") dispatched at
    once to 2 workers: most wait.  Each handler reports when it ran; from
    that and the dispatch times, every run time and queue wait is known
    within bounds, and each bucket of the scrape must agree with them."""
    bus = hbus
    port = free_port()
    w = HistWorker(bus.name, "--workers", "2", "--metrics-port", str(port))
    hworkers.append(w)
    w.wait_serving()

    tasks: list[Short | Long] = [Short(i) for i in range(20)] + [Long(i) for i in range(10)]
    lo_w, lo_m = time.time(), time.monotonic()
    futs = bus.dispatch_many(tasks)  # queued at once, each stamped within the call
    hi_w = time.time()
    ran: list[tuple[str, float, float, float, Ran]] = [
        (type(t).__name__, lo_w, lo_m, hi_w, f.result(timeout=120))
        for t, f in zip(tasks, futs, strict=True)
    ]

    # Bounds per task, from the order of the tasks on each worker: a worker
    # takes a task after its previous one ended (and after it was queued),
    # and observes it before it starts its next one.
    by_pid: dict[int, list[int]] = {}
    for n, (_, _, _, _, r) in enumerate(ran):
        by_pid.setdefault(r[0], []).append(n)
    bounds: dict[str, dict[str, list[float]]] = {
        k: {"run_lo": [], "run_hi": [], "wait_lo": [], "wait_hi": []} for k in ("Short", "Long")
    }
    for seq in by_pid.values():
        seq.sort(key=lambda n: ran[n][4][1])
        for j, n in enumerate(seq):
            kind, lo_w, lo_m, hi_w, (_, m0, m1, w0, _) = ran[n]
            prev = ran[seq[j - 1]][4] if j else None
            nxt = ran[seq[j + 1]][4] if j + 1 < len(seq) else None
            take_lo_m = max(prev[2] if prev else -INF, lo_m)
            take_lo_w = max(prev[4] if prev else -INF, lo_w)
            b = bounds[kind]
            b["run_lo"].append(m1 - m0)
            b["run_hi"].append((nxt[1] if nxt else INF) - take_lo_m)
            b["wait_lo"].append(max(0.0, take_lo_w - hi_w))
            b["wait_hi"].append(w0 - lo_w)
    # The workload made tasks wait: the long ones (queue "slow", served after
    # "default") start once the 1 s of short ones has been taken by 2 workers.
    assert max(bounds["Long"]["wait_lo"]) > 0.25

    def check(text: str, labels: dict[str, str]) -> None:
        run = families(text, RUN, **labels)
        wait = families(text, WAIT, **labels)
        assert set(run) == set(wait) == {(SHORT, "default"), (LONG, "slow")}
        for key, kind in (((SHORT, "default"), "Short"), ((LONG, "slow"), "Long")):
            b = bounds[kind]
            check_bounds(run[key], b["run_lo"], b["run_hi"], f"run time of {kind}")
            check_bounds(wait[key], b["wait_lo"], b["wait_hi"], f"queue wait of {kind}")
        # sleeps never end early: no 50 ms task under 50 ms, no 200 ms one under 100 ms
        assert run[(SHORT, "default")][0.05] == 0 and run[(LONG, "slow")][0.1] == 0

    labels = {"bus": bus.name, "server": str(w.proc.pid)}
    check(scrape(port), labels)

    # The same histograms once from outside, and in `ringbus stats`.
    out = ringbus_cli("stats", bus.name, "--format", "prometheus", env=cli_env(bus.name))
    assert out.returncode == 0, out.stderr
    check(out.stdout, labels)
    out = ringbus_cli("stats", bus.name, "--json", env=cli_env(bus.name))
    assert out.returncode == 0, out.stderr
    (srv,) = json.loads(out.stdout)["bus"]["servers"]
    rows = {(r["task_type"], r["queue"]): r for r in srv["task_times"]}
    assert rows[(SHORT, "default")]["run_seconds"]["count"] == 20
    assert rows[(LONG, "slow")]["queue_wait_seconds"]["count"] == 10
    everything = rows[(None, None)]["run_seconds"]
    assert everything["count"] == 30 and everything["buckets"][-1] == ["+Inf", 30]
    assert 0.05 <= everything["p50"] <= everything["p99"]
    out = ringbus_cli("stats", bus.name, env=cli_env(bus.name))
    assert out.returncode == 0, out.stderr
    assert "task times" in out.stdout and SHORT in out.stdout and "wait p99" in out.stdout
    assert w.stop() == 0


def test_histograms_survive_sigkilled_workers(hbus: TaskBus, hworkers: list[HistWorker]) -> None:
    """A worker killed idle, then one killed in the middle of a task: the
    new worker of the slot goes on from the counts there, nothing finished is
    lost, and the task that was running is counted once, when it finishes."""
    bus = hbus
    port = free_port()
    w = HistWorker(bus.name, "--workers", "1", "--metrics-port", str(port))
    hworkers.append(w)
    w.wait_serving()
    labels = {"bus": bus.name, "server": str(w.proc.pid)}
    quick = ("_hist_tasks.Quick", "default")

    def restarts() -> float:
        text = scrape(port)
        for fam in parser.text_string_to_metric_families(text):
            if fam.name == "ringbus_worker_restarts":
                return sum(s.value for s in fam.samples if s.name.endswith("_total"))
        raise AssertionError("no ringbus_worker_restarts_total")

    assert [f.result(timeout=60) for f in [bus.dispatch(Quick(i)) for i in range(10)]] == list(
        range(10)
    )
    assert families(scrape(port), RUN, **labels)[quick]["count"] == 10
    (pid,) = wait_for(lambda: _idle_worker_pids(bus.name), what="the idle worker")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: restarts() == 1 and _idle_worker_pids(bus.name), what="a new worker")
    assert families(scrape(port), RUN, **labels)[quick]["count"] == 10
    assert [f.result(timeout=60) for f in [bus.dispatch(Quick(i)) for i in range(5)]] == list(
        range(5)
    )
    m = families(scrape(port), RUN, **labels)
    assert m[quick]["count"] == 15
    assert families(scrape(port), WAIT, **labels)[quick]["count"] == 15

    release = Path(f"/tmp/ringbus-hist-{uuid.uuid4().hex}")
    try:
        held = bus.dispatch(Block(str(release)))
        (victim,) = wait_for(
            lambda: [
                s.worker_pid
                for slots in read_pool_states(bus.name).values()
                for s in slots
                if s.state == "running"
            ],
            what="the blocking task to run",
        )
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: restarts() == 2, what="the second new worker")
        release.touch()
        assert held.result(timeout=60) == "released"
    finally:
        release.unlink(missing_ok=True)
    m = families(scrape(port), RUN, **labels)
    assert m[quick]["count"] == 15
    assert m[("_hist_tasks.Block", "default")]["count"] == 1  # the killed run never finished
    assert w.stop() == 0


def test_a_concurrent_worker_counts_every_task(hbus: TaskBus, servers: list[TaskServer]) -> None:
    """concurrency=4: four task slots, one histogram area (the worker's first slot)."""
    servers.append(TaskServer(hbus, workers=1, concurrency=4).start())
    futs = hbus.dispatch_many([Quick(i) for i in range(40)] + [Short(i) for i in range(4)])
    assert [f.result(timeout=60) for f in futs[:40]] == list(range(40))
    for f in futs[40:]:
        f.result(timeout=60)
    times = _times(hbus.name)
    quick, short = times[("_hist_tasks.Quick", "default")], times[(SHORT, "default")]
    assert (quick.run.count, quick.wait.count, short.run.count, short.wait.count) == (40, 40, 4, 4)
    assert short.run.cumulative()[hist.BOUNDS.index(0.05)][1] == 0  # sleeps never end early
    (path,) = read_pool_states(hbus.name)
    ps = PoolState.attach(path, writable=False)
    try:  # every count in the worker's first slot
        assert sum(len(hist.read_area(ps.mm, ps.offset(s) + ps.journal_end)) for s in range(4)) == 2
        assert len(hist.read_area(ps.mm, ps.offset(0) + ps.journal_end)) == 2
    finally:
        ps.close()


@pytest.mark.parametrize("concurrency", [1, 2])
def test_redis_workers_keep_them_in_their_pool_state_too(
    redis_server: Any, servers: list[TaskServer], concurrency: int
) -> None:
    """Over Redis (signed envelopes) the workers are still a pool with a
    pool-state segment on this machine; the concurrent worker counts too."""
    import _hist_tasks
    from ringbus.transport.redis import RedisTransport

    name = f"test-hist-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bus = TaskBus(name, transport=RedisTransport(redis_server.url), secret="hist-secret")
    for cls, fn in _hist_tasks.bus.handlers.items():  # Redis: the default queue only
        bus.register(cls, fn)
    try:
        servers.append(TaskServer(bus, workers=1, concurrency=concurrency).start())
        assert [f.result(timeout=60) for f in [bus.dispatch(Quick(i)) for i in range(7)]] == list(
            range(7)
        )
        key = ("_hist_tasks.Quick", "default")
        t = wait_for(lambda: (t := _times(name).get(key)) and t.run.count == 7 and t, what="7")
        assert t.wait.count == 7
        assert t.run.buckets[-1] == 0  # none over 300 s
    finally:
        for s in servers:
            s.stop(timeout=10)
        bus.destroy()


# ---------------------------------------------------------------- the envelope


def test_envelopes_say_when_they_were_queued() -> None:
    t0 = time.time()
    data = env.encode_task(pickle.dumps(Quick(1), 5), 7, env.FLAG_REPLY, 42, b"/r")
    t1 = time.time()
    assert data[0] == 0xB4 and env.TASK_HEADER_SIZE == 58
    hdr, reply, start = env.decode_task_header(data)
    assert t0 <= hdr.enqueued <= t1
    assert (hdr.task_id, hdr.pid, reply, pickle.loads(data[start:])) == (7, 42, b"/r", Quick(1))
    for serializer, secret in (("pickle", None), ("msgpack", None), ("pickle", "s3cret")):
        name = f"test-hist-codec-{uuid.uuid4().hex[:8]}"
        bus = TaskBus(name, serializer=serializer, secret=secret)
        try:
            bus.register(Quick, lambda t: t.i)
            t0 = time.time()
            data = bus.codec.encode_task(Quick(3), 1, env.FLAG_REPLY, 42, b"/r")
            assert t0 <= env.decode_task_header(data)[0].enqueued <= time.time(), serializer
            if secret:
                assert bus.codec.verify_task is not None
                assert bus.codec.verify_task(data, data[1]) is None
        finally:
            bus.close()


def test_a_retry_or_a_delay_rewrites_enqueued_at_outside_the_tag() -> None:
    signer = Signer([b"k" * 32])
    body = env.encode_task(b"payload", 1, env.FLAG_SIGNED, 1, b"/r", enqueued=100.0)
    data = body + signer.tag_task(body)
    later = env.with_enqueued(data, 12345.5)
    assert env.decode_task_header(later)[0].enqueued == 12345.5
    assert signer.verify(later, True)  # left out of the tag, like the attempt field
    for at in (1, 34, 49, 58, len(data) - 33):  # every other byte is covered
        forged = bytearray(data)
        forged[at] ^= 1
        assert not signer.verify(bytes(forged), True), at


def _b3(flags: int, reply: bytes, payload: bytes, gid: bytes = b"\x07" * 16) -> bytes:
    """An envelope of the 0xB3 layout, built by hand (no enqueued-at field)."""
    head = struct.pack("<BBHIQddH16s", 0xB3, flags, 1, 4242, 77, 0.0, 0.0, len(reply), gid)
    return head + reply + payload


def test_older_layouts_still_decode_with_no_queue_wait() -> None:
    data = _b3(0, b"/r", b"payload")
    hdr, reply, start = env.decode_task_header(data)
    assert (hdr.magic, hdr.task_id, hdr.enqueued, reply, data[start:]) == (
        0xB3, 77, 0.0, b"/r", b"payload",
    )  # fmt: skip
    assert env.task_gid(data) == b"\x07" * 16
    assert env.with_enqueued(data, 5.0) == data  # nothing to rewrite
    up = env.from_legacy(data)
    hdr, reply, start = env.decode_task_header(up)
    assert (hdr.magic, hdr.gid, hdr.enqueued, reply, up[start:]) == (
        0xB4, b"\x07" * 16, 0.0, b"/r", b"payload",
    )  # fmt: skip
    old = struct.pack("<BBHIQddH", 0xB1, 0, 1, 4242, 78, 0.0, 0.0, 0) + b"p"
    assert env.decode_task_header(old)[0].task_id == 78
    up = env.from_legacy(old)
    hdr, _, start = env.decode_task_header(up)
    assert (hdr.magic, hdr.task_id, hdr.gid, hdr.enqueued, up[start:]) == (
        0xB4, 78, env.NO_ID, 0.0, b"p",
    )  # fmt: skip

    # Signed 0xB3, tagged by hand as a producer elsewhere would (bytes 0-1, 4..end).
    key = b"k" * 32
    signer = Signer([key])
    body = _b3(env.FLAG_SIGNED, b"", b"signed payload")
    signed = body + hashlib.blake2b(body[:2] + body[4:], key=key, digest_size=32).digest()
    assert signer.verify(signed, True)
    up = env.from_legacy(signed, signer)
    assert up[0] == 0xB4 and signer.verify(up, True)
    assert env.decode_task_header(up)[2] == 58 and up[58:-32] == b"signed payload"
    forged = bytearray(signed)
    forged[60] ^= 1
    assert env.from_legacy(bytes(forged), signer) == bytes(forged)  # refused later


def test_a_0xb3_envelope_runs_and_counts_no_queue_wait(
    hbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    """Put on the ring by hand (an older producer): it runs; its run time is
    observed, its queue wait is not (it does not say when it was queued)."""
    bus = hbus
    servers.append(TaskServer(bus, workers=1).start())
    old, new = tmp_path / "old", tmp_path / "new"
    bus.transport.put_task(_b3(0, b"", pickle.dumps(Touch(str(old)), 5), env.NO_ID))
    wait_for(old.exists, what="the 0xB3 task to run")
    bus.send(Touch(str(new)))
    wait_for(new.exists, what="the 0xB4 task to run")
    key = ("_hist_tasks.Touch", "default")
    t = wait_for(lambda: (t := _times(bus.name).get(key)) and t.run.count == 2 and t, what="2 runs")
    assert t.wait.count == 1


def _timer_records(bus: TaskBus) -> list[tuple[float, bytes]]:
    """(due, envelope) of the bus's delayed tasks, read from its timer file."""
    from ringbus import _names
    from ringbus.transport.record_file import RecordFile

    return [
        (struct.unpack_from("<d", body)[0], body[8:])
        for _, body in RecordFile(_names.timers_path(bus.name)).records()
    ]


def test_a_delay_counts_its_wait_from_when_it_is_due(hbus: TaskBus) -> None:
    bus = hbus
    bus.send(Quick(1), delay=3600)
    ((due, data),) = _timer_records(bus)
    assert env.decode_task_header(data)[0].enqueued == due


def test_a_retry_counts_its_wait_from_when_it_is_due(
    hbus: TaskBus, servers: list[TaskServer]
) -> None:
    """The retry waits in the timer store (backoff of 30 s or more): its
    envelope's enqueued-at is its due time, not the first dispatch."""
    bus = hbus
    servers.append(TaskServer(bus, workers=1).start())
    bus.send(Flaky(1))
    ((due, data),) = wait_for(lambda: _timer_records(bus), what="the retry to be held")
    hdr = env.decode_task_header(data)[0]
    assert (hdr.attempt, hdr.enqueued) == (2, due)
    t = wait_for(lambda: _times(bus.name).get(("_hist_tasks.Flaky", "default")), what="a run")
    assert (t.run.count, t.wait.count) == (1, 1)


# ---------------------------------------------------------------- the segment


def test_the_slot_area_outlives_its_workers_and_overflows_to_other() -> None:
    """The area is not reset with the slot; a new writer (the next worker)
    goes on from its counts; the 12th type on goes to OTHER."""
    ps = PoolState.create(f"test-hist-{os.getpid()}-{uuid.uuid4().hex[:8]}", 2, 4096)
    try:
        assert ps.journal_end == ps.stride - hist.HIST_AREA
        now = time.monotonic()
        ps.observe(0, now - 0.003, time.time() - 1000, "a.A", b"")  # waited 1000 s
        ps.reset(0)
        again = PoolState.attach(ps.path)  # another process's view: a new writer
        try:
            again.observe(0, now, 0.0, "a.A", b"")  # no enqueued-at: no wait
            for n in range(14):
                again.observe(1, now, 0.0, f"t.T{n}", b"")
        finally:
            again.close()
        times = ps.histograms()
        a = times[("a.A", "")]
        assert (a.run.count, a.wait.count) == (2, 1)
        assert a.run.sum >= 0.003 and a.run.cumulative()[hist.BOUNDS.index(0.0025)][1] <= 1
        assert a.wait.buckets[-1] == 1 and a.wait.quantile(0.5) == hist.BOUNDS[-1]
        assert len([k for k in times if k[0].startswith("t.T")]) == hist.ENTRIES - 1
        assert times[(hist.OTHER, "")].run.count == 14 - (hist.ENTRIES - 1)
    finally:
        ps.close()
        ps.unlink()


def test_a_bad_histogram_area_is_refused_and_an_old_segment_has_none() -> None:
    ps = PoolState.create(f"test-hist-{os.getpid()}-{uuid.uuid4().hex[:8]}", 1, 4096)
    try:
        struct.pack_into("<I", ps.mm, 44, ps.stride)  # no room left for the journal
        with pytest.raises(ValueError, match="histogram area"):
            PoolState.attach(ps.path, writable=False)
        struct.pack_into("<IH", ps.mm, 44, 0, 0)  # as an earlier server wrote it
        old = PoolState.attach(ps.path, writable=False)
        try:
            assert old.journal_end == old.stride and old.histograms() == {}
        finally:
            old.close()
    finally:
        ps.close()
        ps.unlink()


def test_quantiles_are_estimated_like_histogram_quantile() -> None:
    counts = [0] * hist.NB
    counts[hist.BOUNDS.index(0.1)] = 10  # ten in (0.05, 0.1]
    h = hist.Histogram(tuple(counts), 0.75)
    assert h.quantile(0.5) == pytest.approx(0.075)
    assert h.cumulative()[-1] == (INF, 10)
    assert hist.Histogram((0,) * hist.NB, 0.0).quantile(0.5) is None
    top = [0] * hist.NB
    top[-1] = 1
    assert hist.Histogram(tuple(top), 999.0).quantile(0.99) == hist.BOUNDS[-1]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_outcomes_are_counted_by_task_type_and_queue(
    hbus: TaskBus, servers: list[TaskServer], concurrency: int
) -> None:
    """started / succeeded / failed / retried / dead-lettered per (task type,
    queue), in the exposition format of the scrape, parsed by prometheus_client."""
    from ringbus.cli.metrics import render_once

    servers.append(TaskServer(hbus, workers=1, concurrency=concurrency).start())
    quick = [hbus.dispatch(Quick(i)) for i in range(5)]
    boom = [hbus.dispatch(Boom(i)) for i in range(3)]
    flaky = [hbus.send(Flaky(i)) for i in range(2)]  # one retry, 60 s away: retried only
    assert [f.result(timeout=60) for f in quick] == list(range(5))
    for f in boom:
        with pytest.raises(ValueError, match="boom"):
            f.result(timeout=60)
    assert len(flaky) == 2

    def counts() -> dict[tuple[str, str, str], float]:
        out = {}
        for fam in parser.text_string_to_metric_families(render_once(hbus.name)):
            name = fam.name.removeprefix("ringbus_task_")
            if name not in hist.OUTCOMES:
                continue
            for smp in fam.samples:
                if smp.name.endswith("_total"):
                    out[(name, smp.labels["task_type"], smp.labels["queue"])] = smp.value
        return out

    want = {
        ("started", "_hist_tasks.Quick", "default"): 5,
        ("succeeded", "_hist_tasks.Quick", "default"): 5,
        ("failed", "_hist_tasks.Quick", "default"): 0,
        ("started", "_hist_tasks.Boom", "mail"): 3,
        ("succeeded", "_hist_tasks.Boom", "mail"): 0,
        ("failed", "_hist_tasks.Boom", "mail"): 3,
        ("dead_lettered", "_hist_tasks.Boom", "mail"): 3,
        ("retried", "_hist_tasks.Flaky", "default"): 2,
        ("started", "_hist_tasks.Flaky", "default"): 2,
        ("failed", "_hist_tasks.Flaky", "default"): 0,
    }
    wait_for(
        lambda: all(counts().get(k) == v for k, v in want.items()),
        timeout=60,
        what="the outcome counters",
    )
    times = _times(hbus.name)
    assert times[("_hist_tasks.Boom", "mail")].outcomes == (3, 0, 3, 0, 3)
