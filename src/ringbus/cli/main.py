"""The ``ringbus`` command.

``ringbus worker module:bus --workers N`` runs a TaskServer in the
foreground (a process of its own, like ``celery worker`` or Swoole's task
workers); SIGTERM or SIGINT drain it (workers finish the task in hand), a
second one kills the workers still busy.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ringbus.tasks.bus import TaskBus

__all__ = ["load_bus", "main"]

log = logging.getLogger("ringbus.cli")


def load_bus(target: str) -> object:
    """Import ``module:attribute`` (the attribute may be dotted), with the
    current directory on ``sys.path`` as gunicorn and celery do."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected module:bus, got {target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _cmd_worker(args: argparse.Namespace) -> int:
    from ringbus.errors import UnsignedPickleError
    from ringbus.server.supervisor import TaskServer
    from ringbus.tasks.bus import TaskBus

    try:
        bus = load_bus(args.target)
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"ringbus worker: cannot load {args.target!r}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(bus, TaskBus):
        print(
            f"ringbus worker: {args.target!r} is a {type(bus).__name__}, not a TaskBus",
            file=sys.stderr,
        )
        return 2
    if args.transport:
        try:
            bus = _on_transport(bus, args.transport)
        except (ValueError, ConnectionError) as exc:
            print(f"ringbus worker: --transport {args.transport!r}: {exc}", file=sys.stderr)
            return 2
    try:
        bus.check_serving()  # unsigned pickle over a network: say what to do, no traceback
    except UnsignedPickleError as exc:
        print(f"ringbus worker: {exc}", file=sys.stderr)
        return 2
    server = TaskServer(
        bus,
        args.workers,
        max_tasks_per_child=args.max_tasks_per_child,
        task_timeout=args.task_timeout,
        start_method=args.start_method,
    )
    stop = threading.Event()
    signals_seen = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("ringbus worker: %s, draining", signal.Signals(signum).name)
            stop.set()
        else:
            name = signal.Signals(signum).name
            log.warning("ringbus worker: %s again, killing busy workers", name)
            server.kill(wait=False)  # the main thread is waiting in stop()

    previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[int(sig)] = signal.signal(sig, on_signal)
    try:
        server.start()
        print(
            f"ringbus worker: serving bus {bus.name!r} with {args.workers} workers "
            f"(pid {os.getpid()})",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        server.stop(timeout=args.drain_timeout)
    finally:
        if server.running:
            server.kill()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        bus.close()
    print("ringbus worker: stopped", file=sys.stderr, flush=True)
    return 0


def _on_transport(bus: TaskBus, spec: str) -> TaskBus:
    """The same bus (name, handlers, retry policies) on another transport, so
    one module serves a shared-memory pool here and a Redis pool elsewhere."""
    from ringbus.transport.registry import make_transport

    parts: tuple[Any, ...] = bus.__reduce__()
    rebuild, (name, _, *rest) = parts[0], parts[1]
    moved: TaskBus = rebuild(name, make_transport(spec), *rest)
    return moved


WORKER_EXAMPLES = """\
examples:
  ringbus worker app.tasks:bus --workers 8
  ringbus worker app.tasks:bus -w 4 --max-tasks-per-child 1000 --task-timeout 30
  ringbus worker app.tasks:bus --drain-timeout 10     # stop waits 10 s, then kills
  ringbus worker app.tasks:bus --transport redis://10.0.0.5:6379/0   # a pool on Redis

exit codes: 0 stopped cleanly, 1 the pool failed, 2 bad usage or the bus could not be loaded
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringbus", description="Tasks to worker processes over shared-memory rings."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    w = sub.add_parser(
        "worker",
        help="run a pool of task workers for a bus in the foreground",
        description=(
            "Run a TaskServer for BUS in the foreground. SIGTERM or SIGINT drains it "
            "(workers finish the task in hand); a second one kills the busy workers."
        ),
        epilog=WORKER_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("target", help="the bus to serve, as module:attribute (e.g. app.tasks:bus)")
    w.add_argument("-w", "--workers", type=_positive_int, default=os.cpu_count() or 1)
    w.add_argument("--max-tasks-per-child", type=_positive_int, default=None)
    w.add_argument("--task-timeout", type=_positive_float, default=None, metavar="SECONDS")
    w.add_argument(
        "--drain-timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, kill workers still busy after this long (default: wait)",
    )
    w.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default="fork")
    w.add_argument(
        "--transport",
        default=None,
        metavar="URL",
        help="serve the bus over this transport instead of its own (redis://, rediss://, shm)",
    )
    w.set_defaults(func=_cmd_worker)
    from ringbus.cli.admin import register

    register(sub)  # stats, ls, rm, gc, recover
    from ringbus.cli.dead_letters import register as register_dead

    register_dead(sub)
    for cmd in sub.choices.values():  # `ringbus worker -v ...` as well as `ringbus -v worker ...`
        cmd.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
    sub.add_parser(
        "bench",
        help="quick benchmark against the peers (full run: python -m bench.compare)",
        add_help=False,
    )
    sub.add_parser(
        "demo",
        help="run the web-server demo: requests offload mail to task workers (ringbus demo -h)",
        add_help=False,
    )
    return parser


_OWN_PARSERS = ("bench", "demo")
"""Commands that parse their own options (everything after their name)."""


def _own_parser_command(argv: list[str]) -> tuple[str, bool] | None:
    """``(command, verbose)`` when ``argv`` is ``[-v ...] bench|demo ...``."""
    verbose = False
    for i, arg in enumerate(argv):
        if arg in ("-v", "--verbose"):
            verbose = True
        elif arg in _OWN_PARSERS:
            del argv[: i + 1]
            return arg, verbose
        else:
            return None
    return None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = _own_parser_command(argv)
    if own is not None:
        command, verbose = own
        if verbose:  # otherwise their logging stays as they set it up
            _setup_logging(verbose)
        if command == "bench":
            from ringbus.cli.bench import main as bench_main

            return bench_main(argv)
        from ringbus.demo.run import main as demo_main

        return demo_main(argv)
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
