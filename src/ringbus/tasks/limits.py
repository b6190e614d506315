"""Rate limits and concurrency caps of handlers: what ``@bus.handler(...,
rate_limit="20/s", max_concurrency=8)`` means, checked at registration.

The numbers are enforced machine-wide by the transport's limits backend
(``ringbus.transport.limits``; on shared memory the segment
``/dev/shm/ringbus-<bus>-limits``, see csrc/ring_limits.h) and asked for by
each worker before it starts a task (``ringbus.server.limiter``).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

__all__ = ["MAX_CONCURRENCY", "MAX_KEY_BYTES", "HandlerLimits", "check_limits", "limit_key"]

MAX_CONCURRENCY = 512
"""The largest ``max_concurrency`` (the holder table's size)."""
MAX_KEY_BYTES = 239
"""The longest handler key (``module.qualname`` of the registered type, UTF-8)."""

_PERIODS = {"s": 1, "m": 60, "h": 3600}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-zA-Z]+)\s*$")
_MAX_RATE = 10**9  # one start per nanosecond per second at most


class HandlerLimits(NamedTuple):
    """A handler's limits.  ``rate``/``period``: at most ``rate`` starts per
    ``period`` seconds (0: no rate limit), through a token bucket of ``burst``
    tokens (= ``rate``: a full period's worth may start at once, and over any
    window of t seconds at most ``burst + rate * t / period`` start).
    ``max_concurrency``: at most that many running at once (0: no cap)."""

    rate: int = 0
    period: int = 0
    burst: int = 0
    max_concurrency: int = 0

    @property
    def interval_ns(self) -> int:
        """Nanoseconds per token, rounded up (never more than ``rate`` per period)."""
        return math.ceil(self.period * 1_000_000_000 / self.rate) if self.rate else 0

    def describe(self) -> str:
        parts = []
        if self.rate:
            unit = {1: "s", 60: "m", 3600: "h"}[self.period]
            parts.append(f"rate_limit={self.rate}/{unit} (burst {self.burst})")
        if self.max_concurrency:
            parts.append(f"max_concurrency={self.max_concurrency}")
        return ", ".join(parts)


def _parse_rate(spec: object) -> tuple[int, int]:
    if not isinstance(spec, str):
        raise ValueError(f"rate_limit must be a string like '20/s', '100/m' or '5/h', not {spec!r}")
    m = _RATE.match(spec)
    if m is None:
        raise ValueError(f"rate_limit {spec!r} is not of the form 'N/s', 'N/m' or 'N/h'")
    n, unit = int(m.group(1)), m.group(2)
    if unit not in _PERIODS:
        raise ValueError(f"rate_limit {spec!r} has an unknown unit {unit!r}: use s, m or h")
    if not 1 <= n <= _MAX_RATE:
        raise ValueError(f"rate_limit {spec!r}: N must be from 1 to {_MAX_RATE}")
    return n, _PERIODS[unit]


def check_limits(rate_limit: object, max_concurrency: object) -> HandlerLimits | None:
    """The limits of a registration, or None when it has none; ``ValueError``
    with a sentence for anything else."""
    rate = period = cap = 0
    if rate_limit is not None:
        rate, period = _parse_rate(rate_limit)
    if max_concurrency is not None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise ValueError(f"max_concurrency must be an int, not {max_concurrency!r}")
        if not 1 <= max_concurrency <= MAX_CONCURRENCY:
            raise ValueError(
                f"max_concurrency must be from 1 to {MAX_CONCURRENCY}, not {max_concurrency!r}"
            )
        cap = max_concurrency
    if not rate and not cap:
        return None
    return HandlerLimits(rate, period, rate, cap)


def limit_key(task_type: type) -> str:
    """The name a handler's limits go by: its registered type's qualified name."""
    key = f"{task_type.__module__}.{task_type.__qualname__}"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(
            f"cannot limit handlers of {key[:60]}...: its qualified name is longer than "
            f"{MAX_KEY_BYTES} bytes"
        )
    return key
