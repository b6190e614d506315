"""The task channel of ``RedisTransport``: a stream per bus read by one
consumer group; each worker process is a consumer that takes entries with
XREADGROUP, acknowledges them after its result went out, and takes over the
entries of workers that died (see ``redis.py`` for the whole picture)."""

from __future__ import annotations

import contextlib
import os
import queue
import random
import socket
import threading
import time
from collections import deque
from typing import Any

from ringbus.errors import BrokerUnavailable, TransportClosed
from ringbus.transport.base import write_journal
from ringbus.transport.redis_combine import Combiner
from ringbus.transport.redis_conn import (
    GROUP,
    NET_ERRORS,
    R,
    RedisBase,
    as_bytes,
    as_text,
    id_key,
    log,
    redis,
)
from ringbus.transport.redis_identity import Identity
from ringbus.transport.redis_scripts import CLAIM, DROP_CONSUMER, KEEP

__all__ = ["TaskChannel"]

_TRIM_EVERY = 1000  # acknowledgements between two trims in a process


class TaskChannel(RedisBase):
    """The task side of ``RedisTransport`` (dispatchers add, workers take)."""

    def _reset_process_state(self) -> None:
        super()._reset_process_state()
        self._identity = Identity(self._host)
        self._consumer = self._identity.name
        self._tpool: redis.ConnectionPool | None = None
        self._tconn: Any = None  # redis.Connection of the blocking reads
        self._tsock: socket.socket | None = None
        self._tlock = threading.Lock()
        self._taken: deque[bytes] = deque()  # entry ids handed out, not finished
        self._to_ack: list[bytes] = []  # finished, acknowledged with the next read
        self._acks = 0
        self._interrupted = False
        self._opened = False
        self._next_claim = 0.0
        self._keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self._was_consumer = False
        self._dispatches: Combiner | None = None
        self._sender: Any = None  # ReplySender of a worker (redis_replies)

    def open(self) -> None:
        """Create the stream and the consumer group (from the first entry, so
        tasks queued before any worker existed are served)."""

        def create(r: R) -> None:
            try:
                r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        self._once(create, "creating the task stream")
        self._opened = True

    def put_task(self, data: bytes, timeout: float | None = None) -> None:
        self._combiner().put([data], timeout)

    def put_tasks(self, items: list[bytes], timeout: float | None = None) -> None:
        if items:
            self._combiner().put(items, timeout)

    def _combiner(self) -> Combiner:
        """Dispatches of this process's threads that overlap share round trips."""
        c = self._dispatches
        if c is None:
            with self._lock:
                if self._dispatches is None:
                    self._dispatches = Combiner(self._send_tasks)
                c = self._dispatches
        return c

    def _send_tasks(self, items: list[bytes], timeout: float | None) -> None:
        cmds = self._dispatch_commands()
        stream = self.stream
        cmds += [("XADD", stream, "*", b"d", data) for data in items]
        self._call(cmds, "queueing tasks", timeout)

    def _sender_holds(self) -> list[bytes]:
        """Finished entries whose acknowledgement waits behind their results."""
        sender = self._sender
        return [] if sender is None else sender.holds()

    def _task_conn(self) -> Any:
        """This process's connection for blocking reads: one we can shut down
        from a signal handler (interrupt) to wake the read at once."""
        if self._tconn is None:
            self._tpool = redis.ConnectionPool.from_url(
                self._server_url(), **self._options(self.socket_timeout + self._slice)
            )
            self._tconn = self._tpool.make_connection()
        conn = self._tconn
        if getattr(conn, "_sock", None) is None:
            conn.connect()
        self._tsock = getattr(conn, "_sock", None)
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        return conn

    def _read(self, count: int, block_ms: int | None) -> list[tuple[bytes, bytes]]:
        """XACK what was finished and XREADGROUP, pipelined in one round trip."""
        acks = list(self._to_ack)
        cmds: list[tuple[Any, ...]] = []
        if acks:
            cmds.append(("XACK", self.stream, GROUP, *acks))
        read: tuple[Any, ...] = ("XREADGROUP", "GROUP", GROUP, self._consumer, "COUNT", count)
        if block_ms is not None:
            read += ("BLOCK", block_ms)
        cmds.append((*read, "STREAMS", self.stream, ">"))
        after = self._read_commands()  # run once the read returned (redis_status)
        cmds += after
        conn = self._task_conn()
        try:
            conn.send_packed_command(conn.pack_commands(cmds))
            replies: list[Any] = []
            for _ in cmds:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            conn.disconnect()
            self._tsock = None
            raise
        if acks:
            if isinstance(replies[0], Exception):
                raise replies[0]
            del self._to_ack[: len(acks)]
            self._acked(len(acks))
        if after:
            self._after_read(replies[len(replies) - len(after) :])
            del replies[len(replies) - len(after) :]
        resp = replies[-1]
        if isinstance(resp, Exception):
            raise resp
        return _stream_entries(resp, self.bus_name)

    def _stop_reading(self) -> bool:
        return self._interrupted

    def take_task(self, journal: Any, timeout: float | None = None) -> bytes:
        """One entry's envelope, recorded in ``journal`` after it was taken
        (Redis keeps it pending until acknowledged); ``deliveries`` is that
        entry's own delivery count."""
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        with self._tlock:
            ((data, deliveries, tag),) = self._get_tasks(1, timeout)
            self.deliveries = deliveries
            self.delivery_tag = tag
        write_journal(journal, data)
        return data

    takes_batches = True
    puts_off_loop = True  # a dispatch_async put waits for Redis: not on the caller's loop

    def take_tasks(
        self, journals: list[Any], timeout: float | None = None
    ) -> list[tuple[bytes, int, object]]:
        """Up to ``len(journals)`` entries in one XREADGROUP (the worker's free
        slots bound the batch: no prefetch), each recorded in its journal;
        (envelope, its delivery count, its entry id) per entry."""
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        with self._tlock:
            got = self._get_tasks(len(journals), timeout)
        for journal, (data, _, _) in zip(journals, got, strict=False):
            write_journal(journal, data)
        return got  # type: ignore[return-value]

    def get_tasks(self, max_items: int = 1, timeout: float | None = None) -> list[bytes]:
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        with self._tlock:
            got = self._get_tasks(max_items, timeout)
            self.deliveries = got[-1][1]
        return [data for data, _, _ in got]

    def _get_tasks(self, max_items: int, timeout: float | None) -> list[tuple[bytes, int, bytes]]:
        """(envelope, deliveries, entry id) of up to ``max_items`` entries:
        taken over from dead workers first, else new ones."""
        if not self._opened:
            self._retrying(lambda r: self.open(), "creating the task stream", self._stop_reading)
        self._was_consumer = True
        self._start_keeper()
        end = None if timeout is None else time.monotonic() + timeout
        down_since = 0.0
        delay = 0.05
        while True:
            if self._interrupted:
                raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
            now = time.monotonic()
            if now >= self._next_claim and timeout != 0:
                self._next_claim = now + self._slice
                try:
                    # What this worker finished is acknowledged first: else a
                    # task it held past the visibility timeout looks abandoned.
                    self._retrying(self._ack_now, "acknowledging tasks", self._stop_reading)
                    got = self._retrying(
                        lambda r: self._reclaim(r, max_items),
                        "reclaiming tasks",
                        self._stop_reading,
                    )
                except redis.ResponseError as exc:
                    self._stream_gone(exc)
                    continue
                if got:
                    return got
            if end is None:
                block: int | None = int(self._slice * 1000)
            elif timeout == 0:
                block = None  # one look, no wait
            else:
                left = end - now
                if left <= 0:
                    raise queue.Empty
                block = max(1, int(min(self._slice, left) * 1000))
            try:
                entries = self._read(max_items, block)
            except NET_ERRORS as exc:
                if self._interrupted:
                    raise TransportClosed(
                        f"task channel of bus {self.bus_name!r} was interrupted"
                    ) from None
                if not down_since:
                    down_since = time.monotonic()
                log.warning(
                    "ringbus: Redis at %s unavailable while reading tasks of bus %r (%s); "
                    "retrying in %.1f s",
                    self.where(),
                    self.bus_name,
                    exc,
                    delay,
                )
                time.sleep(delay * (0.5 + random.random()))
                delay = min(2.0, delay * 2)
                continue
            except redis.ResponseError as exc:
                self._stream_gone(exc)
                continue
            if down_since:
                log.warning(
                    "ringbus: Redis at %s reachable again after %.1f s (reading tasks of bus %r)",
                    self.where(),
                    time.monotonic() - down_since,
                    self.bus_name,
                )
                down_since, delay = 0.0, 0.05
            if entries:
                out = []
                for entry_id, data in entries:
                    self._taken.append(entry_id)
                    out.append((data, 1, entry_id))  # read as new: its first delivery
                if timeout == 0:
                    # A look without waiting is how a dispatcher takes its own
                    # queued tasks off the channel (cancel; the others are put
                    # back as new entries): they leave the stream now.
                    self.ack_tasks(len(out))
                return out
            if timeout == 0:
                raise queue.Empty

    def _stream_gone(self, exc: redis.ResponseError) -> None:
        """The stream or its group was deleted under this worker (DEL,
        FLUSHDB, destroy() elsewhere, a Redis without persistence restarted):
        create them again.  Any other error is raised."""
        if self._moved(exc):  # a Redis Cluster moved the bus's slot
            self._tconn = self._tsock = self._tpool = None
            return
        text = str(exc)
        if not any(m in text for m in ("NOGROUP", "UNBLOCKED", "no such key")):
            raise exc
        log.warning(
            "ringbus: task stream %s is gone (%s); creating it again", self.stream, text[:80]
        )
        self._to_ack.clear()  # their entries are gone with it
        self._opened = False
        self._retrying(lambda r: self.open(), "creating the task stream", self._stop_reading)

    def _reclaim(self, r: R, count: int) -> list[tuple[bytes, int, bytes]]:
        """Entries whose worker died: those of dead processes on this host at
        once, the others once idle past the visibility timeout."""
        claimed = self._reclaim_local(r, count)
        if claimed:
            return claimed
        idle_ms = int(self.visibility_timeout * 1000)
        return self._claim(r, idle_ms, count, "", "idle past the timeout")

    def _reclaim_local(self, r: R, count: int) -> list[tuple[bytes, int, bytes]]:
        grace_ms = int(min(self.visibility_timeout, 1.0) * 1000)
        for c in r.xinfo_consumers(self.stream, GROUP):
            name = as_text(c.get("name", b""))
            pid = self._identity.dead_here(name)
            if not pid:
                continue  # alive, or not provably dead: the visibility timeout decides
            if not int(c.get("pending", 0)):
                self._script("drop", DROP_CONSUMER)(keys=[self.stream], args=[GROUP, name])
                continue
            if int(c.get("idle", 0)) < grace_ms:
                continue
            got = self._claim(r, grace_ms, count, name, f"its worker pid {pid} died")
            if got:
                return got
        return []

    def _claim(
        self, r: R, idle_ms: int, count: int, owner: str, why: str
    ) -> list[tuple[bytes, int, bytes]]:
        """Take over entries idle for ``idle_ms`` (of ``owner`` only, if given),
        never one this consumer holds: (envelope, its delivery count)."""
        got = self._script("claim", CLAIM)(
            keys=[self.stream],
            args=[GROUP, self._consumer, idle_ms, count, max(100, count), owner],
            client=r,
        )
        out: list[tuple[bytes, int, bytes]] = []
        for entry_id, flat, deliveries in got or ():
            entry_id = as_bytes(entry_id)
            fields = dict(zip(flat[::2], flat[1::2], strict=False))
            log.warning(
                "ringbus: worker %s took over task entry %s of bus %r (%s; delivery %d)",
                self._consumer,
                as_text(entry_id),
                self.bus_name,
                why,
                int(deliveries),
            )
            self._taken.append(entry_id)
            out.append((_envelope(entry_id, fields, self.bus_name), int(deliveries), entry_id))
        return out

    def ack_tasks(self, n: int = 1) -> None:
        """The oldest ``n`` taken entries are finished (their results were
        sent): they are acknowledged with this process's next read, in the
        same round trip, or at ``close()``."""
        for _ in range(min(n, len(self._taken))):
            self._to_ack.append(self._taken.popleft())

    def ack_task(self, tag: object) -> None:
        """The entry ``tag`` (a ``delivery_tag``) is finished; tasks of a worker
        with ``concurrency > 1`` finish in any order."""
        try:
            self._taken.remove(tag)  # type: ignore[arg-type]
        except ValueError:
            return  # not ours (any more): nothing to acknowledge
        sender = self._sender
        if sender is not None and sender.ack(tag):
            return  # after the results queued before it, in their round trip
        self._to_ack.append(tag)  # type: ignore[arg-type]

    def _acked(self, n: int) -> None:
        self._acks += n
        if self._acks >= min(_TRIM_EVERY, max(1, self.stream_maxlen // 2)):
            self._acks = 0
            try:
                self._trim(self._redis())
            except (*NET_ERRORS, redis.ResponseError) as exc:
                log.debug("ringbus: trimming %s skipped: %s", self.stream, exc)

    def _ack_now(self, r: R) -> None:
        acks = list(self._to_ack)
        if acks:
            r.xack(self.stream, GROUP, *acks)
            del self._to_ack[: len(acks)]
            self._acked(len(acks))

    def _flush_acks(self) -> None:
        try:
            self._retrying(self._ack_now, "acknowledging tasks", patience=self.socket_timeout)
        except BrokerUnavailable as exc:
            log.warning(
                "ringbus: %d finished task(s) will be delivered again: %s", len(self._to_ack), exc
            )
            self._to_ack.clear()

    def _trim(self, r: R) -> None:
        """Drop acknowledged entries once the stream is longer than
        stream_maxlen; never pending or undelivered ones (MINID below both)."""
        if r.xlen(self.stream) <= self.stream_maxlen:
            return
        floor: bytes | None = None
        for g in r.xinfo_groups(self.stream):
            if as_text(g.get("name", b"")) == GROUP:
                floor = g["last-delivered-id"]
        if floor is None or floor in (b"0-0", "0-0"):
            return
        summary = r.xpending(self.stream, GROUP)
        if summary and summary.get("pending") and summary.get("min"):
            floor = min(floor, summary["min"], key=id_key)
        r.xtrim(self.stream, minid=floor, approximate=True)

    def _start_keeper(self) -> None:
        """A thread that keeps this worker's entries claimed while their tasks
        run, so only those of dead or frozen workers are taken over (and of
        a worker whose handler holds the GIL past the visibility timeout:
        this thread cannot run then)."""
        if self._keeper is not None:
            return
        pid = os.getpid()
        period = self.visibility_timeout / 3
        stop = self._keeper_stop

        def keep() -> None:
            while not stop.wait(period) and os.getpid() == pid:
                ids = [*self._taken, *self._to_ack, *self._sender_holds()]
                if not ids:
                    continue
                try:
                    self._script("keep", KEEP)(
                        keys=[self.stream], args=[GROUP, self._consumer, *ids]
                    )
                except Exception as exc:  # the next round tries again
                    log.warning("ringbus: could not refresh claims of %s: %s", self._consumer, exc)

        self._keeper = threading.Thread(target=keep, name="ringbus-redis-keeper", daemon=True)
        self._keeper.start()

    def interrupt(self) -> None:
        # Signal-handler safe: a flag and one system call, no locks.
        self._interrupted = True
        sock = self._tsock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def pending_tasks(self) -> int:
        """Entries not yet delivered to any worker (the group's lag)."""

        def lag(r: R) -> int:
            try:
                groups = r.xinfo_groups(self.stream)
            except redis.ResponseError:
                return 0  # no stream yet
            for g in groups:
                if as_text(g.get("name", b"")) != GROUP:
                    continue
                if g.get("lag") is not None:
                    return int(g["lag"])
                return len(r.xrange(self.stream, b"(" + as_bytes(g["last-delivered-id"]), "+"))
            return int(r.xlen(self.stream))

        return self._once(lag, "counting tasks")

    def settle(self, data: bytes) -> None:
        """Acknowledge the entry holding ``data`` pending at a dead consumer of
        this host (a supervisor buried the task of a worker it killed)."""
        with contextlib.suppress(*NET_ERRORS, redis.ResponseError):
            r = self._redis()
            for c in r.xinfo_consumers(self.stream, GROUP):
                name = as_text(c.get("name", b""))
                if not int(c.get("pending", 0)) or not self._identity.dead_here(name):
                    continue
                for p in r.xpending_range(self.stream, GROUP, "-", "+", 100, name):
                    found = r.xrange(self.stream, p["message_id"], p["message_id"])
                    fields = found[0][1] if found else None
                    if fields and fields.get(b"d", b"") == data:
                        r.xack(self.stream, GROUP, p["message_id"])
                        return

    def _close_tasks(self) -> None:
        """Acknowledge finished tasks, drop this consumer when it holds
        nothing, close the blocking connection."""
        self._keeper_stop.set()
        if self._to_ack:
            self._flush_acks()
        if self._was_consumer and not self._taken:
            with contextlib.suppress(Exception):
                self._script("drop", DROP_CONSUMER)(
                    keys=[self.stream], args=[GROUP, self._consumer]
                )
        with self._lock:
            tpool, self._tpool = self._tpool, None
            self._tconn = self._tsock = None
            self._keeper = None
            self._keeper_stop = threading.Event()
            self._opened = False
        with contextlib.suppress(Exception):
            if tpool is not None:
                tpool.disconnect()


def _stream_entries(resp: Any, bus_name: str) -> list[tuple[bytes, bytes]]:
    """(id, envelope) pairs from a raw XREADGROUP reply (RESP2 list or RESP3 map)."""
    if not resp:
        return []
    streams = resp.items() if isinstance(resp, dict) else resp
    out: list[tuple[bytes, bytes]] = []
    for _, entries in streams:
        for entry_id, fields in entries:
            if not fields:
                continue  # deleted meanwhile
            if not isinstance(fields, dict):
                fields = dict(zip(fields[::2], fields[1::2], strict=False))
            out.append((as_bytes(entry_id), _envelope(entry_id, fields, bus_name)))
    return out


def _envelope(entry_id: Any, fields: dict[bytes, bytes], bus_name: str) -> bytes:
    """The envelope an entry carries in its field ``d``.  An entry without
    one (written by something else) is handed out as an empty envelope, which
    the task layer dead-letters as malformed, then acknowledged like any
    other: it never stops a worker."""
    data = fields.get(b"d")
    if isinstance(data, bytes):
        return data
    log.error(
        "ringbus: task entry %s of bus %r has no envelope (fields %s); "
        "handing it out empty, to be dead-lettered",
        as_text(entry_id),
        bus_name,
        sorted(as_text(k) for k in fields)[:8],
    )
    return b""
