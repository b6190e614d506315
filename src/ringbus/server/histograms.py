"""Task run-time and queue-wait histograms, kept in the pool-state segment.

Each worker slot of the pool state ends in a *histogram area* (its size is
in the segment's header, ``pool_state.HIST_AREA_OFF``).  Only the worker
process that owns the slot writes it, with plain stores (no lock, no
syscall: ``_ring.HistWriter``, in C, as it runs once per task); readers
(``ringbus stats``, the Prometheus collector) copy it and tolerate a torn
read of one counter (the writer's 8-byte stores are atomic).  Counts are per bucket (not
cumulative), so a reader's count is the sum of its buckets and the ``+Inf``
bucket always equals the count.

The area is **not** reset when the supervisor gives the slot to a new
worker: the next worker goes on from the counts there.  Pool-wide totals
are then plain sums over the slots, and they never go down, whatever dies
and when (folding a dead worker's counts into header totals would need the
supervisor to act before the next scrape, and a reader racing the fold
could count them twice or not at all).

Area layout (all little-endian, every counter 8-byte aligned)::

    0     u32  entries in use (an entry is filled before this counts it)
    4     u32  reserved
    8     u64  reserved
    16    ENTRIES x ENTRY_SIZE:
          0    u8  task type length   1  u8 queue length   2..8 reserved
          8    task type (UTF-8) [128]
          136  queue name [120]
          256  run time:   NB x u64 bucket counts, then f64 sum (seconds)
          424  queue wait: NB x u64 bucket counts, then f64 sum (seconds)
          592  outcomes: u64 started, succeeded, failed, retried, dead-lettered

One entry per task type a worker of the slot has run; the last entry is
``OTHER``, for the types that came when every other entry was taken.

Outcomes: *started* and *succeeded* are counted with the times (a task
whose handler ran is started when it ends, or when its worker is lost and
the next attempt ends); *failed* (for good: last attempt raised, every
worker died, time limit, undecodable), *retried* and *dead-lettered* where
the worker decides them (``WorkerBase``).

What is observed, once per task whose handler ran (whatever its outcome):
run time, from when the worker took the task until it was done with it
(its handler returned or raised and its answer is sent; in-worker retry
backoffs included); queue wait, from when the
task was queued, or became due (a delayed task, a retry held by the timer
store), until a worker took it.  Envelopes that do not say when they were
queued (layouts 0xB1 and 0xB3) have no queue wait.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "BOUNDS",
    "DEAD_LETTERED",
    "FAILED",
    "HIST_AREA",
    "HIST_LAYOUT",
    "OTHER",
    "OUTCOMES",
    "RETRIED",
    "Histogram",
    "SlotHistograms",
    "TaskTimes",
    "merge_into",
    "read_area",
    "times_doc",
    "total",
]

BOUNDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
"""Upper bounds (``le``, seconds) of the buckets; a last one is ``+Inf``.
Log-spaced 1-2.5-5 like Dramatiq's defaults, from 100 us (a ringbus task
often runs in microseconds: a first bucket of 1 ms would hold them all) to
5 minutes (a queue wait in a backlog)."""
NB = len(BOUNDS) + 1
HIST_LAYOUT = 2
"""Version of the layout above (header field ``pool_state.HIST_LAYOUT_OFF``)."""
AREA_HEAD = 16
TYPE_MAX, QUEUE_MAX = 128, 120
KEY_SIZE = 256
HIST_SIZE = NB * 8 + 8
OUTCOMES = ("started", "succeeded", "failed", "retried", "dead_lettered")
STARTED, SUCCEEDED, FAILED, RETRIED, DEAD_LETTERED = range(len(OUTCOMES))
ENTRY_SIZE = KEY_SIZE + 2 * HIST_SIZE + 8 * len(OUTCOMES)
HIST_AREA = 2 * 4096 - 512
"""Bytes at the end of every slot: a page more per slot than before, for a
journal of a whole number of pages (the slot head is 512 bytes)."""
ENTRIES = (HIST_AREA - AREA_HEAD) // ENTRY_SIZE
OTHER = "(other)"
"""Task type of the last entry: types that found every other entry taken."""

_U32 = struct.Struct("<I")
_KEY = struct.Struct("<BB")
_HIST = struct.Struct(f"<{NB}Qd")
_OUTCOMES = struct.Struct(f"<{len(OUTCOMES)}Q")
_Q_RUN = KEY_SIZE // 8  # in an entry, in 8-byte words: run time, then queue wait

assert ENTRY_SIZE % 8 == 0 and HIST_AREA % 8 == 0 and ENTRIES >= 2


def _words(i: int) -> int:
    """Word offset of the run-time buckets of entry ``i``."""
    return (AREA_HEAD + i * ENTRY_SIZE) // 8 + _Q_RUN


class SlotHistograms:
    """The writer of one slot's area (the worker process that owns it).

    ``observe(started, enqueued, task_type, data)`` counts one task done
    with: ``started`` is when the worker took it (``time.monotonic()``),
    ``enqueued`` when it was queued or became due (Unix seconds; 0: not
    known), ``data`` its envelope (its queue names the entry of a new task
    type).  The counting is ``_ring.HistWriter`` (C: it runs once per task);
    the entries' keys are written here, once per task type."""

    __slots__ = ("_buf", "_n", "count", "observe", "writer")

    def __init__(self, mm: Any, offset: int) -> None:
        from ringbus._ring import HistWriter

        self._buf = memoryview(mm)[offset : offset + HIST_AREA]
        self.writer = HistWriter(mm, offset, HIST_AREA, BOUNDS, self._add)
        self.observe = self.writer.observe
        self.count = self.writer.count  # (task type, envelope, outcome): failed, retried...
        # The slot may have served other workers: go on from their entries.
        self._n = min(_U32.unpack_from(self._buf, 0)[0], ENTRIES)
        entries = self.writer.entries  # task type -> word offset of its run-time buckets
        for i, (name, *_) in enumerate(_entries(bytes(self._buf), self._n)):
            entries.setdefault(name, _words(i))

    def _add(self, task_type: str, data: bytes) -> int:
        """The word offset of a new entry for ``task_type`` (or of OTHER)."""
        n = self._n
        if n >= ENTRIES - 1:
            if n == ENTRIES - 1:  # OTHER's first use
                self._write_key(ENTRIES - 1, OTHER, "")
                self._publish(ENTRIES)
            return _words(ENTRIES - 1)
        from ringbus.tasks.envelope import route_of  # once per task type

        queue = route_of(data)[0] if data else ""
        self._write_key(n, task_type or "(unknown)", queue)
        self._publish(n + 1)
        return _words(n)

    def _write_key(self, i: int, task_type: str, queue: str) -> None:
        at = AREA_HEAD + i * ENTRY_SIZE
        t = task_type.encode("utf-8", "replace")[:TYPE_MAX]
        qb = queue.encode("ascii", "replace")[:QUEUE_MAX]
        buf = self._buf
        buf[at + 8 : at + 8 + len(t)] = t
        buf[at + 8 + TYPE_MAX : at + 8 + TYPE_MAX + len(qb)] = qb
        buf[at + KEY_SIZE : at + ENTRY_SIZE] = bytes(ENTRY_SIZE - KEY_SIZE)  # unpublished: 0
        _KEY.pack_into(buf, at, len(t), len(qb))

    def _publish(self, n: int) -> None:
        _U32.pack_into(self._buf, 0, n)
        self._n = n

    def release(self) -> None:
        self.writer.release()
        self._buf.release()


@dataclass(frozen=True, slots=True)
class Histogram:
    """Bucket counts (per bucket, the last one ``+Inf``) and the sum of the
    observed values (seconds)."""

    buckets: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def cumulative(self) -> list[tuple[float, int]]:
        """(le, observations <= le) for every bound, then (inf, count)."""
        out: list[tuple[float, int]] = []
        n = 0
        for le, c in zip((*BOUNDS, float("inf")), self.buckets, strict=True):
            n += c
            out.append((le, n))
        return out

    def quantile(self, q: float) -> float | None:
        """An estimate of the ``q`` quantile (0..1) as Prometheus's
        ``histogram_quantile`` makes it: linear within the bucket, the
        highest finite bound for the ``+Inf`` bucket.  None: no observation."""
        total = self.count
        if not total:
            return None
        rank = q * total
        below = 0
        for i, c in enumerate(self.buckets):
            if c and below + c >= rank:
                if i == len(BOUNDS):
                    return BOUNDS[-1]
                lo = BOUNDS[i - 1] if i else 0.0
                return lo + (BOUNDS[i] - lo) * (rank - below) / c
            below += c
        return BOUNDS[-1]

    def doc(self) -> dict[str, Any]:
        """For ``ringbus stats --json``: cumulative buckets and estimates."""
        return {
            "count": self.count,
            "sum": self.sum,
            "buckets": [["+Inf" if le == float("inf") else le, n] for le, n in self.cumulative()],
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
        }


EMPTY = Histogram((0,) * NB, 0.0)


NO_OUTCOMES = (0,) * len(OUTCOMES)


class TaskTimes(NamedTuple):
    """The run time, queue wait and outcome counts (``OUTCOMES`` order) of
    one (task type, queue)."""

    run: Histogram
    wait: Histogram
    outcomes: tuple[int, ...] = NO_OUTCOMES


Entry = tuple[str, str, Histogram, Histogram, tuple[int, ...]]


def _entries(raw: bytes, n: int) -> list[Entry]:
    out = []
    for i in range(min(n, ENTRIES)):
        at = AREA_HEAD + i * ENTRY_SIZE
        if at + ENTRY_SIZE > len(raw):
            break
        tlen, qlen = _KEY.unpack_from(raw, at)
        if not 0 < tlen <= TYPE_MAX or qlen > QUEUE_MAX:
            break  # not written by a worker: read no further
        name = raw[at + 8 : at + 8 + tlen].decode("utf-8", "replace")
        queue = raw[at + 8 + TYPE_MAX : at + 8 + TYPE_MAX + qlen].decode("ascii", "replace")
        run = _HIST.unpack_from(raw, at + KEY_SIZE)
        wait = _HIST.unpack_from(raw, at + KEY_SIZE + HIST_SIZE)
        outcomes = _OUTCOMES.unpack_from(raw, at + KEY_SIZE + 2 * HIST_SIZE)
        out.append(
            (name, queue, Histogram(run[:NB], run[NB]), Histogram(wait[:NB], wait[NB]), outcomes)
        )
    return out


def read_area(mm: Any, offset: int) -> list[Entry]:
    """(task type, queue, run time, queue wait, outcomes) of every entry of the area at
    ``offset`` (one copy of the entries in use)."""
    (n,) = _U32.unpack_from(mm, offset)
    n = min(n, ENTRIES)
    return _entries(bytes(mm[offset : offset + AREA_HEAD + n * ENTRY_SIZE]), n)


def _add(a: Histogram, b: Histogram) -> Histogram:
    return Histogram(tuple(x + y for x, y in zip(a.buckets, b.buckets, strict=True)), a.sum + b.sum)


def _sum(a: TaskTimes, b: TaskTimes) -> TaskTimes:
    return TaskTimes(
        _add(a.run, b.run),
        _add(a.wait, b.wait),
        tuple(x + y for x, y in zip(a.outcomes, b.outcomes, strict=True)),
    )


def merge_into(out: dict[tuple[str, str], TaskTimes], entries: list[Entry]) -> None:
    """Add a slot's entries to ``out`` ((task type, queue) -> times)."""
    for name, queue, run, wait, outcomes in entries:
        t = TaskTimes(run, wait, outcomes)
        prev = out.get((name, queue))
        out[(name, queue)] = t if prev is None else _sum(prev, t)


def total(times: dict[tuple[str, str], TaskTimes]) -> TaskTimes:
    """Every task type together."""
    out = TaskTimes(EMPTY, EMPTY)
    for t in times.values():
        out = _sum(out, t)
    return out


def times_doc(times: dict[tuple[str, str], TaskTimes]) -> list[dict[str, Any]]:
    """``ringbus stats --json``: one row per (task type, queue), then when
    there are several, a row of every type together (``task_type`` null)."""
    rows: list[dict[str, Any]] = [
        {
            "task_type": task_type,
            "queue": queue,
            "run_seconds": t.run.doc(),
            "queue_wait_seconds": t.wait.doc(),
            "tasks": dict(zip(OUTCOMES, t.outcomes, strict=True)),
        }
        for (task_type, queue), t in sorted(times.items())
    ]
    if len(rows) > 1:
        t = total(times)
        rows.append(
            {
                "task_type": None,
                "queue": None,
                "run_seconds": t.run.doc(),
                "queue_wait_seconds": t.wait.doc(),
                "tasks": dict(zip(OUTCOMES, t.outcomes, strict=True)),
            }
        )
    return rows
