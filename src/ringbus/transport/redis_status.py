"""The task table on Redis: one hash per task, with an expiry.

``ringbus:{bus}:task:<32 hex digits>``: fields ``s`` (state), ``c`` (cancel
flag, absent: 0), ``a`` (attempt, absent: 1), ``w``/``d`` (worker / dispatcher pid), ``n`` (the
dispatcher's counter), ``q``/``t``/``f`` (queued, started, finished: Unix
seconds), ``p``/``m`` (progress, message) and ``r`` (the kept result
message).  A task not finished keeps its hash ``LIVE_TTL`` seconds after the
last write (a bound for tasks lost with their whole Redis); a finished one
``keep_result`` seconds, or none (deleted at once).

Every request goes through the transport's bounded requests
(``RedisBase._call``): an answer within the caller's time or
``BrokerUnavailable``, never a raw redis-py error.

- A dispatch costs no round trip of its own: ``add`` only keeps the new
  record's commands, and the transport sends them ahead of the task's XADD
  (or ZADD) in the same pipeline (``unsent``, called from
  ``_dispatch_commands``).  Redis runs a pipeline in order, so the record
  exists before any worker can take the task.
- A worker starts a task with no round trip of its own either: behind its
  XREADGROUP it reads the bus's set of tasks cancelled while they waited
  (``ringbus:{bus}:cancelled``; Redis runs it once the read returned, so a
  cancel that came first is in it), drops a task found there, and marks
  the others running through its sending thread.  A cancel that reaches
  Redis after that read is one of a running task (the flag, read at most
  every ``FLAG_AGE`` seconds).  Redeliveries and retries ask Redis at once.
- A worker's running, progress and end writes go out with its results,
  through its sending thread (``redis_sender``), in order: the end ahead of
  the result (a caller that has the result sees the status ``done``),
  retried through a Redis restart like the results.
- The worker's other requests (a start of a task delivered again, a retry,
  the cancel flag) are bounded by ``WRITE_PATIENCE`` seconds; when Redis
  does not answer they are logged (one line per ``_QUIET`` seconds) and
  skipped: a blip never stalls or loses a task, it only leaves its status
  behind (a skipped retry is sent again ahead of the process's next status
  write, or at close).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ringbus._ids import new_id
from ringbus.errors import BrokerUnavailable
from ringbus.transport.redis_conn import redis
from ringbus.transport.redis_status_lazy import LazyStatus
from ringbus.transport.task_table import (
    CANCEL,
    CANCELLED,
    CANCELLED_HOLD,
    DONE,
    FAILED,
    FINAL,
    QUEUED,
    RUNNING,
    SCHEDULED,
    TERMINATE,
    TaskRecord,
    TaskTable,
)

if TYPE_CHECKING:
    from ringbus.transport.redis_conn import RedisBase

__all__ = ["FLAG_AGE", "LIVE_TTL", "WRITE_PATIENCE", "RedisTaskTable"]

log = logging.getLogger("ringbus.redis")

LIVE_TTL = 30 * 86400
"""Seconds a record of a task not finished outlives its last write."""

WRITE_PATIENCE = 2.0
"""Longest wait of a worker for a status write (capped by ``socket_timeout``)."""

FLAG_AGE = 0.05
"""Longest a running task's cancel flag is taken as read (the async
handlers' watcher looks every 50 ms too)."""

_QUIET = 10.0  # seconds between two log lines about skipped status writes
_CANCELLED_MAX = 1000  # more tasks cancelled while waiting: workers ask per task
_OWED_MAX = 100_000  # commands of skipped ends and retries kept for later

Cmd = tuple[Any, ...]


class _Record(tuple[Any, ...]):
    """The HSET of a new record, marked so that a dispatch round trip that
    failed can hand its records back (``resend``); ``cmds`` is the whole
    record (HSET, EXPIRE)."""

    gid: bytes
    cmds: list[Cmd]


# Cancel atomically: a waiting task becomes cancelled (and joins the bus's
# set of tasks cancelled while waiting, which workers read with their tasks),
# a running one is flagged.
_CANCEL = """
local s = redis.call('HGET', KEYS[1], 's')
if not s then return false end
local before = redis.call('HGETALL', KEYS[1])
s = tonumber(s)
if s == tonumber(ARGV[2]) or s == tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'c', ARGV[1], 's', ARGV[4], 'f', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[8])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5] - ARGV[6])
elseif s == tonumber(ARGV[7]) then
  redis.call('HSET', KEYS[1], 'c', ARGV[1])
end
return before
"""

# Start unless cancelled: 0 = cancelled (do not run), 1 = running now.  A
# missing or ended record is left alone (never made again, never reopened),
# and so is one a later attempt wrote (a held start that went out late).
_START = """
local h = redis.call('HMGET', KEYS[1], 'c', 's', 'a')
if h[1] and tonumber(h[1]) > 0 then return 0 end
local s = tonumber(h[2] or ARGV[6])
local later = tonumber(h[3] or 0) > tonumber(ARGV[2])
if s ~= tonumber(ARGV[6]) and s ~= tonumber(ARGV[7]) and not later then
  redis.call('HSET', KEYS[1], 's', ARGV[1], 'a', ARGV[2], 'w', ARGV[3], 't', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
return 1
"""

# Back to queued/scheduled, only while the record exists (an ended task's
# record, dropped, must not come back).
_SET_STATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 's', ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('HSET', KEYS[1], 'a', ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

_SCRIPTS = {
    name: (src, hashlib.sha1(src.encode()).hexdigest())
    for name, src in (("cancel", _CANCEL), ("start", _START), ("set_state", _SET_STATE))
}


def _f(v: Any, default: float = 0.0) -> float:
    return default if v is None or v in (b"", "") else float(v)


class RedisTaskTable(TaskTable):
    """See the module docstring; ``t`` is the bus's ``RedisTransport``."""

    same_host = False  # workers run anywhere: terminate cannot kill them from here

    def __init__(self, t: RedisBase) -> None:
        self._t = t
        self._prefix = t._prefix
        self._lock = threading.Lock()
        # gid -> commands to send ahead of the next dispatch: new records, and
        # deletions of records whose dispatch failed after they were sent.
        self._unsent: dict[bytes, list[Cmd]] = {}
        self._patience = max(0.05, min(t.socket_timeout, WRITE_PATIENCE))
        self._warned_at = 0.0
        self._skipped = 0
        self._owed: list[Cmd] = []  # worker writes Redis did not take (see _tell)
        # Ids (hex) of the tasks cancelled while they waited, as of this
        # worker's last read of tasks (None: not known, ask per task).
        self._cancelled: frozenset[bytes] | None = None
        self._lazy = LazyStatus(self._send_status)  # running and progress writes

    def _key(self, gid: bytes) -> str:
        return f"{self._prefix}:task:{gid.hex()}"

    @property
    def _cancelled_key(self) -> str:
        return f"{self._prefix}:cancelled"

    # ------------------------------------------------------------ requests

    def _request(self, cmds: list[Cmd], what: str, timeout: float | None) -> list[Any]:
        """``cmds`` in one bounded round trip; a script Redis does not hold
        (restarted, flushed) is sent again in full, once."""
        try:
            return self._t._call(cmds, what, timeout)
        except redis.exceptions.NoScriptError:
            pass
        full = [_full_script(c) for c in cmds]
        return self._t._call(full, what, timeout)

    def _send_status(self, cmds: list[Cmd], wake: bool = True) -> None:
        """A worker's status writes: with its results (its sending thread;
        ``wake=False``: with the next one), else one bounded request now."""
        if not self._t._status_later(cmds, wake) and cmds:
            self._tell(cmds, "writing task statuses", owe=True)

    def _ask(self, cmds: list[Cmd], what: str) -> list[Any]:
        """For a caller that wants the answer (status, cancel): bounded by
        the socket timeout; Redis away raises ``BrokerUnavailable``."""
        return self._request(cmds, what, None)

    def _tell(self, cmds: list[Cmd], what: str, owe: bool = False) -> list[Any] | None:
        """For a worker: bounded by ``WRITE_PATIENCE``; None (logged) when
        Redis did not take it.  ``owe``: then keep ``cmds`` and send them
        ahead of this process's next status write (an end or a retry must not
        stay unwritten for good after a blip)."""
        with self._lock:
            owed, self._owed = self._owed, []
        try:
            out = self._request(owed + cmds, what, self._patience)
            return out[len(owed) :]
        except (BrokerUnavailable, redis.RedisError) as exc:
            if isinstance(exc, BrokerUnavailable):  # an error reply would repeat: not kept
                with self._lock:
                    self._owed[:0] = owed + (cmds if owe else [])
                    if len(self._owed) > _OWED_MAX:  # a long outage: the oldest go
                        del self._owed[: len(self._owed) - _OWED_MAX]
            self._skipped += 1
            now = time.monotonic()
            if now - self._warned_at >= _QUIET:
                log.warning(
                    "ringbus: bus %r: task status not updated while %s (%d write(s) "
                    "skipped since the last such line; the tasks run on): %s",
                    self._t.bus_name,
                    what,
                    self._skipped,
                    exc,
                )
                self._warned_at, self._skipped = now, 0
            return None

    # ------------------------------------------------------------ dispatcher

    def add(self, state: int, dispatcher_pid: int, counter: int) -> bytes:
        """No round trip: the record goes out with the task (``unsent``)."""
        gid = new_id()
        key = self._key(gid)
        rec = _Record(
            ("HSET", key, "s", state, "d", dispatcher_pid, "n", counter, "q", repr(time.time()))
        )  # no "c" (0) nor "a" (1) yet: every field costs Redis on every dispatch
        rec.gid = gid
        rec.cmds = cmds = [rec, ("EXPIRE", key, LIVE_TTL)]
        with self._lock:
            self._unsent[gid] = cmds
        return gid

    def unsent(self) -> list[Cmd]:
        """The commands kept since the last call, for the transport to send
        ahead of the task(s) of its next dispatch round trip."""
        if not self._unsent:
            return []
        with self._lock:
            held, self._unsent = self._unsent, {}
        return [c for cmds in held.values() for c in cmds]

    def resend(self, cmds: list[Cmd]) -> None:
        """A dispatch round trip carrying ``cmds`` failed: its records go
        out with the next one (a task queued later by another thread whose
        record rode along here keeps its record; the dispatches that failed
        drop theirs, see ``drop``)."""
        recs = [c for c in cmds if type(c) is _Record]
        if recs:
            with self._lock:
                for rec in recs:
                    self._unsent.setdefault(rec.gid, rec.cmds)

    def drop(self, gid: bytes) -> None:
        """The dispatch failed.  A record not sent yet is forgotten; one sent
        (with a round trip that then failed, or with another thread's) is
        deleted with the next dispatch's round trip: no request here, so a
        failed dispatch never waits for Redis twice."""
        with self._lock:
            if self._unsent.pop(gid, None) is None:
                self._unsent[gid] = [("DEL", self._key(gid))]

    def get(self, gid: bytes) -> TaskRecord | None:
        (h,) = self._ask([("HGETALL", self._key(gid))], "reading a task's status")
        return _record(gid, h) if h else None

    def request_cancel(self, gid: bytes, terminate: bool = False) -> TaskRecord | None:
        args = [
            TERMINATE if terminate else CANCEL, QUEUED, SCHEDULED, CANCELLED, repr(time.time()),
            int(CANCELLED_HOLD), RUNNING, gid.hex(),
        ]  # fmt: skip
        keys = [self._key(gid), self._cancelled_key]
        (flat,) = self._ask([_script("cancel", keys, args)], "cancelling a task")
        return _record(gid, flat) if flat else None

    # ------------------------------------------------------------ worker

    def read_commands(self) -> list[Cmd]:
        """Pipelined behind a worker's read of tasks: the tasks cancelled
        while they waited, as of the moment the read returned."""
        return [("ZRANGE", self._cancelled_key, 0, _CANCELLED_MAX)]

    def after_read(self, replies: list[Any]) -> None:
        got = replies[0] if replies else None
        if not isinstance(got, list) or len(got) > _CANCELLED_MAX:
            self._cancelled = None  # an error, or too many: ask per task
        else:
            self._cancelled = frozenset(got)

    def start(self, gid: bytes, attempt: int, worker_pid: int) -> bool:
        """A task read anew (attempt 1) is checked against the cancelled set
        read with it, and marked running with the worker's next results: no
        round trip.  A cancel that reaches Redis after the read counts as one
        of a running task (the flag).  Others ask Redis now."""
        key, hexid = self._key(gid), gid.hex()
        args = [RUNNING, attempt, worker_pid, repr(time.time()), LIVE_TTL, DONE, FAILED]
        known = self._cancelled
        if known is not None and attempt == 1:
            if hexid.encode() in known:
                self._forget_cancelled(hexid)
                return False
            # Held (redis_status_lazy): a short task never sends it.  EVAL, not
            # EVALSHA: the sending thread cannot send it again in full.
            self._lazy.hold(gid, [("EVAL", _START, 1, key, *args)])
            return True
        out = self._tell([_script("start", [key], args)], "marking a task running")
        if out is not None and not out[0]:
            self._forget_cancelled(hexid)
            return False
        return True  # running, or Redis away: run it

    def _forget_cancelled(self, hexid: str) -> None:
        """A worker met a task cancelled while it waited: out of the set."""
        self._send_status([("ZREM", self._cancelled_key, hexid)])

    def set_state(self, gid: bytes, state: int, attempt: int = 0) -> None:
        self._lazy.drop(gid)  # the attempt before: superseded
        args = [state, attempt, LIVE_TTL]
        self._tell(
            [_script("set_state", [self._key(gid)], args)], "marking a task queued", owe=True
        )

    def progress(self, gid: bytes, fraction: float | None, message: str) -> None:
        key = self._key(gid)
        p = "" if fraction is None else repr(float(fraction))
        self._lazy.hold(gid, [("HSET", key, "p", p, "m", message), ("EXPIRE", key, LIVE_TTL)])

    def cancel_flag(self, gid: bytes) -> int:
        out = self._tell([("HGET", self._key(gid), "c")], "reading a cancel flag")
        return int(out[0] or 0) if out else 0

    def accessors(
        self, gid: bytes
    ) -> tuple[Callable[[], int], Callable[[float | None, str], None]]:
        """The cancel flag is read from Redis at most once per ``FLAG_AGE``
        seconds (the task was not cancelled when it started): a task shorter
        than that costs no read, also for the worker's look after it returned."""
        return _Flag(self, gid), (lambda f, m: self.progress(gid, f, m))

    def finish(self, gid: bytes, state: int, keep: float, result: bytes | None) -> None:
        key = self._key(gid)
        cmds: list[Cmd] = [("DEL", key)]
        if keep > 0:
            cmds = [
                ("HSET", key, "s", state, "f", repr(time.time()), "r", result or b""),
                ("PEXPIRE", key, max(1, int(keep * 1000))),
            ]
        if state == CANCELLED:  # a cancel that saw it still queued put it in the set
            cmds.append(("ZREM", self._cancelled_key, gid.hex()))

        def last(held: list[Cmd]) -> list[Cmd]:
            # Without keep_result the record goes: what the task held goes unsent.
            return cmds if keep <= 0 else held + cmds

        self._lazy.end(gid, last)

    def close(self) -> None:
        """Send the deletions of failed dispatches and the worker writes still
        owed (once, bounded; records of new tasks go out with their tasks)."""
        self._lazy.close()
        dels = [c for c in self.unsent() if c[0] == "DEL"]
        if dels or self._owed:
            self._tell(dels, "writing task statuses at close")


class _Flag:
    """A running task's cancel flag, read again once ``FLAG_AGE`` passed."""

    __slots__ = ("gid", "next", "table", "value")

    def __init__(self, table: RedisTaskTable, gid: bytes) -> None:
        self.table, self.gid = table, gid
        self.value = 0
        self.next = time.monotonic() + FLAG_AGE

    def __call__(self) -> int:
        if self.value or time.monotonic() < self.next:
            return self.value
        self.value = self.table.cancel_flag(self.gid)
        self.next = time.monotonic() + FLAG_AGE
        return self.value


def _script(name: str, keys: list[str], args: list[Any]) -> Cmd:
    return ("EVALSHA", _SCRIPTS[name][1], len(keys), *keys, *args)


def _full_script(cmd: Cmd) -> Cmd:
    if cmd[0] != "EVALSHA":
        return cmd
    src = next(s for s, sha in _SCRIPTS.values() if sha == cmd[1])
    return ("EVAL", src, *cmd[2:])


def _record(gid: bytes, h: Any) -> TaskRecord:
    """A record from a hash as Redis sent it: a map (RESP3) or a flat list."""
    if not isinstance(h, dict):
        h = dict(zip(h[::2], h[1::2], strict=True))
    g = {(k.decode() if isinstance(k, bytes) else k): v for k, v in h.items()}
    state = int(g.get("s", 0))
    prog = g.get("p")
    msg = g.get("m", b"")
    result = g.get("r") or None
    if isinstance(result, str):
        result = result.encode("latin-1")
    return TaskRecord(
        gid,
        state,
        int(g.get("c", 0)),
        int(g.get("a", 1)),
        int(g.get("w", 0)),
        int(g.get("d", 0)),
        int(g.get("n", 0)),
        _f(g.get("q")),
        _f(g.get("t")),
        _f(g.get("f")),
        0.0,
        None if prog in (None, b"", "") else float(prog),
        msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg),
        result if state in FINAL else None,
    )
