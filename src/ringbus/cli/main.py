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

from ringbus.cli.argtypes import float_above, int_at_least, queue_list
from ringbus.cli.config import EnvOption, apply_env, choice, env_help
from ringbus.cli.logs import LEVELS, setup_logging, worker_logging

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
    announce = _announcer(args.log_format)
    server = TaskServer(
        bus,
        args.workers,
        max_tasks_per_child=args.max_tasks_per_child,
        task_timeout=args.task_timeout,
        start_method=args.start_method,
        concurrency=args.concurrency,
        queues=args.queues,
        max_workers=args.max_workers,
        # Workers of a rolling restart start fresh (spawn): the same log setup there.
        initializer=worker_logging,
        initargs=(args.log_level or "info", args.log_format),
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

    def on_control(signum: int, frame: FrameType | None) -> None:
        log.info("ringbus worker: %s", signal.Signals(signum).name)
        if signum == signal.SIGHUP:
            server.reload()  # rolling restart with the code on disk
        elif signum == signal.SIGTTIN:
            server.add_worker()
        else:
            server.remove_worker()

    previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[int(sig)] = signal.signal(sig, on_signal)
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        previous[int(sig)] = signal.signal(sig, on_control)
    httpd: Any = None
    try:
        if args.metrics_port:
            httpd = _serve_metrics(server, args.metrics_host, args.metrics_port)
            if httpd is None:
                return 2
            announce(
                f"ringbus worker: metrics at http://{args.metrics_host}:{args.metrics_port}/metrics"
            )
        try:
            server.start()
        except (ValueError, NotImplementedError) as exc:  # e.g. --queues names no queue of the bus
            print(f"ringbus worker: {exc}", file=sys.stderr)
            return 2
        announce(
            f"ringbus worker: serving bus {bus.name!r} with {args.workers} workers "
            f"(queues {','.join(server.queues or [])}, pid {os.getpid()})"
        )
        while not stop.wait(1.0):
            pass
        server.stop(timeout=args.drain_timeout)
    finally:
        if server.running:
            server.kill()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        bus.close()
    announce("ringbus worker: stopped")
    return 0


def _announcer(log_format: str) -> Callable[[str], None]:
    """Lines scripts wait for ("serving bus"): on stderr as they are, or as
    log records when the log is JSON (every line of it stays an object)."""
    if log_format == "json":
        return log.info
    return lambda text: print(text, file=sys.stderr, flush=True)


def _serve_metrics(server: Any, host: str, port: int) -> Any:
    """The /metrics endpoint of ``server``, or None (said why on stderr)."""
    try:
        from ringbus.cli.metrics import serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "prometheus_client":
            raise
        print(
            "ringbus worker: --metrics-port needs prometheus_client "
            "(pip install 'ringbus[metrics]')",
            file=sys.stderr,
        )
        return None
    try:
        return serve(server, port, host)
    except OSError as exc:
        print(f"ringbus worker: cannot serve metrics on {host}:{port}: {exc}", file=sys.stderr)
        return None


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
  ringbus worker app.tasks:bus --metrics-port 9191 --log-format json
  RINGBUS_WORKERS=8 RINGBUS_METRICS_PORT=9191 ringbus worker app.tasks:bus

every option also comes from RINGBUS_<OPTION> (shown with each); a flag wins over it

signals: TERM/INT drain (a second one kills the busy workers); HUP rolling restart
(new workers import the code again); TTIN/TTOU one worker more/fewer (up to
--max-workers); USR2 to a worker prints every thread's stack on its stderr

exit codes: 0 stopped cleanly, 1 the pool failed, 2 bad usage or the bus could not be loaded
"""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 0..65535, not {value}")
    return value


START_METHODS = ("fork", "spawn", "forkserver")

WORKER_ENV = [
    EnvOption("workers", int_at_least(1), os.cpu_count() or 1),
    EnvOption("concurrency", int_at_least(1), 1),
    EnvOption("max_workers", int_at_least(1)),
    EnvOption("max_tasks_per_child", int_at_least(1)),
    EnvOption("task_timeout", float_above(0)),
    EnvOption("drain_timeout", float_above(0)),
    EnvOption("start_method", choice(*START_METHODS), "fork"),
    EnvOption("transport", str),
    EnvOption("queues", queue_list),
    EnvOption("metrics_port", _port, 0),
    EnvOption("metrics_host", str, "127.0.0.1"),
    EnvOption("log_level", choice(*LEVELS)),
    EnvOption("log_format", choice("text", "json"), "text"),
]
"""Options of ``ringbus worker`` that also come from ``RINGBUS_<DEST>``."""


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
    w.add_argument(
        "-w",
        "--workers",
        type=int_at_least(1),
        default=None,
        help=env_help("worker processes", "workers", "the number of CPUs"),
    )
    w.add_argument(
        "-c",
        "--concurrency",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help=env_help(
            "tasks each worker runs at once: async handlers on its event loop, plain ones "
            "in a thread pool of that size",
            "concurrency",
            1,
        ),
    )
    w.add_argument(
        "-Q",
        "--queues",
        type=queue_list,
        default=None,
        metavar="Q1,Q2",
        help=env_help(
            "queues to serve, in strict order (the first non-empty one first)",
            "queues",
            "every queue of the bus's handlers",
        ),
    )
    w.add_argument(
        "--max-workers",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help=env_help("the most workers SIGTTIN may grow the pool to", "max_workers", "--workers"),
    )
    w.add_argument(
        "--max-tasks-per-child",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help=env_help("replace a worker after N tasks", "max_tasks_per_child"),
    )
    w.add_argument(
        "--task-timeout",
        type=float_above(0),
        default=None,
        metavar="SECONDS",
        help=env_help("kill a worker whose task runs longer", "task_timeout"),
    )
    w.add_argument(
        "--drain-timeout",
        type=float_above(0),
        default=None,
        metavar="SECONDS",
        help=env_help(
            "on SIGTERM/SIGINT, kill workers still busy after this long (default: wait)",
            "drain_timeout",
        ),
    )
    w.add_argument(
        "--start-method",
        type=choice(*START_METHODS),
        default=None,
        metavar="{" + ",".join(START_METHODS) + "}",
        help=env_help("how workers are started", "start_method", "fork"),
    )
    w.add_argument(
        "--transport",
        default=None,
        metavar="URL",
        help=env_help(
            "serve the bus over this transport instead of its own (redis://, rediss://, shm)",
            "transport",
        ),
    )
    w.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help=env_help(
            "serve Prometheus metrics at http://HOST:PORT/metrics (0: off; needs "
            "prometheus_client)",
            "metrics_port",
            0,
        ),
    )
    w.add_argument(
        "--metrics-host",
        default=None,
        metavar="HOST",
        help=env_help("address the metrics endpoint binds", "metrics_host", "127.0.0.1"),
    )
    w.add_argument(
        "--log-level",
        type=choice(*LEVELS),
        default=None,
        metavar="{" + ",".join(LEVELS) + "}",
        help=env_help("log level (-v: debug)", "log_level", "info"),
    )
    w.add_argument(
        "--log-format",
        type=choice("text", "json"),
        default=None,
        metavar="{text,json}",
        help=env_help("json: one JSON object per line", "log_format", "text"),
    )
    w.set_defaults(func=_cmd_worker, env_error=w.error)
    from ringbus.cli.admin import register

    register(sub)  # stats, ls, rm, gc, recover
    from ringbus.cli.dead_letters import register as register_dead

    register_dead(sub)
    from ringbus.cli.doctor import register as register_doctor

    register_doctor(sub)
    from ringbus.cli.top import register as register_top

    register_top(sub)
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
    setup_logging("debug" if verbose else "info")


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
    if args.func is _cmd_worker:
        if args.verbose and args.log_level is None:
            args.log_level = "debug"  # a flag: wins over RINGBUS_LOG_LEVEL
        apply_env(args, WORKER_ENV, args.env_error)
        setup_logging(args.log_level or "info", args.log_format)
    else:
        _setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
