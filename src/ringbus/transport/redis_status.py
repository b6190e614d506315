"""The task table on Redis: one hash per task, with an expiry.

``ringbus:{bus}:task:<32 hex digits>``: fields ``s`` (state), ``c`` (cancel
flag), ``a`` (attempt), ``w``/``d`` (worker / dispatcher pid), ``n`` (the
dispatcher's counter), ``q``/``t``/``f`` (queued, started, finished: Unix
seconds), ``p``/``m`` (progress, message) and ``r`` (the kept result
message).  A task not finished keeps its hash ``LIVE_TTL`` seconds after the
last write (a bound for tasks lost with their whole Redis); a finished one
``keep_result`` seconds, or none (deleted at once).  One round trip per
step, progress included.

To be exposed by ``RedisTransport.task_table()`` (see the README, "Task
identity and control").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ringbus.tasks.identity import new_id
from ringbus.transport.task_table import (
    CANCEL,
    CANCELLED,
    CANCELLED_HOLD,
    FINAL,
    QUEUED,
    RUNNING,
    SCHEDULED,
    TERMINATE,
    TaskRecord,
    TaskTable,
)

__all__ = ["LIVE_TTL", "RedisTaskTable"]

LIVE_TTL = 30 * 86400
"""Seconds a record of a task not finished outlives its last write."""

# Cancel atomically: a waiting task becomes cancelled, a running one is flagged.
_CANCEL = """
local s = redis.call('HGET', KEYS[1], 's')
if not s then return false end
local before = redis.call('HGETALL', KEYS[1])
s = tonumber(s)
if s == tonumber(ARGV[2]) or s == tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'c', ARGV[1], 's', ARGV[4], 'f', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
elseif s == tonumber(ARGV[7]) then
  redis.call('HSET', KEYS[1], 'c', ARGV[1])
end
return before
"""

# Start unless cancelled: 0 = cancelled (do not run), 1 = running now.
_START = """
local c = redis.call('HGET', KEYS[1], 'c')
if c and tonumber(c) > 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 's', ARGV[1], 'a', ARGV[2], 'w', ARGV[3], 't', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
return 1
"""


def _f(v: Any, default: float = 0.0) -> float:
    return default if v is None or v == b"" else float(v)


class RedisTaskTable(TaskTable):
    """See the module docstring."""

    same_host = False  # workers run anywhere: terminate cannot kill them from here

    def __init__(self, client: Callable[[], Any], prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._scripts: dict[str, Any] = {}

    def _key(self, gid: bytes) -> str:
        return f"{self._prefix}:task:{gid.hex()}"

    def _script(self, name: str, source: str) -> Any:
        s = self._scripts.get(name)
        if s is None:
            s = self._scripts[name] = self._client().register_script(source)
        return s

    def add(self, state: int, dispatcher_pid: int, counter: int) -> bytes:
        gid = new_id()
        key = self._key(gid)
        fields = {"s": state, "c": 0, "a": 1, "d": dispatcher_pid, "n": counter, "q": time.time()}
        pipe = self._client().pipeline(transaction=False)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, LIVE_TTL)
        pipe.execute()
        return gid

    def get(self, gid: bytes) -> TaskRecord | None:
        h = self._client().hgetall(self._key(gid))
        return _record(gid, h) if h else None

    def start(self, gid: bytes, attempt: int, worker_pid: int) -> bool:
        args = [RUNNING, attempt, worker_pid, time.time(), LIVE_TTL]
        return bool(self._script("start", _START)(keys=[self._key(gid)], args=args))

    def set_state(self, gid: bytes, state: int, attempt: int = 0) -> None:
        key = self._key(gid)
        fields: dict[str, Any] = {"s": state}
        if attempt:
            fields["a"] = attempt
        r = self._client()
        if r.exists(key):
            r.hset(key, mapping=fields)

    def progress(self, gid: bytes, fraction: float | None, message: str) -> None:
        key = self._key(gid)
        pipe = self._client().pipeline(transaction=False)  # one round trip
        pipe.hset(key, mapping={"p": "" if fraction is None else fraction, "m": message})
        pipe.expire(key, LIVE_TTL)
        pipe.execute()

    def cancel_flag(self, gid: bytes) -> int:
        v = self._client().hget(self._key(gid), "c")
        return int(v or 0)

    def finish(self, gid: bytes, state: int, keep: float, result: bytes | None) -> None:
        key = self._key(gid)
        r = self._client()
        if keep <= 0:
            r.delete(key)
            return
        pipe = r.pipeline(transaction=False)
        pipe.hset(key, mapping={"s": state, "f": time.time(), "r": result or b""})
        pipe.pexpire(key, max(1, int(keep * 1000)))
        pipe.execute()

    def request_cancel(self, gid: bytes, terminate: bool = False) -> TaskRecord | None:
        args = [
            TERMINATE if terminate else CANCEL, QUEUED, SCHEDULED, CANCELLED, time.time(),
            int(CANCELLED_HOLD), RUNNING,
        ]  # fmt: skip
        flat = self._script("cancel", _CANCEL)(keys=[self._key(gid)], args=args)
        if not flat:
            return None
        return _record(gid, dict(zip(flat[::2], flat[1::2], strict=True)))


def _record(gid: bytes, h: dict[Any, Any]) -> TaskRecord:
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
        int(g.get("a", 0)),
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
