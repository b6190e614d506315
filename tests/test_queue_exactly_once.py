"""Exactly-once across processes: 4 producers and 4 consumers, 1,000,000
messages of random sizes (one slot to many), each stamped with its producer,
sequence number and a CRC of its payload."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import random
import struct
import zlib
from array import array
from pathlib import Path
from typing import Any

import pytest

from ringbus import Queue

HDR = struct.Struct("<III")  # producer, seq, crc32(payload)
STOP = b"STOP"
NOISE = random.Random(7).randbytes(8192)


def _sizes(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice((0, 8, 40, 100, 200)) if rng.random() < 0.9 else rng.randrange(300, 3000)
            for _ in range(n)]


def _producer(name: str, pid: int, n: int, batch: int, objects: bool) -> None:
    q = Queue.attach(name)
    sizes = _sizes(pid, n)
    rng = random.Random(pid * 31)
    out: list[Any] = []
    for seq in range(n):
        off = rng.randrange(0, 4096)
        payload = NOISE[off : off + sizes[seq]]
        msg = HDR.pack(pid, seq, zlib.crc32(payload)) + payload
        out.append(msg)
        if len(out) == batch or seq == n - 1:
            if objects:
                q.put_many(out, timeout=120)
            elif len(out) == 1:
                q.put_bytes(out[0], timeout=120)
            else:
                q.put_bytes_many(out, timeout=120)
            out = []


def _consumer(name: str, producers: int, result: str, objects: bool) -> None:
    q = Queue.attach(name)
    seen = [array("I") for _ in range(producers)]
    bad = 0
    while True:
        batch = q.get_many(128, timeout=120) if objects else q.get_bytes_many(128, timeout=120)
        stops = sum(1 for m in batch if m == STOP)
        for m in batch:
            if m == STOP:
                continue
            pid, seq, crc = HDR.unpack_from(m)
            if zlib.crc32(memoryview(m)[HDR.size :]) != crc:
                bad += 1
            seen[pid].append(seq)
        if stops:  # one STOP ends one consumer: hand the others on
            for _ in range(stops - 1):
                q.put(STOP) if objects else q.put_bytes(STOP)
            Path(result).write_bytes(pickle.dumps((seen, bad)))
            return


def run(tmp_path: Path, name: str, procs: list[Any], n_per: int, batch: int,
        objects: bool = False, method: str = "fork", producers: int = 4,
        consumers: int = 4) -> None:
    ctx: Any = mp.get_context(method)
    with Queue(1024, name=name, max_message_size=4096) as q:
        cons = [ctx.Process(target=_consumer,
                            args=(name, producers, str(tmp_path / f"c{i}"), objects))
                for i in range(consumers)]
        prods = [ctx.Process(target=_producer, args=(name, i, n_per, batch, objects))
                 for i in range(producers)]
        procs.extend(cons + prods)
        for p in cons + prods:
            p.start()
        for p in prods:
            p.join(300)
            assert p.exitcode == 0
        for _ in cons:  # after every real message (FIFO): one STOP each
            if objects:
                q.put(STOP)
            else:
                q.put_bytes(STOP)
        for p in cons:
            p.join(300)
            assert p.exitcode == 0
    counts = [0] * producers
    seen_all: list[set[int]] = [set() for _ in range(producers)]
    for i in range(consumers):
        seen, bad = pickle.loads((tmp_path / f"c{i}").read_bytes())
        assert bad == 0, f"consumer {i} saw {bad} corrupted messages"
        for pid, seqs in enumerate(seen):
            assert list(seqs) == sorted(seqs), f"producer {pid} out of order at consumer {i}"
            counts[pid] += len(seqs)
            seen_all[pid].update(seqs)
    for pid in range(producers):
        assert counts[pid] == n_per, f"producer {pid}: {counts[pid]} delivered of {n_per}"
        assert seen_all[pid] == set(range(n_per)), f"producer {pid}: lost or duplicated"


def test_million_messages_4x4_exactly_once(tmp_path: Path, shm_name: str, procs: list[Any]) -> None:
    run(tmp_path, shm_name, procs, n_per=250_000, batch=64)


def test_single_puts_4x4(tmp_path: Path, shm_name: str, procs: list[Any]) -> None:
    run(tmp_path, shm_name, procs, n_per=25_000, batch=1)


def test_pickled_objects_put_many_get_many(tmp_path: Path, shm_name: str, procs: list[Any]) -> None:
    run(tmp_path, shm_name, procs, n_per=20_000, batch=16, objects=True)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_other_start_methods(tmp_path: Path, shm_name: str, procs: list[Any], method: str) -> None:
    run(tmp_path, shm_name, procs, n_per=5_000, batch=8, method=method, producers=2, consumers=2)
