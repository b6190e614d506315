"""Named queues and priorities on shared memory: one ring per channel.

A channel is a (queue, priority) pair.  ("default", 0) is the bus's task
ring ``/ringbus-<bus>-tasks``, untouched; every other channel has a ring of
its own, ``/ringbus-<bus>-tasks.<queue>.<priority>``, made (persistent) by
the first producer that uses it, so a full or slow queue never blocks
another and one queue's backlog never sits in front of another's tasks.

Waking consumers that serve several channels: a producer that queued on any
channel but ("default", 0) fills the bus's *queue bell*
``/ringbus-<bus>-qbell``, a small ring of tokens.  Filling (not one token)
makes it a broadcast: every worker asleep on it wakes, looks at its channels
in order and sleeps again if they are empty; a token stolen by a worker of
other queues therefore never leaves a worker of this queue asleep.  Puts on
("default", 0) stay exactly as they were (no bell): a worker that serves
the default queue among others also wakes every ``_DEFAULT_POLL`` seconds
while idle, to look at it.  A worker serving the default queue alone, with
no priority rings, blocks directly on the task ring, as before.
"""

from __future__ import annotations

import contextlib
import os
import queue
from collections.abc import Callable
from typing import Any

from ringbus import _names
from ringbus.errors import RingClosed, RingError, TransportClosed
from ringbus.queue import Queue
from ringbus.transport.base import JOURNAL_DATA_AT

__all__ = ["ShmQueues"]

_BELL_SLOTS = 64  # tokens: more than the workers that sleep on one bus, in practice
_TOKENS = [b"!"] * _BELL_SLOTS
_DEFAULT_POLL = 0.02  # an idle multi-channel worker looks at the default ring this often
_IDLE = 1.0  # then queue.Empty: the worker checks its channels still exist
AGING_EVERY = 32
"""Takes in a row from above a queue's lowest priority before one aging take."""


class _MultiTaker:
    """``take()`` over several rings: queues in strict order, within a queue
    the highest priority first, with aging (below); when all are empty it
    sleeps on the queue bell (see the module docstring)."""

    __slots__ = ("bell", "groups", "journal", "poll", "streak", "t")

    def __init__(
        self, t: ShmQueues, journal: Any, groups: list[list[Queue]], bell: Queue
    ) -> None:
        self.t = t
        self.journal = journal
        self.groups = groups  # one list per served queue, priority 9 first
        self.bell = bell
        default = _names.task_ring_name(t.bus_name)
        polls = any(q.name == default for g in groups for q in g)
        self.poll = _DEFAULT_POLL if polls else _IDLE
        self.streak = 0

    def _take_once(self) -> bytes | None:
        journal = self.journal
        for g in self.groups:
            last = len(g) - 1
            if last and self.streak >= AGING_EVERY:
                # Aging: after AGING_EVERY takes in a row above the lowest
                # priority of a queue, one take starts from the bottom, so a
                # steady stream of urgent tasks cannot starve the rest.
                for q in reversed(g):
                    try:
                        data = q.get_bytes_recorded(journal, 0, JOURNAL_DATA_AT, False)
                    except queue.Empty:
                        continue
                    self.streak = 0
                    return data
                continue
            for i, q in enumerate(g):
                try:
                    data = q.get_bytes_recorded(journal, 0, JOURNAL_DATA_AT, False)
                except queue.Empty:
                    continue
                self.streak = self.streak + 1 if i < last else 0
                return data
        return None

    def __call__(self) -> bytes:
        t = self.t
        slept = 0.0
        while True:
            if t._interrupted:
                raise TransportClosed(f"task channels of bus {t.bus_name!r} were interrupted")
            if t._rescan:
                raise queue.Empty  # the worker builds its taker again
            try:
                data = self._take_once()
                if data is not None:
                    return data
                self.bell.get_bytes(True, self.poll)
            except queue.Empty:
                slept += self.poll
                if slept >= _IDLE:
                    raise
            except RingClosed:
                if t._interrupted:
                    raise
                raise queue.Empty from None  # closed by rescan()


class ShmQueues:
    """The queue methods of ``ShmTransport`` (a mixin: see ``Transport``)."""

    bus_name: str
    maxsize: int
    slot_size: int
    max_message_size: int | None
    _interrupted: bool
    _in: Queue | None
    put_task: Callable[..., None]
    put_tasks: Callable[..., None]
    router: Callable[[bytes], tuple[str, int]] | None

    def _reset_queues(self) -> None:
        self._served: list[str] | None = None
        self._chan_out: dict[tuple[str, int], Queue] = {}
        self._chan_in: dict[str, Queue] = {}
        self._bell_out: Queue | None = None
        self._bell_in: Queue | None = None
        self._rescan = False
        self._rescan_closed = False
        self._key_cache: tuple[int, object] | None = None

    # -------------------------------------------------------- producers

    def _channel(self, q: str, priority: int) -> Queue:
        ring = self._chan_out.get((q, priority))
        if ring is None:
            name = _names.channel_ring_name(self.bus_name, q, priority)
            ring = Queue.open(
                name, self.maxsize, slot_size=self.slot_size, max_message_size=self.max_message_size
            )
            self._chan_out[(q, priority)] = ring
        return ring

    def _bell(self) -> Queue:
        if self._bell_out is None:
            self._bell_out = Queue.open(
                _names.queue_bell_name(self.bus_name), _BELL_SLOTS, slot_size=64,
                max_message_size=64,
            )  # fmt: skip
        return self._bell_out

    def _ring_bell(self) -> None:
        with contextlib.suppress(queue.Full):
            self._bell().put_bytes_many(_TOKENS, False)

    def put_task_to(
        self, queue_name: str, priority: int, data: bytes, timeout: float | None = None
    ) -> None:
        if queue_name == _names.DEFAULT_QUEUE and priority == 0:
            self.put_task(data, timeout)
            return
        self._channel(queue_name, priority).put_bytes(data, True, timeout)
        self._ring_bell()

    def put_tasks_to(
        self, queue_name: str, priority: int, items: list[bytes], timeout: float | None = None
    ) -> None:
        if queue_name == _names.DEFAULT_QUEUE and priority == 0:
            self.put_tasks(items, timeout)
            return
        try:
            self._channel(queue_name, priority).put_bytes_many(items, True, timeout)
        finally:
            self._ring_bell()  # also after a partial put: those tasks are queued

    def _put_due(self, items: list[bytes]) -> None:
        """Due delayed envelopes, each into its own channel (the task layer's
        ``router`` says which), runs of one channel in one call."""
        router = self.router
        if router is None:
            self.put_tasks(items)
            return
        run: list[bytes] = []
        chan: tuple[str, int] | None = None
        for data in items:
            c = router(data)
            if c != chan and run:
                assert chan is not None
                self.put_tasks_to(chan[0], chan[1], run)
                run = []
            chan = c
            run.append(data)
        if run and chan is not None:
            self.put_tasks_to(chan[0], chan[1], run)

    # -------------------------------------------------------- consumers

    def serve(self, queues: list[str]) -> None:
        for q in queues:
            _names.validate_queue_name(q)
        self._served = list(queues)
        for q in self._served:  # a server makes its queues' rings: tasks may wait there
            self._channel(q, 0)

    def _existing(self) -> dict[tuple[str, int], str]:
        """(queue, priority) -> ring name of every channel ring of the bus."""
        out: dict[tuple[str, int], str] = {}
        try:
            names = os.listdir(_names.SHM_DIR)
        except OSError:
            return out
        for name in names:
            chan = _names.parse_channel(self.bus_name, name)
            if chan is not None:
                out[chan] = "/" + name
        return out

    def _served_rings(self) -> list[list[str]]:
        """Ring names of the served channels in taking order: one list per
        queue (in the order served), priority 9 first."""
        served = self._served or [_names.DEFAULT_QUEUE]
        have = self._existing()
        out: list[list[str]] = []
        for q in served:
            group: list[str] = []
            for p in range(9, -1, -1):
                name = have.get((q, p))
                if name is None and p == 0:
                    name = _names.channel_ring_name(self.bus_name, q, 0)
                if name is not None:
                    group.append(name)
            out.append(group)
        return out

    def channels_key(self) -> object:
        # A new ring is a new file: while /dev/shm's mtime stands still, no listing.
        try:
            mtime = os.stat(_names.SHM_DIR).st_mtime_ns
        except OSError:
            mtime = -1
        cached = self._key_cache
        if cached is not None and cached[0] == mtime:
            return cached[1]
        key = tuple(tuple(g) for g in self._served_rings())
        self._key_cache = (mtime, key)
        return key

    def _fast(self, groups: list[list[str]]) -> bool:
        """Only the task ring to take from: block on it directly (as before)."""
        return groups == [[_names.task_ring_name(self.bus_name)]]

    def _multi_taker(self, journal: Any, groups: list[list[str]]) -> Callable[[], bytes]:
        self._rescan = False
        handles: list[list[Queue]] = []
        for names in groups:
            handles.append([])
            for name in names:
                q = self._chan_in.get(name)
                if q is None:
                    try:
                        q = Queue.attach(name)
                    except RingError:
                        q = Queue.open(
                            name, self.maxsize, slot_size=self.slot_size,
                            max_message_size=self.max_message_size,
                        )  # fmt: skip
                    self._chan_in[name] = q
                handles[-1].append(q)
        if self._bell_in is None:
            self._bell()
            self._bell_in = Queue.attach(_names.queue_bell_name(self.bus_name))
        return _MultiTaker(self, journal, handles, self._bell_in)

    def _check_queues(self) -> None:
        """Idle: drop handles of channel rings removed or made anew."""
        for name, q in list(self._chan_in.items()):
            st = None
            with contextlib.suppress(OSError):
                st = os.stat(_names.shm_path(name))
            if st is None or q.stats().get("created_unix_ns") != _created_ns(name):
                self._chan_in.pop(name, None)
                q.close()

    def rescan(self) -> None:
        # Runs in signal handlers: no locks, only flags and close() (which
        # wakes this process's waiters, as interrupt() does).
        self._rescan = True
        q = self._in
        if q is not None:
            self._in = None
            self._rescan_closed = True
            q.close()
        bell = self._bell_in
        if bell is not None:
            self._bell_in = None
            bell.close()

    def rescanning(self) -> bool:
        was, self._rescan_closed = self._rescan_closed, False
        return was and not self._interrupted

    def _interrupt_queues(self) -> None:
        for q in [*self._chan_in.values(), self._bell_in]:
            if q is not None:
                q.close()

    def queue_depths(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for chan, name in sorted(self._existing().items()):
            with contextlib.suppress(RingError, ValueError):
                from ringbus.queue import read_stats

                out[chan] = int(read_stats(name)["depth"])
        return out

    # -------------------------------------------------------- lifecycle

    def _close_queues(self) -> None:
        handles = [*self._chan_out.values(), *self._chan_in.values(), self._bell_out, self._bell_in]
        self._chan_out.clear()
        self._chan_in.clear()
        self._bell_out = self._bell_in = None
        for q in handles:
            if q is not None:
                q.close()

    def _queue_ring_names(self) -> list[str]:
        """Every channel ring but the task ring, and the queue bell."""
        names = [n for c, n in self._existing().items() if c != (_names.DEFAULT_QUEUE, 0)]
        return [*names, _names.queue_bell_name(self.bus_name)]

    def _destroy_queues(self) -> None:
        for name in self._queue_ring_names():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_names.shm_path(name))


def _created_ns(name: str) -> object:
    from ringbus.queue import read_stats

    try:
        return read_stats(name).get("created_unix_ns")
    except (RingError, ValueError):
        return None
