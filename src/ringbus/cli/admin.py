"""Admin commands of the ``ringbus`` CLI: stats, ls, rm, gc, recover.

The commands and their parser; what they read comes from
``ringbus.cli.probe`` (rings and pools seen from outside) and what people see
from ``ringbus.cli.render``.

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
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

from ringbus.cli.argtypes import float_at_least, int_at_least
from ringbus.cli.probe import (
    SHM_DIR,
    Segment,
    broker_snapshot,
    find_kind,
    inspect_segment,
    list_segments,
    mapped_pids,
    resolve_stats_target,
    seg_path,
    shm_name,
    stats_snapshot,
)
from ringbus.cli.render import console, render_segments, render_stats
from ringbus.errors import RingError
from ringbus.queue import read_stats, unlink_ring

__all__ = [
    "Segment",
    "inspect_segment",
    "list_segments",
    "main",
    "mapped_pids",
    "register",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

EXIT_CODES = """exit codes:
  0  success
  1  error: no such ring, not a ringbus segment, removal refused, unlink failed
  2  usage error (bad arguments)"""


def _err(cmd: str, text: str) -> None:
    print(f"ringbus {cmd}: {text}", file=sys.stderr)


def _stats_stacks(args: argparse.Namespace) -> int:
    """``--stacks``: SIGUSR2 to each live worker (faulthandler prints its stacks)."""
    import signal

    from ringbus.server.pool_state import read_pool_states

    pids = sorted(
        {w.worker_pid for slots in read_pool_states(args.name).values() for w in slots} - {0}
    )
    asked = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)
            asked.append(pid)
    if not asked:
        _err("stats", f"no live worker of bus {args.name!r} on this machine")
        return EXIT_ERROR
    print(
        f"asked {len(asked)} worker(s) of bus {args.name!r} for their stacks: pids "
        f"{', '.join(map(str, asked))}; they print them on their stderr (the server's log)"
    )
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    if getattr(args, "check", False):
        from ringbus.cli.check import cmd_check

        return cmd_check(args)
    if getattr(args, "format", None) == "prometheus":
        return _stats_prometheus(args)
    if getattr(args, "stacks", False):
        return _stats_stacks(args)
    if getattr(args, "format", None) == "json":
        args.json = True
    url = getattr(args, "transport", None)
    if url:
        # A bus on a broker: the queue lives there; worker states are the pool
        # segments of the servers running on this machine.
        ring, bus = None, args.name
    else:
        ring, bus = resolve_stats_target(args.name)
    if ring is None and bus is None:
        _err("stats", f"no ring or bus named {args.name!r} (see `ringbus ls`)")
        return EXIT_ERROR

    def snap(prev: dict[str, Any] | None) -> dict[str, Any]:
        doc = stats_snapshot(ring, bus, prev)
        if bus is not None and doc.get("bus") is not None:
            from ringbus.cli.running import running_tasks  # progress (issue 17)

            paths = [s["path"] for s in doc["bus"]["servers"]]
            doc["bus"]["running_tasks"] = running_tasks(bus, paths, url)
        if url and bus is not None:
            doc["broker"] = broker = broker_snapshot(url, bus)
            if doc.get("bus") is not None:
                doc["bus"]["dead_letters"] = broker["dead_letters"]
                # Depth per channel from the broker; servers from this machine.
                servers = doc["bus"]["servers"]
                doc["bus"]["queues"] = [
                    {
                        **q,
                        "served_by": [
                            s["server_pid"] for s in servers if q["queue"] in s["queues"]
                        ],
                    }
                    for q in broker["queues"]
                ]
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
                console().print(render_stats(doc))
            return EXIT_OK
        return _watch(args, snap, public)
    except (RingError, ConnectionError, ValueError) as exc:
        _err("stats", f"{args.name}: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


def _stats_prometheus(args: argparse.Namespace) -> int:
    """``--format prometheus``: the metrics of the bus once (see ``ringbus.cli.metrics``)."""
    try:
        from ringbus.cli.metrics import cmd_stats_prometheus
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "prometheus_client":
            raise
        _err("stats", "--format prometheus needs prometheus_client: pip install 'ringbus[metrics]'")
        return EXIT_USAGE
    return cmd_stats_prometheus(args)


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

    with Live(render_stats(prev), console=console(), auto_refresh=False) as live:
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
    con = console()
    con.print(render_segments(segs, str(SHM_DIR)))
    con.print(f"{len(segs)} segment(s)")
    return EXIT_OK


# ---------------------------------------------------------------- rm / gc


def _unlink(seg: Segment) -> None:
    if seg.kind == "ring":
        try:
            unlink_ring(seg.name)
            return
        except RingError:
            if seg.path.exists():
                raise
            raise FileNotFoundError(seg.name) from None
    seg.path.unlink()


def cmd_rm(args: argparse.Namespace) -> int:
    kind = find_kind(args.name)
    if kind is None:
        if seg_path(args.name).exists():
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
    from ringbus.server.lost_tasks import adopt_pool_file

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
                    elif again.kind == "pool":
                        # Its workers' tasks in hand go back to the bus first.
                        handed = adopt_pool_file(str(again.path))
                        if handed is None:
                            action, reason = "keep", "in use or being adopted"
                        elif handed:
                            reason += f"; {handed} task(s) in hand queued again"
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
    if find_kind(name) != "ring":
        _err("recover", f"no ring named {name}")
        return EXIT_ERROR
    try:
        before = read_stats(name)
        q = Queue.attach(name)
    except RingError as exc:
        _err("recover", f"{name}: {exc}")
        return EXIT_ERROR
    try:
        out = q.recover(requeue=True)
        after = read_stats(name)
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
            "  ringbus stats shop --transport redis://10.0.0.5:6379/0\n"
            "  ringbus stats shop --format prometheus   # the metrics once\n"
            "  ringbus stats shop --check --min-workers 2 --max-depth 10000 --max-age 60"
        ),
        formatter_class=fmt,
    )
    p.add_argument("name", help="ring name (/x, x or /dev/shm/x) or bus name")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument(
        "--interval",
        type=float_at_least(0),
        default=1.0,
        metavar="S",
        help="seconds between the two snapshots rates come from (0: no rates), "
        "and between refreshes with --watch (default 1)",
    )
    p.add_argument(
        "--count",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="with --watch: stop after N refreshes",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--format",
        choices=("table", "json", "prometheus"),
        default="table",
        help="table (default), json (as --json) or prometheus: a bus's metrics once, "
        "in the Prometheus exposition format (needs prometheus_client)",
    )
    p.add_argument(
        "--transport",
        default=None,
        metavar="URL",
        help="a bus on a broker (redis://...): its queue and dead letters from there",
    )
    p.add_argument(
        "--stacks",
        action="store_true",
        help="ask every live worker of the bus on this machine to print every thread's "
        "stack on its stderr (the server's log): for a stuck worker",
    )
    from ringbus.cli.check import add_arguments as add_check_arguments

    add_check_arguments(p)
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
