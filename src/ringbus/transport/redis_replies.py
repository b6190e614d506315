"""The reply channels of ``RedisTransport``: a list per dispatching process,
written by workers only while its ``:alive`` key says a reader listens."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ringbus.errors import BrokerUnavailable, TransportClosed
from ringbus.transport.redis_conn import R, RedisBase, log
from ringbus.transport.redis_scripts import SEND
from ringbus.transport.redis_wire import pipeline as wire_pipeline

__all__ = ["ReplyChannel"]

WAKE = b""  # pushed on a reply list to wake its reader; never handed out
_RIDE_COUNT = 512  # results a dispatch's round trip may bring back


class ReplyChannel(RedisBase):
    """The reply side of ``RedisTransport`` (dispatchers read, workers send)."""

    def _reset_process_state(self) -> None:
        super()._reset_process_state()
        self._reply_key = ""
        self._reply_closed = False
        self._alive_at = 0.0
        self._alive_outages = 0
        self._rconns: list[Any] = []  # idle connections of reply readers (redis_wire)
        self._rides = False  # a worker's results ride its reads (see redis_sender)
        # Results a dispatch's round trip brought back, and the threads whose
        # reads wait in BLMPOP now (deque and set: each step atomic, any thread).
        self._popped: deque[bytes] = deque()
        self._blocked: set[int] = set()

    def reply_address(self) -> bytes:
        """This process's reply list.  Its ``:alive`` key is set by every
        dispatch (ahead of the task, in the same round trip: a Redis that
        lost it, restarted without persistence or flushed, gets it back
        before the task can answer) and refreshed by the reader."""
        key = self._reply_key
        if key:
            return key.encode()
        with self._lock:
            if not self._reply_key:
                key = f"{self._prefix}:reply:{self._host}:{os.getpid()}:{secrets.token_hex(4)}"
                self._alive_at = 0.0  # the reader sets it at once
                self._reply_closed = False
                self._reply_key = key
            return self._reply_key.encode()

    def _dispatch_commands(self) -> list[tuple[Any, ...]]:
        key = self._reply_key
        if not key or self._reply_closed:
            return []
        return [("SET", f"{key}:alive", b"1", "EX", int(self.reply_ttl))]

    def _reply_stopped(self) -> bool:
        return self._reply_closed

    # A dispatch's round trip also pops the results already waiting (LMPOP,
    # no wait) while no reader waits in BLMPOP (it would have them first):
    # the next read hands them out with no round trip of its own.  A reader
    # thread parked while a caller reads leaves results in the list for as
    # long anyway, so none waits longer than before.

    def _pop_command(self) -> tuple[Any, ...] | None:
        """The LMPOP to ride a dispatch (None: no reply list, or a reader waits)."""
        key = self._reply_key
        if not key or self._reply_closed or self._blocked:
            return None
        return ("LMPOP", 1, key, "LEFT", "COUNT", _RIDE_COUNT)

    def _popped_with(self, got: Any) -> None:
        """The reply of a riding LMPOP."""
        if not got or isinstance(got, Exception):
            return
        items = next(iter(got.values())) if isinstance(got, dict) else got[1]
        out = [d for d in items if d != WAKE]
        if not out:
            return
        self._popped.extend(out)  # first, then look: a reader either sees these or is seen
        if self._blocked:  # a reader began to wait meanwhile: wake it for these
            with contextlib.suppress(Exception):
                self._once(lambda r: r.rpush(self._reply_key, WAKE), "waking the reader")

    def _take_popped(self, max_items: int) -> list[bytes]:
        out: list[bytes] = []
        pop = self._popped.popleft
        with contextlib.suppress(IndexError):  # another reader took the rest
            while len(out) < max_items:
                out.append(pop())
        return out

    def recv_replies(self, max_items: int, timeout: float | None = None) -> list[bytes]:
        key = self._reply_key
        if not key or self._reply_closed:
            raise TransportClosed("no reply channel in this process")
        if self._popped:
            return self._take_popped(max_items)
        end = None if timeout is None else time.monotonic() + timeout
        ttl = int(self.reply_ttl)
        while True:
            if self._reply_closed:
                raise TransportClosed("the reply channel was closed")
            now = time.monotonic()
            # Refreshed periodically, and at once after Redis was unreachable
            # (it may have restarted without its keys).
            if now - self._alive_at > self.reply_ttl / 4 or self._outages != self._alive_outages:
                self._alive_at = now
                self._alive_outages = self._outages
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

            if wait <= 0:
                cmd: tuple[Any, ...] = ("LMPOP", 1, key, "LEFT", "COUNT", max_items)
            else:
                cmd = ("BLMPOP", f"{wait:.3f}", 1, key, "LEFT", "COUNT", max_items)
            pop: Callable[[R], Any] = functools.partial(self._pop_replies, cmd)
            me = threading.get_ident()
            self._blocked.add(me)  # first, then look (see _popped_with)
            try:
                if self._popped:  # a dispatch brought some back meanwhile
                    return self._take_popped(max_items)
                got = self._retrying(pop, "reading results", self._reply_stopped)
            finally:
                self._blocked.discard(me)
            if self._popped:
                got = self._merged(got)
            if got:
                items = next(iter(got.values())) if isinstance(got, dict) else got[1]
                out = [d for d in items if d != WAKE]
                if out or self._reply_closed:
                    return out
            if timeout == 0:
                raise queue.Empty

    def _merged(self, got: Any) -> Any:
        """``got`` (a (B)LMPOP reply) behind what dispatches popped meanwhile."""
        items = [] if not got else next(iter(got.values())) if isinstance(got, dict) else got[1]
        return [None, self._take_popped(_RIDE_COUNT) + list(items)]

    def _pop_replies(self, cmd: tuple[Any, ...], r: R = None) -> Any:
        """One (B)LMPOP on a reader connection of this process's own (two
        readers may overlap for a moment: each takes its own).  Its socket
        timeout is ``socket_timeout`` + the longest wait."""
        try:
            conn = self._rconns.pop()
        except IndexError:
            conn = self._raw_connection(self._reply_key or "")
        (got,) = wire_pipeline(conn, [cmd])
        if self._reply_closed:
            conn.disconnect()
        else:
            self._rconns.append(conn)
        if isinstance(got, Exception):
            raise got  # a cluster's MOVED: _retrying finds the node again
        return got

    def _close_connections(self) -> None:
        super()._close_connections()
        conns, self._rconns = self._rconns, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.disconnect()

    def close_replies(self) -> None:
        with self._lock:
            key, self._reply_key = self._reply_key, ""
            self._reply_closed = True
        if not key:
            return

        def drop(r: R) -> None:
            pipe = r.pipeline(transaction=False)
            pipe.delete(f"{key}:alive")  # workers drop later results at once
            pipe.rpush(key, WAKE, WAKE)  # wakes readers blocked in BLMPOP
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
        script = self._script("send", SEND)
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
            if data != WAKE:
                log.warning("dropping a result: the dispatcher of %s is gone", key)
            return False
        return True
