"""``ringbus dead-letters NAME``: list, retry or purge a bus's dead letters.

Exit codes: 0 done (also when there is nothing to list), 1 the store could
not be read or written, 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

__all__ = ["register"]

EXAMPLES = """\
examples:
  ringbus dead-letters shop                 list the dead letters of bus "shop"
  ringbus dead-letters shop --json          the same, one JSON document
  ringbus dead-letters shop --retry         queue every one of them again
  ringbus dead-letters shop --retry --id 1f2e3d4c5b6a7988
  ringbus dead-letters shop --purge         drop them all
  ringbus dead-letters shop --transport redis://10.0.0.5:6379/0

A retried task is queued with attempt 1, no deadline and no reply path (its
original caller has already been told it failed).

exit codes: 0 done, 1 the store could not be read or written, 2 bad usage
"""


def _cmd(args: argparse.Namespace) -> int:
    from ringbus.tasks.dead_letters import DeadLetterStore
    from ringbus.transport.registry import make_transport

    try:
        transport = make_transport(args.transport)
        transport.bind(args.name)
        store = DeadLetterStore(transport)
    except (ValueError, TypeError) as exc:
        print(f"ringbus dead-letters: {exc}", file=sys.stderr)
        return 2
    ids = args.ids or None
    try:
        if args.retry:
            n = store.retry(ids)
            print(f"queued {n} dead letter(s) of bus {args.name!r} again")
            return 0
        if args.purge:
            n = store.purge(ids)
            print(f"dropped {n} dead letter(s) of bus {args.name!r}")
            return 0
        letters = store.letters()
    except Exception as exc:
        print(f"ringbus dead-letters: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        transport.close()
    if ids is not None:
        letters = [d for d in letters if d.id in set(ids)]
    if args.json:
        rows: list[dict[str, Any]] = [
            {
                "id": d.id,
                "time": d.time,
                "reason": d.reason,
                "task_type": d.task_type,
                "attempts": d.attempts,
                "size": len(d.data),
            }
            for d in letters
        ]
        json.dump({"bus": args.name, "dead_letters": rows}, sys.stdout, indent=2)
        print()
        return 0
    if not letters:
        print(f"bus {args.name!r} has no dead letters")
        return 0
    from rich.table import Table

    from ringbus.cli.render import console, plain

    # Task types and reasons come from tasks and exceptions: literal text, never markup.
    table = Table(title=plain(f"dead letters of bus {args.name!r}: {len(letters)}"))
    table.add_column("id", no_wrap=True)
    table.add_column("when", no_wrap=True)
    for col in ("task type", "attempts", "bytes", "reason"):
        table.add_column(col, overflow="fold")
    for d in letters:
        when = datetime.datetime.fromtimestamp(d.time).isoformat(" ", "seconds")
        cells = (d.id, when, d.task_type or "?", d.attempts, len(d.data), d.reason)
        table.add_row(*map(plain, cells))
    console().print(table)  # piped: wide, so ids copy whole into --id
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "dead-letters",
        help="list, retry or purge the tasks that failed for good on a bus",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="the bus name")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--retry", action="store_true", help="queue them again")
    what.add_argument("--purge", action="store_true", help="drop them")
    p.add_argument("--id", dest="ids", action="append", metavar="ID", help="only this one (repeat)")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.add_argument(
        "--transport", default=None, metavar="URL", help="the bus's transport (default: shm)"
    )
    p.set_defaults(func=_cmd)
