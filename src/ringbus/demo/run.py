"""``ringbus demo``: a web application whose requests must not wait for slow
work, run for real on this machine and measured.

It starts a real SMTP server (aiosmtpd, counting what it receives, with a
per-message delay like a real mail server), a pool of task workers
(``ringbus worker ringbus.demo.app:bus``) and uvicorn serving the Starlette
app of ``ringbus.demo.app`` with several worker processes.  Then it sends N
signups that deliver their welcome mail inside the request handler, N that
hand it to the task workers with ``bus.send``, and a few report requests that
await a task's result; it prints latency p50/p99 and throughput for each, how
many mails arrived, and draws a PNG plot.

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
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from ringbus._proc import proc_stat_fields, set_parent_death_signal

__all__ = ["main"]

SHM_DIR = Path("/dev/shm")
DEMO_PACKAGES = ("starlette", "uvicorn", "aiosmtpd", "matplotlib")


class DemoError(Exception):
    """Something the demo needs did not work (the message says what)."""


# ---------------------------------------------------------------- child processes


def _die_with_parent() -> None:  # pragma: no cover - runs between fork and exec
    """preexec_fn: the child gets SIGTERM if the demo itself is killed."""
    set_parent_death_signal(signal.SIGTERM)


def session_pids(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (a child started with its own session)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat_fields(int(entry))
        if fields and len(fields) > 3 and int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
            out.append(int(entry))
    return out


class Child:
    """A command in a session of its own (Ctrl-C at the terminal reaches only the
    demo, which then stops its children in order); its output goes to a log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float) -> bool:
        """SIGTERM and wait ``timeout``; then SIGKILL the whole session.
        Returns True if it stopped by itself."""
        clean = True
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                clean = False
        # Its own children (uvicorn's workers, multiprocessing's resource
        # tracker) may take a moment more to exit; then whatever is left goes.
        grace = time.monotonic() + (5.0 if clean else 0.0)
        while session_pids(self.proc.pid) and time.monotonic() < grace:
            time.sleep(0.05)
        for _ in range(50):
            pids = session_pids(self.proc.pid)
            if not pids:
                break
            clean = False
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()
        return clean


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env(bus_name: str, smtp: str) -> dict[str, str]:
    import ringbus

    src = str(Path(ringbus.__file__).resolve().parent.parent)  # the same ringbus in children
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "RINGBUS_DEMO_BUS": bus_name,
        "RINGBUS_DEMO_SMTP": smtp,
        "PYTHONPATH": f"{src}{os.pathsep}{path}" if path else src,
        "PYTHONUNBUFFERED": "1",
    }


def _wait_for(what: str, check: Any, timeout: float, child: Child | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        if child is not None and not child.alive():
            raise DemoError(f"{what}: {child.name} exited\n{child.log_tail()}")
        time.sleep(0.05)
    tail = f"\n{child.log_tail()}" if child is not None else ""
    raise DemoError(f"{what}: not ready after {timeout:g} s{tail}")


def _workers_idle(bus_name: str, n: int) -> bool:
    from ringbus.server.pool_state import read_pool_states

    states = [w.state for slots in read_pool_states(bus_name).values() for w in slots]
    return len(states) == n and all(s == "idle" for s in states)


def _web_ready(base_url: str, workers: int, seen: set[int]) -> bool:
    import urllib.error
    import urllib.request

    try:
        # A new connection each time, so the answers come from different workers.
        with urllib.request.urlopen(base_url + "/health", timeout=2) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError):
        return False
    if text.startswith("ok "):
        seen.add(int(text.split()[1]))
    return len(seen) >= workers


# ---------------------------------------------------------------- the measurement


async def _measure(base_url: str, args: argparse.Namespace, sink: Any, out: dict[str, Any]) -> None:
    from ringbus.demo.loadgen import run_load

    n, c = args.requests, args.concurrency

    def signup(kind: str, path: str) -> Any:
        return lambda i: ("POST", path, {"email": f"{kind}-{i}@example.com", "name": f"user{i}"})

    # Warm-up: every web worker opens the task ring and its reply ring, every
    # connection pool fills; none of that is what we compare.
    warm = max(2 * c, 4 * args.workers)
    await run_load(base_url, "warmup", warm, c, signup("warmup", "/signup"))
    await run_load(base_url, "warmup", warm, c, signup("warmup", "/signup-inline"))
    await run_load(base_url, "warmup", warm, c, lambda i: ("GET", f"/report/{10_000 + i}", None))
    end = time.monotonic() + args.mail_timeout
    while sink.counts()["warmup"] < 2 * warm and time.monotonic() < end:
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
    out["ringbus"] = {
        **offload.summary(),
        "mails": delivered,
        "all_mails_after_s": round(time.monotonic() - t0, 3) if delivered >= n else None,
    }
    out["_lat"]["ringbus"] = offload.latencies

    if args.reports:
        rep = await run_load(
            base_url, "report", args.reports, c, lambda i: ("GET", f"/report/{i}", None)
        )
        out["report"] = rep.summary()
        out["_lat"]["report"] = rep.latencies


def _table(res: dict[str, Any], n: int) -> Any:
    from rich.table import Table

    t = Table(title="ringbus demo: the welcome mail of POST /signup, inline vs. on the bus")
    for col, just in (
        ("mode", "left"),
        ("requests", "right"),
        ("errors", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("req/s", "right"),
        ("mails arrived", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]

    def row(label: str, r: dict[str, Any], mails: str) -> None:
        t.add_row(
            label,
            str(r["requests"]),
            str(r["errors"]),
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['throughput_rps']:,.0f}",
            mails,
        )

    row("inline: SMTP in the handler", res["inline"], f"{res['inline']['mails']}/{n}")
    rb = res["ringbus"]
    after = f" in {rb['all_mails_after_s']:.1f} s" if rb["all_mails_after_s"] else ""
    row("ringbus: bus.send", rb, f"{rb['mails']}/{n}{after}")
    if "report" in res:
        row("report: await dispatch_async", res["report"], "-")
    return t


def _plot(res: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat: dict[str, list[float]] = res["_lat"]
    labels = {
        "inline": "inline (SMTP in the request)",
        "ringbus": "ringbus (bus.send)",
        "report": "report (await dispatch_async)",
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for key, values in lat.items():
        if not values:
            continue
        ms = sorted(v * 1000 for v in values)
        frac = [(i + 1) / len(ms) for i in range(len(ms))]
        left.step(ms, frac, where="post", label=labels[key])
    left.set_xscale("log")
    left.set_xlabel("request latency (ms, log scale)")
    left.set_ylabel("fraction of requests")
    left.set_title("latency distribution")
    left.grid(True, which="both", alpha=0.3)
    left.legend(loc="lower right")

    modes = [k for k in ("inline", "ringbus", "report") if k in res]
    x = range(len(modes))
    p50 = [res[m]["p50_ms"] for m in modes]
    p99 = [res[m]["p99_ms"] for m in modes]
    right.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    right.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    for i, m in enumerate(modes):
        right.annotate(
            f"{res[m]['throughput_rps']:,.0f} req/s",
            (i, max(p50[i], p99[i])),
            ha="center",
            va="bottom",
        )
    right.set_xticks(list(x), [labels[m].split(" (")[0] for m in modes])
    right.set_ylabel("ms")
    right.set_title("p50 / p99 latency and throughput")
    right.legend()
    fig.suptitle(
        f"ringbus demo: {args.requests} requests, concurrency {args.concurrency}, "
        f"{args.workers} web workers, {args.task_workers} task workers, "
        f"SMTP delay {args.smtp_delay * 1000:.0f} ms"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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

    from ringbus.demo.mailer import MailSink

    con = Console(stderr=True)
    bus_name = f"demo-{os.getpid()}-{secrets.token_hex(3)}"
    res: dict[str, Any] = {
        "config": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "web_workers": args.workers,
            "task_workers": args.task_workers,
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
            env = _child_env(bus_name, smtp)
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
            _wait_for(
                "task workers",
                lambda: _workers_idle(bus_name, args.task_workers),
                args.start_timeout,
                worker,
            )
            con.print(
                f"[dim]{args.task_workers} task workers serving bus {bus_name!r} "
                f"(ringbus worker pid {worker.pid})[/]"
            )
            seen: set[int] = set()
            _wait_for(
                "uvicorn",
                lambda: _web_ready(base_url, args.workers, seen),
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
    for name in ("requests", "concurrency", "workers", "task_workers"):
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
    con.print(_table(res, n))
    inline, rb = res["inline"], res["ringbus"]
    ratio = inline["p50_ms"] / rb["p50_ms"] if rb["p50_ms"] > 0 else float("inf")
    con.print(
        f"p50 request latency: {rb['p50_ms']:.2f} ms with ringbus vs {inline['p50_ms']:.2f} ms "
        f"inline ({ratio:.1f}x lower); mails arrived: {inline['mails'] + rb['mails']}/{2 * n}"
    )
    if args.plot:
        try:
            _plot(res, Path(args.plot), args)
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
