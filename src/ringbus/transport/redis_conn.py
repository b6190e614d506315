"""Redis plumbing shared by the channels of ``RedisTransport``: the options,
this process's connections, and the two ways of asking Redis (once, for a
caller who wants an answer now; retrying, for workers and readers)."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ringbus import _names
from ringbus.errors import BrokerUnavailable, TransportClosed
from ringbus.transport.base import Transport
from ringbus.transport.redis_wire import pipeline as wire_pipeline

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("the Redis transport needs redis-py: pip install 'ringbus[redis]'") from exc

__all__ = [
    "CLUSTER_SCHEMES",
    "GROUP",
    "NET_ERRORS",
    "R",
    "RedisBase",
    "as_bytes",
    "as_text",
    "id_key",
]

log = logging.getLogger("ringbus.redis")

T = TypeVar("T")
R = Any
"""A redis.Redis client, typed loosely: redis-py types replies as wide unions."""

GROUP = "workers"
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
_CLUSTER_MOVES = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")
NET_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
_CLUSTER_ERRORS = (
    redis.exceptions.AskError,  # MovedError is one
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)

_OPTIONS = ("stream_maxlen", "visibility_timeout", "reply_ttl", "socket_timeout")


class RedisBase(Transport):
    """Configuration and connections of a Redis transport (see ``redis.py``)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        stream_maxlen: int = 100_000,
        visibility_timeout: float = 60.0,
        reply_ttl: float = 60.0,
        socket_timeout: float = 10.0,
    ) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)):
            raise ValueError(f"not a Redis URL: {url!r}")
        # Options in the URL (``?visibility_timeout=30``) serve ``ringbus worker
        # --transport URL``; redis-py never sees them.
        url, options = split_options(url)
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
        self._dpool: redis.ConnectionPool | None = None
        self._dconns: list[Any] = []  # idle connections of dispatches
        self._rpool: redis.ConnectionPool | None = None
        self._node_url = ""  # Redis Cluster: the node that holds the bus's slot
        self._outages = 0  # how often a retried request found Redis back

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
                        self._server_url(), **self._options(self.socket_timeout + self._slice)
                    )
                c = self._client
        return c

    @property
    def cluster(self) -> bool:
        """Whether the URL names a Redis Cluster (``redis+cluster://``)."""
        return self.url.startswith(CLUSTER_SCHEMES)

    def _server_url(self) -> str:
        """The URL to connect to: the configured server, or in a Redis Cluster
        the node that holds the bus's hash slot (every key of a bus carries
        the ``{<bus>}`` tag, so one node serves all of them, scripts included)."""
        if not self.cluster:
            return self.url
        if not self._node_url:
            self._node_url = self._find_node()
        return self._node_url

    def _find_node(self) -> str:
        from urllib.parse import urlsplit, urlunsplit

        from redis.cluster import RedisCluster

        scheme, _, rest = self.url.partition("+cluster://")
        seed = f"{scheme}://{rest}"
        try:
            rc = RedisCluster.from_url(
                seed, socket_timeout=self.socket_timeout, socket_connect_timeout=5.0
            )
            try:
                node = rc.get_node_from_key(self.stream)
            finally:
                rc.close()
        except (redis.RedisError, OSError) as exc:
            raise redis.ConnectionError(f"no Redis Cluster node for {self.stream}: {exc}") from exc
        parts = urlsplit(seed)
        cred = parts.netloc.rpartition("@")[0]
        netloc = f"{cred}@{node.host}:{node.port}" if cred else f"{node.host}:{node.port}"
        return urlunsplit(parts._replace(netloc=netloc, path="/0"))

    def _moved(self, exc: BaseException) -> bool:
        """A cluster answered MOVED/ASK/CLUSTERDOWN (the slot moved, a failover):
        forget the node and the connections to it (True), so the next request
        finds the node that holds the slot now."""
        text = str(exc)
        # redis-py's parser makes MovedError("<slot> <node>") of "MOVED ..."
        # (the code stripped), as redis_wire does: the class tells it then.
        moved = isinstance(exc, _CLUSTER_ERRORS) or text.startswith(_CLUSTER_MOVES)
        if not self.cluster or not moved:
            return False
        log.warning(
            "ringbus: bus %r: %s; finding its Redis Cluster node again", self.bus_name, text
        )
        self._close_connections()
        self._node_url = ""
        return True

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

    def _once(self, fn: Callable[[R], T], what: str) -> T:
        """One request for a caller that wants an answer now (a dispatch):
        a stale pooled connection (Redis restarted) is retried once at once;
        Redis down raises BrokerUnavailable."""
        for attempt in (1, 2):
            try:
                return fn(self._redis())
            except NET_ERRORS as exc:
                if attempt == 2:
                    raise self._unavailable(exc, what) from None
            except redis.ResponseError as exc:
                if attempt == 2 or not self._moved(exc):
                    raise
        raise AssertionError("unreachable")

    def _dispatch_commands(self) -> list[tuple[Any, ...]]:
        """Commands sent ahead of every dispatch, in its round trip (the reply
        key's ``:alive``, new task records): every put of an envelope
        (XADD, ZADD) must send them first."""
        return []

    def _pop_command(self) -> tuple[Any, ...] | None:
        """A read of this process's results to ride a dispatch's round trip
        (``redis_replies``; None: none now)."""
        return None

    def _popped_with(self, got: Any) -> None:
        """The reply of ``_pop_command``'s command."""

    def _read_commands(self) -> list[tuple[Any, ...]]:
        """Commands pipelined behind a worker's XREADGROUP: Redis runs them
        once the read returned (``_after_read`` gets their replies)."""
        return []

    def _after_read(self, replies: list[Any]) -> None:
        """The replies of ``_read_commands`` (errors as exception objects)."""

    def _status_later(self, cmds: list[tuple[Any, ...]], wake: bool = True) -> bool:
        """Queue a worker's task-status commands to go out ahead of the
        results it sends next, off the caller's thread (``wake=False``: with
        the next result; False: cannot here, send them now)."""
        return False

    def _dispatch_failed(self, cmds: list[tuple[Any, ...]]) -> None:
        """``_call`` is about to raise BrokerUnavailable for ``cmds`` (a task
        record among them must go out with the next dispatch)."""

    def _call(self, cmds: list[tuple[Any, ...]], what: str, timeout: float | None) -> list[Any]:
        """Pipelined commands for a caller that wants an answer now (a
        dispatch), answered within ``timeout`` seconds (None: the socket
        timeout) or BrokerUnavailable: connecting, the handshake and every
        read are bounded by the time left.  A connection that broke since its
        last use (Redis restarted) is replaced once, at once, while time is
        left; Redis down raises at once."""
        budget = self.socket_timeout + self._slice if timeout is None else max(timeout, 0.05)
        end = time.monotonic() + budget
        for attempt in (1, 2):
            left = end - time.monotonic()
            if left <= 0:
                self._dispatch_failed(cmds)
                raise self._unavailable(TimeoutError(f"no answer within {budget:g} s"), what)
            conn: Any = None
            try:
                conn = self._dispatch_conn(left)
                replies = wire_pipeline(conn, cmds, end)  # redis_wire: hiredis, no redis-py layers
            except NET_ERRORS as exc:
                if conn is not None:
                    conn.disconnect()
                    self._dconns.append(conn)
                if attempt == 2 or end - time.monotonic() <= 0:
                    self._dispatch_failed(cmds)
                    raise self._unavailable(exc, what) from None
                continue
            except BaseException:
                if conn is not None:
                    conn.disconnect()
                raise
            self._dconns.append(conn)
            for reply in replies:
                if isinstance(reply, Exception):
                    if attempt == 1 and self._moved(reply):
                        break  # to the slot's new node, once
                    raise reply
            else:
                return replies
        raise AssertionError("unreachable")

    def _dispatch_conn(self, left: float) -> Any:
        """An idle connection whose connect, handshake and reads wait at most
        ``left`` seconds."""
        try:
            conn = self._dconns.pop()
        except IndexError:
            with self._lock:
                if self._dpool is None:
                    self._dpool = redis.ConnectionPool.from_url(
                        self._server_url(), **self._options(self.socket_timeout)
                    )
                pool = self._dpool
            conn = pool.make_connection()
        conn.socket_timeout = left
        conn.socket_connect_timeout = min(left, self.socket_timeout, 5.0)
        if getattr(conn, "_sock", None) is None:
            conn.connect()
        return conn  # redis_wire bounds its reads by the caller's end

    def _raw_connection(self, key: str) -> Any:
        """A connection of this process's own (not pooled) to the server
        that holds ``key``, for pipelines sent with ``pack_commands``."""
        with self._lock:
            if self._rpool is None:
                self._rpool = redis.ConnectionPool.from_url(
                    self._server_url(), **self._options(self.socket_timeout + self._slice)
                )
            return self._rpool.make_connection()

    def _retrying(
        self,
        fn: Callable[[R], T],
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
            except redis.ResponseError as exc:
                if not self._moved(exc):
                    raise
                continue
            except NET_ERRORS as exc:
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
                self._outages += 1
                log.warning(
                    "ringbus: Redis at %s reachable again after %.1f s (%s)",
                    self.where(),
                    time.monotonic() - down_since,
                    what,
                )
            return out

    def _close_connections(self) -> None:
        with self._lock:
            c, self._client = self._client, None
            conns, self._dconns = self._dconns, []
            self._dpool = self._rpool = None
            self._scripts = {}
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.disconnect()
        if c is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to release
                c.close()


def split_options(url: str) -> tuple[str, dict[str, str]]:
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


def as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def id_key(entry_id: Any) -> tuple[int, int]:
    """A stream entry id as a sortable pair."""
    ms, _, seq = as_text(entry_id).partition("-")
    return int(ms), int(seq or 0)
