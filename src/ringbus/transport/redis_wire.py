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

import socket
import struct
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
_TIMEVAL = struct.Struct("@ll")  # struct timeval (Linux, 64-bit and 32-bit alike)


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


def _wait_at_most(conn: Any, sock: Any, seconds: float | None) -> None:
    """Each send and receive on ``sock`` waits at most ``seconds`` (None: the
    connection's socket timeout).  The socket is made blocking with kernel
    timeouts (SO_RCVTIMEO/SO_SNDTIMEO), set again only when they change:
    a socket with a Python timeout costs a poll() before every send and
    receive, and an ioctl() for every change of timeout."""
    if seconds is None:
        seconds = conn.socket_timeout or 0.0  # 0: no limit
    elif seconds <= 0:
        raise TimeoutError("no time left")
    held = getattr(conn, "_rb_wait", None)
    if held is not None and held[0] is sock and abs(held[1] - seconds) <= 0.002 + seconds / 50:
        return
    if sock.gettimeout() is not None:
        sock.settimeout(None)
    whole = int(seconds)
    tv = _TIMEVAL.pack(whole, max(int((seconds - whole) * 1e6), 0 if whole or not seconds else 1))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    conn._rb_wait = (sock, seconds)


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
        data = pack(cmds)
        if hiredis is None:
            if end is not None:
                sock.settimeout(max(end - time.monotonic(), 0.001))
            sock.sendall(data)
            return _read_slow(conn, len(cmds))
        _wait_at_most(conn, sock, None if end is None else end - time.monotonic())
        sock.sendall(data)
        reader = _reader(conn, sock)
        out: list[Any] = []
        want = len(cmds)
        gets, feed, recv = reader.gets, reader.feed, sock.recv
        waited = False
        while True:
            got = gets()
            if got is False:
                if end is not None and waited:  # a reply in several pieces
                    _wait_at_most(conn, sock, end - time.monotonic())
                chunk = recv(_READ)
                waited = True
                if not chunk:
                    raise redis.ConnectionError("Redis closed the connection")
                feed(chunk)
                continue
            out.append(got)
            if len(out) == want:
                return out
    except (TimeoutError, BlockingIOError) as exc:  # as redis-py says it (EAGAIN: SO_RCVTIMEO)
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
