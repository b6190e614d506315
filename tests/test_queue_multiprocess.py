"""Exactly-once delivery across real processes sharing one ringbus.Queue.

Producers stamp every message with (producer id, sequence number, crc32 of the
rest); consumers check the checksum and record, per producer, the sequence
numbers in the order they received them, and write that to a file in tmp_path.
The test then asserts: nothing lost, nothing duplicated, every consumer saw each
producer's messages in increasing order, no checksum mismatch.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import pickle
import random
import struct
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ringbus import Queue

HEADER = struct.Struct("<HII")  # producer id, seq, crc32(payload + producer id + seq)
POOL = random.Random(1234).randbytes(1 << 16)  # payload bytes are slices of this pool
SLOT = 256
BATCH = 256


def stamp(pid: int, seq: int, size: int) -> bytes:
    """A message of HEADER.size + size bytes for (pid, seq), with its checksum."""
    off = (seq * 131 + pid * 977) % (len(POOL) - size)
    body = POOL[off : off + size]
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<HI", pid, seq)))
    return HEADER.pack(pid, seq, crc) + body


def check(msg: bytes | memoryview) -> tuple[int, int, bool]:
    """(producer id, seq, checksum ok) of a stamped message."""
    pid, seq, crc = HEADER.unpack_from(msg)
    body = msg[HEADER.size :]
    return pid, seq, zlib.crc32(body, zlib.crc32(struct.pack("<HI", pid, seq))) == crc


def message_sizes(pid: int, n: int) -> list[int]:
    """Random payload sizes: mostly one slot, about 1 in 16 spanning 2 to 12 slots."""
    rng = random.Random(pid)
    return [
        rng.randint(SLOT, 12 * SLOT) if rng.random() < 1 / 16 else rng.randint(0, SLOT - 2 * 10)
        for _ in range(n)
    ]


# ---------------------------------------------------------------- raw bytes


def produce_bytes(q: Queue, pid: int, n: int) -> None:
    """Put n stamped messages: batches through put_bytes_many, some single put_bytes."""
    sizes = message_sizes(pid, n)
    seq = 0
    while seq < n:
        if seq % 4096 == 0:
            q.put_bytes(stamp(pid, seq, sizes[seq]))
            seq += 1
            continue
        end = min(n, seq + BATCH)
        q.put_bytes_many([stamp(pid, s, sizes[s]) for s in range(seq, end)])
        seq = end


def consume_bytes(q: Queue, cid: int, n_producers: int, out: str) -> None:
    """Drain until the empty-message sentinel; write per-producer seqs and bad count."""
    seen = [array("I") for _ in range(n_producers)]
    bad = 0
    while True:
        batch = q.get_bytes_many(BATCH, timeout=120)
        sentinels = 0
        for msg in batch:
            if not msg:
                sentinels += 1
                continue
            pid, seq, ok = check(msg)
            if not ok:
                bad += 1
            seen[pid].append(seq)
        if sentinels:
            # Sentinels are put after all data, so only sentinels follow the first:
            # hand back the extra ones so every consumer gets its own.
            for _ in range(sentinels - 1):
                q.put_bytes(b"")
            break
    Path(out).write_bytes(pickle.dumps({"seen": [a.tobytes() for a in seen], "bad": bad}))


# ---------------------------------------------------------------- pickled objects


def produce_objects(q: Queue, pid: int, n: int) -> None:
    """Put n (pid, seq, payload, crc) tuples, alternating put and put_many."""
    sizes = message_sizes(pid, n)
    seq = 0
    while seq < n:
        if (seq // 64) % 2:
            end = min(n, seq + 64)
            q.put_many(
                (pid, s, POOL[: sizes[s]], zlib.crc32(POOL[: sizes[s]], s)) for s in range(seq, end)
            )
            seq = end
        else:
            q.put((pid, seq, POOL[: sizes[seq]], zlib.crc32(POOL[: sizes[seq]], seq)))
            seq += 1


def consume_objects(q: Queue, cid: int, n_producers: int, out: str) -> None:
    """Drain objects with get and get_many until a None sentinel."""
    seen = [array("I") for _ in range(n_producers)]
    bad = 0
    turn = 0
    while True:
        turn += 1
        batch = q.get_many(32, timeout=120) if turn % 2 else [q.get(timeout=120)]
        sentinels = 0
        for item in batch:
            if item is None:
                sentinels += 1
                continue
            pid, seq, body, crc = item
            if zlib.crc32(body, seq) != crc:
                bad += 1
            seen[pid].append(seq)
        if sentinels:
            for _ in range(sentinels - 1):
                q.put(None)
            break
    Path(out).write_bytes(pickle.dumps({"seen": [a.tobytes() for a in seen], "bad": bad}))


# ---------------------------------------------------------------- the harness


def run_exactly_once(
    *,
    ctx: Any,
    q: Queue,
    procs: list[mp.process.BaseProcess],
    tmp_path: Path,
    n_producers: int,
    n_consumers: int,
    per_producer: int,
    objects: bool,
) -> None:
    """Start consumers and producers, send sentinels after the producers, verify."""
    produce: Callable[[Queue, int, int], None] = produce_objects if objects else produce_bytes
    consume: Callable[[Queue, int, int, str], None] = consume_objects if objects else consume_bytes
    outs = [tmp_path / f"consumer-{c}.pickle" for c in range(n_consumers)]
    consumers = [
        ctx.Process(target=consume, args=(q, c, n_producers, str(outs[c])))
        for c in range(n_consumers)
    ]
    producers = [ctx.Process(target=produce, args=(q, p, per_producer)) for p in range(n_producers)]
    procs.extend(consumers + producers)
    for p in consumers + producers:
        p.start()
    for p in producers:
        p.join(timeout=240)
        assert p.exitcode == 0, f"producer exit code {p.exitcode}"
    for _ in range(n_consumers):
        if objects:
            q.put(None)
        else:
            q.put_bytes(b"")
    for p in consumers:
        p.join(timeout=240)
        assert p.exitcode == 0, f"consumer exit code {p.exitcode}"
    assert q.empty()
    verify([pickle.loads(o.read_bytes()) for o in outs], n_producers, per_producer)


def verify(reports: list[dict[str, Any]], n_producers: int, per_producer: int) -> None:
    """None lost, none duplicated, per-producer order kept within each consumer, no bad crc."""
    assert sum(r["bad"] for r in reports) == 0, "checksum mismatch: a message was corrupted"
    for pid in range(n_producers):
        union: list[int] = []
        for c, r in enumerate(reports):
            seqs = array("I")
            seqs.frombytes(r["seen"][pid])
            assert all(a < b for a, b in itertools.pairwise(seqs)), (
                f"consumer {c} saw producer {pid} out of order"
            )
            union.extend(seqs)
        assert len(union) == per_producer, (
            f"producer {pid}: {per_producer} sent, {len(union)} received "
            f"({'duplicates' if len(union) > per_producer else 'lost'})"
        )
        union.sort()
        assert union == list(range(per_producer)), f"producer {pid}: lost and duplicated seqs"


def test_checker_detects_corruption_loss_duplication_and_disorder() -> None:
    """The oracle itself: a flipped byte, a lost, a duplicated or a reordered seq all fail."""
    msg = bytearray(stamp(3, 7, 300))
    assert check(bytes(msg)) == (3, 7, True)
    msg[HEADER.size + 100] ^= 1
    assert check(bytes(msg))[2] is False

    def report(*seqs: list[int], bad: int = 0) -> list[dict[str, Any]]:
        return [{"seen": [array("I", s).tobytes()], "bad": bad} for s in seqs]

    verify(report([0, 2], [1, 3]), 1, 4)
    for bad_reports in (
        report([0, 2], [1, 3], bad=1),  # corrupted
        report([0, 2], [3]),  # lost
        report([0, 2], [1, 2, 3]),  # duplicated
        report([2, 0], [1, 3]),  # reordered within a consumer
    ):
        with pytest.raises(AssertionError):
            verify(bad_reports, 1, 4)


@pytest.mark.timeout(300)
def test_exactly_once_4x4_a_million_bytes_messages(
    shm_name: str, procs: list[mp.process.BaseProcess], tmp_path: Path
) -> None:
    """4 producers x 250,000 stamped messages (some spanning up to 12 slots), 4 consumers."""
    with Queue(1024, name=shm_name, slot_size=SLOT, max_message_size=16 * SLOT) as q:
        run_exactly_once(
            ctx=mp.get_context("fork"),
            q=q,
            procs=procs,
            tmp_path=tmp_path,
            n_producers=4,
            n_consumers=4,
            per_producer=250_000,
            objects=False,
        )
        stats = q.stats()
        assert stats["gets"] == stats["puts"] >= 1_000_000 + 4  # + sentinels handed back


@pytest.mark.timeout(300)
def test_exactly_once_pickled_objects(
    shm_name: str, procs: list[mp.process.BaseProcess], tmp_path: Path
) -> None:
    """The same guarantees through the serializer: put/put_many and get/get_many."""
    with Queue(512, name=shm_name, slot_size=SLOT, max_message_size=16 * SLOT) as q:
        run_exactly_once(
            ctx=mp.get_context("fork"),
            q=q,
            procs=procs,
            tmp_path=tmp_path,
            n_producers=4,
            n_consumers=4,
            per_producer=20_000,
            objects=True,
        )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("objects", [False, True], ids=["bytes", "objects"])
def test_exactly_once_under_spawn(
    shm_name: str, procs: list[mp.process.BaseProcess], tmp_path: Path, objects: bool, method: str
) -> None:
    """Children started by spawn or forkserver attach by name (no inherited mapping)."""
    with Queue(256, name=shm_name, slot_size=SLOT, max_message_size=16 * SLOT) as q:
        run_exactly_once(
            ctx=mp.get_context(method),
            q=q,
            procs=procs,
            tmp_path=tmp_path,
            n_producers=2,
            n_consumers=2,
            per_producer=20_000,
            objects=objects,
        )
