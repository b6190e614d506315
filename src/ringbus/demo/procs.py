"""The demo's servers as child processes: each in a session of its own with a
log file, stopped in order (SIGTERM, then SIGKILL of whatever is left of its
session), and the checks that say when they are ready."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from ringbus._proc import proc_stat_fields, set_parent_death_signal

__all__ = ["Child", "DemoError", "child_env", "free_port", "wait_for", "web_ready", "workers_idle"]


class DemoError(Exception):
    """Something the demo needs did not work (the message says what)."""


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


def child_env(bus_name: str, smtp: str) -> dict[str, str]:
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


def wait_for(what: str, check: Any, timeout: float, child: Child | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        if child is not None and not child.alive():
            raise DemoError(f"{what}: {child.name} exited\n{child.log_tail()}")
        time.sleep(0.05)
    tail = f"\n{child.log_tail()}" if child is not None else ""
    raise DemoError(f"{what}: not ready after {timeout:g} s{tail}")


def workers_idle(bus_name: str, n: int) -> bool:
    """Whether the bus's pool shows ``n`` task slots, all idle (a worker with
    ``--concurrency C`` has C of them)."""
    from ringbus.server.pool_state import read_pool_states

    states = [w.state for slots in read_pool_states(bus_name).values() for w in slots]
    return len(states) == n and all(s == "idle" for s in states)


def web_ready(base_url: str, workers: int, seen: set[int]) -> bool:
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
