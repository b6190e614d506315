"""A worker's results and acknowledgements, pipelined per batch.

The worker hands a result over (``put``) and goes on; everything handed
over since the last round trip goes out in one pipeline: the results (one
script, ``SEND_GROUPED``: one RPUSH per reply list, only while its
dispatcher listens), then the XACK of the tasks finished meanwhile.  Redis
runs a pipeline in order, so a task is acknowledged only after its result
was delivered, as before; a worker killed before the round trip leaves its
tasks pending, to be delivered again.  No timer: what arrives while a round
trip is in flight rides the next.  A task's status writes (``put_commands``,
``redis_status``) go ahead of the results queued after them, in the same
round trip.

Who sends: in a concurrent worker, one sending thread per process, woken
by a put when idle.  A one-at-a-time worker (``t._rides``: it takes with
``take_task``) reads its next task right after it answered: its results and
acknowledgements ride that read's pipeline (``ride``), ahead of the
XREADGROUP, which saves a round trip and a thread wake-up per task; what a
last read did not carry is sent at ``close``, and a status write that must
go now (progress) wakes the thread.  One batch is in flight at a time, so
the order of results, statuses and acknowledgements holds either way.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ringbus.errors import BrokerUnavailable, TransportClosed
from ringbus.transport.redis_conn import redis
from ringbus.transport.redis_scripts import SEND_GROUPED
from ringbus.transport.redis_wire import pipeline as wire_pipeline

__all__ = ["ReplySender"]

log = logging.getLogger("ringbus.redis")

MAX_BATCH = 1024  # results and acknowledgements per round trip (below Lua's unpack limit)

Item = tuple[str | None, bytes]  # (reply key, result) or (None, entry id)
Cmd = tuple[Any, ...]
# commands, results by reply list, acks, number of status and XACK commands
Plan = tuple[list[Cmd], dict[str, list[bytes]], list[bytes], int, int]


class ReplySender:
    """Results, statuses and acknowledgements of one worker process (``t``:
    its RedisTransport).  A put takes no lock (a deque append); the sending
    thread sleeps on a SimpleQueue, woken by a token only when it said it is
    idle."""

    def __init__(self, t: Any) -> None:
        self.t = t
        self._items: deque[Item] = deque()
        self._lock = threading.Lock()  # batches, statuses and holds(): one view
        self._status: list[Cmd] = []  # task status writes, sent ahead (put_commands)
        self._status_due = False  # a status write asked to go now, not with the next item
        self._inflight: list[bytes] = []
        self._busy = False  # a batch is in flight (one at a time)
        self._idle = False  # the thread waits for a token (a put must send one)
        self._wake: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._drained = threading.Condition(threading.Lock())  # waits for _busy to clear
        self._closing = False
        self._thread: threading.Thread | None = None
        self._conn: Any = None  # redis.Connection of the sending thread
        self._kick: Callable[[], None] | None = None  # a worker's loop reads (redis_loop)
        self.rounds = 0

    def on_loop(self, kick: Callable[[], None] | None) -> None:
        """A worker's loop reads from now on: what is queued rides them, and
        ``kick`` decides when the sending thread must send it instead."""
        self._kick = kick

    def queued(self) -> bool:
        return bool(self._items or self._status)

    def wake_thread(self) -> None:
        """The sending thread sends what is queued (started if need be)."""
        self._poke()

    def put(self, key: str, data: bytes, block: bool = True) -> None:
        """Queue a result for ``key`` (a reply list of this bus)."""
        if self._closing:
            raise TransportClosed("the result sender is closed")
        self._items.append((key, data))  # first, then the flag (see _run)
        if self._kick is not None:
            self._kick()
        elif not self.t._rides:  # else the putting thread's next read carries it
            self._poke()

    def put_commands(self, cmds: list[Cmd], wake: bool = True) -> None:
        """Queue commands (a task's status: ``redis_status``) to run ahead of
        the results queued after them, in the same or an earlier round trip;
        ``wake=False``: they wait for the next item (the task's result or
        acknowledgement, which follows) or a later wake."""
        if self._closing:
            raise TransportClosed("the result sender is closed")
        with self._lock:
            self._status.extend(cmds)
            if wake:
                self._status_due = True
        if self._kick is not None:
            if wake:
                self._kick()
        elif wake:
            self._poke()
        elif self._thread is None and not self.t._rides:
            self._start()

    def ack(self, entry_id: bytes) -> bool:
        """Queue an acknowledgement behind the results queued before it
        (False when closing, or no result went this way: the caller
        acknowledges another way)."""
        if self._closing or (self._thread is None and not self.t._rides and self._kick is None):
            return False
        self._items.append((None, entry_id))
        if self._kick is not None:
            self._kick()
        elif not self.t._rides and self._idle:
            self._idle = False
            self._wake.put(1)
        return True

    def holds(self) -> list[bytes]:
        """Entry ids whose acknowledgement is queued or in flight."""
        with self._lock:
            return [d for k, d in list(self._items) if k is None] + self._inflight

    def _poke(self) -> None:
        if self._idle:
            self._idle = False
            self._wake.put(1)
        elif self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="ringbus-redis-sender", daemon=True
            )
        self._thread.start()

    def _take(self) -> tuple[list[Item], list[Cmd]] | None:
        """The next batch (None: one is in flight, or nothing is queued)."""
        with self._lock:
            if self._busy:
                return None
            items = self._items
            batch = [items.popleft() for _ in range(min(len(items), MAX_BATCH))]
            status, self._status, self._status_due = self._status, [], False
            if not batch and not status:
                return None
            self._inflight = [d for k, d in batch if k is None]
            self._busy = True
        return batch, status

    def _sent(self) -> None:
        with self._lock:
            self._inflight = []
            self._busy = False
        with self._drained:
            self._drained.notify_all()

    def _run(self) -> None:
        pid = os.getpid()
        items = self._items
        while True:
            if os.getpid() != pid:
                return
            if not items and not self._status_due:
                if self._closing:
                    return
                self._idle = True  # first, then look again: a put either sees it or is seen
                if not items and not self._status_due and not self._closing:
                    self._wake.get()  # a stale token only costs one more look
                self._idle = False
                continue
            if self._busy:  # a read carries a batch (see ride): after it
                with self._drained:
                    self._drained.wait_for(lambda: not self._busy, 1.0)
                continue
            got = self._take()
            if got is None:
                continue
            try:
                self._send(*got)
            except Exception:
                log.exception("ringbus: sending results failed")
            finally:
                self._sent()

    # -------------------------------------------------------- one batch

    def _plan(self, batch: list[Item], status: list[Cmd]) -> Plan:
        """The commands that send ``batch`` behind ``status``."""
        t = self.t
        groups: dict[str, list[bytes]] = {}  # reply key -> its results, in order
        acks: list[bytes] = []
        for k, d in batch:
            if k is None:
                acks.append(d)
            else:
                got = groups.get(k)
                if got is None:
                    groups[k] = [d]
                else:
                    got.append(d)
        cmds = _squash(status)
        n_status = len(cmds)
        if groups:
            keys: list[str] = []
            args: list[Any] = [int(t.reply_ttl)]
            for k, ds in groups.items():
                keys += [k, f"{k}:alive"]
                args.append(len(ds))
                args += ds
            # EVAL, not EVALSHA: a Redis that forgot the script (restarted,
            # flushed) must not run the XACK behind a failed NOSCRIPT.  Redis
            # caches the compiled script by its digest all the same.
            cmds.append(("EVAL", SEND_GROUPED, len(keys), *keys, *args))
        ack_cmds = t._xack_commands(acks)  # one XACK per channel stream
        return cmds + ack_cmds, groups, acks, n_status, len(ack_cmds)

    def _send(self, batch: list[Item], status: list[Cmd], patience: float | None = None) -> None:
        t = self.t
        cmds, groups, acks, n_status, n_ack = self._plan(batch, status)
        self.rounds += 1
        try:
            out = t._retrying(
                lambda r: self._pipeline(r, cmds),
                "sending results",
                lambda: self._closing,
                patience=patience,
            )
        except (TransportClosed, BrokerUnavailable) as exc:
            log.warning(
                "ringbus: dropping %d result(s) and %d status write(s): %s",
                len(batch) - len(acks),
                len(status),
                exc,
            )
            t._to_ack.extend(acks)  # tried again at close, else delivered again
            return
        if out and isinstance(out[0], redis.ResponseError) and t._moved(out[0]):
            self._conn = None  # a Redis Cluster moved the bus's slot: nothing ran there
            self._send(batch, status, patience)
            return
        self._check(out[n_status:], groups, acks, n_ack)  # statuses: best effort

    def _check(
        self, out: list[Any], groups: dict[str, list[bytes]], acks: list[bytes], n_ack: int
    ) -> None:
        if groups:
            sent = out[0]
            if isinstance(sent, Exception):
                n = sum(len(ds) for ds in groups.values())
                log.warning("ringbus: dropping %d result(s): %s", n, sent)
            else:
                for (k, ds), ok in zip(groups.items(), sent, strict=False):
                    if not ok:
                        log.warning(
                            "dropping %d result(s): the dispatcher of %s is gone", len(ds), k
                        )
        failed = [o for o in out[len(out) - n_ack :] if isinstance(o, Exception)]
        if acks and failed:
            log.warning("ringbus: acknowledging %d task(s): %s", len(acks), failed[0])
        elif acks:
            self.t._acked(len(acks))  # counts toward the next trim

    def _pipeline(self, r: Any, cmds: list[Cmd]) -> list[Any]:
        """The commands in one round trip on this thread's own connection
        (redis-py's pipeline would ask SCRIPT EXISTS first, every time)."""
        if self._conn is None:
            self._conn = self.t._raw_connection(self.t.stream)
        return wire_pipeline(self._conn, cmds)

    # -------------------------------------------------------- riding a read

    def ride(self) -> tuple[list[Cmd], Any] | None:
        """What is queued, as commands to send ahead of a read (None: nothing,
        or a batch is in flight); the read then calls ``rode`` with their
        replies or ``fell`` on error."""
        if self._closing or not (self._items or self._status):
            return None
        got = self._take()
        if got is None:
            return None
        batch, status = got
        cmds, groups, acks, n_status, n_ack = self._plan(batch, status)
        self.rounds += 1
        return cmds, (batch, status, groups, acks, n_status, n_ack)

    def rode(self, token: Any, out: list[Any]) -> None:
        batch, status, groups, acks, n_status, n_ack = token
        try:
            if out and isinstance(out[0], redis.ResponseError) and self.t._moved(out[0]):
                self._give_back(batch, status)  # nothing ran there: with the next read
                return
            self._check(out[n_status:], groups, acks, n_ack)
        finally:
            self._sent()

    def fell(self, token: Any) -> None:
        """The read failed: the batch goes with the next one (a result that
        did arrive arrives twice; its dispatcher keeps the first)."""
        try:
            self._give_back(token[0], token[1])
        finally:
            self._sent()

    def _give_back(self, batch: list[Item], status: list[Cmd]) -> None:
        with self._lock:
            self._items.extendleft(reversed(batch))
            self._status[:0] = status

    # -------------------------------------------------------- closing

    def close(self, timeout: float) -> list[bytes]:
        """Send what is queued (waiting up to ``timeout`` s), stop; returns the
        entry ids still to acknowledge."""
        end = time.monotonic() + timeout
        if self._thread is not None:
            with self._lock:
                self._status_due = True  # status writes waiting for company: now
            self._poke()
            with self._drained:
                self._drained.wait_for(
                    lambda: not self._items and not self._status and not self._busy, timeout
                )
        else:  # what rode no read (the worker stopped after its last task)
            while (self._items or self._status) and (left := end - time.monotonic()) > 0:
                got = self._take()
                if got is None:
                    break
                try:
                    self._send(*got, patience=left)
                finally:
                    self._sent()
        self._closing = True
        self._wake.put(1)
        with self._lock:
            left_ids = [d for k, d in self._items if k is None] + self._inflight
            self._items.clear()
            self._status.clear()
        return left_ids


def _squash(status: list[Cmd]) -> list[Cmd]:
    """Status commands with each run of single-key DELs (the ends of tasks
    without kept results) as one DEL: one command for Redis, not one a task."""
    out: list[Cmd | list[Any]] = []
    run: list[Any] | None = None
    for cmd in status:
        if cmd[0] == "DEL":
            if run is None:
                run = ["DEL"]
                out.append(run)
            run.extend(cmd[1:])
        else:
            run = None
            out.append(cmd)
    return [tuple(c) for c in out]
