"""The ring survives processes that die at any instruction (real processes,
real _exit at injected points, real SIGKILL)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import struct
import time
from typing import Any

import pytest

from _cffi_ring import load
from _proc_support import run_to_exit
from ringbus import Queue

ctx = mp.get_context("fork")
STAMP = struct.Struct("<II")  # producer, seq


def _die_at(name: str, point: str, action: str, payload: bytes, after: int = 0) -> None:
    """Child: attach with a fault point armed and do `action` until it kills us."""
    os.environ["RINGBUS_FAULT"] = point
    os.environ["RINGBUS_FAULT_AFTER"] = str(after)
    q = Queue.attach(name)
    if action == "put":
        for _ in range(after + 1):
            q.put_bytes(payload)
    else:
        for _ in range(after + 1):
            q.get_bytes(timeout=10)
    os._exit(0)  # the fault point did not fire: the test will notice exit code 0


def run_child(procs: list[Any], *args: Any) -> int:
    return run_to_exit(procs, _die_at, *args)


@pytest.mark.parametrize(
    ("point", "size"),
    [("put-after-claim", 40), ("put-after-claim", 3000), ("put-mid-write", 3000)],
    ids=["claim-single-slot", "claim-multi-slot", "mid-multi-slot-write"],
)
def test_producer_death_before_publish_is_skipped(
    shm_name: str, procs: list[Any], point: str, size: int
) -> None:
    with Queue(64, name=shm_name, slot_size=256, max_message_size=4096) as q:
        q.put_bytes(b"before")
        assert run_child(procs, shm_name, point, "put", b"x" * size) == 77
        q.put_bytes(b"after")  # claimed behind the dead producer's tickets
        # the consumer waits on the dead claim, finds its claimant dead, skips it
        assert q.get_bytes(timeout=10) == b"before"
        assert q.get_bytes(timeout=10) == b"after"
        st = q.stats()
        assert st["abandoned"] == 1
        with pytest.raises(queue.Empty):
            q.get_bytes(timeout=0.3)
        # the ring keeps working across the wrap after the repair
        for i in range(300):
            q.put_bytes(b"%d" % i + b"y" * (i % 700))
            assert q.get_bytes(timeout=5) == b"%d" % i + b"y" * (i % 700)


def test_batch_producer_death_counts_each_lost_message(shm_name: str, procs: list[Any]) -> None:
    with Queue(64, name=shm_name) as q:
        assert run_to_exit(procs, _batch_then_die, shm_name) == 77
        q.put_bytes(b"survivor")
        assert q.get_bytes(timeout=10) == b"survivor"
        assert q.stats()["abandoned"] == 5


def _batch_then_die(name: str) -> None:
    os.environ["RINGBUS_FAULT"] = "put-after-claim"
    Queue.attach(name).put_bytes_many([b"m%d" % i for i in range(5)])
    os._exit(0)


@pytest.mark.parametrize("size", [10, 2000], ids=["single-slot", "multi-slot"])
def test_consumer_death_before_free_hands_the_message_back(
    shm_name: str, procs: list[Any], size: int
) -> None:
    with Queue(64, name=shm_name, max_message_size=4096) as q:
        msg = b"m" * size
        q.put_bytes(msg)
        q.put_bytes(b"second")
        assert run_child(procs, shm_name, "get-before-release", "get", b"") == 77
        got = q.recover(requeue=False)
        assert got["messages"] == [msg]
        assert got["recovered"] == 1 and got["reclaimed"] >= 1
        assert q.get_bytes(timeout=5) == b"second"
        assert q.stats()["recovered"] == 1


def test_blocked_producer_requeues_a_dead_consumers_batch(shm_name: str, procs: list[Any]) -> None:
    with Queue(8, name=shm_name, slot_size=64, max_message_size=128) as q:
        assert q.capacity == 8
        for i in range(8):
            q.put_bytes(b"%d" % i)
        assert run_child(procs, shm_name, "get-before-release", "get", b"") == 77
        taken = [q.get_bytes(timeout=5) for _ in range(7)]  # all but the held one
        # full again at the next lap, and slot 0 is held by a dead consumer:
        # this put waits, finds the holder dead, puts the held message back
        # (it takes one of the 8 slots), then fits
        q.put_bytes(b"8", timeout=20)
        assert q.stats()["recovered"] == 1
        for i in range(9, 15):
            q.put_bytes(b"%d" % i, timeout=10)
        assert q.full()
        while True:
            try:
                taken.append(q.get_bytes(timeout=0.5))
            except queue.Empty:
                break
        assert sorted(taken) == sorted(b"%d" % i for i in range(15))


# ---------------------------------------------------------------- SIGKILL


def _producer(name: str, pid_id: int, n: int) -> None:
    q = Queue.attach(name)
    for seq in range(n):
        q.put_bytes(STAMP.pack(pid_id, seq) + b"p" * (seq % 600))
    os._exit(0)


def test_sigkill_producers_mid_stream(shm_name: str, procs: list[Any]) -> None:
    """Producers killed at random moments: survivors' messages all arrive, the
    victims' arrive as an in-order prefix, nothing hangs."""
    n = 200_000
    with Queue(256, name=shm_name, max_message_size=1024) as q:
        for i in range(4):
            p = ctx.Process(target=_producer, args=(shm_name, i, n if i >= 2 else 10**9))
            procs.append(p)
            p.start()
        seen: dict[int, list[int]] = {i: [] for i in range(4)}
        killed = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                batch = q.get_bytes_many(256, timeout=1.0)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                continue
            for m in batch:
                pid_id, seq = STAMP.unpack_from(m)
                seen[pid_id].append(seq)
            if killed < 2 and len(seen[killed]) > 20_000:
                os.kill(procs[killed].pid, signal.SIGKILL)
                procs[killed].join()
                killed += 1
        assert killed == 2
        for i in (2, 3):
            assert seen[i] == list(range(n)), f"survivor {i} lost messages"
        for i in (0, 1):
            assert seen[i] == list(range(len(seen[i]))), f"victim {i} not an in-order prefix"
        assert q.stats()["abandoned"] <= 2  # at most the put in flight per victim


def _forward(name: str, out_name: str) -> None:
    q, out = Queue.attach(name), Queue.attach(out_name)
    while True:
        out.put_bytes_many(q.get_bytes_many(BATCH, timeout=60))


BATCH = 64


def test_sigkill_consumers_mid_stream(shm_name: str, procs: list[Any]) -> None:
    """Consumers killed while taking batches: nothing hangs, nothing is
    duplicated, and a victim loses at most the batch it had already taken
    out of the ring (in the bus, in-flight records close that gap)."""
    n = 100_000
    with Queue(128, name=shm_name) as q, Queue(1 << 18, name=shm_name + "-out") as out:
        workers = []
        for _ in range(3):
            p = ctx.Process(target=_forward, args=(shm_name, out.name))
            procs.append(p)
            workers.append(p)
            p.start()
        for seq in range(n):
            q.put_bytes(STAMP.pack(0, seq), timeout=60)
            if seq in (30_000, 60_000):
                victim = workers[seq // 30_000 - 1].pid
                assert victim is not None
                os.kill(victim, signal.SIGKILL)
        q.recover()  # what the TaskServer does when it reaps a dead child
        got: list[int] = []
        while True:
            try:
                got.extend(STAMP.unpack_from(m)[1] for m in out.get_bytes_many(1024, timeout=2))
            except queue.Empty:
                break
        assert len(got) == len(set(got)), "duplicated messages"
        missing = set(range(n)) - set(got)
        assert len(missing) <= 2 * BATCH, f"{len(missing)} lost"
        assert all(m <= 60_000 + 128 for m in missing)


# ---------------------------------------------------------------- cffi


def test_fault_points_through_the_cffi_binding(shm_name: str) -> None:
    """The same fault points driven on the C API directly, in a forked child."""
    ffi, lib = load()
    err = ffi.new("char[]", lib.RING_ERRBUF)
    out = ffi.new("ring_t **")
    params = ffi.new("ring_params_t *", {"maxsize": 16, "slot_size": 64,
                                         "max_message_size": 256})
    assert lib.ring_open(shm_name.encode(), lib.RING_CREATE, params, out, err) == 0
    r = out[0]
    try:
        done = ffi.new("size_t *")
        for point in (b"put-after-claim", b"put-mid-write"):
            pid = os.fork()
            if pid == 0:  # child: arm the point, attach, put a 3-slot message
                os.environ["RINGBUS_FAULT"] = point.decode()
                child = ffi.new("ring_t **")
                lib.ring_open(shm_name.encode(), lib.RING_ATTACH, ffi.NULL, child, err)
                data = ffi.new("char[]", b"z" * 150)
                iov = ffi.new("ring_iov_t *", {"base": data, "len": 150})
                lib.ring_put(child[0], iov, 1, done, lib.RING_FOREVER)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.WEXITSTATUS(status) == 77
        rec = ffi.new("ring_recovery_t *")
        assert lib.ring_recover(r, lib.RING_RECOVER_ALL, rec) == 0
        assert rec.abandoned == 2 and rec.recovered == 0
        lib.ring_recovery_free(rec)
        data = ffi.new("char[]", b"ok")
        iov = ffi.new("ring_iov_t *", {"base": data, "len": 2})
        assert lib.ring_put(r, iov, 1, done, 0) == 0
        b = ffi.new("ring_batch_t *")
        assert lib.ring_claim(r, 8, b, 0) == 0 and b.count == 1
        lib.ring_release(r, b)
        parts = ffi.new("ring_participant_t[64]")
        n = lib.ring_participants(r, parts, 64)
        assert all(parts[i].alive for i in range(n))  # dead entries were reclaimed
    finally:
        lib.ring_detach(r)
        lib.ring_unlink(shm_name.encode(), err)


def test_recover_with_requeue_reports_its_counts(shm_name: str, procs: list[Any]) -> None:
    with Queue(64, name=shm_name) as q:
        q.put_bytes(b"held")
        assert run_child(procs, shm_name, "get-before-release", "get", b"") == 77
        got = q.recover()  # requeue=True: the message goes back into the ring
        assert got["recovered"] == 1 and got["messages"] == []
        assert q.get_bytes(timeout=5) == b"held"
