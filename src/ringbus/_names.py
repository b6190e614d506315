"""Every name a bus gives its segments and keys, and the rule for bus names.

Shared memory: ``/dev/shm/ringbus-<bus>-<part>``; Redis: keys under
``ringbus:{<bus>}`` (one hash tag, so a bus lives on one cluster shard).
"""

from __future__ import annotations

import re

__all__ = [
    "SHM_DIR",
    "bell_name",
    "dead_letter_path",
    "leader_path",
    "limits_name",
    "pool_prefix",
    "redis_prefix",
    "reply_prefix",
    "schedule_path",
    "shm_path",
    "spill_path",
    "task_ring_name",
    "timers_path",
    "validate_bus_name",
]

SHM_DIR = "/dev/shm"

_BUS_NAME = re.compile(r"^[A-Za-z0-9._-]{1,120}$")


def validate_bus_name(name: str) -> str:
    """Bus names become parts of segment names: keep them short and portable."""
    if not isinstance(name, str) or not _BUS_NAME.match(name):
        raise ValueError(
            f"invalid bus name {name!r}: use 1-120 characters among letters, digits, '.', '_', '-'"
        )
    return name


def is_bus_name(name: str) -> bool:
    return bool(_BUS_NAME.match(name))


def shm_path(shm_name: str) -> str:
    """``/x`` (a POSIX shm name) -> ``/dev/shm/x``."""
    return f"{SHM_DIR}/{shm_name.lstrip('/')}"


def task_ring_name(bus: str) -> str:
    return f"/ringbus-{bus}-tasks"


def reply_prefix(bus: str) -> str:
    """File-name prefix of the dispatchers' reply rings (``<pid>-<hex>`` follows)."""
    return f"ringbus-{bus}-reply-"


def spill_path(reply_name: str) -> str:
    """Where workers put results while a dispatcher's reply ring stays full
    and unread (a stopped dispatcher): beside its reply ring."""
    return shm_path(reply_name) + ".spill"


def pool_prefix(bus: str) -> str:
    """File-name prefix of the servers' pool-state segments (``<pid>[-n]`` follows)."""
    return f"ringbus-{bus}-pool-"


def dead_letter_path(bus: str) -> str:
    return f"{SHM_DIR}/ringbus-{bus}-dead"


def timers_path(bus: str) -> str:
    """Delayed tasks waiting for their due time."""
    return f"{SHM_DIR}/ringbus-{bus}-timers"


def bell_name(bus: str) -> str:
    """The one-slot ring that wakes the leader for a new delayed task."""
    return f"/ringbus-{bus}-bell"


def limits_name(bus: str) -> str:
    """The handlers' rate limits and concurrency caps (csrc/ring_limits.h)."""
    return f"/ringbus-{bus}-limits"


def leader_path(bus: str) -> str:
    """Locked (``flock``) by the process that leads the bus's scheduler."""
    return f"{SHM_DIR}/ringbus-{bus}-leader"


def schedule_path(bus: str) -> str:
    """The leader's schedule state (periodic tasks' runs), for ``ringbus stats``."""
    return f"{SHM_DIR}/ringbus-{bus}-schedule"


def redis_prefix(bus: str) -> str:
    return f"ringbus:{{{bus}}}"
