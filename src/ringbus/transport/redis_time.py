"""Time on Redis: delayed envelopes, the bus's leader, its schedule state.

- **Delayed envelopes** wait in the sorted set ``ringbus:{<bus>}:delayed``
  (score: the due time in Unix milliseconds; member: 8 random bytes + the
  envelope, so equal envelopes stay distinct).  The leader moves the due ones
  to the task stream with one Lua script per batch (``MOVE_DUE``): atomic, so
  an envelope is moved once however many processes race, in due order.
  ``put_delayed`` also pushes on ``...:timers-bell`` (a list kept at one
  item), which the leader blocks on while it sleeps until its next due time:
  an earlier one wakes it at once.
- **The leader** holds the lease ``ringbus:{<bus>}:leader`` (``SET NX PX``,
  value: this process's consumer name + a random token), renewed every
  ``LEASE_RENEW`` seconds and released with a compare-and-delete script.
  The lease lasts ``LEASE_MS`` (1.5 s): a leader that misses two renewals in
  a row (a loaded machine, a slow round trip) still leads, one that died is
  replaced within ~2 s on any host, and at once (the next try, within
  0.5 s) by a follower on its own host that can prove it is dead (the
  consumer-name proof of ``redis_identity``).  A leader that cannot renew
  stops leading when its own copy of the lease runs out, measured from
  before the renewal was sent.
- **Schedule state** is the string ``ringbus:{<bus>}:schedule``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from typing import Any

from ringbus.transport.redis_conn import NET_ERRORS, RedisBase, redis
from ringbus.transport.redis_identity import Identity
from ringbus.transport.redis_scripts import MOVE_DUE, RELEASE, RENEW

__all__ = ["LEASE_MS", "LEASE_RENEW", "RedisTime"]

log = logging.getLogger("ringbus.redis")

LEASE_MS = 1500
LEASE_RENEW = 0.5
_MOVE_BATCH = 512
_FINE = 0.12  # the end of a timer wait slept here, not in BLPOP
_STEP = 0.01  # how often the bell is looked at meanwhile


class RedisTime(RedisBase):
    """The time methods of ``RedisTransport`` (see the module docstring)."""

    holds_delayed = True

    def _reset_process_state(self) -> None:
        super()._reset_process_state()
        # A forked child never inherits leadership (the lease names the parent).
        self._lease = ""
        self._lease_until = 0.0  # monotonic: when our copy of the lease runs out
        self._renewed = 0.0
        self._time_identity: Identity | None = None

    @property
    def _delayed_key(self) -> str:
        return f"{self._prefix}:delayed"

    @property
    def _bell_key(self) -> str:
        return f"{self._prefix}:timers-bell"

    @property
    def _leader_key(self) -> str:
        return f"{self._prefix}:leader"

    @property
    def _schedule_key(self) -> str:
        return f"{self._prefix}:schedule"

    def _time_keys(self) -> list[str]:
        return [self._delayed_key, self._bell_key, self._leader_key, self._schedule_key]

    # ------------------------------------------------------------ delayed

    def put_delayed(self, data: bytes, due: float) -> None:
        member = secrets.token_bytes(8) + data
        cmds = [
            *self._dispatch_commands(),
            # Whole milliseconds, rounded up: truncating ran tasks up to 1 ms early.
            ("ZADD", self._delayed_key, math.ceil(due * 1000), member),
            ("LPUSH", self._bell_key, b"1"),
            ("LTRIM", self._bell_key, 0, 0),
        ]
        self._call(cmds, "keeping a delayed task", None)

    def move_due(self) -> float | None:
        script = self._script("move_due", MOVE_DUE)
        while True:
            now_ms = int(time.time() * 1000)
            moved, nxt = self._retrying(
                lambda r, now_ms=now_ms: script(  # type: ignore[misc]
                    keys=[self._delayed_key, self.stream], args=[now_ms, _MOVE_BATCH], client=r
                ),
                "moving due tasks",
                patience=self.socket_timeout,
            )
            if int(moved) < _MOVE_BATCH:
                return None if nxt is None else float(nxt) / 1000.0

    def wait_timers(self, timeout: float) -> None:
        """Sleep until ``timeout`` or a ring of the bell.  Redis ends a blocked
        BLPOP only when its event loop wakes (every 100 ms at the default
        ``hz``), so the last ``_FINE`` seconds are slept here, looking at the
        bell every ``_STEP`` seconds: a due time is met within milliseconds."""
        end = time.monotonic() + timeout
        try:
            r = self._redis()
            if timeout > _FINE + 0.01 and r.blpop([self._bell_key], timeout=timeout - _FINE):
                return
            while (left := end - time.monotonic()) > 0.001:
                time.sleep(min(left, _STEP))
                if r.lpop(self._bell_key) is not None:
                    return
        except NET_ERRORS as exc:  # the leader's next round finds out again
            log.debug("ringbus: waiting on %s: %s", self._bell_key, exc)
            time.sleep(max(0.0, end - time.monotonic()))

    def scheduled(self) -> tuple[int, float | None]:
        def look(r: redis.Redis) -> tuple[int, float | None]:
            pipe = r.pipeline(transaction=False)
            pipe.zcard(self._delayed_key)
            pipe.zrange(self._delayed_key, 0, 0, withscores=True)
            n, first = pipe.execute()
            return int(n), (float(first[0][1]) / 1000.0 if first else None)

        return self._once(look, "counting delayed tasks")

    # ------------------------------------------------------------ leader

    def _lease_token(self) -> str:
        if self._time_identity is None:
            self._time_identity = Identity(self._host)
        return f"{self._time_identity.name}#{secrets.token_hex(4)}"

    def try_lead(self) -> bool:
        now = time.monotonic()
        if self._lease and now - self._renewed < LEASE_RENEW and now < self._lease_until:
            return True
        try:
            return self._lead(now)
        except NET_ERRORS as exc:
            log.warning("ringbus: leader lease of bus %r: %s", self.bus_name, exc)
            # Still ours until our own copy runs out (it started before the request).
            return bool(self._lease) and time.monotonic() < self._lease_until

    def _lead(self, sent: float) -> bool:
        r: Any = self._redis()
        if self._lease:
            if self._script("renew", RENEW)(
                keys=[self._leader_key], args=[self._lease, LEASE_MS], client=r
            ):
                self._renewed = sent
                self._lease_until = sent + LEASE_MS / 1000.0
                return True
            log.warning(
                "ringbus: pid %d lost the leader lease of bus %r", os.getpid(), self.bus_name
            )
            self._lease = ""
        token = self._lease_token()
        if not r.set(self._leader_key, token, nx=True, px=LEASE_MS):
            holder = r.get(self._leader_key)
            if holder is None or not self._dead_here(holder.decode("utf-8", "replace")):
                return False
            # Its process is provably gone: free the lease at once (only that one).
            self._script("release", RELEASE)(keys=[self._leader_key], args=[holder], client=r)
            if not r.set(self._leader_key, token, nx=True, px=LEASE_MS):
                return False
        self._lease = token
        self._renewed = sent
        self._lease_until = sent + LEASE_MS / 1000.0
        return True

    def _dead_here(self, token: str) -> bool:
        if self._time_identity is None:
            self._time_identity = Identity(self._host)
        return bool(self._time_identity.dead_here(token.partition("#")[0]))

    def resign(self) -> None:
        token, self._lease = self._lease, ""
        self._lease_until = 0.0
        if not token:
            return
        try:
            self._script("release", RELEASE)(keys=[self._leader_key], args=[token])
        except (*NET_ERRORS, redis.ResponseError) as exc:  # it runs out by itself
            log.debug("ringbus: releasing the leader lease of bus %r: %s", self.bus_name, exc)

    def leader(self) -> str | None:
        value = self._once(lambda r: r.get(self._leader_key), "reading the leader")
        return None if value is None else value.decode("utf-8", "replace")

    def retire(self, keep_state: bool) -> None:
        self.resign()
        if not keep_state:
            try:
                self._redis().delete(self._schedule_key)
            except NET_ERRORS as exc:
                log.debug("ringbus: removing the schedule state of %r: %s", self.bus_name, exc)

    def write_schedule_state(self, data: bytes) -> None:
        try:
            self._retrying(
                lambda r: r.set(self._schedule_key, data),
                "keeping the schedule state",
                patience=self.socket_timeout,
            )
        except Exception as exc:  # the next firing writes it again
            log.warning("ringbus: schedule state of bus %r not kept: %s", self.bus_name, exc)

    def read_schedule_state(self) -> bytes | None:
        value = self._retrying(
            lambda r: r.get(self._schedule_key),
            "reading the schedule state",
            patience=self.socket_timeout,
        )
        return value if isinstance(value, bytes) else None


def leader_pid(token: str) -> int | None:
    """The pid in a lease token (``host:pid:...#token``), for tests and tools."""
    pid = token.split(":", 2)[1] if token.count(":") >= 2 else ""
    return int(pid) if pid.isdigit() else None
