"""Pipelined commands on a connection's own socket: RESP packed here, replies
parsed by hiredis.

redis-py's ``pack_commands`` and ``read_response`` cost tens of
microseconds of Python per command (encoders, health checks, chunking,
wrappers around the parser); a dispatch is one XADD and that overhead was
most of it.  redis-py still makes and hands over each connection (URL,
TLS, AUTH, SELECT, the handshake); only the commands of a pipeline and
their replies go through here.  Without hiredis, the replies are read by
redis-py as before.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from redis._parsers.base import BaseParser

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis ships with ringbus[redis]
    hiredis = None  # type: ignore[assignment]

__all__ = ["pack", "pipeline"]

_pack_c = getattr(hiredis, "pack_command", None)  # hiredis >= 2.1

_READ = 65536


def _arg(a: Any) -> bytes:
    if isinstance(a, bytes):
        return b"$%d\r\n%b\r\n" % (len(a), a)
    if isinstance(a, str):
        a = a.encode()
        return b"$%d\r\n%b\r\n" % (len(a), a)
    if isinstance(a, int):  # bool is refused by redis-py too: never passed here
        a = b"%d" % a
        return b"$%d\r\n%b\r\n" % (len(a), a)
    if isinstance(a, float):  # as redis-py and hiredis write it
        a = repr(a).encode()
        return b"$%d\r\n%b\r\n" % (len(a), a)
    if isinstance(a, (bytearray, memoryview)):
        a = bytes(a)
        return b"$%d\r\n%b\r\n" % (len(a), a)
    raise TypeError(f"a Redis argument must be bytes, str, int or float, not {type(a).__name__}")


def pack(cmds: list[tuple[Any, ...]]) -> bytes:
    """The RESP of ``cmds``, one array per command (hiredis packs in C what
    it can: a third of the time, on every dispatch and every batch)."""
    if _pack_c is not None:
        try:
            return b"".join([_pack_c(c) for c in cmds])
        except TypeError:  # a list, a bytearray: packed here
            pass
    parts: list[bytes] = []
    add = parts.append
    for cmd in cmds:
        add(b"*%d\r\n" % len(cmd))
        for a in cmd:
            add(_arg(a))
    return b"".join(parts)


def _reader(conn: Any, sock: Any) -> Any:
    """The hiredis reader of ``conn``'s current socket (a new socket, after a
    reconnect, starts with a new one: nothing half-read carries over)."""
    held = getattr(conn, "_rb_reader", None)
    if held is not None and held[0] is sock:
        return held[1]
    # Error replies become redis-py's own classes (NoScriptError, ...), as
    # redis-py's parser makes them.
    reader = hiredis.Reader(replyError=BaseParser.parse_error)
    conn._rb_reader = (sock, reader)
    return reader


def pipeline(conn: Any, cmds: list[tuple[Any, ...]], end: float | None = None) -> list[Any]:
    """Send ``cmds`` on ``conn`` (a connected redis-py Connection) in one
    write and read their replies, each error reply in its place as a
    ``redis.ResponseError``.  ``end`` (a ``time.monotonic()``): no read waits
    past it (``redis.TimeoutError``); None: the connection's socket timeout.
    A network error disconnects ``conn`` (the caller decides to retry)."""
    sock = conn._sock
    if sock is None:
        conn.connect()
        sock = conn._sock
    try:
        if end is not None:
            sock.settimeout(max(end - time.monotonic(), 0.001))
        sock.sendall(pack(cmds))
        if hiredis is None:
            return _read_slow(conn, len(cmds))
        reader = _reader(conn, sock)
        out: list[Any] = []
        want = len(cmds)
        gets, feed, recv = reader.gets, reader.feed, sock.recv
        while True:
            got = gets()
            if got is False:
                if end is not None:
                    left = end - time.monotonic()
                    if left <= 0:
                        raise redis.TimeoutError("no answer from Redis in time")
                    sock.settimeout(left)
                chunk = recv(_READ)
                if not chunk:
                    raise redis.ConnectionError("Redis closed the connection")
                feed(chunk)
                continue
            out.append(got)
            if len(out) == want:
                return out
    except TimeoutError as exc:  # socket.timeout: as redis-py says it
        conn.disconnect()
        raise redis.TimeoutError(f"no answer from Redis in time: {exc}") from None
    except redis.RedisError:
        conn.disconnect()
        raise
    except OSError as exc:
        conn.disconnect()
        raise redis.ConnectionError(f"the connection to Redis failed: {exc}") from None
    except BaseException:
        conn.disconnect()
        raise


def _read_slow(conn: Any, n: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(n):
        try:
            out.append(conn.read_response())
        except redis.ResponseError as exc:
            out.append(exc)
    return out
