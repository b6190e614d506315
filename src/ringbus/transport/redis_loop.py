"""A concurrent worker's reads on its own event loop (``RedisTransport.loop_taker``).

With a taker thread, every batch crossed two threads (taker -> loop ->
sending thread) and cost two round trips (XREADGROUP, then the results and
XACKs).  Here the loop itself reads: XREADGROUP goes out on a non-blocking
socket that the loop watches, the entries start as tasks at once, and the
results and acknowledgements those tasks made meanwhile ride the next read,
ahead of its XREADGROUP (``ReplySender.ride``), as a one-at-a-time
worker's do.  An ``async def`` handler that does not wait thus costs one
round trip and no thread hand-off per batch.

A read that carries results blocks in Redis only when no task is running
(else a result made during the block would wait for it); results made while
a read blocks go out through the sending thread, as before (``kick``).
Everything but the plain read of one stream (opening the stream, the
reclaim round every ``_slice``, the channel set, several channels, a
network error, a stream gone) goes through ``take_tasks`` in a thread, the
way it always did: its retries, backoff and log lines are unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from ringbus.errors import TransportClosed
from ringbus.transport.base import write_journal
from ringbus.transport.redis_conn import NET_ERRORS, log, redis
from ringbus.transport.redis_wire import _reader, pack

__all__ = ["LoopConn", "LoopTaker"]

Cmd = tuple[Any, ...]
Got = list[tuple[bytes, int, object]]
_READ = 65536


class LoopConn:
    """One redis-py connection driven by ``loop``: a pipeline at a time, its
    replies parsed by hiredis as they arrive (the socket stays watched)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, make: Callable[[], Any]) -> None:
        self.loop = loop
        self._make = make  # a new redis-py connection (to the node that holds the bus)
        self.conn: Any = None
        self.sock: Any = None
        self._fut: asyncio.Future[list[Any]] | None = None
        self._out: list[Any] = []
        self._want = 0
        self._reader: Any = None

    async def call(self, cmds: list[Cmd], timeout: float) -> list[Any]:
        """The replies of ``cmds`` (error replies in place); a network error or
        no answer within ``timeout`` s disconnects and raises."""
        if self.sock is None:
            # Connecting (and redis-py's handshake, finding a cluster's node)
            # may wait: not on the loop.
            await self.loop.run_in_executor(None, self._connect)
            self.sock = self.conn._sock
            self.sock.setblocking(False)
            self._reader = _reader(self.conn, self.sock)
            self.loop.add_reader(self.sock.fileno(), self._readable)
        fut = self._fut = self.loop.create_future()
        self._out, self._want = [], len(cmds)
        data = pack(cmds)
        try:
            sent = self.sock.send(data)
            if sent < len(data):
                await self.loop.sock_sendall(self.sock, data[sent:])
        except OSError as exc:
            self.close()
            raise redis.ConnectionError(f"the connection to Redis failed: {exc}") from None
        timer = self.loop.call_later(timeout, self._expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()

    def _connect(self) -> None:
        if self.conn is None:
            self.conn = self._make()
        self.conn.connect()

    def renew(self) -> None:
        """The next call connects anew, through a new connection (a cluster
        may have moved the bus's slot to another node)."""
        self.close()
        self.conn = None

    def _expire(self, fut: asyncio.Future[list[Any]]) -> None:
        if fut is self._fut and not fut.done():
            self._fail(redis.TimeoutError("no answer from Redis in time"))

    def _readable(self) -> None:
        try:
            chunk = self.sock.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(redis.ConnectionError(f"the connection to Redis failed: {exc}"))
            return
        if not chunk:
            self._fail(redis.ConnectionError("Redis closed the connection"))
            return
        reader = self._reader
        reader.feed(chunk)
        out = self._out
        while (got := reader.gets()) is not False:
            out.append(got)
        fut = self._fut
        if fut is not None and len(out) >= self._want:
            self._fut = None
            if not fut.done():
                fut.set_result(out)

    def _fail(self, exc: BaseException) -> None:
        fut, self._fut = self._fut, None
        self.close()
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                self.loop.remove_reader(sock.fileno())
            except (ValueError, OSError, RuntimeError):
                pass  # closed already (interrupt shut it down, the loop is gone)
            with contextlib.suppress(OSError):  # back to redis-py's ways (if still open)
                sock.setblocking(True)
        if self.conn is not None:
            self.conn.disconnect()


class LoopTaker:
    """Takes of transport ``t`` (a ``RedisTransport``) for a worker running
    ``loop`` (see the module docstring); ``running()`` says how many of
    the worker's tasks are not finished."""

    def __init__(self, t: Any, loop: asyncio.AbstractEventLoop, running: Callable[[], int]) -> None:
        self.t = t
        self.loop = loop
        self.running = running
        self._conn = LoopConn(loop, lambda: t._raw_connection(t.stream))
        t._lsock_of = self._sock  # interrupt() shuts this socket down too
        self._thread = threading.get_ident()
        self._reading = False  # a fast read is in flight
        self._slow = False  # a take_tasks runs in a thread
        self._due = False
        self.stats = {"fast": 0, "slow": 0, "rides": 0, "wakes": 0}  # reads by kind
        self.sender = t._the_sender()
        self.sender.on_loop(self.kick)

    def _sock(self) -> Any:
        return self._conn.sock

    # -------------------------------------------------------- results

    def kick(self) -> None:
        """Something was queued to send (any thread): ride the next read, or
        when a read is in flight or no read comes, the sending thread."""
        try:
            if threading.get_ident() != self._thread:
                self.loop.call_soon_threadsafe(self._pump)
            elif not self._due:
                self._due = True
                self.loop.call_soon(self._pump)
        except RuntimeError:  # the loop is closed: the worker is stopping
            self.sender.wake_thread()

    def _pump(self) -> None:
        self._due = False
        if (self._reading or self._slow or self.waiting) and self.sender.queued():
            self.stats["wakes"] += 1
            self.sender.wake_thread()

    waiting = False  # the worker waits for a free slot: no read comes soon

    # -------------------------------------------------------- reads

    async def take(self, journals: list[Any]) -> Got:
        """Up to ``len(journals)`` entries (as ``take_tasks``); raises
        ``TransportClosed`` when interrupted, ``queue.Empty`` never (an empty
        list when nothing came within the slice)."""
        t = self.t
        if t._interrupted:
            raise TransportClosed(f"task channel of bus {t.bus_name!r} was interrupted")
        if not t._loop_ready():
            return await self._take_slow(journals)
        riding = self.sender.ride()
        # A read carrying results blocks only with no task running: a result
        # made meanwhile must not wait for the block to end.
        block = riding is None or not self.running()
        cmds, block_ms, finish = t._loop_read(len(journals), block)
        self.stats["fast"] += 1
        if riding is not None:
            self.stats["rides"] += 1
            cmds = riding[0] + cmds
        self._reading = True
        try:
            out = await self._conn.call(cmds, t.socket_timeout + t._slice + block_ms / 1000)
        except (*NET_ERRORS, asyncio.CancelledError) as exc:
            if riding is not None:
                self.sender.fell(riding[1])
            if t._interrupted:
                raise TransportClosed(
                    f"task channel of bus {t.bus_name!r} was interrupted"
                ) from None
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("ringbus: reading tasks on the loop failed (%s); retrying", exc)
            self._conn.renew()
            return await self._take_slow(journals)
        finally:
            self._reading = False
        if riding is not None:
            self.sender.rode(riding[1], out[: len(riding[0])])
            out = out[len(riding[0]) :]
        try:
            got = finish(out)
        except redis.ResponseError:  # a stream gone, a cluster's MOVED: the careful way
            self._conn.renew()
            return await self._take_slow(journals)
        for journal, (data, _, _) in zip(journals, got, strict=False):
            write_journal(journal, data)
        return got

    async def _take_slow(self, journals: list[Any]) -> Got:
        self.stats["slow"] += 1
        self._slow = True
        if self.sender.queued():
            self.sender.wake_thread()  # this read carries nothing
        try:
            return await self.loop.run_in_executor(None, self._take_tasks, journals)
        finally:
            self._slow = False

    def _take_tasks(self, journals: list[Any]) -> Got:
        import queue

        try:
            got: Got = self.t.take_tasks(journals)
        except queue.Empty:
            return []
        return got

    def close(self) -> None:
        self.sender.on_loop(None)  # from now on the sending thread sends
        self.t._lsock_of = None
        self._conn.close()
