"""``ringbus demo``: a web application whose requests must not wait for slow
work, run for real on this machine and measured.

It starts a real SMTP server (aiosmtpd, counting what it receives, with a
per-message delay like a real mail server), a pool of task workers
(``ringbus worker ringbus.demo.app:bus --concurrency 64``: each runs dozens
of ``async def`` mail handlers at once) and uvicorn serving the Starlette
app of ``ringbus.demo.app`` with several worker processes.  Then it sends N
signups that deliver their welcome mail inside the request handler, N that
hand it to the task workers with ``bus.send``, and a few report requests that
await a task's result; it prints latency p50/p99 and throughput for each, how
many mails arrived and when the last one did (mails/s), and draws a PNG plot.

Everything it started is torn down at the end, also on Ctrl-C or an error:
no process and no shared-memory segment is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ringbus.demo.procs import (
    Child,
    DemoError,
    child_env,
    free_port,
    wait_for,
    web_ready,
    workers_idle,
)
from ringbus.demo.report import plot, table

__all__ = ["main"]

SHM_DIR = Path("/dev/shm")
DEMO_PACKAGES = ("starlette", "uvicorn", "aiosmtpd", "aiosmtplib", "matplotlib")


# ---------------------------------------------------------------- the measurement


async def _measure(base_url: str, args: argparse.Namespace, sink: Any, out: dict[str, Any]) -> None:
    from ringbus.demo.loadgen import run_load

    n, c = args.requests, args.concurrency

    def signup(kind: str, path: str) -> Any:
        return lambda i: ("POST", path, {"email": f"{kind}-{i}@example.com", "name": f"user{i}"})

    # Warm-up: every web worker opens the task ring and its reply ring, every
    # connection pool fills (the task workers' SMTP connections too: one per
    # mail a worker sends at once); none of that is what we compare.
    warm = max(2 * c, 4 * args.workers)
    queued = max(warm, args.task_workers * args.task_concurrency)
    await run_load(base_url, "warmup", queued, c, signup("warmup", "/signup"))
    await run_load(base_url, "warmup", warm, c, signup("warmup", "/signup-inline"))
    await run_load(base_url, "warmup", warm, c, lambda i: ("GET", f"/report/{10_000 + i}", None))
    end = time.monotonic() + args.mail_timeout
    while sink.counts()["warmup"] < queued + warm and time.monotonic() < end:
        await asyncio.sleep(0.01)

    inline = await run_load(base_url, "inline", n, c, signup("inline", "/signup-inline"))
    out["inline"] = {**inline.summary(), "mails": sink.counts()["inline"]}
    out["_lat"] = {"inline": inline.latencies}

    t0 = time.monotonic()
    offload = await run_load(base_url, "ringbus", n, c, signup("ringbus", "/signup"))
    requests_done = time.monotonic() - t0
    end = t0 + requests_done + args.mail_timeout
    while sink.counts()["ringbus"] < n and time.monotonic() < end:
        await asyncio.sleep(0.005)
    delivered = sink.counts()["ringbus"]
    last = time.monotonic() - t0 if delivered >= n else None
    out["ringbus"] = {
        **offload.summary(),
        "mails": delivered,
        # from the first request of the mode to the arrival of its last mail
        "all_mails_after_s": round(last, 3) if last is not None else None,
        "mails_per_s": round(n / last, 1) if last else None,
    }
    out["_lat"]["ringbus"] = offload.latencies

    if args.reports:
        rep = await run_load(
            base_url, "report", args.reports, c, lambda i: ("GET", f"/report/{i}", None)
        )
        out["report"] = rep.summary()
        out["_lat"]["report"] = rep.latencies


# ---------------------------------------------------------------- orchestration


def _missing_packages() -> list[str]:
    import importlib.util

    return [p for p in DEMO_PACKAGES if importlib.util.find_spec(p) is None]


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM tears the demo down the same way Ctrl-C does."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _remove_bus_segments(bus_name: str) -> list[str]:
    """Unlink the bus's task ring and task table (persistent: they outlive
    their processes by design) and return any other segment of the bus that
    was left behind."""
    leftovers = []
    keep = {f"ringbus-{bus_name}-tasks", f"ringbus-{bus_name}-tasktable"}
    for f in sorted(SHM_DIR.glob(f"ringbus-{bus_name}-*")):
        if f.name not in keep:
            leftovers.append(f.name)
        f.unlink(missing_ok=True)
    return leftovers


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, measure, tear everything down; return the results."""
    from rich.console import Console

    from ringbus.demo.sink import MailSink

    con = Console(stderr=True)
    bus_name = f"demo-{os.getpid()}-{secrets.token_hex(3)}"
    res: dict[str, Any] = {
        "config": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "web_workers": args.workers,
            "task_workers": args.task_workers,
            "task_concurrency": args.task_concurrency,
            "smtp_delay_s": args.smtp_delay,
            "reports": args.reports,
            "bus": bus_name,
        }
    }
    children: list[Child] = []
    sink: MailSink | None = None
    teardown_notes: list[str] = []
    with contextlib.ExitStack() as stack:
        if args.logs:
            logdir = args.logs
            Path(logdir).mkdir(parents=True, exist_ok=True)
        else:
            logdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ringbus-demo-"))
        try:
            sink = MailSink(args.smtp_delay).start()
            smtp = f"{sink.host}:{sink.port}"
            res["processes"] = {"smtp-sink": sink.pid}
            con.print(f"[dim]SMTP sink on {smtp} (pid {sink.pid}), delay {args.smtp_delay}s[/]")
            env = child_env(bus_name, smtp)
            worker = Child(
                "task-workers",
                [
                    sys.executable,
                    "-m",
                    "ringbus.cli",
                    "worker",
                    "ringbus.demo.app:bus",
                    "--workers",
                    str(args.task_workers),
                    "--concurrency",
                    str(args.task_concurrency),
                ],
                env,
                Path(logdir),
            )
            children.append(worker)
            res["processes"]["task-workers"] = worker.pid
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            web = Child(
                "uvicorn",
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "ringbus.demo.app:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    str(args.workers),
                    "--http",
                    "ringbus.demo.app:NoDelayHTTP",
                    "--log-level",
                    "warning",
                    "--no-access-log",
                    "--timeout-graceful-shutdown",
                    "5",
                ],
                env,
                Path(logdir),
            )
            children.insert(0, web)  # stopped first: no new tasks while workers drain
            res["processes"]["uvicorn"] = web.pid
            wait_for(
                "task workers",
                lambda: workers_idle(bus_name, args.task_workers * args.task_concurrency),
                args.start_timeout,
                worker,
            )
            con.print(
                f"[dim]{args.task_workers} task workers x {args.task_concurrency} tasks at once "
                f"serving bus {bus_name!r} "
                f"(ringbus worker pid {worker.pid})[/]"
            )
            seen: set[int] = set()
            wait_for(
                "uvicorn",
                lambda: web_ready(base_url, args.workers, seen),
                args.start_timeout,
                web,
            )
            con.print(
                f"[dim]uvicorn on {base_url} with {args.workers} workers "
                f"(pids {', '.join(map(str, sorted(seen)))})[/]"
            )
            con.print(
                f"[bold]sending {args.requests} signups inline, then {args.requests} "
                f"through ringbus, concurrency {args.concurrency}...[/]"
            )
            asyncio.run(_measure(base_url, args, sink, res))
        finally:
            for child in children:
                if not child.stop(timeout=15):
                    teardown_notes.append(f"{child.name} had to be killed")
            if sink is not None:
                sink.stop()
            leftovers = _remove_bus_segments(bus_name)
            if leftovers:
                teardown_notes.append(f"removed leftover segments {leftovers}")
            res["teardown"] = teardown_notes
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ringbus demo",
        description="Run a Starlette app under uvicorn whose signups send a welcome mail "
        "over SMTP, first inside the request, then through ringbus task workers; print "
        "latency and throughput of both and draw a plot.  Everything runs on loopback "
        "and is torn down at the end.",
        epilog="examples:\n  ringbus demo\n  ringbus demo --requests 2000 --concurrency 32 "
        "--smtp-delay 0.05 --plot /tmp/demo.png\n  python -m ringbus.demo --requests 50\n\n"
        "exit codes:\n  0  every request answered and every mail arrived\n"
        "  1  a request failed, a mail is missing or something did not start\n"
        "  2  usage error\n  130 interrupted (Ctrl-C or SIGTERM); everything was torn down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-n", "--requests", type=int, default=400, help="signups per mode (400)")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="concurrent clients (16)")
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (2)")
    p.add_argument("--task-workers", type=int, default=4, help="ringbus task workers (4)")
    p.add_argument(
        "--task-concurrency",
        type=int,
        default=64,
        metavar="C",
        help="mails each task worker sends at once, on its event loop (64)",
    )
    p.add_argument(
        "--smtp-delay",
        type=float,
        default=0.05,
        metavar="S",
        help="seconds the SMTP server takes per message, as a real one does (0.05)",
    )
    p.add_argument("--reports", type=int, default=50, help="GET /report requests (50; 0: none)")
    p.add_argument(
        "--plot",
        default="ringbus-demo.png",
        metavar="PATH",
        help="PNG plot path (default ./ringbus-demo.png; '' for none)",
    )
    p.add_argument("--json-out", default=None, metavar="PATH", help="also write results as JSON")
    p.add_argument("--logs", default=None, metavar="DIR", help="keep the servers' logs in DIR")
    p.add_argument(
        "--mail-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to wait for the last mail (60)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to wait for the servers to start (60)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "workers", "task_workers", "task_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.reports < 0 or args.smtp_delay < 0:
        parser.error("--reports and --smtp-delay must be >= 0")
    missing = _missing_packages()
    if missing:
        print(
            f"ringbus demo needs {', '.join(missing)}: pip install 'ringbus[demo]'",
            file=sys.stderr,
        )
        return 1
    from rich.console import Console

    con = Console() if sys.stdout.isatty() else Console(width=120)  # piped: no wrapping
    err = Console(stderr=True)
    try:
        with _terminate_as_interrupt():
            res = run_demo(args)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: everything the demo started was torn down[/]")
        return 130
    except DemoError as exc:
        err.print(f"[red]ringbus demo: {exc}[/]")
        return 1
    n = args.requests
    con.print(table(res, n))
    inline, rb = res["inline"], res["ringbus"]
    ratio = inline["p50_ms"] / rb["p50_ms"] if rb["p50_ms"] > 0 else float("inf")
    con.print(
        f"p50 request latency: {rb['p50_ms']:.2f} ms with ringbus vs {inline['p50_ms']:.2f} ms "
        f"inline ({ratio:.1f}x lower); mails arrived: {inline['mails'] + rb['mails']}/{2 * n}"
    )
    if rb["mails_per_s"]:
        con.print(
            f"the last of the {n} ringbus mails arrived {rb['all_mails_after_s']:.3f} s after "
            f"the first request: {rb['mails_per_s']:,.0f} mails/s ({args.task_workers} task "
            f"workers x {args.task_concurrency} at once, "
            f"SMTP delay {args.smtp_delay * 1000:.0f} ms)"
        )
    if args.plot:
        try:
            plot(res, Path(args.plot), args)
            con.print(f"plot written to {args.plot}")
        except Exception as exc:  # a plot is a bonus: say why it is missing
            err.print(f"[yellow]no plot: {type(exc).__name__}: {exc}[/]")
    for note in res.get("teardown", []):
        err.print(f"[yellow]teardown: {note}[/]")
    if args.json_out:
        public = {k: v for k, v in res.items() if not k.startswith("_")}
        Path(args.json_out).write_text(json.dumps(public, indent=2))
    errors = inline["errors"] + rb["errors"] + res.get("report", {}).get("errors", 0)
    ok = errors == 0 and inline["mails"] == n and rb["mails"] == n
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
