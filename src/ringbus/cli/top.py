"""``ringbus top NAME``: a live view of a bus's workers and running tasks.

Every frame reads the pool-state segments of the bus's servers on this
machine and its queue depth (from outside, like ``ringbus stats``), and
``/proc/<pid>/status`` for each worker's resident memory.  Rates come from
the difference between two frames.  ``--once`` prints one frame (no rates)
and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ringbus import _names
from ringbus.cli.argtypes import float_above, int_at_least
from ringbus.server.pool_state import WorkerInfo

__all__ = ["Frame", "cmd_top", "register", "render", "snapshot"]


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (VmRSS), None when unknown."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Frame:
    """One look at a bus."""

    bus: str
    mono: float
    depth: int | None
    workers: list[tuple[str, WorkerInfo, int | None]] = field(default_factory=list)
    """(server pid, slot, worker RSS) of every worker slot."""
    unreadable: int = 0


def _server(path: str) -> str:
    return path.rsplit("-pool-", 1)[-1].split("-", 1)[0]


def snapshot(bus: str, url: str | None = None) -> Frame:
    from ringbus.cli.probe import read_pools

    depth: int | None
    if url:
        from ringbus.transport.registry import make_transport

        t = make_transport(url)
        t.bind(bus)
        try:
            depth = int(t.pending_tasks())
        finally:
            t.close()
    else:
        from ringbus.errors import RingError
        from ringbus.queue import read_stats

        try:
            depth = int(read_stats(_names.task_ring_name(bus))["depth"])
        except (RingError, FileNotFoundError):
            depth = None
    errors: dict[str, str] = {}
    frame = Frame(bus=bus, mono=time.monotonic(), depth=depth)
    for path, slots in sorted(read_pools(bus, errors).items()):
        for w in slots:
            frame.workers.append((_server(path), w, rss_bytes(w.worker_pid)))
    frame.unreadable = len(errors)
    return frame


def _rates(frame: Frame, prev: Frame | None) -> dict[tuple[str, int, int], float]:
    """Tasks done per second by (server, slot, worker pid) since ``prev``."""
    if prev is None or frame.mono <= prev.mono:
        return {}
    before = {(s, w.slot, w.worker_pid): w.tasks_done for s, w, _ in prev.workers}
    dt = frame.mono - prev.mono
    out = {}
    for s, w, _ in frame.workers:
        key = (s, w.slot, w.worker_pid)
        if key in before and w.tasks_done >= before[key]:
            out[key] = (w.tasks_done - before[key]) / dt
    return out


def render(frame: Frame, prev: Frame | None = None) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from ringbus.cli.render import fmt_age, fmt_bytes, fmt_count, plain

    rates = _rates(frame, prev)
    live = [w for _, w, _ in frame.workers if w.worker_pid and w.state in ("idle", "running")]
    running = [(s, w, rss) for s, w, rss in frame.workers if w.state == "running"]
    total_rate = sum(rates.values())
    head = Text()
    head.append(f"bus {frame.bus}", style="bold")
    depth = "?" if frame.depth is None else f"{frame.depth:,}"
    head.append(f"   queue depth {depth}   workers {len(live)} live, {len(running)} running")
    head.append(f"   {total_rate:,.1f} tasks/s" if prev is not None else "   rates: -")
    if frame.unreadable:
        head.append(f"   ({frame.unreadable} pool state(s) unreadable)", style="red")

    tasks = Table(title="running tasks", title_justify="left")
    for col in ("task", "type", "age", "attempt", "worker", "rss"):
        tasks.add_column(col, justify="right" if col in ("age", "rss", "attempt") else "left")
    for _, w, rss in sorted(running, key=lambda r: r[1].started):
        tasks.add_row(
            plain(f"#{w.task_id}"),
            plain(w.task_type or "?"),
            plain(fmt_age(frame.mono - w.started)),
            plain(w.attempt),
            plain(w.worker_pid),
            plain(fmt_bytes(rss) if rss is not None else "?"),
        )
    if not running:
        tasks.add_row("-", plain("no task running", "dim"), "", "", "", "")

    workers = Table(title="workers", title_justify="left")
    cols = ("server", "slot", "pid", "state", "rss", "done", "failed", "retried", "dead")
    for col in (*cols, "/s", "up"):
        workers.add_column(col, justify="left" if col in ("server", "state") else "right")
    for server, w, rss in frame.workers:
        style = {"running": "yellow", "idle": "green", "exited": "red"}.get(w.state, "")
        rate = rates.get((server, w.slot, w.worker_pid))
        workers.add_row(
            plain(server),
            plain(w.slot),
            plain(w.worker_pid or "-"),
            plain(w.state, style),
            plain(fmt_bytes(rss) if rss is not None else "-"),
            plain(fmt_count(w.tasks_done)),
            plain(fmt_count(w.tasks_failed)),
            plain(fmt_count(w.tasks_retried)),
            plain(fmt_count(w.dead_lettered)),
            plain(f"{rate:,.1f}" if rate is not None else "-"),
            plain(fmt_age(frame.mono - w.worker_started) if w.worker_started else "-"),
        )
    if not frame.workers:
        workers.add_row("-", "", "", plain("no live task server of this bus", "dim"))
    return Group(head, tasks, workers)


def cmd_top(args: argparse.Namespace) -> int:
    from ringbus.cli.render import console

    bus = args.name.strip("/")
    if not _names.is_bus_name(bus):
        print(f"ringbus top: {args.name!r} is not a bus name", file=sys.stderr)
        return 2
    try:
        frame = snapshot(bus, args.transport)
        if args.once:
            console().print(render(frame))
            return 0
        from rich.live import Live

        shown = 0
        with Live(render(frame), console=console(), auto_refresh=False, screen=False) as live:
            with contextlib.suppress(KeyboardInterrupt):
                while args.count is None or shown < args.count:
                    time.sleep(args.interval)
                    prev, frame = frame, snapshot(bus, args.transport)
                    live.update(render(frame, prev), refresh=True)
                    shown += 1
    except (ConnectionError, OSError, ValueError) as exc:
        print(f"ringbus top: {bus}: {exc}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "top",
        help="live view of a bus: running tasks, workers, rates, queue depth",
        description="Show every running task (type, id, age, attempt, worker pid and its "
        "memory), each worker's counters and tasks/s, and the queue depth, refreshed "
        "until Ctrl-C.",
        epilog="examples:\n  ringbus top shop\n  ringbus top shop --interval 0.5\n"
        "  ringbus top shop --once\n\nexit codes: 0 ok, 1 cannot read the bus, 2 usage",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="the bus name")
    p.add_argument(
        "--interval", type=float_above(0), default=1.0, metavar="S", help="seconds between frames"
    )
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument(
        "--count", type=int_at_least(1), default=None, metavar="N", help="stop after N refreshes"
    )
    p.add_argument(
        "--transport",
        default=None,
        metavar="URL",
        help="a bus on a broker (redis://...): its queue depth from there",
    )
    p.set_defaults(func=cmd_top)
