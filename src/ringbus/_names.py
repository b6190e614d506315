"""Every name a bus gives its segments and keys, and the rule for bus names.

Shared memory: ``/dev/shm/ringbus-<bus>-<part>``; Redis: keys under
``ringbus:{<bus>}`` (one hash tag, so a bus lives on one cluster shard).
"""

from __future__ import annotations

import re

__all__ = [
    "DEFAULT_QUEUE",
    "SHM_DIR",
    "bell_name",
    "channel_prefix",
    "channel_ring_name",
    "dead_letter_path",
    "leader_path",
    "limits_name",
    "pool_prefix",
    "queue_bell_name",
    "redis_prefix",
    "reply_prefix",
    "schedule_path",
    "shm_path",
    "spill_path",
    "task_ring_name",
    "task_table_path",
    "timers_path",
    "validate_bus_name",
    "validate_queue_name",
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


DEFAULT_QUEUE = "default"
"""Tasks of types registered without ``queue=`` go here (the task ring above)."""

_RING_NAME_MAX = 200  # RING_NAME_MAX of csrc/ring.h, with its leading '/'


def validate_queue_name(name: str, bus: str | None = None) -> str:
    """Queue names follow the bus-name rule (they become parts of ring names);
    with ``bus``, the longest ring name of the queue must fit the core's limit."""
    if not isinstance(name, str) or not _BUS_NAME.match(name):
        raise ValueError(
            f"invalid queue name {name!r}: use 1-120 characters among letters, digits, "
            "'.', '_', '-'"
        )
    if bus is not None and len(channel_ring_name(bus, name, 9)) > _RING_NAME_MAX:
        raise ValueError(
            f"queue name {name!r} is too long for bus {bus!r}: its ring names would pass "
            f"{_RING_NAME_MAX} characters"
        )
    return name


def channel_prefix(bus: str) -> str:
    """File-name prefix of the rings of (queue, priority) channels other than
    the default queue at priority 0 (``<queue>.<priority digit>`` follows)."""
    return f"ringbus-{bus}-tasks."


def channel_ring_name(bus: str, queue: str, priority: int) -> str:
    """The ring of one (queue, priority): the default queue at priority 0 is
    the bus's task ring (unchanged, so single-queue buses keep their ring);
    every other pair has a ring of its own, made when first used."""
    if queue == DEFAULT_QUEUE and priority == 0:
        return task_ring_name(bus)
    return f"/{channel_prefix(bus)}{queue}.{priority}"


def parse_channel(bus: str, file_name: str) -> tuple[str, int] | None:
    """(queue, priority) of a file in /dev/shm named by ``channel_ring_name``."""
    if file_name == task_ring_name(bus)[1:]:
        return DEFAULT_QUEUE, 0
    prefix = channel_prefix(bus)
    if not file_name.startswith(prefix):
        return None
    rest = file_name[len(prefix) :]
    if len(rest) < 3 or rest[-2] != "." or not rest[-1].isdigit():
        return None
    queue = rest[:-2]
    return (queue, int(rest[-1])) if _BUS_NAME.match(queue) else None


def queue_bell_name(bus: str) -> str:
    """A ring of wake-up tokens: producers put one after queueing on any
    channel but the default one at priority 0; workers that serve several
    channels sleep on it (one futex, no polling) and then look at their
    channels in order."""
    return f"/ringbus-{bus}-qbell"


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


def task_table_path(bus: str) -> str:
    """The bus's task table (status records, kept results): shm_results.py."""
    return f"{SHM_DIR}/ringbus-{bus}-tasktable"


def redis_prefix(bus: str) -> str:
    return f"ringbus:{{{bus}}}"
