"""Processes as Linux shows them: liveness with pid-reuse guard, procfs
fields, who maps a segment, and the parent-death signal.  The one place
that parses ``/proc``."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

__all__ = [
    "die_with_parent",
    "mapped_pids",
    "pid_alive",
    "proc_start_unix",
    "proc_stat_fields",
    "set_parent_death_signal",
]

_PR_SET_PDEATHSIG = 1


def proc_stat_fields(pid: int) -> list[bytes] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (``fields[0]`` is
    the state, ``fields[3]`` the session id, ``fields[19]`` the start time in
    clock ticks), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return stat[stat.rfind(b")") + 2 :].split()


def _boot_time() -> float:
    with contextlib.suppress(OSError), open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


def proc_start_unix(pid: int) -> float | None:
    """Start time of ``pid`` in Unix seconds, or None if it is gone or a zombie."""
    fields = proc_stat_fields(pid)
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int, born_before: float | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if ``born_before`` (Unix
    seconds) is given, started before then (guards against pid reuse)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = proc_start_unix(pid)
    if start is None:
        return False
    return not (born_before is not None and start > born_before + 1.0)


def mapped_pids(directory: str = "/dev/shm") -> dict[str, set[int]]:
    """``/name`` -> pids of the live processes (other than this one) that map
    a file of ``directory``."""
    out: dict[str, set[int]] = {}
    me = os.getpid()
    marker = f" {directory}/"
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:  # gone, or not ours to read
            continue
        for line in text.splitlines():
            at = line.find(marker)
            if at < 0 or line.endswith(" (deleted)"):
                continue
            name = "/" + line[at + len(marker) :].strip()
            out.setdefault(name, set()).add(pid)
    return out


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Linux ``PR_SET_PDEATHSIG``: this process gets ``sig`` when the thread
    that forked it ends.  Safe between fork and exec (a ``preexec_fn``).
    Returns False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(owner_pid: int, sig: int = signal.SIGTERM) -> None:
    """Get ``sig`` when the parent dies, and at once if ``owner_pid`` (the
    process that asked for this one) is already gone.

    The parent is not always the owner: a fork server (``forkserver``, the
    default start method from Python 3.14) forks on the owner's behalf.
    That server exits when its owner does, so its death signal still comes.
    """
    if set_parent_death_signal(sig) and owner_pid and os.getppid() != owner_pid:
        if not pid_alive(owner_pid):  # it died before prctl took effect
            os.kill(os.getpid(), sig)
