"""Rate limits and concurrency caps over Redis: the same limits for every
worker on every machine that serves the bus.

Keys (under the bus's prefix ``ringbus:{<bus>}``, one hash tag):

- ``:limit:<handler>:tat``: the token bucket, one integer (GCRA: the
  theoretical arrival time of the next token, microseconds of Redis's own
  clock, so machines' clocks never matter), and ``:limit:<handler>:horizon``
  (when the next refused start is told to come back: refused starts are
  spread one interval apart, as on shared memory).  Both expire once the
  bucket is full again.
- ``:limit:<handler>:holders``: the permits, a sorted set of holder tokens
  scored by their expiry (Redis milliseconds).  A holder refreshes its
  permits every ``holder_ttl / 3`` seconds from a daemon thread; a worker
  that died stops refreshing, and its permits are dropped by the next
  acquire after ``holder_ttl`` seconds.

One Lua script takes the permit and the token together (a permit taken
for a start the bucket refuses is given back in the same script), so a
start costs one round trip, and giving the permit back one more.

Wiring (``RedisTransport``, in redis.py)::

    def limits(self) -> RedisLimits:
        if self._limits is None:   # reset to None in _reset_process_state
            self._limits = RedisLimits(self._redis, self._prefix,
                                       holder_ttl=self.visibility_timeout)
        return self._limits

and ``self._limits.close()`` in ``close()``; ``destroy()`` may delete
``<prefix>:limit:*``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any

from ringbus.transport.limits import LimitGate

__all__ = ["ACQUIRE", "RedisGate", "RedisLimits"]

log = logging.getLogger("ringbus.redis")

MAX_SPREAD_US = 10_000_000
"""Refused starts are spread at most this far past their token (10 s)."""
CAP_RETRY_NS = 20_000_000

ACQUIRE = """
-- KEYS: tat, horizon, holders.  ARGV: interval_us (0: no rate), burst, cap
-- (0: no cap), holder token, holder ttl ms, max spread us, cap retry us.
-- Returns 0 (granted), or the microseconds to wait (> 0).
local t = redis.call('time')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if cap > 0 then
    redis.call('zremrangebyscore', KEYS[3], '-inf', math.floor(now / 1000))
    if redis.call('zcard', KEYS[3]) >= cap then
        return tonumber(ARGV[7])
    end
end
if interval > 0 then
    local tat = tonumber(redis.call('get', KEYS[1]) or '0')
    local base = math.max(tat, now)
    local allow = (burst - 1) * interval
    if base - now > allow then
        local at = base - allow
        local h = tonumber(redis.call('get', KEYS[2]) or '0')
        if h > at and h - at <= tonumber(ARGV[6]) then at = h end
        redis.call('set', KEYS[2], string.format('%.0f', at + interval),
                   'px', math.ceil((at + interval - now) / 1000) + 1000)
        return at - now
    end
    redis.call('set', KEYS[1], string.format('%.0f', base + interval),
               'px', math.ceil((base + interval - now) / 1000) + 1000)
end
if cap > 0 then
    redis.call('zadd', KEYS[3], math.floor(now / 1000) + tonumber(ARGV[5]), ARGV[4])
    redis.call('pexpire', KEYS[3], tonumber(ARGV[5]) * 2)
end
return 0
"""

KEEP = """
-- KEYS: holders.  ARGV: ttl ms, tokens...: push the expiry of the ones still held.
local t = redis.call('time')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
    redis.call('zadd', KEYS[1], 'xx', until_ms, ARGV[i])
end
redis.call('pexpire', KEYS[1], tonumber(ARGV[1]) * 2)
return #ARGV - 1
"""


class RedisGate:
    """One handler's limits on Redis, as seen by one process."""

    def __init__(
        self, owner: RedisLimits, base: str, interval_ns: int, burst: int, cap: int
    ) -> None:
        self._owner = owner
        self._keys = [f"{base}:tat", f"{base}:horizon", f"{base}:holders"]
        self._interval_us = math.ceil(interval_ns / 1000) if interval_ns else 0
        self._burst = burst
        self._cap = cap
        self._held: dict[int, str] = {}
        self._next = itertools.count(1)
        self._lock = threading.Lock()

    def try_start(self) -> int:
        owner = self._owner
        permit = next(self._next) if self._cap else 0
        token = f"{owner.holder_id}:{permit}"
        wait_us = int(
            owner.script("acquire", ACQUIRE)(
                keys=self._keys,
                args=[
                    self._interval_us,
                    self._burst,
                    self._cap,
                    token,
                    owner.holder_ttl_ms,
                    MAX_SPREAD_US,
                    CAP_RETRY_NS // 1000,
                ],
            )
        )
        if wait_us > 0:
            return -wait_us * 1000
        if permit:
            with self._lock:
                self._held[permit] = token
            owner.keep_alive()
        return permit

    def finish(self, permit: int) -> bool:
        if permit <= 0:
            return True
        with self._lock:
            token = self._held.pop(permit, None)
        if token is None:
            return False
        return bool(self._owner.client().zrem(self._keys[2], token))

    def refresh(self) -> None:
        with self._lock:
            tokens = list(self._held.values())
        if tokens:
            self._owner.script("keep", KEEP)(
                keys=[self._keys[2]], args=[self._owner.holder_ttl_ms, *tokens]
            )


class RedisLimits:
    """The limits of one bus on a Redis server (see the module docstring).

    ``client``: returns this process's redis-py client (the transport's);
    ``prefix``: the bus's key prefix; ``holder_ttl``: seconds after which
    the permits of a holder that stopped refreshing them are dropped."""

    def __init__(self, client: Callable[[], Any], prefix: str, *, holder_ttl: float = 30.0) -> None:
        if not holder_ttl > 0.3:
            raise ValueError(f"holder_ttl must be above 0.3 s, not {holder_ttl!r}")
        self.client = client
        self.prefix = prefix
        self.holder_ttl_ms = int(holder_ttl * 1000)
        self.holder_id = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self._gates: list[RedisGate] = []
        self._scripts: dict[str, Any] = {}
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()

    def script(self, name: str, source: str) -> Any:
        s = self._scripts.get(name)
        if s is None:
            s = self._scripts[name] = self.client().register_script(source)
        return s

    def gate(self, key: str, interval_ns: int, burst: int, cap: int) -> LimitGate:
        g = RedisGate(self, f"{self.prefix}:limit:{key}", interval_ns, burst, cap)
        self._gates.append(g)
        return g

    def keep_alive(self) -> None:
        """Start the thread that refreshes this process's permits (once)."""
        if self._keeper is None or self._keeper.ident is None:
            self._keeper = threading.Thread(
                target=self._keep, name="ringbus-limits-keeper", daemon=True
            )
            self._keeper.start()

    def _keep(self) -> None:
        period = self.holder_ttl_ms / 3000
        while not self._stop.wait(period):
            for g in list(self._gates):
                try:
                    g.refresh()
                except Exception as exc:  # Redis down: the next round tries again
                    log.warning("ringbus: could not refresh limit permits: %s", exc)

    def close(self) -> None:
        self._stop.set()
