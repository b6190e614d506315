"""Tables and numbers of the ``ringbus`` commands, for people (rich).

The JSON documents of ``ringbus.cli.probe`` go in, rich renderables come
out; ``--json`` output never passes through here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ringbus.cli.probe import WORKER_COUNTERS

if TYPE_CHECKING:
    from ringbus.cli.probe import Segment

__all__ = [
    "console",
    "fmt_age",
    "fmt_bytes",
    "fmt_count",
    "plain",
    "render_segments",
    "render_stats",
    "render_task_times",
]


def fmt_count(n: float) -> str:
    if n >= 10_000_000:
        return f"{n / 1e6:,.1f}M"
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def fmt_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plain(value: object, style: str = "") -> Any:
    """``value`` as literal text: names, task types, reasons and addresses come
    from tasks, brokers and files, and ``[bold]`` or ``[/etc/app]`` in them must
    print as written (rich markup would style it or raise MarkupError)."""
    from rich.text import Text

    return Text(str(value), style=style)


def console() -> Any:
    from rich.console import Console

    # Piped output (scripts, logs): wide enough that names are never cut.
    return Console() if sys.stdout.isatty() else Console(width=200)


def render_stats(doc: dict[str, Any]) -> Any:
    """A rich renderable of one stats document."""
    from rich.console import Group
    from rich.table import Table

    parts: list[Any] = []
    broker = doc.get("broker")
    if broker is not None:
        t = Table(
            title=plain(f"bus {doc['name']!r} on {broker['transport']}"), title_justify="left"
        )
        t.add_column("queued tasks")
        t.add_column("dead letters")
        t.add_row(f"{broker['pending_tasks']:,}", f"{broker['dead_letters']:,}")
        parts.append(t)
        if broker.get("time"):
            parts.extend(render_time(broker["time"]))
    ring = doc.get("ring")
    if ring is not None:
        parts.extend(_render_ring(doc, ring))
    bus = doc.get("bus")
    if bus is not None:
        parts.extend(_render_bus(bus))
    return Group(*parts)


def _render_ring(doc: dict[str, Any], ring: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    head = Table(title=plain(f"ring {ring['name']}"), show_header=False, title_justify="left")
    head.add_column("field", style="bold")
    head.add_column("value")
    head.add_column("field", style="bold")
    head.add_column("value")
    creator = doc["creator"]
    rates = doc.get("rates")

    def rate(key: str, fmt: Callable[[float], str] = fmt_count) -> str:
        return "-" if rates is None else f"{fmt(rates[key])}/s"

    rows = [
        ("depth", f"{ring['depth']:,} msgs", "capacity", f"{ring['capacity']:,} slots"),
        ("slots used", f"{ring['tail'] - ring['head']:,}", "limit", f"{ring['limit']:,}"),
        ("puts", fmt_count(ring["puts"]), "put rate", rate("puts_per_s")),
        ("gets", fmt_count(ring["gets"]), "get rate", rate("gets_per_s")),
        ("bytes in", fmt_bytes(ring["bytes_in"]), "in rate", rate("bytes_in_per_s", fmt_bytes)),
        (
            "bytes out",
            fmt_bytes(ring["bytes_out"]),
            "out rate",
            rate("bytes_out_per_s", fmt_bytes),
        ),
        (
            "waits full",
            fmt_count(ring["waits_full"]),
            "waits empty",
            fmt_count(ring["waits_empty"]),
        ),
        ("abandoned", fmt_count(ring["abandoned"]), "recovered", fmt_count(ring["recovered"])),
        (
            "slot size",
            f"{ring['slot_size']} B",
            "max message",
            fmt_bytes(ring["max_message_size"]),
        ),
        (
            "segment",
            fmt_bytes(ring["segment_size"]),
            "persistent",
            "yes" if ring["persistent"] else "no",
        ),
        (
            "creator",
            f"{creator['pid']} ({'alive' if creator['alive'] else 'dead'})",
            "age",
            fmt_age(doc["time"] - ring["created_unix_ns"] / 1e9),
        ),
    ]
    if ring.get("unfinished"):
        rows.append(("unfinished", fmt_count(ring["unfinished"]), "", ""))
    for row in rows:
        head.add_row(*map(plain, row))
    procs = Table(title="attached processes", title_justify="left")
    for col in ("pid", "state", "threads", "doing", "maps it", "role"):
        procs.add_column(col)
    for p in doc["processes"]:
        doing = ", ".join(k for k in ("putting", "getting") if p[k]) or "-"
        procs.add_row(
            plain(p["pid"]),
            plain("alive", "green") if p["alive"] else plain("dead", "red"),
            plain(p["threads"]),
            plain(doing),
            plain("yes" if p["mapped"] else "no"),
            plain("creator" if p["creator"] else ""),
        )
    if not doc["processes"]:
        procs.add_row("-", "none attached", "", "", "", "")
    return [head, procs]


def _render_bus(bus: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    parts: list[Any] = []
    if len(bus.get("queues") or []) > 1:  # one queue, priority 0: the ring table says it all
        t = Table(title="queues (strict order per server; priority 9 first)", title_justify="left")
        for col in ("queue", "priority", "depth", "served by"):
            t.add_column(col, justify="right" if col in ("priority", "depth") else "left")
        for q in bus["queues"]:
            by = ", ".join(map(str, q["served_by"])) or "no live server"
            t.add_row(plain(q["queue"]), plain(q["priority"]), plain(f"{q['depth']:,}"), plain(by))
        parts.append(t)
    if not bus["servers"]:
        t = Table(title=plain(f"bus {bus['name']!r}: no live task server"), title_justify="left")
        t.add_column("")
        parts.append(t)
    for srv in bus["servers"]:
        t = Table(
            title=plain(
                f"bus {bus['name']!r} server pid {srv['server_pid']}: workers"
                + (f" (queues {', '.join(srv['queues'])})" if srv.get("queues") else "")
            ),
            title_justify="left",
        )
        counters = [c for c in WORKER_COUNTERS if srv["workers"] and c in srv["workers"][0]]
        for col in ("slot", "pid", "state", "task", "for", "up", *counters):
            t.add_column(col.replace("tasks_", ""))
        for w in srv["workers"]:
            state = w["state"]
            style = {"running": "yellow", "idle": "green", "exited": "red"}.get(state, "")
            t.add_row(
                plain(w["slot"]),
                plain(w["worker_pid"] or "-"),
                plain(state, style),
                plain((w.get("task_type") or "-") if state == "running" else "-"),
                plain(fmt_age(w["running_for"]) if w.get("running_for") is not None else "-"),
                plain(fmt_age(w["up_for"]) if w.get("up_for") is not None else "-"),
                *(plain(fmt_count(int(w.get(c) or 0))) for c in counters),
            )
        parts.append(t)
        if srv.get("task_times"):
            parts.append(render_task_times(srv["task_times"]))
    if bus.get("running_tasks"):
        parts.append(_render_running(bus["running_tasks"]))
    if bus.get("unreadable_pools"):
        t = Table(title="pool state segments skipped", title_justify="left")
        t.add_column("path")
        t.add_column("why")
        for u in bus["unreadable_pools"]:
            t.add_row(plain(u["path"]), plain(u["error"]))
        parts.append(t)
    if bus["reply_rings"]:
        t = Table(title="reply rings (one per dispatching process)", title_justify="left")
        for col in ("name", "dispatcher", "depth"):
            t.add_column(col)
        for r in bus["reply_rings"]:
            t.add_row(
                plain(r["name"]),
                plain(f"{r['dispatcher_pid']} ({'alive' if r['alive'] else 'dead'})"),
                plain(r["depth"]),
            )
        parts.append(t)
    if bus.get("dead_letters"):
        t = Table(
            title=plain(
                f"dead letters: {bus['dead_letters']} (ringbus dead-letters {bus['name']})"
            ),
            title_justify="left",
        )
        t.add_column("")
        parts.append(t)
    if bus.get("time"):
        parts.extend(render_time(bus["time"]))
    return parts


def _render_running(rows: list[dict[str, Any]]) -> Any:
    """The tasks running on this machine's workers, with their progress."""
    from rich.table import Table

    t = Table(title="running tasks (progress from current_task())", title_justify="left")
    for col in ("id", "type", "worker", "attempt", "progress", "message"):
        t.add_column(col, justify="right" if col in ("attempt", "progress") else "left")
    for r in rows:
        p = r.get("progress")
        t.add_row(
            plain(r["id"]),
            plain(r.get("type") or "-"),
            plain(r.get("worker_pid") or "-"),
            plain(r.get("attempt") or "-"),
            plain("-" if p is None else f"{p * 100:.0f}%"),
            plain(r.get("message") or ""),
        )
    return t


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 0.001:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1000:.1f} ms"
    return fmt_age(s)


def render_task_times(rows: list[dict[str, Any]]) -> Any:
    """Run time and queue wait by task type (p50/p99 estimated from the
    histogram buckets, as Prometheus's histogram_quantile does)."""
    from rich.table import Table

    t = Table(
        title="task times (run: taken to done; wait: queued or due to taken; "
        "p50/p99 estimated from buckets)",
        title_justify="left",
    )
    for col in ("task", "queue", "runs", "run p50", "run p99", "waits", "wait p50", "wait p99"):
        t.add_column(col, justify="left" if col in ("task", "queue") else "right")
    for r in rows:
        run, wait = r["run_seconds"], r["queue_wait_seconds"]
        t.add_row(
            plain(r["task_type"] if r["task_type"] is not None else "(all)"),
            plain(r["queue"] if r["queue"] is not None else ""),
            plain(fmt_count(run["count"])),
            plain(fmt_seconds(run["p50"])),
            plain(fmt_seconds(run["p99"])),
            plain(fmt_count(wait["count"])),
            plain(fmt_seconds(wait["p50"])),
            plain(fmt_seconds(wait["p99"])),
        )
    return t


def render_time(doc: dict[str, Any]) -> list[Any]:
    """Delayed tasks, the leader and the periodic schedules."""
    from rich.table import Table

    now = time.time()

    def when(t: float | None) -> str:
        return "-" if t is None else f"{fmt_age(abs(t - now))} {'ago' if t < now else 'from now'}"

    parts: list[Any] = []
    if doc.get("scheduled") or doc.get("leader"):
        t = Table(title="scheduler", title_justify="left")
        for col in ("delayed tasks", "next due", "leader pid"):
            t.add_column(col)
        t.add_row(str(doc["scheduled"]), when(doc.get("next_due")), plain(doc.get("leader") or "-"))
        parts.append(t)
    if doc.get("schedules"):
        t = Table(title="periodic schedules", title_justify="left")
        for col in ("name", "last run", "next run"):
            t.add_column(col)
        for name, sch in sorted(doc["schedules"].items()):
            t.add_row(plain(name), when(sch.get("last")), when(sch.get("next")))
        parts.append(t)
    return parts


def render_segments(segs: Sequence[Segment], where: str) -> Any:
    """The ``ringbus ls`` table."""
    from rich.table import Table

    t = Table(title=plain(f"ringbus segments in {where}"), title_justify="left")
    for col in ("name", "kind", "size", "creator", "live pids", "depth", "capacity", "persistent"):
        t.add_column(col, justify="right" if col in ("size", "depth", "capacity") else "left")
    for s in segs:
        creator = (
            f"{s.creator_pid} ({'alive' if s.creator_alive else 'dead'})" if s.creator_pid else "?"
        )
        live = ", ".join(map(str, sorted(s.live_pids)))
        ring = s.kind == "ring" and s.stats is not None
        if s.kind == "broken":
            kind = plain("broken", "red")
            kind.append(f": {s.error}")  # appended text is never markup
        else:
            kind = plain(s.kind)
        t.add_row(
            plain(s.name),
            kind,
            plain(fmt_bytes(s.size)),
            plain(creator),
            plain(live) if live else plain("none", "dim"),
            plain(f"{s.depth:,}" if ring else "-"),
            plain(f"{s.stats['capacity']:,}" if ring and s.stats else "-"),
            plain(("yes" if s.persistent else "no") if ring else "-"),
        )
    return t
