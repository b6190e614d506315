"""The task channel of ``RedisTransport``: a stream per (queue, priority)
channel read by one consumer group; each worker process is a consumer that
takes entries with XREADGROUP (or the ``TAKE`` script over several
channels: ``redis_channels``), acknowledges them after its result went
out, and takes over the entries of workers that died (``redis_reclaim``;
see ``redis.py`` for the whole picture)."""

from __future__ import annotations

import contextlib
import hashlib
import queue
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ringbus.errors import BrokerUnavailable, TransportClosed
from ringbus.transport.base import write_journal
from ringbus.transport.redis_channels import Chan, create_group, stream_entries, stream_lag
from ringbus.transport.redis_combine import Combiner
from ringbus.transport.redis_conn import GROUP, NET_ERRORS, R, as_text, log, redis
from ringbus.transport.redis_identity import Identity
from ringbus.transport.redis_queue_scripts import TAKE
from ringbus.transport.redis_reclaim import Reclaims
from ringbus.transport.redis_sender import ReplySender
from ringbus.transport.redis_wire import pipeline as wire_pipeline

__all__ = ["TaskChannel"]

_TRIM_EVERY = 1000  # acknowledgements between two trims in a process
_TAKE_SHA = hashlib.sha1(TAKE.encode()).hexdigest()


class TaskChannel(Reclaims):
    """The task side of ``RedisTransport`` (dispatchers add, workers take)."""

    def _reset_process_state(self) -> None:
        super()._reset_process_state()
        self._identity = Identity(self._host)
        self._consumer = self._identity.name
        self._tpool: redis.ConnectionPool | None = None
        self._tconn: Any = None  # redis.Connection of the blocking reads
        self._tsock: socket.socket | None = None
        self._lsock_of: Callable[[], Any] | None = None  # the socket of a loop's reads
        self._tlock = threading.Lock()
        self._taken: deque[bytes] = deque()  # delivery tags handed out, not finished
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
        self._once(lambda r: create_group(r, self.stream), "creating the task stream")
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
        pop = self._pop_command()  # results waiting come back in this round trip
        if pop is not None:
            cmds.append(pop)
        replies = self._call(cmds, "queueing tasks", timeout)
        if pop is not None:
            self._popped_with(replies[-1])

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

    def _roundtrip(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
        """``cmds`` pipelined on the blocking connection; errors as replies.
        A one-at-a-time worker's results and acknowledgements ride ahead of
        them (``ReplySender.ride``: results first, then every XACK)."""
        conn = self._task_conn()
        sender = self._sender
        riding = sender.ride() if self._rides and sender is not None else None
        try:
            if riding is not None:
                cmds = riding[0] + cmds  # results first, then every XACK
            replies = wire_pipeline(conn, cmds)  # redis_wire: hiredis, no redis-py layers
        except BaseException:
            if riding is not None:
                sender.fell(riding[1])
            conn.disconnect()
            self._tsock = None
            raise
        if riding is not None:
            sender.rode(riding[1], replies[: len(riding[0])])
            replies = replies[len(riding[0]) :]
        return replies

    def _with_acks(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
        """XACK what was finished, then ``cmds``, in one round trip; the
        replies of ``cmds``."""
        acks = list(self._to_ack)
        ack_cmds = self._xack_commands(acks)
        replies = self._roundtrip([*ack_cmds, *cmds])
        self._acks_sent(acks, replies[: len(ack_cmds)])
        return replies[len(ack_cmds) :]

    def _acks_sent(self, acks: list[bytes], replies: list[Any]) -> None:
        """The XACKs of ``acks`` came back (``replies``): raise the first
        error, else forget them."""
        if acks:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            del self._to_ack[: len(acks)]
            self._acked(len(acks))

    def _read(
        self, key: str, count: int, block_ms: int | None, served: bool
    ) -> list[tuple[str, bytes, bytes]]:
        """XREADGROUP on one stream (acknowledging first, and for a worker
        looking at the channel set, in the same round trip)."""
        read: tuple[Any, ...] = ("XREADGROUP", "GROUP", GROUP, self._consumer, "COUNT", count)
        if block_ms is not None:
            read += ("BLOCK", block_ms)
        read += ("STREAMS", key, ">")
        after = self._read_commands()  # run once the read returned (redis_status)
        if served:
            watch, resp, *got = self._with_acks([self._watch_command(), read, *after])
            self._watched(watch)
        else:
            resp, *got = self._with_acks([read, *after])
        self._after_read(got)
        if isinstance(resp, Exception):
            raise resp
        return stream_entries(resp, self.bus_name)

    def _take_multi(
        self, chans: list[Chan], count: int, block_ms: int | None
    ) -> list[tuple[str, bytes, bytes]]:
        """``TAKE`` over several channels (acknowledging first, same round
        trip); when all are empty, wait up to ``block_ms`` for a put to any
        of them (XREAD from the ids ``TAKE`` gave; on streams of the served
        queues not in the set yet, from now) and return nothing."""
        keys = [c.key for c in chans]
        args = [GROUP, self._consumer, count, "1" if self._aging(chans) else "0"]
        args += [c.group for c in chans]
        after = self._read_commands()  # run once the take returned (redis_status)
        watch, resp, *got = self._with_acks(
            [self._watch_command(), ("EVALSHA", _TAKE_SHA, len(keys), *keys, *args), *after]
        )
        self._watched(watch)
        if isinstance(resp, redis.exceptions.NoScriptError):  # a Redis that forgot it
            resp, *got = self._roundtrip([("EVAL", TAKE, len(keys), *keys, *args), *after])
        self._after_read(got)
        if isinstance(resp, Exception):
            raise resp
        found, rows = resp
        if int(found):
            self._count_takes(chans, (int(i) - 1 for i, _, _ in rows))
            return stream_entries([(keys[int(i) - 1], [(e, f)]) for i, e, f in rows], self.bus_name)
        if block_ms is not None and not self._chans_stale:
            new = self._unknown_channels(chans)
            wait = ("XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", *keys, *new)
            (woke,) = self._roundtrip([(*wait, *rows, *["$"] * len(new))])
            if isinstance(woke, Exception):
                raise woke
            streams = woke.items() if isinstance(woke, dict) else woke or ()  # RESP3 or 2
            if any(as_text(k) in new for k, _ in streams):
                self._chans_stale = True  # a first put to a new channel
        return []

    def _stop_reading(self) -> bool:
        return self._interrupted

    # -------------------------------------------------------- reads on a worker's loop

    def loop_taker(self, loop: Any, running: Callable[[], int]) -> Any:
        """A concurrent worker's reads on its event loop (``redis_loop``)."""
        from ringbus.transport.redis_loop import LoopTaker

        return LoopTaker(self, loop, running)

    def _loop_ready(self) -> bool:
        """Whether the next read is a plain XREADGROUP of one stream (else
        ``take_tasks`` does it: opening, the reclaim round, the channel set)."""
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        if not self._opened or time.monotonic() >= self._next_claim:
            return False
        if self._served is None:
            return True
        chans = self._chans
        return chans is not None and not self._chans_stale and len(chans) == 1

    def _loop_read(
        self, count: int, block: bool
    ) -> tuple[list[tuple[Any, ...]], int, Callable[[list[Any]], list[tuple[bytes, int, object]]]]:
        """The commands of ``_read`` (acknowledgements, the channel set's size,
        XREADGROUP, the status reads), how long it may block (ms), and what
        makes (envelope, deliveries, tag) of their replies."""
        served = self._served is not None
        key = self._chans[0].key if served and self._chans else self.stream
        block_ms = int(self._slice * 1000) if block else 0
        read: tuple[Any, ...] = ("XREADGROUP", "GROUP", GROUP, self._consumer, "COUNT", count)
        if block:
            read += ("BLOCK", block_ms)
        read += ("STREAMS", key, ">")
        acks = list(self._to_ack)
        ack_cmds = self._xack_commands(acks)
        head = [*ack_cmds, self._watch_command()] if served else ack_cmds
        cmds = [*head, read, *self._read_commands()]

        def finish(replies: list[Any]) -> list[tuple[bytes, int, object]]:
            self._acks_sent(acks, replies[: len(ack_cmds)])
            rest = replies[len(ack_cmds) :]
            if served:
                self._watched(rest[0])
                rest = rest[1:]
            resp, *got = rest
            self._after_read(got)
            if isinstance(resp, Exception):
                raise resp
            out: list[tuple[bytes, int, object]] = []
            for k, entry_id, data in stream_entries(resp, self.bus_name):
                tag = self.tag_of(k, entry_id)
                self._taken.append(tag)
                self._consumed.add(k)
                out.append((data, 1, tag))  # read as new: its first delivery
            return out

        return cmds, block_ms, finish

    def _the_sender(self) -> Any:
        """This process's ReplySender (made on first use)."""
        with self._lock:
            if self._sender is None:
                self._sender = ReplySender(self)
            return self._sender

    def take_task(self, journal: Any, timeout: float | None = None) -> bytes:
        """One entry's envelope from the served channels (after ``serve``; else
        the task stream), recorded in ``journal`` after it was taken (Redis
        keeps it pending until acknowledged); ``deliveries`` is that entry's
        own delivery count."""
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        self._rides = True  # one task at a time: its result rides the next read
        with self._tlock:
            ((data, deliveries, tag),) = self._get_tasks(1, timeout, self._served is not None)
            self.deliveries = deliveries
            self.delivery_tag = tag
        write_journal(journal, data)
        return data

    def task_taker(self, journal: Any) -> Callable[[], bytes]:
        # The served channels are looked up by each take (no rescan to raise).
        return lambda: self.take_task(journal)

    takes_batches = True
    puts_off_loop = True  # a dispatch_async put waits for Redis: not on the caller's loop

    def take_tasks(
        self, journals: list[Any], timeout: float | None = None
    ) -> list[tuple[bytes, int, object]]:
        """Up to ``len(journals)`` entries in one round trip (the worker's free
        slots bound the batch: no prefetch), each recorded in its journal;
        (envelope, its delivery count, its delivery tag) per entry."""
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        with self._tlock:
            got = self._get_tasks(len(journals), timeout, self._served is not None)
        for journal, (data, _, _) in zip(journals, got, strict=False):
            write_journal(journal, data)
        return got  # type: ignore[return-value]

    def get_tasks(self, max_items: int = 1, timeout: float | None = None) -> list[bytes]:
        """From the task stream only, also in a process that serves other
        queues (a dispatcher's cancel puts back what it took there)."""
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        with self._tlock:
            got = self._get_tasks(max_items, timeout, False)
            self.deliveries = got[-1][1]
        return [data for data, _, _ in got]

    def _get_tasks(
        self, max_items: int, timeout: float | None, served: bool
    ) -> list[tuple[bytes, int, bytes]]:
        """(envelope, deliveries, tag) of up to ``max_items`` entries of the
        served channels (else the task stream): taken over from dead workers
        first, else new ones, in taking order."""
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
            chans = self._chans if served else None
            due = now >= self._next_claim and timeout != 0
            if served and (chans is None or self._chans_stale or due):
                chans = self._retrying(
                    self._refresh_channels, "reading the bus's channels", self._stop_reading
                )
            if chans is None:
                chans = self._default_chans()
            if due:
                self._next_claim = now + self._slice
                # What this worker finished is acknowledged first: else a
                # task it held past the visibility timeout looks abandoned.
                self._retrying(self._ack_now, "acknowledging tasks", self._stop_reading)
                got = self._retrying(
                    lambda r, c=chans: self._reclaim(r, max_items, c),  # type: ignore[misc]
                    "reclaiming tasks",
                    self._stop_reading,
                )
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
                if len(chans) == 1:
                    entries = self._read(chans[0].key, max_items, block, served)
                else:
                    entries = self._take_multi(chans, max_items, block)
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
                self._stream_gone(exc, chans[0].key if len(chans) == 1 else None)
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
                for key, entry_id, data in entries:
                    tag = self.tag_of(key, entry_id)
                    self._taken.append(tag)
                    self._consumed.add(key)
                    out.append((data, 1, tag))  # read as new: its first delivery
                if timeout == 0:
                    # A look without waiting is how a dispatcher takes its own
                    # queued tasks off the channel (cancel; the others are put
                    # back as new entries): they leave the stream now.
                    self.ack_tasks(len(out))
                return out
            if timeout == 0:
                raise queue.Empty

    def _stream_gone(self, exc: redis.ResponseError, key: str | None) -> None:
        """A stream or its group was deleted under this worker (DEL, FLUSHDB,
        destroy() elsewhere, a Redis without persistence restarted): create
        them again (``key``: the one stream read; None: ``TAKE`` makes the
        groups it misses itself).  Any other error is raised."""
        if self._moved(exc):  # a Redis Cluster moved the bus's slot
            self._tconn = self._tsock = self._tpool = None
            return
        text = str(exc)
        if not any(m in text for m in ("NOGROUP", "UNBLOCKED", "no such key")):
            raise exc
        where = key or "a channel stream"
        log.warning("ringbus: %s is gone (%s); creating it again", where, text[:80])
        self._chans_stale = True
        self._registered = False
        if key is None:
            return
        self._drop_stream_acks(key)  # their entries are gone with it
        if key == self.stream:
            self._opened = False
            self._retrying(lambda r: self.open(), "creating the task stream", self._stop_reading)
        else:
            self._retrying(
                lambda r: create_group(r, key), "creating a channel stream", self._stop_reading
            )

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
            self._trim_acked()

    def _ack_now(self, r: R) -> None:
        acks = list(self._to_ack)
        if acks:
            for key, ids in self._by_stream(acks).items():
                self._ack_streams.add(key)
                r.xack(key, GROUP, *ids)
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

    def interrupt(self) -> None:
        # Signal-handler safe: a flag and one system call, no locks.
        self._interrupted = True
        lsock = self._lsock_of() if self._lsock_of is not None else None
        for sock in (self._tsock, lsock):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def pending_tasks(self) -> int:
        """Entries of the task stream not yet delivered to any worker (the
        group's lag); ``queue_depths`` has every channel."""
        return self._once(lambda r: stream_lag(r, self.stream), "counting tasks")

    def _close_tasks(self) -> None:
        """Acknowledge finished tasks, drop this consumer when it holds
        nothing, close the blocking connection."""
        self._keeper_stop.set()
        if self._to_ack:
            self._flush_acks()
        if self._was_consumer and not self._taken:
            self._drop_consumer()
        with self._lock:
            tpool, self._tpool = self._tpool, None
            self._tconn = self._tsock = None
            self._keeper = None
            self._keeper_stop = threading.Event()
            self._opened = False
        with contextlib.suppress(Exception):
            if tpool is not None:
                tpool.disconnect()
