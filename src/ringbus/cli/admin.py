"""Admin commands of the ``ringbus`` CLI: stats, ls, rm, gc, recover.

They look at rings from the outside, so an operator can watch a running
system without touching it: ``read_stats`` snapshots a ring's header without
registering as a participant, and ``/proc/<pid>/maps`` tells which live
processes map a segment (a process that attached but never put or got is
not in the ring's participant table, yet it still holds the ring).

``register(subparsers)`` adds the commands to the ``ringbus`` parser;
``python -m ringbus.cli.admin`` runs them on their own.

Exit codes: 0 ok, 1 error (no such ring, refused removal, failed unlink),
2 usage (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import struct
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringbus import _ring
from ringbus._proc import pid_alive
from ringbus.errors import RingError

__all__ = [
    "Segment",
    "inspect_segment",
    "list_segments",
    "main",
    "mapped_pids",
    "register",
]

SHM_DIR = Path("/dev/shm")
RING_MAGIC = b"RINGBUS1"
POOL_MAGIC = b"RBPOOL01"  # ringbus.server's worker-state segment
# magic, version, slots, stride, server pid, created (Unix), bus name length
_POOL_HEADER = struct.Struct("<8sIIIIdH")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

EXIT_CODES = """exit codes:
  0  success
  1  error: no such ring, not a ringbus segment, removal refused, unlink failed
  2  usage error (bad arguments)"""

# Counters of a worker slot shown in the workers table when the pool state has them.
_WORKER_COUNTERS = ("tasks_done", "tasks_failed", "tasks_retried", "dead_lettered")


# ---------------------------------------------------------------- discovery


def _pid_alive(pid: int, born_before: float | None = None) -> bool:
    """Alive and (with ``born_before``, Unix seconds) not a reused pid."""
    return pid_alive(pid, born_before)


def shm_name(name: str) -> str:
    """Accept ``/x``, ``x`` or ``/dev/shm/x`` and return the shm name ``/x``."""
    if name.startswith(str(SHM_DIR) + "/"):
        name = name[len(str(SHM_DIR)) :]
    return "/" + name.lstrip("/")


def _path(name: str) -> Path:
    return SHM_DIR / shm_name(name).lstrip("/")


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError:
        return b""


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
        magic = _magic(Path(entry.path))
        if magic == RING_MAGIC:
            out.append(("/" + entry.name, "ring"))
        elif magic == POOL_MAGIC:
            out.append(("/" + entry.name, "pool"))
    return out


def mapped_pids() -> dict[str, set[int]]:
    """shm name -> pids of the live processes (other than this one) that map it."""
    out: dict[str, set[int]] = {}
    me = os.getpid()
    marker = f" {SHM_DIR}/"
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:  # gone, or not ours to read
            continue
        for line in text.splitlines():
            at = line.find(marker)
            if at < 0 or line.endswith(" (deleted)"):
                continue
            name = "/" + line[at + len(marker) :].strip()
            out.setdefault(name, set()).add(pid)
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
        return _path(self.name)

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
    seg = Segment(name=name, kind=kind, size=_path(name).stat().st_size)
    seg.mappers = set((maps if maps is not None else mapped_pids()).get(name, set()))
    if kind == "ring":
        try:
            st = _ring.read_stats(name)
        except RingError as exc:
            if not _path(name).exists():
                raise FileNotFoundError(name) from exc
            seg.kind, seg.error = "broken", str(exc)
            return seg
        seg.stats = st
        seg.creator_pid = int(st["creator_pid"])
        seg.created = st["created_unix_ns"] / 1e9
        seg.creator_alive = _pid_alive(seg.creator_pid, seg.created)
        for p in st.get("participants", []):
            (seg.live_participants if p["alive"] else seg.dead_participants).add(int(p["pid"]))
    elif kind == "pool":
        try:
            with open(seg.path, "rb") as f:
                head = f.read(_POOL_HEADER.size)
            _, _, _, _, server_pid, created, _ = _POOL_HEADER.unpack(head)
        except (OSError, struct.error) as exc:
            seg.kind, seg.error = "broken", f"unreadable pool state: {exc}"
            return seg
        seg.creator_pid, seg.created = int(server_pid), float(created)
        seg.creator_alive = _pid_alive(seg.creator_pid, seg.created)
    return seg


def _find_kind(name: str) -> str | None:
    magic = _magic(_path(name))
    if magic == RING_MAGIC:
        return "ring"
    if magic == POOL_MAGIC:
        return "pool"
    return None


def _bus_of(ring_name: str) -> str | None:
    """The bus whose task ring this is (``/ringbus-<bus>-tasks``), else None."""
    m = re.fullmatch(r"/ringbus-(.+)-tasks", ring_name)
    return m.group(1) if m else None


def _resolve_stats_target(name: str) -> tuple[str | None, str | None]:
    """NAME of ``stats`` -> (ring shm name or None, bus name or None).

    A segment name wins; otherwise NAME is tried as a bus name (its task
    ring ``/ringbus-NAME-tasks``).  A pool state segment names its bus.
    """
    kind = _find_kind(name)
    if kind == "ring":
        ring = shm_name(name)
        return ring, _bus_of(ring)
    if kind == "pool":
        try:
            with open(_path(name), "rb") as f:
                head = f.read(_POOL_HEADER.size + 256)
            n = _POOL_HEADER.unpack_from(head)[6]
            bus = head[64 : 64 + n].decode("utf-8", "replace")
        except (OSError, struct.error):
            return None, None
        ring = f"/ringbus-{bus}-tasks"
        return (ring if _find_kind(ring) == "ring" else None), bus
    if "/" not in name.strip("/") and re.fullmatch(r"[A-Za-z0-9._-]{1,120}", name):
        ring = f"/ringbus-{name}-tasks"
        if _find_kind(ring) == "ring":
            return ring, name
        if _pool_reader() is not None and _read_pools(name):
            return None, name
    return None, None


# ---------------------------------------------------------------- bus view


def _pool_reader() -> Callable[[str], dict[str, list[Any]]] | None:
    """``ringbus.server.pool_state.read_pool_states`` if the server layer is there."""
    try:
        from ringbus.server.pool_state import read_pool_states
    except ImportError:
        return None
    return read_pool_states


def _read_pools(bus: str) -> dict[str, list[Any]]:
    reader = _pool_reader()
    if reader is None:
        return {}
    try:
        return reader(bus)
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
    for path, slots in _read_pools(bus).items():
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
            {"path": path, "server_pid": int(m.group(1)) if m else 0, "workers": workers}
        )
    replies = []
    maps = mapped_pids()
    for name, kind in list_segments(f"ringbus-{bus}-reply-"):
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
        for c in _WORKER_COUNTERS
        if any(c in w for s in servers for w in s["workers"])
    }
    from ringbus.tasks.dead_letters import DeadLetterStore
    from ringbus.transport.shm import ShmTransport

    shm = ShmTransport()
    shm.bind(bus)
    dead = len(DeadLetterStore(shm))
    return {
        "name": bus,
        "servers": servers,
        "reply_rings": replies,
        "totals": totals,
        "dead_letters": dead,
    }


# ---------------------------------------------------------------- stats


_RATE_FIELDS = (
    ("puts", "puts_per_s"),
    ("gets", "gets_per_s"),
    ("bytes_in", "bytes_in_per_s"),
    ("bytes_out", "bytes_out_per_s"),
)


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
        st = _ring.read_stats(ring)
        maps = mapped_pids()
        created = st["created_unix_ns"] / 1e9
        out["ring"] = {k: v for k, v in st.items() if k != "participants"}
        out["ring"]["name"] = ring
        out["ring"]["path"] = str(_path(ring))
        out["creator"] = {
            "pid": st["creator_pid"],
            "alive": _pid_alive(int(st["creator_pid"]), created),
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


def _fmt_count(n: float) -> str:
    if n >= 10_000_000:
        return f"{n / 1e6:,.1f}M"
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _fmt_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_stats(doc: dict[str, Any]) -> Any:
    """A rich renderable of one stats document."""
    from rich.console import Group
    from rich.table import Table

    parts: list[Any] = []
    broker = doc.get("broker")
    if broker is not None:
        t = Table(title=f"bus {doc['name']!r} on {broker['transport']}", title_justify="left")
        t.add_column("queued tasks")
        t.add_column("dead letters")
        t.add_row(f"{broker['pending_tasks']:,}", f"{broker['dead_letters']:,}")
        parts.append(t)
    ring = doc.get("ring")
    if ring is not None:
        head = Table(title=f"ring {ring['name']}", show_header=False, title_justify="left")
        head.add_column("field", style="bold")
        head.add_column("value")
        head.add_column("field", style="bold")
        head.add_column("value")
        creator = doc["creator"]
        rates = doc.get("rates")

        def rate(key: str, fmt: Callable[[float], str] = _fmt_count) -> str:
            return "-" if rates is None else f"{fmt(rates[key])}/s"

        rows = [
            ("depth", f"{ring['depth']:,} msgs", "capacity", f"{ring['capacity']:,} slots"),
            ("slots used", f"{ring['tail'] - ring['head']:,}", "limit", f"{ring['limit']:,}"),
            ("puts", _fmt_count(ring["puts"]), "put rate", rate("puts_per_s")),
            ("gets", _fmt_count(ring["gets"]), "get rate", rate("gets_per_s")),
            (
                "bytes in",
                _fmt_bytes(ring["bytes_in"]),
                "in rate",
                rate("bytes_in_per_s", _fmt_bytes),
            ),
            (
                "bytes out",
                _fmt_bytes(ring["bytes_out"]),
                "out rate",
                rate("bytes_out_per_s", _fmt_bytes),
            ),
            (
                "waits full",
                _fmt_count(ring["waits_full"]),
                "waits empty",
                _fmt_count(ring["waits_empty"]),
            ),
            (
                "abandoned",
                _fmt_count(ring["abandoned"]),
                "recovered",
                _fmt_count(ring["recovered"]),
            ),
            (
                "slot size",
                f"{ring['slot_size']} B",
                "max message",
                _fmt_bytes(ring["max_message_size"]),
            ),
            (
                "segment",
                _fmt_bytes(ring["segment_size"]),
                "persistent",
                "yes" if ring["persistent"] else "no",
            ),
            (
                "creator",
                f"{creator['pid']} ({'alive' if creator['alive'] else 'dead'})",
                "age",
                _fmt_age(doc["time"] - ring["created_unix_ns"] / 1e9),
            ),
        ]
        if ring.get("unfinished"):
            rows.append(("unfinished", _fmt_count(ring["unfinished"]), "", ""))
        for row in rows:
            head.add_row(*row)
        parts.append(head)
        procs = Table(title="attached processes", title_justify="left")
        for col in ("pid", "state", "threads", "doing", "maps it", "role"):
            procs.add_column(col)
        for p in doc["processes"]:
            doing = ", ".join(k for k in ("putting", "getting") if p[k]) or "-"
            procs.add_row(
                str(p["pid"]),
                "[green]alive[/]" if p["alive"] else "[red]dead[/]",
                str(p["threads"]),
                doing,
                "yes" if p["mapped"] else "no",
                "creator" if p["creator"] else "",
            )
        if not doc["processes"]:
            procs.add_row("-", "none attached", "", "", "", "")
        parts.append(procs)
    bus = doc.get("bus")
    if bus is not None:
        parts.extend(_render_bus(bus))
    return Group(*parts)


def _render_bus(bus: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    parts: list[Any] = []
    if not bus["servers"]:
        t = Table(title=f"bus {bus['name']!r}: no live task server", title_justify="left")
        t.add_column("")
        parts.append(t)
    for srv in bus["servers"]:
        t = Table(
            title=f"bus {bus['name']!r} server pid {srv['server_pid']}: workers",
            title_justify="left",
        )
        counters = [c for c in _WORKER_COUNTERS if srv["workers"] and c in srv["workers"][0]]
        for col in ("slot", "pid", "state", "task", "for", "up", *counters):
            t.add_column(col.replace("tasks_", ""))
        for w in srv["workers"]:
            state = w["state"]
            style = {"running": "yellow", "idle": "green", "exited": "red"}.get(state, "")
            t.add_row(
                str(w["slot"]),
                str(w["worker_pid"] or "-"),
                f"[{style}]{state}[/]" if style else state,
                (w.get("task_type") or "-") if state == "running" else "-",
                _fmt_age(w["running_for"]) if w.get("running_for") is not None else "-",
                _fmt_age(w["up_for"]) if w.get("up_for") is not None else "-",
                *(_fmt_count(int(w.get(c) or 0)) for c in counters),
            )
        parts.append(t)
    if bus["reply_rings"]:
        t = Table(title="reply rings (one per dispatching process)", title_justify="left")
        for col in ("name", "dispatcher", "depth"):
            t.add_column(col)
        for r in bus["reply_rings"]:
            t.add_row(
                r["name"],
                f"{r['dispatcher_pid']} ({'alive' if r['alive'] else 'dead'})",
                str(r["depth"]),
            )
        parts.append(t)
    if bus.get("dead_letters"):
        t = Table(
            title=f"dead letters: {bus['dead_letters']} (ringbus dead-letters {bus['name']})",
            title_justify="left",
        )
        t.add_column("")
        parts.append(t)
    return parts


def _console() -> Any:
    from rich.console import Console

    # Piped output (scripts, logs): wide enough that names are never cut.
    return Console() if sys.stdout.isatty() else Console(width=200)


def _err(cmd: str, text: str) -> None:
    print(f"ringbus {cmd}: {text}", file=sys.stderr)


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
            "dead_letters": len(DeadLetterStore(t)),
        }
    finally:
        t.close()


def cmd_stats(args: argparse.Namespace) -> int:
    url = getattr(args, "transport", None)
    if url:
        # A bus on a broker: the queue lives there; worker states are the pool
        # segments of the servers running on this machine.
        ring, bus = None, args.name
    else:
        ring, bus = _resolve_stats_target(args.name)
    if ring is None and bus is None:
        _err("stats", f"no ring or bus named {args.name!r} (see `ringbus ls`)")
        return EXIT_ERROR

    def snap(prev: dict[str, Any] | None) -> dict[str, Any]:
        doc = stats_snapshot(ring, bus, prev)
        if url and bus is not None:
            doc["broker"] = broker = broker_snapshot(url, bus)
            if doc.get("bus") is not None:
                doc["bus"]["dead_letters"] = broker["dead_letters"]
        return doc

    def public(doc: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k != "mono"}

    try:
        if not args.watch:
            first = snap(None)
            doc = first
            if args.interval > 0 and ring is not None:
                time.sleep(args.interval)
                doc = snap(first)
            if args.json:
                print(json.dumps(public(doc), indent=2))
            else:
                _console().print(render_stats(doc))
            return EXIT_OK
        return _watch(args, snap, public)
    except (RingError, ConnectionError, ValueError) as exc:
        _err("stats", f"{args.name}: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


def _watch(
    args: argparse.Namespace,
    snap: Callable[[dict[str, Any] | None], dict[str, Any]],
    public: Callable[[dict[str, Any]], dict[str, Any]],
) -> int:
    """Refresh every ``--interval`` seconds until Ctrl-C (or ``--count`` times)."""
    interval = args.interval if args.interval > 0 else 1.0
    prev = snap(None)
    shown = 0
    if args.json:
        while args.count is None or shown < args.count:
            time.sleep(interval)
            doc = snap(prev)
            print(json.dumps(public(doc)), flush=True)
            prev, shown = doc, shown + 1
        return EXIT_OK
    from rich.live import Live

    with Live(render_stats(prev), console=_console(), auto_refresh=False) as live:
        while args.count is None or shown < args.count:
            time.sleep(interval)
            doc = snap(prev)
            live.update(render_stats(doc), refresh=True)
            prev, shown = doc, shown + 1
    return EXIT_OK


# ---------------------------------------------------------------- ls


def cmd_ls(args: argparse.Namespace) -> int:
    maps = mapped_pids()
    segs: list[Segment] = []
    for name, kind in list_segments(args.prefix):
        with contextlib.suppress(FileNotFoundError):
            segs.append(inspect_segment(name, kind, maps))
    if args.json:
        print(json.dumps([s.to_json() for s in segs], indent=2))
        return EXIT_OK
    from rich.table import Table

    t = Table(title=f"ringbus segments in {SHM_DIR}", title_justify="left")
    for col in ("name", "kind", "size", "creator", "live pids", "depth", "capacity", "persistent"):
        t.add_column(col, justify="right" if col in ("size", "depth", "capacity") else "left")
    for s in segs:
        creator = (
            f"{s.creator_pid} ({'alive' if s.creator_alive else 'dead'})" if s.creator_pid else "?"
        )
        live = ", ".join(map(str, sorted(s.live_pids))) or "[dim]none[/]"
        ring = s.kind == "ring" and s.stats is not None
        t.add_row(
            s.name,
            s.kind if s.kind != "broken" else f"[red]broken[/]: {s.error}",
            _fmt_bytes(s.size),
            creator,
            live,
            f"{s.depth:,}" if ring else "-",
            f"{s.stats['capacity']:,}" if ring and s.stats else "-",
            ("yes" if s.persistent else "no") if ring else "-",
        )
    con = _console()
    con.print(t)
    con.print(f"{len(segs)} segment(s)")
    return EXIT_OK


# ---------------------------------------------------------------- rm / gc


def _unlink(seg: Segment) -> None:
    if seg.kind == "ring":
        try:
            _ring.unlink(seg.name)
            return
        except RingError:
            if seg.path.exists():
                raise
            raise FileNotFoundError(seg.name) from None
    seg.path.unlink()


def cmd_rm(args: argparse.Namespace) -> int:
    kind = _find_kind(args.name)
    if kind is None:
        if _path(args.name).exists():
            _err("rm", f"{shm_name(args.name)} is not a ringbus segment: not removing it")
        else:
            _err("rm", f"no segment named {shm_name(args.name)}")
        return EXIT_ERROR
    try:
        seg = inspect_segment(args.name, kind)
    except FileNotFoundError:
        _err("rm", f"no segment named {shm_name(args.name)}")
        return EXIT_ERROR
    if seg.live and not args.force:
        pids = ", ".join(map(str, sorted(seg.live_pids)))
        _err(
            "rm",
            f"refusing to remove {seg.name}: live processes hold it (pids {pids}); "
            "use --force to remove the name anyway",
        )
        return EXIT_ERROR
    try:
        _unlink(seg)
    except FileNotFoundError:
        _err("rm", f"{seg.name} is already gone")
        return EXIT_ERROR
    except OSError as exc:
        _err("rm", f"cannot remove {seg.name}: {exc}")
        return EXIT_ERROR
    note = f" ({seg.depth} queued message(s) dropped)" if seg.depth else ""
    print(f"removed {seg.name}{note}")
    return EXIT_OK


def gc_plan(prefix: str = "", force: bool = False) -> list[tuple[Segment, bool, str]]:
    """(segment, remove?, reason) for every ringbus segment under ``prefix``."""
    maps = mapped_pids()
    plan: list[tuple[Segment, bool, str]] = []
    for name, kind in list_segments(prefix):
        try:
            seg = inspect_segment(name, kind, maps)
        except FileNotFoundError:
            continue
        if seg.kind == "broken":
            plan.append((seg, False, f"unreadable ({seg.error}); use `ringbus rm`"))
        elif seg.live:
            pids = ", ".join(map(str, sorted(seg.live_pids)))
            plan.append((seg, False, f"in use by pid {pids}"))
        elif seg.persistent and seg.depth and not force:
            plan.append(
                (seg, False, f"persistent ring holds {seg.depth} queued message(s); --force")
            )
        else:
            what = "server" if seg.kind == "pool" else "creator"
            plan.append((seg, True, f"{what} {seg.creator_pid} and every attacher dead"))
    return plan


def cmd_gc(args: argparse.Namespace) -> int:
    plan = gc_plan(args.prefix, args.force)
    status = EXIT_OK
    results: list[dict[str, Any]] = []
    for seg, remove, reason in plan:
        action = "keep"
        if remove:
            action = "would remove" if args.dry_run else "removed"
            if not args.dry_run:
                # Re-check right before removing: something may have attached since.
                try:
                    again = inspect_segment(seg.name, seg.kind)
                except FileNotFoundError:
                    action, reason = "gone", "removed by someone else"
                else:
                    if again.live:
                        action, reason = "keep", "attached while gc ran"
                    else:
                        try:
                            _unlink(again)
                        except FileNotFoundError:
                            action, reason = "gone", "removed by someone else"
                        except OSError as exc:
                            action, reason = "failed", str(exc)
                            status = EXIT_ERROR
        results.append({"name": seg.name, "kind": seg.kind, "action": action, "reason": reason})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['action']:>12}  {r['name']}  ({r['reason']})")
        n = sum(r["action"] in ("removed", "would remove") for r in results)
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {n} of {len(results)} segment(s)")
    return status


# ---------------------------------------------------------------- recover


def _dead_entries(st: dict[str, Any]) -> int:
    return sum(1 for p in st.get("participants", []) if not p["alive"])


def cmd_recover(args: argparse.Namespace) -> int:
    from ringbus.queue import Queue

    name = shm_name(args.name)
    if _find_kind(name) != "ring":
        _err("recover", f"no ring named {name}")
        return EXIT_ERROR
    try:
        before = _ring.read_stats(name)
        q = Queue.attach(name)
    except RingError as exc:
        _err("recover", f"{name}: {exc}")
        return EXIT_ERROR
    try:
        out = q.recover(requeue=True)
        after = _ring.read_stats(name)
    except RingError as exc:
        _err("recover", f"{name}: {exc}")
        return EXIT_ERROR
    finally:
        q.close()
    # The header counters say what was repaired even where the returned counts
    # are incomplete (they are zeroed when messages were requeued, and a waiter
    # may have run the same repair an instant before us).
    counts = {
        "name": name,
        "abandoned": max(int(out["abandoned"]), after["abandoned"] - before["abandoned"]),
        "recovered": max(int(out["recovered"]), after["recovered"] - before["recovered"]),
        "reclaimed": max(int(out["reclaimed"]), _dead_entries(before) - _dead_entries(after)),
        "returned": len(out.get("messages", [])),
        "depth": int(after["depth"]),
    }
    if args.json:
        print(json.dumps(counts))
    else:
        print(
            f"{name}: {counts['abandoned']} message(s) of dead producers skipped (abandoned), "
            f"{counts['recovered']} message(s) of dead consumers put back (recovered), "
            f"{counts['reclaimed']} attach entr(ies) of dead processes freed (reclaimed); "
            f"depth now {counts['depth']}"
        )
    return EXIT_OK


# ---------------------------------------------------------------- parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Human-readable output needs rich; say so instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] != "rich":
                raise
            _err(
                getattr(args, "command", None) or "",
                "tables need rich (pip install rich), or use --json",
            )
            return EXIT_ERROR

    run.__doc__ = fn.__doc__
    return run


def _wrap(text: str) -> str:
    """Descriptions are wrapped here: the raw formatter keeps epilog examples as written."""
    return textwrap.fill(text, 79)


def _epilog(examples: str) -> str:
    return f"examples:\n{examples}\n\n{EXIT_CODES}"


def register(subparsers: Any) -> None:
    """Add stats, ls, rm, gc and recover to an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "stats",
        help="show a ring's (or a bus's) counters, rates, processes and workers",
        description=_wrap(
            "Read a ring's header from outside (nothing is registered in it): "
            "capacity, depth, put/get rates, waits, abandoned/recovered counts and the "
            "attached processes.  For a bus (its name, or its task ring), also each task "
            "worker's state and task counters, and the reply rings of its dispatchers."
        ),
        epilog=_epilog(
            "  ringbus stats shop                     # bus 'shop' (ring /ringbus-shop-tasks)\n"
            "  ringbus stats /ringbus-shop-tasks --watch --interval 0.5\n"
            "  ringbus stats /my-ring --json | jq .rates.puts_per_s\n"
            "  ringbus stats shop --watch --json      # one JSON document per line\n"
            "  ringbus stats shop --transport redis://10.0.0.5:6379/0"
        ),
        formatter_class=fmt,
    )
    p.add_argument("name", help="ring name (/x, x or /dev/shm/x) or bus name")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds between the two snapshots rates come from (0: no rates), "
        "and between refreshes with --watch (default 1)",
    )
    p.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        metavar="N",
        help="with --watch: stop after N refreshes",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--transport",
        default=None,
        metavar="URL",
        help="a bus on a broker (redis://...): its queue and dead letters from there",
    )
    p.set_defaults(func=_guard(cmd_stats))

    p = subparsers.add_parser(
        "ls",
        help="list every ringbus segment on this machine",
        description=_wrap(
            "List every ringbus segment in /dev/shm (rings, whatever their name, "
            "and task servers' worker-state segments) with size, creator and whether it "
            "lives, the live processes that hold it, depth and persistence."
        ),
        epilog=_epilog("  ringbus ls\n  ringbus ls --prefix ringbus-shop-\n  ringbus ls --json"),
        formatter_class=fmt,
    )
    p.add_argument("--prefix", default="", help="only segments whose name starts with this")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guard(cmd_ls))

    p = subparsers.add_parser(
        "rm",
        help="remove a segment's name (refused while live processes hold it)",
        description=_wrap(
            "Remove a ringbus segment's name.  Refused while its creator or any "
            "attached process lives, unless --force (processes that hold it keep their "
            "mapping; new ones cannot attach).  Never removes a file that is not a ringbus "
            "segment."
        ),
        epilog=_epilog("  ringbus rm /ringbus-old-tasks\n  ringbus rm ringbus-stuck --force"),
        formatter_class=fmt,
    )
    p.add_argument("name", help="segment name (/x, x or /dev/shm/x)")
    p.add_argument("--force", action="store_true", help="remove even if live processes hold it")
    p.set_defaults(func=_guard(cmd_rm))

    p = subparsers.add_parser(
        "gc",
        help="remove segments whose creator and attachers are all dead",
        description=_wrap(
            "Remove every ringbus segment whose creator and attached processes "
            "are all dead (a live one is never removed).  A persistent ring (Queue.open, a "
            "bus's task ring) that still holds messages is kept unless --force, because it "
            "holds queued work.  Unreadable segments are left for `ringbus rm`."
        ),
        epilog=_epilog(
            "  ringbus gc --dry-run\n  ringbus gc\n  ringbus gc --prefix ringbus-shop- --force"
        ),
        formatter_class=fmt,
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument(
        "--force",
        action="store_true",
        help="also remove dead persistent rings that still hold messages",
    )
    p.add_argument("--prefix", default="", help="only segments whose name starts with this")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guard(cmd_gc))

    p = subparsers.add_parser(
        "recover",
        help="repair a ring after processes died mid-put or mid-get",
        description=_wrap(
            "Run the ring's crash recovery: claims of dead producers are skipped "
            "(abandoned), messages held by dead consumers are put back into the ring "
            "(recovered) and the attach entries of dead processes are freed (reclaimed)."
        ),
        epilog=_epilog("  ringbus recover /ringbus-shop-tasks\n  ringbus recover my-ring --json"),
        formatter_class=fmt,
    )
    p.add_argument("name", help="ring name (/x, x or /dev/shm/x)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guard(cmd_recover))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringbus",
        description=_wrap("Inspect and clean up ringbus shared-memory segments."),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:  # `ringbus ls | head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
