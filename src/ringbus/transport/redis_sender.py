"""A worker's results and acknowledgements, pipelined per batch.

The worker hands a result over (``put``) and goes on; one thread per
process sends everything handed over since its last round trip in one
pipeline: the results (one ``SEND_MANY`` script: each only while its
dispatcher listens), then the XACK of the tasks finished meanwhile.  Redis
runs a pipeline in order, so a task is acknowledged only after its result
was delivered, as before; a worker killed before the round trip leaves its
tasks pending, to be delivered again.  No timer: the thread sends at once
when idle, and what arrives while a round trip is in flight rides the next.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ringbus.errors import BrokerUnavailable, TransportClosed
from ringbus.transport.redis_conn import redis
from ringbus.transport.redis_scripts import SEND_MANY

__all__ = ["ReplySender"]

log = logging.getLogger("ringbus.redis")

MAX_BATCH = 1024  # results and acknowledgements per round trip


class ReplySender:
    """The sending thread of one worker process (``t``: its RedisTransport)."""

    def __init__(self, t: Any) -> None:
        self.t = t
        self._cond = threading.Condition(threading.Lock())  # not reentrant: cheaper
        self._items: list[tuple[str | None, bytes]] = []  # (reply key, result) or (None, entry id)
        self._inflight: list[bytes] = []
        self._status: list[tuple[Any, ...]] = []  # task status writes, sent ahead (put_commands)
        self._status_due = False  # a status write asked to go now, not with the next item
        self._busy = False
        self._idle = False  # the thread waits for items (a put must wake it)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._conn: Any = None  # redis.Connection of the sending thread
        self.rounds = 0

    def put(self, key: str, data: bytes, block: bool = True) -> None:
        """Queue a result for ``key`` (a reply list of this bus)."""
        with self._cond:
            if self._closing:
                raise TransportClosed("the result sender is closed")
            self._items.append((key, data))
            if self._idle:
                self._cond.notify()
            if self._thread is None:
                self._start()

    def put_commands(self, cmds: list[tuple[Any, ...]], wake: bool = True) -> None:
        """Queue commands (a task's status: ``redis_status``) to run ahead of
        the results queued after them, in the same or an earlier round trip;
        ``wake=False``: they wait for the next item (the task's result or
        acknowledgement, which follows) or a later wake."""
        with self._cond:
            if self._closing:
                raise TransportClosed("the result sender is closed")
            self._status.extend(cmds)
            if wake:
                self._status_due = True
                if self._idle:
                    self._cond.notify()
            if self._thread is None:
                self._start()

    def ack(self, entry_id: bytes) -> bool:
        """Queue an acknowledgement behind the results queued before it
        (False when closing: the caller acknowledges another way)."""
        with self._cond:
            if self._closing or self._thread is None:
                return False
            self._items.append((None, entry_id))
            if self._idle:
                self._cond.notify()
            return True

    def holds(self) -> list[bytes]:
        """Entry ids whose acknowledgement is queued or in flight."""
        with self._cond:
            return [d for k, d in self._items if k is None] + self._inflight

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ringbus-redis-sender", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pid = os.getpid()
        while True:
            with self._cond:
                while not self._items and not self._status_due and not self._closing:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                if os.getpid() != pid or (self._closing and not (self._items or self._status)):
                    return
                if not (self._items or self._status):  # a wake with nothing to send
                    self._status_due = False
                    continue
                batch = self._items[:MAX_BATCH]
                del self._items[:MAX_BATCH]
                status, self._status, self._status_due = self._status, [], False
                self._inflight = [d for k, d in batch if k is None]
                self._busy = True
            try:
                self._send(batch, status)
            except Exception:
                log.exception("ringbus: sending results failed")
            finally:
                with self._cond:
                    self._inflight = []
                    self._busy = False
                    self._cond.notify_all()

    def _send(
        self, batch: list[tuple[str | None, bytes]], status: list[tuple[Any, ...]] | None = None
    ) -> None:
        status = status or []
        t = self.t
        replies = [(k, d) for k, d in batch if k is not None]
        acks = [d for k, d in batch if k is None]
        cmds = _squash(status)
        n_status = len(cmds)
        if replies:
            keys: list[str] = []
            for k, _ in replies:
                keys += [k, f"{k}:alive"]
            args = [*(d for _, d in replies), int(t.reply_ttl)]
            # EVAL, not EVALSHA: a Redis that forgot the script (restarted,
            # flushed) must not run the XACK behind a failed NOSCRIPT.  Redis
            # caches the compiled script by its digest all the same.
            cmds.append(("EVAL", SEND_MANY, len(keys), *keys, *args))
        ack_cmds = t._xack_commands(acks)  # one XACK per channel stream
        cmds += ack_cmds
        self.rounds += 1
        try:
            out = t._retrying(
                lambda r: self._pipeline(r, cmds), "sending results", lambda: self._closing
            )
        except (TransportClosed, BrokerUnavailable) as exc:
            log.warning(
                "ringbus: dropping %d result(s) and %d status write(s): %s",
                len(replies),
                len(status),
                exc,
            )
            t._to_ack.extend(acks)  # tried again at close, else delivered again
            return
        if out and isinstance(out[0], redis.ResponseError) and t._moved(out[0]):
            self._conn = None  # a Redis Cluster moved the bus's slot: nothing ran there
            self._send(batch, status)
            return
        out = out[n_status:]  # status writes: best effort, like the records they update
        if replies:
            sent = out[0]
            if isinstance(sent, Exception):
                log.warning("ringbus: dropping %d result(s): %s", len(replies), sent)
            else:
                for (k, _), ok in zip(replies, sent, strict=False):
                    if not ok:
                        log.warning("dropping a result: the dispatcher of %s is gone", k)
        failed = [o for o in out[len(out) - len(ack_cmds) :] if isinstance(o, Exception)]
        if acks and failed:
            log.warning("ringbus: acknowledging %d task(s): %s", len(acks), failed[0])
        elif acks:
            t._acked(len(acks))  # counts toward the next trim

    def _pipeline(self, r: Any, cmds: list[tuple[Any, ...]]) -> list[Any]:
        """The commands in one round trip on this thread's own connection
        (redis-py's pipeline would ask SCRIPT EXISTS first, every time)."""
        if self._conn is None:
            self._conn = self.t._raw_connection(self.t.stream)
        conn = self._conn
        try:
            conn.send_packed_command(conn.pack_commands(cmds))
            out: list[Any] = []
            for _ in cmds:
                try:
                    out.append(conn.read_response())
                except redis.ResponseError as exc:
                    out.append(exc)
        except BaseException:
            conn.disconnect()
            raise
        return out

    def close(self, timeout: float) -> list[bytes]:
        """Send what is queued (waiting up to ``timeout`` s), stop; returns the
        entry ids still to acknowledge."""
        with self._cond:
            if self._thread is not None:
                self._status_due = True  # status writes waiting for company: now
                self._cond.notify_all()
                self._cond.wait_for(
                    lambda: not self._items and not self._status and not self._busy, timeout
                )
            self._closing = True
            self._cond.notify_all()
            left = [d for k, d in self._items if k is None] + self._inflight
            self._items.clear()
        return left


def _squash(status: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Status commands with each run of single-key DELs (the ends of tasks
    without kept results) as one DEL: one command for Redis, not one a task."""
    out: list[tuple[Any, ...] | list[Any]] = []
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
