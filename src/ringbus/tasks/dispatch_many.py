"""``TaskBus.dispatch_many``: many tasks in few transport calls.

Every task is resolved and encoded before any is queued, so a task that
cannot be encoded queues nothing.  Status records (and so ids) are taken a
wave at a time: the first wave's (``WAVE`` tasks, a chunk with unsigned
pickle, or a quarter of a smaller task table) before encoding, each later
wave's just before it is queued, its ids then set into the envelopes
already encoded (unsigned pickle: every payload is encoded first, and each
wave's envelopes are made with their ids, which costs less than setting
them).  So a list longer than the task table (65,536 records on shared
memory) waits for earlier tasks to finish, as a full task channel makes it
wait, instead of failing with ``StoreFull``.
"""

from __future__ import annotations

import pickle
import queue
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ringbus._ids import current_pid, new_id
from ringbus.errors import TaskTimeout
from ringbus.tasks.envelope import FLAG_REPLY, GID_OFFSET, NO_ID, TASK_HEADER, TASK_MAGIC
from ringbus.tasks.results import BusFuture, ProcState
from ringbus.tasks.routing import put_routed_many
from ringbus.transport.task_table import QUEUED, StoreFull

if TYPE_CHECKING:
    from ringbus.tasks.bus import TaskBus

__all__ = ["CHUNK", "WAVE", "dispatch_list"]

CHUNK = 512  # tasks per transport call
WAVE = 16384  # tasks per round of status records in a long list (a quarter of the table)
_RECORD_POLL = 0.002  # seconds between looks for a free status record
_monotonic = time.monotonic
_pack, _MAGIC, _dumps = TASK_HEADER.pack, TASK_MAGIC, pickle.dumps
_GID_AT, _GID_END = GID_OFFSET, GID_OFFSET + len(NO_ID)


class _Cut(Exception):
    """The channel or the task table stayed full until the deadline: the
    tasks without a future yet are not queued."""


def dispatch_list(
    bus: TaskBus,
    tasks: list[Any],
    timeout: float | None,
    chans: list[Any] | None,
) -> list[Future[Any]]:
    """Queue ``tasks`` (types resolved by the caller; ``chans``: their
    channels when any is not the default one)."""
    st = bus._st or bus._state()
    deadline = wall = 0.0
    if timeout is not None:
        deadline = bus._deadline(timeout)
        wall = time.time() + timeout
    reply, encode, pid = st.reply, bus.codec.encode_task, current_pid()
    ids = [next(st.ids) for _ in tasks]
    wave = _wave(bus)
    first = min(len(tasks), wave)  # the first wave gets its records now, the rest later
    gids: list[bytes] = []
    table = bus._records
    # Unsigned pickle: every payload now, each wave's envelopes (header with
    # its ids, reply address, payload) when its records are taken; other
    # codecs encode whole envelopes now and set the ids later (_with_gids).
    bodies: list[bytes] | None = None
    try:
        if table is None:
            gids = [new_id() for _ in range(first)]
        else:
            add = table.adder()
            for tid in ids[:first]:
                gids.append(add(QUEUED, pid, tid))
        if bus.codec.plain_pickle:  # codec._encode_plain, inline
            bodies = [_dumps(t, 5) for t in tasks]
            datas = _plain_envelopes(ids, bodies, 0, first, gids, reply, pid, deadline, wall)
            datas += [b""] * (len(tasks) - first)  # each later wave's, made with its ids
        else:
            all_gids = gids + [NO_ID] * (len(tasks) - first)  # set per wave (_with_gids)
            datas = [
                encode(t, tid, FLAG_REPLY, pid, reply, deadline, wall, gid=gid)
                for t, tid, gid in zip(tasks, ids, all_gids, strict=True)
            ]
        datas[:first] = bus._encode_many(tasks[:first], gids, datas[:first])  # middleware
    except BaseException:
        for gid in gids:
            bus._drop_task(gid)
        raise
    futs: list[Future[Any]] = []  # BusFutures (task_id); typed as before
    at = 0
    try:
        while at < len(tasks):
            end = min(len(tasks), at + wave)
            if at:  # a later wave: its records now, their ids into the envelopes
                gids = _records(bus, ids, at, end, deadline if timeout is not None else None)
                if bodies is None:
                    part = _with_gids(bus, datas[at:end], gids)
                else:
                    part = _plain_envelopes(ids, bodies, at, end, gids, reply, pid, deadline, wall)
                datas[at:end] = bus._encode_many(tasks[at:end], gids, part)
            _queue(bus, st, tasks, datas, ids, gids, at, end, chans, deadline, timeout, futs)
            at = end
    except _Cut as cut:
        while len(futs) < len(tasks):
            f = BusFuture(st)
            f.set_exception(TaskTimeout(str(cut)))
            futs.append(f)
    return futs


def _plain_envelopes(
    ids: list[int],
    bodies: list[bytes],
    at: int,
    end: int,
    gids: list[bytes],
    reply: bytes,
    pid: int,
    deadline: float,
    wall: float,
) -> list[bytes]:
    """Envelopes of unsigned pickled tasks ``at:end`` (``codec._encode_plain``,
    inline; one clock read: their queue wait counts from here)."""
    now, rlen = time.time(), len(reply)
    return [
        _pack(_MAGIC, FLAG_REPLY, 1, pid, tid, deadline, wall, rlen, gid, now) + reply + body
        for tid, gid, body in zip(ids[at:end], gids, bodies[at:end], strict=True)
    ]


def _with_gids(bus: TaskBus, datas: list[bytes], gids: list[bytes]) -> list[bytes]:
    """The envelopes with their ids set (``Codec.with_gid``; unsigned ones inline)."""
    if bus.codec.signer is not None:
        return [bus.codec.with_gid(d, g) for d, g in zip(datas, gids, strict=True)]
    return [d[:_GID_AT] + g + d[_GID_END:] for d, g in zip(datas, gids, strict=True)]


def _wave(bus: TaskBus) -> int:
    """Tasks per wave: ``WAVE``, or a quarter of a smaller task table.
    Unsigned pickle: a wave is a chunk (its records and envelopes are made
    right before it is queued, so workers start after the payloads are
    pickled, not after the records and envelopes of 16,384 tasks are made
    too: a quarter of a 20,000-task call that kept the pool idle)."""
    table = bus._records
    slots = None if table is None else table.slots
    wave = CHUNK if bus.codec.plain_pickle else WAVE
    return wave if slots is None else max(1, min(wave, slots // 4))


def _records(
    bus: TaskBus, ids: list[int], at: int, end: int, deadline: float | None
) -> list[bytes]:
    """Status records (ids) for ``ids[at:end]``: while the table is full of
    tasks not finished, wait for them to finish (until ``deadline``)."""
    gids: list[bytes] = []
    table, pid = bus._records, current_pid()
    add = None if table is None else table.adder()
    try:
        for tid in ids[at:end]:
            while True:
                try:
                    gids.append(new_id() if add is None else add(QUEUED, pid, tid))
                    break
                except StoreFull:
                    if deadline is not None and _monotonic() >= deadline:
                        raise _Cut("not queued: the task table stayed full") from None
                    time.sleep(_RECORD_POLL)
    except _Cut:
        for gid in gids:
            bus._drop_task(gid)
        raise
    return gids


def _queue(
    bus: TaskBus,
    st: ProcState,
    tasks: list[Any],
    datas: list[bytes],
    ids: list[int],
    gids: list[bytes],
    at: int,
    end: int,
    chans: list[Any] | None,
    deadline: float,
    timeout: float | None,
    futs: list[Future[Any]],
) -> None:
    """Queue ``tasks[at:end]`` (``gids``: their ids) a chunk at a time:
    workers start on the first while the futures of the rest are built (one
    call for 100,000 tasks kept the pool idle that long: 190k against 315k
    tasks/s).  Raises ``_Cut`` when the channel stayed full until the
    deadline (the futures of what was not queued fail)."""
    pending = st.pending
    for lo in range(at, end, CHUNK):
        hi = min(end, lo + CHUNK)
        tids, part_gids = ids[lo:hi], gids[lo - at : hi - at]
        for tid, gid in zip(tids, part_gids, strict=True):
            bfut = BusFuture(st)
            bfut.task_id = gid.hex()  # format_id(), inline
            futs.append(bfut)
            pending[tid] = bfut
        left = None if timeout is None else max(0.0, deadline - _monotonic())
        try:
            if chans is None:
                bus.transport.put_tasks(datas[lo:hi], left)
            else:
                put_routed_many(bus, chans[lo:hi], datas[lo:hi], left)
        except queue.Full as exc:
            done = getattr(exc, "done", 0)
            why = "not queued: the task channel stayed full"
            for tid, f in zip(tids[done:], futs[lo + done :], strict=True):
                pending.pop(tid, None)
                f.set_exception(TaskTimeout(why))
            for gid in gids[lo - at + done :]:  # not queued: no status record either
                bus._drop_task(gid)
            bus._dispatched(*part_gids[:done])
            bus._arm_all(st, deadline, timeout, tids[:done], tasks[lo : lo + done])
            raise _Cut(why) from None
        except BaseException:
            for tid in tids:  # earlier chunks are queued: their results still come
                pending.pop(tid, None)
            for gid in gids[lo - at :]:
                bus._drop_task(gid)
            raise
        bus._dispatched(*part_gids)
        bus._arm_all(st, deadline, timeout, tids, tasks[lo:hi])
