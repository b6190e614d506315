"""Who a task-stream consumer is, and whether it is provably dead.

A consumer is named ``<host>:<pid>:<boot>.<pidns>.<start>``: the host name,
the pid, this boot's id (``/proc/sys/kernel/random/boot_id``), the inode of
the pid namespace (``/proc/self/ns/pid``) and the process's start time in
clock ticks.  Host name and pid alone are not unique: pods with the host's
network, cloned VMs and containers share host names while their pids live in
different namespaces.  A worker takes the entries of another consumer over
at once only when the name proves that consumer ran on this boot, in this
pid namespace, and is gone (no such pid, or a pid started at another time);
every other consumer keeps its entries until ``visibility_timeout``.
Without ``/proc`` the name ends in a random token and proves nothing.
"""

from __future__ import annotations

import os
import secrets

from ringbus._proc import proc_stat_fields

__all__ = ["Identity"]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    fields = proc_stat_fields(pid)
    if not fields or len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return ""
    return fields[19].decode()


class Identity:
    """This process as a consumer (made anew after fork: the pid changes)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.pid = os.getpid()
        boot = _read("/proc/sys/kernel/random/boot_id").replace("-", "")
        try:
            ns = str(os.stat("/proc/self/ns/pid").st_ino)
        except OSError:
            ns = ""
        start = _start_ticks(self.pid)
        self.local = f"{boot}.{ns}" if boot and ns and start else ""
        token = f"{self.local}.{start}" if self.local else f"r{secrets.token_hex(8)}"
        self.name = f"{host}:{self.pid}:{token}"

    def dead_here(self, name: str) -> int:
        """The pid of consumer ``name`` if it provably ran in this pid
        namespace of this boot of this host and is gone, else 0."""
        if not self.local or name == self.name:
            return 0
        host, _, rest = name.partition(":")
        pid_text, _, token = rest.partition(":")
        local, _, start = token.rpartition(".")
        if host != self.host or local != self.local or not pid_text.isdigit() or not start:
            return 0
        pid = int(pid_text)
        if pid <= 0 or _start_ticks(pid) == start:
            return 0  # that very process still runs
        return pid
