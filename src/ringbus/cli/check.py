"""``ringbus stats NAME --check``: a health check for probes and monitors.

Exit 0 healthy, 1 unhealthy, 2 bad usage or nothing readable, with one line
saying why, e.g.::

    ok: 4 workers, depth 0
    unhealthy: 0 live workers (min 1)
    unhealthy: queue depth 12000 > 10000
    unhealthy: task #12 (app.Mail) running for 95 s > 60

Made for a Kubernetes ``exec`` probe, a systemd ``ExecStartPost=`` or a
Nagios-style check: it reads the pool-state segments and the task ring
from outside, like ``ringbus stats``, and never touches them.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from ringbus import _names
from ringbus._proc import pid_alive
from ringbus.cli.argtypes import float_above, int_at_least
from ringbus.server.pool_state import WorkerInfo

__all__ = ["Health", "cmd_check", "judge"]

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2


@dataclass
class Health:
    """What the check saw of a bus."""

    live_workers: int = 0
    depth: int | None = None
    running: list[tuple[int, str, float]] = field(default_factory=list)
    """(task id, task type, seconds running) of every task in hand."""
    unreadable: list[str] = field(default_factory=list)


def live(w: WorkerInfo) -> bool:
    return bool(w.worker_pid) and w.state not in ("empty", "exited") and pid_alive(w.worker_pid)


def observe(pools: dict[str, list[WorkerInfo]], depth: int | None) -> Health:
    now = time.monotonic()
    h = Health(depth=depth)
    for slots in pools.values():
        for w in slots:
            if live(w):
                h.live_workers += 1
                if w.state == "running":
                    h.running.append((w.task_id, w.task_type, max(0.0, now - w.started)))
    h.running.sort(key=lambda r: -r[2])
    return h


def judge(
    h: Health, *, max_depth: int | None, min_workers: int, max_age: float | None
) -> tuple[bool, str]:
    """(healthy, the line to print)."""
    why: list[str] = []
    if h.live_workers < min_workers:
        why.append(f"{h.live_workers} live workers (min {min_workers})")
    depth = h.depth or 0
    if max_depth is not None and depth > max_depth:
        why.append(f"queue depth {depth} > {max_depth}")
    if max_age is not None:
        late = [r for r in h.running if r[2] > max_age]
        for tid, ttype, age in late[:3]:
            what = f"task #{tid} ({ttype})" if ttype else f"task #{tid}"
            why.append(f"{what} running for {age:.0f} s > {max_age:g}")
        if len(late) > 3:
            why.append(f"{len(late) - 3} more task(s) running for more than {max_age:g} s")
    if h.unreadable:
        why.append(f"{len(h.unreadable)} pool state segment(s) unreadable")
    if why:
        return False, "unhealthy: " + "; ".join(why)
    running = f", {len(h.running)} running" if h.running else ""
    return True, f"ok: {h.live_workers} workers, depth {depth}{running}"


def _depth(bus: str, url: str | None) -> int | None:
    if url:
        from ringbus.transport.registry import make_transport

        t = make_transport(url)
        t.bind(bus)
        try:
            return int(t.pending_tasks())
        finally:
            t.close()
    from ringbus.errors import RingError
    from ringbus.queue import read_stats

    try:
        return int(read_stats(_names.task_ring_name(bus))["depth"])
    except (RingError, FileNotFoundError):
        return None


def cmd_check(args: argparse.Namespace) -> int:
    """``ringbus stats NAME --check``."""
    from ringbus.cli.probe import read_pools, resolve_stats_target

    def say(code: int, text: str) -> int:
        print(text, file=sys.stderr if code == EXIT_USAGE else sys.stdout, flush=True)
        return code

    url = getattr(args, "transport", None)
    if url:
        bus: str | None = args.name if _names.is_bus_name(args.name) else None
    else:
        _, bus = resolve_stats_target(args.name)
        if bus is None and _names.is_bus_name(args.name.strip("/")):
            bus = args.name.strip("/")  # no ring, no server: nothing runs it
    if bus is None:
        return say(EXIT_USAGE, f"unknown: {args.name!r} is not a bus name or a bus's segment")
    try:
        depth = _depth(bus, url)
        errors: dict[str, str] = {}
        pools = read_pools(bus, errors)
    except (OSError, ValueError, ConnectionError) as exc:
        return say(EXIT_USAGE, f"unknown: cannot read bus {bus!r}: {exc}")
    h = observe(pools, depth)
    h.unreadable = sorted(errors)
    healthy, line = judge(
        h, max_depth=args.max_depth, min_workers=args.min_workers, max_age=args.max_age
    )
    return say(EXIT_OK if healthy else EXIT_UNHEALTHY, line)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ringbus stats`` that belong to ``--check``."""
    g = p.add_argument_group("health check (--check)")
    g.add_argument(
        "--check",
        action="store_true",
        help="exit 0 healthy, 1 unhealthy, 2 unknown, printing one line saying why",
    )
    g.add_argument(
        "--max-depth",
        type=int_at_least(0),
        default=None,
        metavar="N",
        help="unhealthy when more than N tasks wait in the queue",
    )
    g.add_argument(
        "--min-workers",
        type=int_at_least(0),
        default=1,
        metavar="M",
        help="unhealthy with fewer than M live workers on this machine (default 1)",
    )
    g.add_argument(
        "--max-age",
        type=float_above(0),
        default=None,
        metavar="S",
        help="unhealthy when a task has been running for more than S seconds",
    )
