"""Rings and pools seen from outside, for the admin commands.

Nothing here registers in a ring or writes to a segment, so an operator can
watch a running system without touching it: ``ringbus.queue.read_stats``
snapshots a ring's header without taking an attach entry, pool-state
segments are mapped read-only, and ``/proc/<pid>/maps`` tells which live
processes map a segment (a process that attached but never put or got is
not in the ring's participant table, yet it still holds the ring).

(Not named ``inspect.py``: run as a script from this folder, that name would
shadow the standard library's ``inspect``.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringbus import _names
from ringbus._proc import mapped_pids, pid_alive
from ringbus.errors import RingError
from ringbus.queue import read_stats
from ringbus.server.pool_state import (
    POOL_MAGIC,
    PoolState,
    WorkerInfo,
    read_pool_states,
    server_holds,
)

__all__ = [
    "RING_MAGIC",
    "WORKER_COUNTERS",
    "Segment",
    "broker_snapshot",
    "bus_snapshot",
    "find_kind",
    "inspect_segment",
    "list_segments",
    "mapped_pids",
    "resolve_stats_target",
    "seg_path",
    "shm_name",
    "stats_snapshot",
]

SHM_DIR = Path(_names.SHM_DIR)
RING_MAGIC = b"RINGBUS1"  # the first bytes of every ring (csrc/ring.h)

# Counters of a worker slot shown in the workers table when the pool state has them.
WORKER_COUNTERS = ("tasks_done", "tasks_failed", "tasks_retried", "dead_lettered")

_RATE_FIELDS = (
    ("puts", "puts_per_s"),
    ("gets", "gets_per_s"),
    ("bytes_in", "bytes_in_per_s"),
    ("bytes_out", "bytes_out_per_s"),
)


# ---------------------------------------------------------------- discovery


def shm_name(name: str) -> str:
    """Accept ``/x``, ``x`` or ``/dev/shm/x`` and return the shm name ``/x``."""
    if name.startswith(str(SHM_DIR) + "/"):
        name = name[len(str(SHM_DIR)) :]
    return "/" + name.lstrip("/")


def seg_path(name: str) -> Path:
    """The file of a segment named ``/x``, ``x`` or ``/dev/shm/x``."""
    return SHM_DIR / shm_name(name).lstrip("/")


def _magic(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        return os.read(fd, 8)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _kind_of(magic: bytes) -> str | None:
    if magic == RING_MAGIC:
        return "ring"
    if magic == POOL_MAGIC:
        return "pool"
    return None


def find_kind(name: str) -> str | None:
    """``ring``, ``pool`` or None (no such file, or not a ringbus segment)."""
    return _kind_of(_magic(seg_path(name)))


def list_segments(prefix: str = "") -> list[tuple[str, str]]:
    """(shm name, kind) of every ringbus segment in /dev/shm; kind is
    ``ring`` (magic RINGBUS1) or ``pool`` (a task server's worker state)."""
    out: list[tuple[str, str]] = []
    try:
        entries = sorted(os.scandir(SHM_DIR), key=lambda e: e.name)
    except OSError:
        return out
    for entry in entries:
        if prefix and not entry.name.startswith(prefix.lstrip("/")):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
        except OSError:
            continue
        kind = _kind_of(_magic(Path(entry.path)))
        if kind is not None:
            out.append(("/" + entry.name, kind))
    return out


@dataclass
class Segment:
    """What ``ls``/``gc``/``rm`` need to know about one segment."""

    name: str
    kind: str  # "ring", "pool" or "broken"
    size: int = 0
    stats: dict[str, Any] | None = None
    error: str | None = None
    creator_pid: int = 0
    creator_alive: bool = False
    created: float = 0.0  # Unix seconds
    mappers: set[int] = field(default_factory=set)
    live_participants: set[int] = field(default_factory=set)
    dead_participants: set[int] = field(default_factory=set)

    @property
    def path(self) -> Path:
        return seg_path(self.name)

    @property
    def live_pids(self) -> set[int]:
        """Live processes that hold this segment (creator included)."""
        pids = self.mappers | self.live_participants
        if self.creator_alive:
            pids.add(self.creator_pid)
        return pids

    @property
    def live(self) -> bool:
        return bool(self.live_pids)

    @property
    def persistent(self) -> bool:
        return bool(self.stats and self.stats.get("persistent"))

    @property
    def depth(self) -> int:
        return int(self.stats["depth"]) if self.stats else 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "path": str(self.path),
            "kind": self.kind,
            "size": self.size,
            "creator_pid": self.creator_pid,
            "creator_alive": self.creator_alive,
            "created_unix": self.created,
            "live_pids": sorted(self.live_pids),
            "dead_participants": sorted(self.dead_participants - self.live_pids),
            "live": self.live,
        }
        if self.kind == "ring" and self.stats is not None:
            out.update(
                depth=self.depth,
                capacity=self.stats["capacity"],
                persistent=self.persistent,
                puts=self.stats["puts"],
                gets=self.stats["gets"],
            )
        if self.error:
            out["error"] = self.error
        return out


def inspect_segment(name: str, kind: str, maps: dict[str, set[int]] | None = None) -> Segment:
    """Read a segment's header and who holds it.  Raises FileNotFoundError if gone."""
    name = shm_name(name)
    seg = Segment(name=name, kind=kind, size=seg_path(name).lstat().st_size)
    seg.mappers = set((maps if maps is not None else mapped_pids()).get(name, set()))
    if kind == "ring":
        try:
            st = read_stats(name)
        except (RingError, ValueError) as exc:  # ValueError: a name no ring may have
            if not seg_path(name).exists():
                raise FileNotFoundError(name) from exc
            seg.kind, seg.error = "broken", str(exc)
            return seg
        seg.stats = st
        seg.creator_pid = int(st["creator_pid"])
        seg.created = st["created_unix_ns"] / 1e9
        seg.creator_alive = pid_alive(seg.creator_pid, seg.created)
        for p in st.get("participants", []):
            (seg.live_participants if p["alive"] else seg.dead_participants).add(int(p["pid"]))
    elif kind == "pool":
        try:
            ps = PoolState.attach(str(seg.path), writable=False)
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            seg.kind, seg.error = "broken", f"unreadable pool state: {exc}"
            return seg
        try:
            seg.creator_pid, seg.created = ps.server_pid, ps.created
        finally:
            ps.close()
        # Not pid_alive alone: the header's pid may be of another pid namespace
        # (a server that ran as pid 1 in a container); processes that map the
        # file count as holders either way (seg.mappers).
        seg.creator_alive = server_holds(str(seg.path), seg.creator_pid, seg.created)
    return seg


def _bus_of(ring_name: str) -> str | None:
    """The bus whose task ring this is (``/ringbus-<bus>-tasks``), else None."""
    m = re.fullmatch(r"/ringbus-(.+)-tasks", ring_name)
    return m.group(1) if m else None


def resolve_stats_target(name: str) -> tuple[str | None, str | None]:
    """NAME of ``stats`` -> (ring shm name or None, bus name or None).

    A segment name wins; otherwise NAME is tried as a bus name (its task
    ring ``/ringbus-NAME-tasks``).  A pool state segment names its bus.
    """
    kind = find_kind(name)
    if kind == "ring":
        ring = shm_name(name)
        return ring, _bus_of(ring)
    if kind == "pool":
        try:
            ps = PoolState.attach(str(seg_path(name)), writable=False)
        except (OSError, ValueError):
            return None, None
        try:
            bus = ps.bus_name
        finally:
            ps.close()
        ring = _names.task_ring_name(bus)
        return (ring if find_kind(ring) == "ring" else None), bus
    if "/" not in name.strip("/") and _names.is_bus_name(name):
        ring = _names.task_ring_name(name)
        if find_kind(ring) == "ring":
            return ring, name
        errors: dict[str, str] = {}
        if read_pools(name, errors) or errors:
            return None, name
    return None, None


# ---------------------------------------------------------------- snapshots


def read_pools(bus: str, errors: dict[str, str] | None = None) -> dict[str, list[WorkerInfo]]:
    """Worker slots of the live servers of ``bus`` (path -> slots); segments
    refused or unreadable go to ``errors`` (path -> why)."""
    try:
        return read_pool_states(bus, errors)
    except Exception:  # a pool stopping under our feet: show what we can
        return {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def bus_snapshot(bus: str) -> dict[str, Any]:
    """Worker states of every live server of ``bus`` and its reply rings."""
    now_mono = time.monotonic()
    servers: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for path, slots in read_pools(bus, errors).items():
        m = re.search(r"-pool-(\d+)", path)
        workers: list[dict[str, Any]] = []
        for info in slots:
            row = {k: _jsonable(v) for k, v in info._asdict().items()}
            running = row.get("state") == "running"
            row["running_for"] = round(now_mono - info.started, 6) if running else None
            row["up_for"] = (
                round(now_mono - info.worker_started, 6) if info.worker_started else None
            )
            workers.append(row)
        servers.append(
            {
                "path": path,
                "server_pid": int(m.group(1)) if m else 0,
                "queues": _pool_queues(path),
                "workers": workers,
                "task_times": _pool_task_times(path),
            }
        )
    replies = []
    maps = mapped_pids()
    for name, kind in list_segments(_names.reply_prefix(bus)):
        try:
            seg = inspect_segment(name, kind, maps)
        except FileNotFoundError:
            continue
        replies.append(
            {
                "name": name,
                "dispatcher_pid": seg.creator_pid,
                "alive": seg.creator_alive,
                "depth": seg.depth,
            }
        )
    totals = {
        c: sum(int(w.get(c) or 0) for s in servers for w in s["workers"])
        for c in WORKER_COUNTERS
        if any(c in w for s in servers for w in s["workers"])
    }
    from ringbus.tasks.dead_letters import DeadLetterStore
    from ringbus.transport.shm import ShmTransport

    shm = ShmTransport()
    shm.bind(bus)
    dead = len(DeadLetterStore(shm))
    queues = [
        {
            "queue": q,
            "priority": p,
            "depth": n,
            "served_by": [s["server_pid"] for s in servers if q in s["queues"]],
        }
        for (q, p), n in sorted(shm.queue_depths().items(), key=lambda kv: (kv[0][0], -kv[0][1]))
    ]
    out: dict[str, Any] = {
        "name": bus,
        "queues": queues,
        "servers": servers,
        "reply_rings": replies,
        "totals": totals,
        "dead_letters": dead,
        "time": time_snapshot(shm),
    }
    if errors:  # skipped, never read: a crafted header must not hang stats
        out["unreadable_pools"] = [{"path": p, "error": e} for p, e in sorted(errors.items())]
    return out


def _pool_queues(path: str) -> list[str]:
    """The queues a server serves, from its pool-state header (issue 16)."""
    try:
        ps = PoolState.attach(path, writable=False)
    except (OSError, ValueError):
        return []
    try:
        return ps.queues
    finally:
        ps.close()


def _pool_task_times(path: str) -> list[dict[str, Any]]:
    """Run time and queue wait by task type, from a pool's histograms."""
    from ringbus.server.histograms import times_doc

    try:
        ps = PoolState.attach(path, writable=False)
    except (OSError, ValueError):
        return []
    try:
        return times_doc(ps.histograms())
    finally:
        ps.close()


def _processes(st: dict[str, Any], maps: dict[str, set[int]], name: str) -> list[dict[str, Any]]:
    """Attached processes: participant threads grouped by pid, plus mappers."""
    procs: dict[int, dict[str, Any]] = {}
    for p in st.get("participants", []):
        row = procs.setdefault(
            int(p["pid"]),
            {
                "pid": int(p["pid"]),
                "alive": bool(p["alive"]),
                "threads": 0,
                "putting": False,
                "getting": False,
                "mapped": False,
            },
        )
        row["threads"] += 1
        row["alive"] = row["alive"] or bool(p["alive"])
        row["putting"] = row["putting"] or bool(p["putting"])
        row["getting"] = row["getting"] or bool(p["getting"])
    for pid in maps.get(name, set()):
        row = procs.setdefault(
            pid,
            {
                "pid": pid,
                "alive": True,
                "threads": 0,
                "putting": False,
                "getting": False,
                "mapped": True,
            },
        )
        row["mapped"] = True
        row["alive"] = True
    creator = int(st["creator_pid"])
    for row in procs.values():
        row["creator"] = row["pid"] == creator
    return sorted(procs.values(), key=lambda r: r["pid"])


def stats_snapshot(
    ring: str | None, bus: str | None, prev: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One stats document; rates are computed against ``prev`` when given."""
    out: dict[str, Any] = {"name": ring or bus, "time": time.time(), "mono": time.monotonic()}
    if ring is not None:
        st = read_stats(ring)
        maps = mapped_pids()
        created = st["created_unix_ns"] / 1e9
        out["ring"] = {k: v for k, v in st.items() if k != "participants"}
        out["ring"]["name"] = ring
        out["ring"]["path"] = str(seg_path(ring))
        out["creator"] = {
            "pid": st["creator_pid"],
            "alive": pid_alive(int(st["creator_pid"]), created),
        }
        out["processes"] = _processes(st, maps, ring)
        rates: dict[str, float] | None = None
        if prev is not None and prev.get("ring") is not None:
            dt = out["mono"] - prev["mono"]
            if dt > 0:
                rates = {r: round((st[f] - prev["ring"][f]) / dt, 3) for f, r in _RATE_FIELDS}
                rates["interval"] = round(dt, 6)
        out["rates"] = rates
    else:
        out["ring"] = None
    out["bus"] = bus_snapshot(bus) if bus is not None else None
    return out


def broker_snapshot(url: str, bus: str) -> dict[str, Any]:
    """Queue depth and dead letters of a bus on a broker transport (Redis)."""
    from ringbus.tasks.dead_letters import DeadLetterStore
    from ringbus.transport.registry import make_transport

    t = make_transport(url)
    t.bind(bus)
    try:
        return {
            "transport": t.describe(),
            "pending_tasks": t.pending_tasks(),
            "queues": [
                {"queue": q, "priority": p, "depth": n}
                for (q, p), n in sorted(
                    t.queue_depths().items(), key=lambda kv: (kv[0][0], -kv[0][1])
                )
            ],
            "dead_letters": len(DeadLetterStore(t)),
            "time": time_snapshot(t),
        }
    finally:
        t.close()


def time_snapshot(t: Any) -> dict[str, Any]:
    """Delayed tasks (count, next due), who leads the bus's scheduler, and
    the periodic schedules' last and next runs (Unix seconds)."""
    count, next_due = t.scheduled()
    schedules: dict[str, Any] = {}
    raw = t.read_schedule_state()
    if raw:
        with contextlib.suppress(ValueError, AttributeError):
            schedules = json.loads(raw).get("schedules", {})
    return {"scheduled": count, "next_due": next_due, "leader": t.leader(), "schedules": schedules}
