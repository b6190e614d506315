"""A worker's results and acknowledgements, pipelined per batch.

The worker hands a result over (``put``) and goes on; everything handed
over since the last round trip goes out in one pipeline: the results (one
script, ``SEND_GROUPED``: one RPUSH per reply list, only while its
dispatcher listens), then the XACK of the tasks finished meanwhile.  Redis
runs a pipeline in order, so a task is acknowledged only after its result
was delivered, as before; a worker killed before the round trip leaves its
tasks pending, to be delivered again.  No timer: what arrives while a round
trip is in flight rides the next.

Who sends: in a concurrent worker, one sending thread per process, woken
by a put when idle.  A one-at-a-time worker (``t._rides``: it takes with
``take_task``) reads its next task right after it answered: its results and
acknowledgements ride that read's pipeline (``ride``), ahead of the
XREADGROUP, which saves a round trip and a thread wake-up per task; what a
last read did not carry is sent at ``close``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from typing import Any

from ringbus.errors import BrokerUnavailable, TransportClosed
from ringbus.transport.redis_conn import redis
from ringbus.transport.redis_scripts import SEND_GROUPED
from ringbus.transport.redis_wire import pipeline as wire_pipeline

__all__ = ["ReplySender"]

log = logging.getLogger("ringbus.redis")

MAX_BATCH = 1024  # results and acknowledgements per round trip (below Lua's unpack limit)

Item = tuple[str | None, bytes]  # (reply key, result) or (None, entry id)
Plan = tuple[list[tuple[Any, ...]], dict[str, list[bytes]], list[bytes], int]


class ReplySender:
    """Results and acknowledgements of one worker process (``t``: its
    RedisTransport).  Puts take no lock (a deque append); the sending thread
    sleeps on a SimpleQueue, woken by a token only when it said it is idle."""

    def __init__(self, t: Any) -> None:
        self.t = t
        self._items: deque[Item] = deque()
        self._lock = threading.Lock()  # taking a batch vs holds(): one view of both
        self._inflight: list[bytes] = []
        self._busy = False
        self._idle = False  # the thread waits for a token (a put must send one)
        self._wake: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._drained = threading.Condition(threading.Lock())  # close() waits on it
        self._closing = False
        self._thread: threading.Thread | None = None
        self._conn: Any = None  # redis.Connection of the sending thread
        self.rounds = 0

    def put(self, key: str, data: bytes, block: bool = True) -> None:
        """Queue a result for ``key`` (a reply list of this bus)."""
        if self._closing:
            raise TransportClosed("the result sender is closed")
        self._items.append((key, data))  # first, then the flag (see _run)
        if self.t._rides:
            return  # the putting thread's next read carries it
        if self._idle:
            self._idle = False
            self._wake.put(1)
        elif self._thread is None:
            self._start()

    def ack(self, entry_id: bytes) -> bool:
        """Queue an acknowledgement behind the results queued before it
        (False when closing, or no result went this way: the caller
        acknowledges another way)."""
        if self._closing or (self._thread is None and not self.t._rides):
            return False
        self._items.append((None, entry_id))
        if self._idle:
            self._idle = False
            self._wake.put(1)
        return True

    def holds(self) -> list[bytes]:
        """Entry ids whose acknowledgement is queued or in flight."""
        with self._lock:
            return [d for k, d in list(self._items) if k is None] + self._inflight

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="ringbus-redis-sender", daemon=True
            )
        self._thread.start()

    def _take(self) -> list[Item]:
        with self._lock:
            items = self._items
            batch = [items.popleft() for _ in range(min(len(items), MAX_BATCH))]
            self._inflight = [d for k, d in batch if k is None]
            self._busy = True
        return batch

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
            if not items:
                if self._closing or os.getpid() != pid:
                    return
                self._idle = True  # first, then look again: a put either sees it or is seen
                if not items and not self._closing:
                    self._wake.get()  # a stale token only costs one more look
                self._idle = False
                continue
            if os.getpid() != pid:
                return
            batch = self._take()
            try:
                self._send(batch)
            except Exception:
                log.exception("ringbus: sending results failed")
            finally:
                self._sent()

    # -------------------------------------------------------- one batch

    def _plan(self, batch: list[Item]) -> Plan:
        """The commands that send ``batch``, its results by reply list, its acks."""
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
        cmds: list[tuple[Any, ...]] = []
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
        return cmds + ack_cmds, groups, acks, len(ack_cmds)

    def _send(self, batch: list[Item], patience: float | None = None) -> None:
        t = self.t
        cmds, groups, acks, n_ack = self._plan(batch)
        self.rounds += 1
        try:
            out = t._retrying(
                lambda r: self._pipeline(r, cmds),
                "sending results",
                lambda: self._closing,
                patience=patience,
            )
        except (TransportClosed, BrokerUnavailable) as exc:
            log.warning("ringbus: dropping %d result(s): %s", len(batch) - len(acks), exc)
            t._to_ack.extend(acks)  # tried again at close, else delivered again
            return
        if out and isinstance(out[0], redis.ResponseError) and t._moved(out[0]):
            self._conn = None  # a Redis Cluster moved the bus's slot: nothing ran there
            self._send(batch, patience)
            return
        self._check(out, groups, acks, n_ack)

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

    def _pipeline(self, r: Any, cmds: list[tuple[Any, ...]]) -> list[Any]:
        """The commands in one round trip on this thread's own connection
        (redis-py's pipeline would ask SCRIPT EXISTS first, every time)."""
        if self._conn is None:
            self._conn = self.t._raw_connection(self.t.stream)
        return wire_pipeline(self._conn, cmds)

    # -------------------------------------------------------- riding a read

    def ride(self) -> tuple[list[tuple[Any, ...]], Any] | None:
        """What is queued, as commands to send ahead of a read (None: nothing);
        the read then calls ``rode`` with their replies or ``fell`` on error."""
        if not self._items or self._closing:
            return None
        batch = self._take()
        cmds, groups, acks, n_ack = self._plan(batch)
        self.rounds += 1
        return cmds, (batch, groups, acks, n_ack)

    def rode(self, token: Any, out: list[Any]) -> None:
        batch, groups, acks, n_ack = token
        try:
            if out and isinstance(out[0], redis.ResponseError) and self.t._moved(out[0]):
                self._give_back(batch)  # nothing ran there: with the next read
                return
            self._check(out, groups, acks, n_ack)
        finally:
            self._sent()

    def fell(self, token: Any) -> None:
        """The read failed: the batch goes with the next one (a result that
        did arrive arrives twice; its dispatcher keeps the first)."""
        try:
            self._give_back(token[0])
        finally:
            self._sent()

    def _give_back(self, batch: list[Item]) -> None:
        with self._lock:
            self._items.extendleft(reversed(batch))

    # -------------------------------------------------------- closing

    def close(self, timeout: float) -> list[bytes]:
        """Send what is queued (waiting up to ``timeout`` s), stop; returns the
        entry ids still to acknowledge."""
        end = time.monotonic() + timeout
        if self._thread is not None:
            with self._drained:
                self._drained.wait_for(lambda: not self._items and not self._busy, timeout)
        else:  # results that rode no read (the worker stopped after its last task)
            while self._items and (left := end - time.monotonic()) > 0:
                batch = self._take()
                try:
                    self._send(batch, patience=left)
                finally:
                    self._sent()
        self._closing = True
        self._wake.put(1)
        with self._lock:
            left_ids = [d for k, d in self._items if k is None] + self._inflight
            self._items.clear()
        return left_ids
