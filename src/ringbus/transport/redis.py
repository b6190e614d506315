"""The bus over Redis Streams: the same handlers and futures beyond one machine.

    bus = TaskBus("shop", transport="redis://10.0.0.5:6379/0", secret=os.environ["RINGBUS_SECRET"])

Keys (``<bus>`` is the bus name; the braces are Redis Cluster hash tags):

- ``ringbus:{<bus>}:tasks``: the task stream, consumer group ``workers``, one
  consumer per worker process (``host:pid``).  Workers read with XREADGROUP
  BLOCK and acknowledge (XACK) only after the result was sent, so a task is
  never lost: a worker that dies leaves its entry pending, and after
  ``visibility_timeout`` seconds another worker takes it over with
  XAUTOCLAIM (at once on the same host, where a dead pid is known to be
  dead).  Its attempt is counted from the entry's delivery count, so the
  retry limit and the dead letters work as on shared memory.  A worker
  running a long task keeps its entries claimed (a thread refreshes them),
  so only dead workers lose their tasks to others.
- ``ringbus:{<bus>}:reply:<host>:<pid>:<random>``: a list per dispatching
  process, read by its reader with BLMPOP; ``...:alive`` (refreshed by that
  reader, expiring ``reply_ttl`` seconds after the process is gone) tells
  workers whether anyone still listens.
- ``ringbus:{<bus>}:dead``: the dead-letter stream.

Trimming only removes entries that the group has acknowledged.  Connection
errors: a dispatch raises ``BrokerUnavailable`` at once; workers and readers
log and retry with exponential backoff, losing nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import secrets
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ringbus import _names
from ringbus._proc import pid_alive
from ringbus.errors import BrokerUnavailable, TransportClosed
from ringbus.transport.base import Record, Transport

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("the Redis transport needs redis-py: pip install 'ringbus[redis]'") from exc

__all__ = ["BrokerUnavailable", "RedisTransport"]

log = logging.getLogger("ringbus.redis")

T = TypeVar("T")
# A redis.Redis client, typed loosely: redis-py types replies as wide unions.
_R = Any

GROUP = "workers"
_WAKE = b""  # pushed on a reply list to wake its reader; never handed out
_TRIM_EVERY = 1000  # acknowledgements between two trims in a process
_NET_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)

# Deliver a result only while its dispatcher's reader is alive.
_SEND = """
if redis.call('exists', KEYS[2]) == 1 then
    redis.call('rpush', KEYS[1], ARGV[1])
    redis.call('expire', KEYS[1], ARGV[2])
    return 1
end
return 0
"""

# Keep fresh the claims of the entries this consumer still works on (and only
# those it still owns: one another worker took over stays taken over).
_KEEP = """
local mine = redis.call('xpending', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[2])
local want = {}
for i = 3, #ARGV do want[ARGV[i]] = true end
local ids = {}
for _, e in ipairs(mine) do
    if want[e[1]] then ids[#ids + 1] = e[1] end
end
if #ids == 0 then return 0 end
local args = {'xclaim', KEYS[1], ARGV[1], ARGV[2], 0}
for _, id in ipairs(ids) do args[#args + 1] = id end
args[#args + 1] = 'JUSTID'  -- refresh only: the delivery count stays
redis.call(unpack(args))
return #ids
"""

# Delete a consumer only when it holds nothing (DELCONSUMER drops pending entries).
_DROP_CONSUMER = """
local p = redis.call('xpending', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then
    return redis.call('xgroup', 'delconsumer', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


_live: weakref.WeakSet[RedisTransport] = weakref.WeakSet()


def _after_fork() -> None:
    for t in list(_live):
        t._reset_process_state()


os.register_at_fork(after_in_child=_after_fork)


class RedisTransport(Transport):
    """Task, reply and dead-letter channels on a Redis server (see the module
    docstring).

    ``stream_maxlen``: past this many entries, acknowledged ones are trimmed
    (never pending or undelivered ones).  ``visibility_timeout``: seconds
    after which a task taken by a worker that stopped answering is delivered
    to another worker; a task may thus run twice if a worker is frozen (not
    dead) for longer than that.  ``reply_ttl``: seconds after which the reply
    key of a vanished dispatcher expires.
    """

    redelivers_lost_tasks = True
    spans_hosts = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        stream_maxlen: int = 100_000,
        visibility_timeout: float = 60.0,
        reply_ttl: float = 60.0,
        socket_timeout: float = 10.0,
    ) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"not a Redis URL: {url!r}")
        # Options in the URL (``?visibility_timeout=30``) serve ``ringbus worker
        # --transport URL``; redis-py never sees them.
        url, options = _split_options(url)
        stream_maxlen = int(options.get("stream_maxlen", stream_maxlen))
        visibility_timeout = float(options.get("visibility_timeout", visibility_timeout))
        reply_ttl = float(options.get("reply_ttl", reply_ttl))
        socket_timeout = float(options.get("socket_timeout", socket_timeout))
        if not visibility_timeout > 0 or not reply_ttl >= 1 or stream_maxlen < 1:
            raise ValueError(
                "visibility_timeout must be > 0, reply_ttl >= 1 and stream_maxlen >= 1"
            )
        self.url = url
        self.stream_maxlen = int(stream_maxlen)
        self.visibility_timeout = float(visibility_timeout)
        self.reply_ttl = float(reply_ttl)
        self.socket_timeout = float(socket_timeout)
        # Longest single wait in Redis: bounds how late the periodic work
        # (reclaiming, refreshing the reply key) and a missed wake-up run.
        self._slice = max(0.05, min(1.0, self.visibility_timeout / 4, self.reply_ttl / 4))
        self._reset_process_state()
        _live.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # Spawned workers get the configuration; connections are per process.
        return (_rebuild, (self.url, self._config(), self.bus_name))

    def _config(self) -> dict[str, Any]:
        return {
            "stream_maxlen": self.stream_maxlen,
            "visibility_timeout": self.visibility_timeout,
            "reply_ttl": self.reply_ttl,
            "socket_timeout": self.socket_timeout,
        }

    def _reset_process_state(self) -> None:
        # Inherited connections are dropped, not closed: they are the parent's.
        self._lock = threading.RLock()
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._host = socket.gethostname()
        self._consumer = f"{self._host}:{os.getpid()}"
        # Task side (workers).
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
        self._claim_cursor: bytes | str = "0-0"
        self._keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self._was_consumer = False
        # Reply side (dispatchers).
        self._reply_key = ""
        self._reply_closed = False
        self._alive_at = 0.0

    # ------------------------------------------------------------ plumbing

    @property
    def _prefix(self) -> str:
        if not self.bus_name:
            raise RuntimeError("transport is not bound to a bus")
        return _names.redis_prefix(self.bus_name)

    @property
    def stream(self) -> str:
        """The task stream's key."""
        return f"{self._prefix}:tasks"

    @property
    def dead_stream(self) -> str:
        """The dead-letter stream's key."""
        return f"{self._prefix}:dead"

    def _options(self, read_timeout: float) -> dict[str, Any]:
        return {
            "socket_timeout": read_timeout,
            "socket_connect_timeout": min(self.socket_timeout, 5.0),
            # We retry ourselves (with log lines, and never behind a caller's back).
            "retry": Retry(NoBackoff(), 0),
        }

    def _redis(self) -> redis.Redis:
        c = self._client
        if c is None:
            with self._lock:
                if self._client is None:
                    self._client = redis.Redis.from_url(
                        self.url, **self._options(self.socket_timeout + self._slice)
                    )
                c = self._client
        return c

    def _script(self, name: str, source: str) -> Any:
        s = self._scripts.get(name)
        if s is None:
            s = self._scripts[name] = self._redis().register_script(source)
        return s

    def where(self) -> str:
        """The URL without its password, for messages."""
        scheme, sep, rest = self.url.partition("://")
        cred, at, host = rest.rpartition("@")
        return f"{scheme}{sep}***@{host}" if at and cred else self.url

    def _unavailable(self, exc: BaseException, what: str) -> BrokerUnavailable:
        return BrokerUnavailable(f"Redis at {self.where()} is unavailable ({what}): {exc}")

    def _once(self, fn: Callable[[_R], T], what: str) -> T:
        """One request for a caller that wants an answer now (a dispatch):
        a stale pooled connection (Redis restarted) is retried once at once;
        Redis down raises BrokerUnavailable."""
        for attempt in (1, 2):
            try:
                return fn(self._redis())
            except _NET_ERRORS as exc:
                if attempt == 2:
                    raise self._unavailable(exc, what) from None
        raise AssertionError("unreachable")

    def _retrying(
        self,
        fn: Callable[[_R], T],
        what: str,
        stop: Callable[[], bool] | None = None,
        patience: float | None = None,
    ) -> T:
        """Workers and readers: wait out a Redis restart with a backoff and a
        log line per attempt; ``stop()`` true or ``patience`` spent ends it
        with TransportClosed / BrokerUnavailable."""
        delay = 0.05
        down_since = 0.0
        give_up = None if patience is None else time.monotonic() + patience
        while True:
            try:
                out = fn(self._redis())
            except _NET_ERRORS as exc:
                if stop is not None and stop():
                    raise TransportClosed(f"bus {self.bus_name!r}: {what} stopped") from None
                now = time.monotonic()
                if not down_since:
                    down_since = now
                if give_up is not None and now >= give_up:
                    raise self._unavailable(exc, what) from None
                log.warning(
                    "ringbus: Redis at %s unavailable while %s (%s); retrying in %.1f s",
                    self.where(),
                    what,
                    exc,
                    delay,
                )
                time.sleep(delay * (0.5 + random.random()))
                delay = min(2.0, delay * 2)
                continue
            if down_since:
                log.warning(
                    "ringbus: Redis at %s reachable again after %.1f s (%s)",
                    self.where(),
                    time.monotonic() - down_since,
                    what,
                )
            return out

    # ------------------------------------------------------------ tasks

    def open(self) -> None:
        """Create the stream and the consumer group (from the first entry, so
        tasks queued before any worker existed are served)."""

        def create(r: _R) -> None:
            try:
                r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        self._once(create, "creating the task stream")
        self._opened = True

    def put_task(self, data: bytes, timeout: float | None = None) -> None:
        self._once(lambda r: r.xadd(self.stream, {b"d": data}), "queueing a task")

    def put_tasks(self, items: list[bytes], timeout: float | None = None) -> None:
        if not items:
            return

        def add(r: _R) -> None:
            pipe = r.pipeline(transaction=False)
            for data in items:
                pipe.xadd(self.stream, {b"d": data})
            pipe.execute()

        self._once(add, "queueing tasks")

    def _delivered(self, data: bytes, deliveries: int) -> bytes:
        """Hand out an entry's envelope; ``deliveries`` is read by the taker."""
        self.deliveries = deliveries
        return data

    def _task_conn(self) -> Any:
        """This process's connection for blocking reads: one we can shut down
        from a signal handler (interrupt) to wake the read at once."""
        if self._tconn is None:
            self._tpool = redis.ConnectionPool.from_url(
                self.url, **self._options(self.socket_timeout + self._slice)
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
        resp = replies[-1]
        if isinstance(resp, Exception):
            raise resp
        return _stream_entries(resp)

    def _stop_reading(self) -> bool:
        return self._interrupted

    def get_tasks(self, max_items: int = 1, timeout: float | None = None) -> list[bytes]:
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        with self._tlock:
            return self._get_tasks(max_items, timeout)

    def _get_tasks(self, max_items: int, timeout: float | None) -> list[bytes]:
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
                got = self._retrying(
                    lambda r: self._reclaim(r, max_items), "reclaiming tasks", self._stop_reading
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
                entries = self._read(max_items, block)
            except _NET_ERRORS as exc:
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
                if "NOGROUP" not in str(exc):
                    raise
                # The stream was deleted (destroy, or a Redis without persistence
                # restarted): create it again.
                log.warning("ringbus: task stream %s is gone; creating it again", self.stream)
                self._to_ack.clear()
                self._opened = False
                self._retrying(
                    lambda r: self.open(), "creating the task stream", self._stop_reading
                )
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
                    out.append(self._delivered(data, 1))
                if timeout == 0:
                    # A look without waiting is how a dispatcher takes its own
                    # queued tasks off the channel (cancel; the others are put
                    # back as new entries): they leave the stream now.
                    self.ack_tasks(len(out))
                return out
            if timeout == 0:
                raise queue.Empty

    def _reclaim(self, r: _R, count: int) -> list[bytes]:
        """Entries whose worker died: those of dead processes on this host at
        once, the others once idle past the visibility timeout."""
        claimed = self._reclaim_local(r, count)
        if claimed:
            return claimed
        idle_ms = int(self.visibility_timeout * 1000)
        cursor, got, *_ = r.xautoclaim(
            self.stream, GROUP, self._consumer, idle_ms, self._claim_cursor, count
        )
        self._claim_cursor = cursor or "0-0"
        return self._deliver_claimed(r, [(i, f) for i, f in got if f], "idle past the timeout")

    def _reclaim_local(self, r: _R, count: int) -> list[bytes]:
        grace_ms = int(min(self.visibility_timeout, 1.0) * 1000)
        out: list[bytes] = []
        for c in r.xinfo_consumers(self.stream, GROUP):
            name = _text(c.get("name", b""))
            host, _, pid_text = name.rpartition(":")
            if host != self._host or not pid_text.isdigit() or name == self._consumer:
                continue
            if pid_alive(int(pid_text)):
                continue
            if not int(c.get("pending", 0)):
                self._script("drop", _DROP_CONSUMER)(keys=[self.stream], args=[GROUP, name])
                continue
            if int(c.get("idle", 0)) < grace_ms:
                continue
            pending = r.xpending_range(self.stream, GROUP, "-", "+", count, name)
            ids = [p["message_id"] for p in pending]
            if not ids:
                continue
            got = r.xclaim(self.stream, GROUP, self._consumer, grace_ms, ids)
            out += self._deliver_claimed(
                r, [(i, f) for i, f in got if f], f"its worker pid {pid_text} died"
            )
            if out:
                break
        return out

    def _deliver_claimed(
        self, r: _R, got: list[tuple[bytes, dict[bytes, bytes]]], why: str
    ) -> list[bytes]:
        if not got:
            return []
        counts: dict[bytes, int] = {}
        for p in r.xpending_range(self.stream, GROUP, "-", "+", 10000, self._consumer):
            counts[p["message_id"]] = int(p["times_delivered"])
        out: list[bytes] = []
        for entry_id, fields in got:
            deliveries = counts.get(entry_id, 2)
            log.warning(
                "ringbus: worker %s took over task entry %s of bus %r (%s; delivery %d)",
                self._consumer,
                _text(entry_id),
                self.bus_name,
                why,
                deliveries,
            )
            self._taken.append(entry_id)
            out.append(self._delivered(fields[b"d"], deliveries))
        return out

    def ack_tasks(self, n: int = 1) -> None:
        """The oldest ``n`` taken entries are finished (their results were
        sent): they are acknowledged with this process's next read, in the
        same round trip, or at ``close()``."""
        for _ in range(min(n, len(self._taken))):
            self._to_ack.append(self._taken.popleft())

    def _acked(self, n: int) -> None:
        self._acks += n
        if self._acks >= min(_TRIM_EVERY, max(1, self.stream_maxlen // 2)):
            self._acks = 0
            try:
                self._trim(self._redis())
            except (*_NET_ERRORS, redis.ResponseError) as exc:
                log.debug("ringbus: trimming %s skipped: %s", self.stream, exc)

    def _flush_acks(self) -> None:
        acks = list(self._to_ack)
        if not acks:
            return
        try:
            self._retrying(
                lambda r: r.xack(self.stream, GROUP, *acks),
                "acknowledging tasks",
                patience=self.socket_timeout,
            )
        except BrokerUnavailable as exc:
            log.warning("ringbus: %d finished task(s) will be delivered again: %s", len(acks), exc)
        del self._to_ack[: len(acks)]

    def _trim(self, r: _R) -> None:
        """Drop acknowledged entries once the stream is longer than
        stream_maxlen; never pending or undelivered ones (MINID below both)."""
        if r.xlen(self.stream) <= self.stream_maxlen:
            return
        floor: bytes | None = None
        for g in r.xinfo_groups(self.stream):
            if _text(g.get("name", b"")) == GROUP:
                floor = g["last-delivered-id"]
        if floor is None or floor in (b"0-0", "0-0"):
            return
        summary = r.xpending(self.stream, GROUP)
        if summary and summary.get("pending") and summary.get("min"):
            floor = min(floor, summary["min"], key=_id_key)
        r.xtrim(self.stream, minid=floor, approximate=True)

    def _start_keeper(self) -> None:
        """A thread that keeps this worker's entries claimed while their tasks
        run, so XAUTOCLAIM only takes over those of dead or frozen workers."""
        if self._keeper is not None:
            return
        pid = os.getpid()
        period = self.visibility_timeout / 3
        stop = self._keeper_stop

        def keep() -> None:
            while not stop.wait(period) and os.getpid() == pid:
                ids = list(self._taken) + list(self._to_ack)
                if not ids:
                    continue
                try:
                    self._script("keep", _KEEP)(
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

        def lag(r: _R) -> int:
            try:
                groups = r.xinfo_groups(self.stream)
            except redis.ResponseError:
                return 0  # no stream yet
            for g in groups:
                if _text(g.get("name", b"")) != GROUP:
                    continue
                if g.get("lag") is not None:
                    return int(g["lag"])
                return len(r.xrange(self.stream, b"(" + _bytes(g["last-delivered-id"]), "+"))
            return int(r.xlen(self.stream))

        return self._once(lag, "counting tasks")

    # ------------------------------------------------------------ replies

    def reply_address(self) -> bytes:
        key = self._reply_key
        if key:
            return key.encode()
        with self._lock:
            if not self._reply_key:
                key = f"{self._prefix}:reply:{self._host}:{os.getpid()}:{secrets.token_hex(4)}"
                ttl = int(self.reply_ttl)
                # Alive before the first task can answer (else its result is dropped).
                self._once(lambda r: r.set(f"{key}:alive", b"1", ex=ttl), "creating a reply key")
                self._alive_at = time.monotonic()
                self._reply_closed = False
                self._reply_key = key
            return self._reply_key.encode()

    def _reply_stopped(self) -> bool:
        return self._reply_closed

    def recv_replies(self, max_items: int, timeout: float | None = None) -> list[bytes]:
        key = self._reply_key
        if not key or self._reply_closed:
            raise TransportClosed("no reply channel in this process")
        end = None if timeout is None else time.monotonic() + timeout
        ttl = int(self.reply_ttl)
        while True:
            if self._reply_closed:
                raise TransportClosed("the reply channel was closed")
            now = time.monotonic()
            if now - self._alive_at > self.reply_ttl / 4:
                self._alive_at = now
                self._retrying(
                    lambda r: r.set(f"{key}:alive", b"1", ex=ttl),
                    "refreshing the reply key",
                    self._reply_stopped,
                )
            if timeout == 0:
                wait = 0.0
            else:
                wait = self._slice if end is None else min(self._slice, end - now)
                if wait <= 0:
                    raise queue.Empty
                wait = max(wait, 0.001)  # BLMPOP 0 would wait forever

            def pop(r: _R, wait: float = wait) -> Any:
                if wait <= 0:
                    return r.execute_command("LMPOP", 1, key, "LEFT", "COUNT", max_items)
                return r.execute_command(
                    "BLMPOP", f"{wait:.3f}", 1, key, "LEFT", "COUNT", max_items
                )

            got = self._retrying(pop, "reading results", self._reply_stopped)
            if got:
                items = next(iter(got.values())) if isinstance(got, dict) else got[1]
                out = [d for d in items if d != _WAKE]
                if out or self._reply_closed:
                    return out
            if timeout == 0:
                raise queue.Empty

    def close_replies(self) -> None:
        with self._lock:
            key, self._reply_key = self._reply_key, ""
            self._reply_closed = True
        if not key:
            return

        def drop(r: _R) -> None:
            pipe = r.pipeline(transaction=False)
            pipe.delete(f"{key}:alive")  # workers drop later results at once
            pipe.rpush(key, _WAKE, _WAKE)  # wakes readers blocked in BLMPOP
            pipe.expire(key, 5)
            pipe.execute()

        with contextlib.suppress(Exception):
            self._once(drop, "closing the reply key")

    def send_reply(
        self, address: bytes, pid: int, data: bytes, patience: float | None = None
    ) -> bool:
        key = address.decode("utf-8", "replace")
        if not key.startswith(f"{self._prefix}:reply:"):
            log.warning("dropping a result: %r is not a reply key of bus %r", key, self.bus_name)
            return False
        script = self._script("send", _SEND)
        ttl = int(self.reply_ttl)
        try:
            ok = self._retrying(
                lambda r: script(keys=[key, f"{key}:alive"], args=[data, ttl], client=r),
                "sending a result",
                patience=patience,
            )
        except BrokerUnavailable as exc:
            log.warning("dropping a result for %s: %s", key, exc)
            return False
        if not ok:
            if data != _WAKE:
                log.warning("dropping a result: the dispatcher of %s is gone", key)
            return False
        return True

    # ------------------------------------------------------------ records

    def add_record(self, data: bytes) -> str:
        entry = self._retrying(
            lambda r: r.xadd(self.dead_stream, {b"d": data}),
            "keeping a record",
            patience=self.socket_timeout,
        )
        return _text(entry)

    def settle(self, data: bytes) -> None:
        """Acknowledge the entry holding ``data`` pending at a dead consumer of
        this host (a supervisor buried the task of a worker it killed)."""
        with contextlib.suppress(*_NET_ERRORS, redis.ResponseError):
            r = self._redis()
            for c in r.xinfo_consumers(self.stream, GROUP):
                name = _text(c.get("name", b""))
                host, _, pid_text = name.rpartition(":")
                if host != self._host or not pid_text.isdigit() or not int(c.get("pending", 0)):
                    continue
                if pid_alive(int(pid_text)):
                    continue
                for p in r.xpending_range(self.stream, GROUP, "-", "+", 100, name):
                    found = r.xrange(self.stream, p["message_id"], p["message_id"])
                    fields = found[0][1] if found else None
                    if fields and fields.get(b"d", b"") == data:
                        r.xack(self.stream, GROUP, p["message_id"])
                        return

    def records(self) -> list[Record]:
        entries = self._once(lambda r: r.xrange(self.dead_stream), "reading records")
        return [(_text(eid), f.get(b"d", b"")) for eid, f in entries]

    def take_records(
        self,
        ids: Iterable[str] | None = None,
        handle: Callable[[Record], object] | None = None,
    ) -> list[Record]:
        want = None if ids is None else set(ids)
        taken: list[Record] = []
        for rec in self.records():
            if want is not None and rec[0] not in want:
                continue
            if handle is not None:
                handle(rec)  # first: a crash in between duplicates, never loses
            self._once(lambda r, i=rec[0]: r.xdel(self.dead_stream, i), "removing a record")  # type: ignore[misc]
            taken.append(rec)
        return taken

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Acknowledge finished tasks, drop this process's reply key and consumer
        (when it holds nothing), close the connections (the streams stay)."""
        self._keeper_stop.set()
        if self._to_ack:
            self._flush_acks()
        self.close_replies()
        if self._was_consumer and not self._taken:
            with contextlib.suppress(Exception):
                self._script("drop", _DROP_CONSUMER)(
                    keys=[self.stream], args=[GROUP, self._consumer]
                )
        with self._lock:
            c, self._client = self._client, None
            tpool, self._tpool = self._tpool, None
            self._tconn = self._tsock = None
            self._scripts = {}
            self._keeper = None
            self._keeper_stop = threading.Event()
            self._opened = False
        with contextlib.suppress(Exception):
            if c is not None:
                c.close()
        with contextlib.suppress(Exception):
            if tpool is not None:
                tpool.disconnect()

    def destroy(self, *, force: bool = False) -> None:
        """Delete the task and dead-letter streams and the reply keys of
        dispatchers that are gone (live ones keep theirs)."""
        self.close()

        def drop(r: _R) -> None:
            keys: list[Any] = [self.stream, self.dead_stream]
            for k in r.scan_iter(f"{self._prefix}:reply:*", count=1000):
                name = _text(k)
                if name.endswith(":alive"):
                    continue
                if not r.exists(f"{name}:alive"):
                    keys.append(k)
            r.delete(*keys)

        self._once(drop, "removing the bus")

    def describe(self) -> str:
        return f"redis:{self.where()} {self.stream}" if self.bus_name else "redis:(unbound)"


_OPTIONS = ("stream_maxlen", "visibility_timeout", "reply_ttl", "socket_timeout")


def _split_options(url: str) -> tuple[str, dict[str, str]]:
    """The URL without this transport's query options, and those options."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.query:
        return url, {}
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in _OPTIONS:
            ours[k] = v
        else:
            theirs.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _id_key(entry_id: Any) -> tuple[int, int]:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _stream_entries(resp: Any) -> list[tuple[bytes, bytes]]:
    """(id, envelope) pairs from a raw XREADGROUP reply (RESP2 list or RESP3 map)."""
    if not resp:
        return []
    streams = resp.items() if isinstance(resp, dict) else resp
    out: list[tuple[bytes, bytes]] = []
    for _, entries in streams:
        for entry_id, fields in entries:
            if not fields:
                continue  # deleted meanwhile
            if isinstance(fields, dict):
                data = fields.get(b"d", b"")
            else:
                data = dict(zip(fields[::2], fields[1::2], strict=False)).get(b"d", b"")
            out.append((_bytes(entry_id), data))
    return out


def _rebuild(url: str, config: dict[str, Any], bus_name: str) -> RedisTransport:
    t = RedisTransport(url, **config)
    if bus_name:
        t.bind(bus_name)
    return t
