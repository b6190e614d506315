"""``ringbus doctor``: this machine checked for the deployment traps.

Shared-memory rings need a roomy, writable ``/dev/shm`` that every process
of the deployment sees, kept alive as long as the pool runs.  The traps,
each checked here with what to change:

- ``/dev/shm`` missing, not tmpfs, read-only, or small (Docker gives a
  container 64 MiB unless ``--shm-size``), or with less free room than a
  pool reserves (its pool-state segment reserves every page up front);
- another pid namespace than PID 1 (processes outside it see other pids),
  or another ``/dev/shm`` than PID 1's (a tmpfs mounted over it in one
  container or unit);
- systemd-logind's ``RemoveIPC=yes`` (the default), which deletes a
  non-system user's ``/dev/shm`` files when that user's last session ends;
- segments left behind by dead processes (``ringbus gc``).

Exit 0 when nothing needs changing, 1 when something does.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import stat
from dataclasses import asdict, dataclass

from ringbus import _names
from ringbus.cli.argtypes import int_at_least

__all__ = ["Finding", "cmd_doctor", "register", "run_checks"]

MiB = 1 << 20
MIN_SHM = 256 * MiB
# What one server reserves today (see ringbus.server.pool_state and the shm
# transport's defaults): the task ring, then a header page and, per worker,
# a slot head, a journal for the largest task (1 MiB) and the task-time
# histograms (server/histograms.py), in whole pages.
TASK_RING = 2_236_416
POOL_HEADER, SLOT = 4096, 2 * 4096 + MiB
DEAD_LETTERS = 64 * MiB  # the record store's cap (record_max_bytes)

OK, NOTE, WARN, FAIL = "ok", "note", "warn", "FAIL"


@dataclass
class Finding:
    level: str  # ok, note, warn, FAIL
    check: str
    text: str
    fix: str = ""

    @property
    def problem(self) -> bool:
        return self.level in (WARN, FAIL)


def fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def pool_reserve(workers: int) -> int:
    """Bytes a pool of ``workers`` puts in /dev/shm before its first task."""
    return TASK_RING + POOL_HEADER + workers * SLOT


# ---------------------------------------------------------------- /dev/shm


def _mount_of(path: str) -> tuple[str, str] | None:
    """(fs type, options) of the mount at ``path`` (the last one: mounts stack)."""
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 6 and fields[4] == path:
                    rfields = right.split()
                    found = (rfields[0], fields[5] + "," + (rfields[2] if len(rfields) > 2 else ""))
    except OSError:
        return None
    return found


def check_shm(shm: str, workers: int) -> list[Finding]:
    out: list[Finding] = []
    shm_fix = "give it room: docker run --shm-size=1g, compose shm_size: 1gb, a pod's "
    shm_fix += "emptyDir {medium: Memory, sizeLimit: 1Gi} at /dev/shm (docs/deploy.md)"
    try:
        st = os.stat(shm)
    except OSError as exc:
        return [Finding(FAIL, "shm", f"{shm} is missing ({exc.strerror})", shm_fix)]
    if not stat.S_ISDIR(st.st_mode):
        return [Finding(FAIL, "shm", f"{shm} is not a directory", shm_fix)]
    mount = _mount_of(shm)
    if mount is None:
        out.append(
            Finding(
                WARN,
                "shm",
                f"{shm} is not a mount point: segments go to the disk under it",
                "mount a tmpfs there: mount -t tmpfs -o size=1g,mode=1777 tmpfs /dev/shm",
            )
        )
    elif mount[0] != "tmpfs":
        out.append(
            Finding(WARN, "shm", f"{shm} is {mount[0]}, not tmpfs", "mount a tmpfs at /dev/shm")
        )
    elif "ro" in mount[1].split(","):
        out.append(Finding(FAIL, "shm", f"{shm} is mounted read-only", "mount it read-write"))
    if not os.access(shm, os.W_OK | os.X_OK):
        out.append(
            Finding(
                FAIL,
                "shm",
                f"uid {os.geteuid()} cannot create files in {shm} (mode "
                f"{stat.S_IMODE(st.st_mode):04o})",
                "chmod 1777 /dev/shm",
            )
        )
    vfs = os.statvfs(shm)
    size, free = vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
    need = pool_reserve(workers)
    text = f"{shm} is {fmt_size(size)} with {fmt_size(free)} free"
    if size < MIN_SHM:
        out.append(Finding(WARN, "shm-size", f"{text}: under {fmt_size(MIN_SHM)}", shm_fix))
    elif free < need + DEAD_LETTERS:
        out.append(
            Finding(
                WARN,
                "shm-size",
                f"{text}: a pool of {workers} workers reserves {fmt_size(need)} and dead "
                f"letters may take {fmt_size(DEAD_LETTERS)}",
                shm_fix + "; or remove what `ringbus ls` shows is stale",
            )
        )
    else:
        kind = mount[0] if mount else "not a mount"
        text += f" ({kind}); a pool of {workers} workers reserves {fmt_size(need)}"
        out.append(Finding(OK, "shm-size", text))
    return out


# ---------------------------------------------------------------- namespaces


def _ns(pid: str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def check_namespaces(shm: str) -> list[Finding]:
    out: list[Finding] = []
    advice = {
        "ipc": "another IPC namespace alone does not hide /dev/shm (a mount), but Docker "
        "gives each IPC namespace its own /dev/shm: share it (--ipc=shareable and "
        "--ipc=container:NAME)",
        "pid": "ringbus judges liveness by pid: processes in other pid namespaces look dead or "
        "alive by mistake; share the pid namespace (docker --pid=container:NAME, "
        "shareProcessNamespace: true) or see docs/deploy.md",
        "mnt": "another mount namespace (systemd PrivateTmp=/PrivateDevices=, a container) "
        "keeps the host's /dev/shm unless something mounts over it",
    }
    # Another pid namespace misleads liveness checks: a problem.  Other IPC or
    # mount namespaces matter only if /dev/shm differs, judged below when
    # PID 1's root can be read.
    unreadable = []
    for kind in ("ipc", "pid", "mnt"):
        mine, init = _ns("self", kind), _ns("1", kind)
        if mine is None or init is None:
            unreadable.append(kind)
        elif mine != init:
            level = WARN if kind == "pid" else NOTE
            text = f"another {kind} namespace than PID 1"
            if level == WARN:
                out.append(Finding(level, "namespace", text, advice[kind]))
            else:
                out.append(Finding(level, "namespace", f"{text}: {advice[kind]}"))
    if unreadable:
        out.append(
            Finding(
                NOTE,
                "namespace",
                f"cannot compare the {'/'.join(unreadable)} namespace(s) with PID 1's "
                "(/proc/1/ns not readable: not root, or no CAP_SYS_PTRACE)",
            )
        )
    try:
        mine_dev, init_dev = os.stat(shm).st_dev, os.stat(f"/proc/1/root{shm}").st_dev
    except OSError:
        pass
    else:
        if mine_dev != init_dev:
            out.append(
                Finding(
                    WARN,
                    "namespace",
                    f"this process sees another {shm} than PID 1 (a private mount over it)",
                    "give every process of the deployment the same /dev/shm: no tmpfs mounted "
                    "over it in one unit or container only (docs/deploy.md)",
                )
            )
    container = [p for p in ("/.dockerenv", "/run/.containerenv") if os.path.exists(p)]
    if container:
        out.append(
            Finding(
                NOTE,
                "namespace",
                f"in a container ({container[0]}): web and worker containers must share "
                f"IPC and {shm}, and run as the same uid (docs/deploy.md)",
            )
        )
    if not out:
        out.append(Finding(OK, "namespace", "same IPC, PID and mount namespaces as PID 1"))
    return out


# ---------------------------------------------------------------- users


def _sys_uid_max() -> int:
    try:
        with open("/etc/login.defs", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "SYS_UID_MAX" and parts[1].isdigit():
                    return int(parts[1])
    except OSError:
        pass
    return 999


def remove_ipc_setting(root: str = "/") -> tuple[bool, str]:
    """(RemoveIPC in force, where it was set) from logind.conf and its drop-ins."""
    base = os.path.join(root, "etc/systemd/logind.conf")
    dropins: dict[str, str] = {}
    for d in (
        "usr/lib/systemd/logind.conf.d",
        "run/systemd/logind.conf.d",
        "etc/systemd/logind.conf.d",
    ):
        for path in glob.glob(os.path.join(root, d, "*.conf")):
            dropins[os.path.basename(path)] = path  # /etc overrides /run overrides /usr
    value, where = True, "by default"
    for path in [base, *(dropins[k] for k in sorted(dropins))]:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except OSError:
            continue
        for line in lines:
            key, sep, val = line.strip().partition("=")
            if sep and key.strip() == "RemoveIPC":
                value = val.strip().lower() in ("yes", "true", "1", "on")
                where = f"{path} (RemoveIPC={val.strip()})"
    return value, where


def check_user(uid: int) -> list[Finding]:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    out = [
        Finding(
            NOTE,
            "user",
            f"uid {uid} ({name}): segments are created 0600; web and worker processes "
            "must run as this same uid",
        )
    ]
    logind = any(os.path.exists(f"{d}/systemd/systemd-logind") for d in ("/lib", "/usr/lib"))
    if not logind:
        out.append(Finding(OK, "RemoveIPC", "systemd-logind is not installed"))
        return out
    on, where = remove_ipc_setting()
    system_user = uid <= _sys_uid_max()
    if on and not system_user:
        out.append(
            Finding(
                WARN,
                "RemoveIPC",
                f"RemoveIPC is on ({where}): logind deletes uid {uid}'s /dev/shm segments "
                "when its last login session ends",
                "set RemoveIPC=no in /etc/systemd/logind.conf.d/ringbus.conf and restart "
                "systemd-logind, or run workers as a system user (useradd --system)",
            )
        )
    elif on:
        out.append(
            Finding(
                OK,
                "RemoveIPC",
                f"RemoveIPC is on ({where}) but spares uid {uid} (a system user, "
                f"uid <= {_sys_uid_max()})",
            )
        )
    else:
        out.append(Finding(OK, "RemoveIPC", f"RemoveIPC is off ({where})"))
    return out


# ---------------------------------------------------------------- leftovers


def check_leftovers(prefix: str = "") -> list[Finding]:
    from ringbus.cli.admin import gc_plan

    removable, kept_full = [], []
    for seg, remove, reason in gc_plan(prefix):
        if remove:
            removable.append(seg)
        elif not seg.live and "queued message" in reason:
            kept_full.append(seg)
    out: list[Finding] = []
    if removable:
        names = ", ".join(s.name for s in removable[:5]) + (" ..." if len(removable) > 5 else "")
        size = sum(s.size for s in removable)
        out.append(
            Finding(
                WARN,
                "leftovers",
                f"{len(removable)} segment(s) of dead processes take {fmt_size(size)}: {names}",
                "ringbus gc --dry-run, then ringbus gc",
            )
        )
    if kept_full:
        out.append(
            Finding(
                NOTE,
                "leftovers",
                f"{len(kept_full)} persistent ring(s) of stopped buses still hold tasks "
                "(the next server of the bus takes them; ringbus gc --force drops them)",
            )
        )
    if not out:
        out.append(Finding(OK, "leftovers", "no segments of dead processes"))
    return out


# ---------------------------------------------------------------- command


def run_checks(workers: int, uid: int, prefix: str = "") -> list[Finding]:
    shm = _names.SHM_DIR
    findings = check_shm(shm, workers)
    findings += check_namespaces(shm)
    findings += check_user(uid)
    if not any(f.level == FAIL and f.check == "shm" for f in findings):
        findings += check_leftovers(prefix)
    return findings


def _uid(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user: {text!r}") from None


def cmd_doctor(args: argparse.Namespace) -> int:
    findings = run_checks(args.workers, args.user, args.prefix)
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for f in findings:
            print(f"{f.level:>4}  {f.check}: {f.text}")
            if f.fix and f.problem:
                print(f"      fix: {f.fix}")
        n = sum(f.problem for f in findings)
        print(f"{n} problem(s) found" if n else "no problems found")
    return 1 if any(f.problem for f in findings) else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check this machine for the deployment traps of shared memory",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ringbus doctor\n  ringbus doctor --workers 16 --user app\n"
        "  ringbus doctor --json\n\nexit codes: 0 no problems, 1 problems found, 2 usage",
    )
    p.add_argument(
        "--workers",
        type=int_at_least(1),
        default=os.cpu_count() or 1,
        metavar="N",
        help="size the /dev/shm check for a pool of N workers (default: the CPUs)",
    )
    p.add_argument(
        "--user",
        type=_uid,
        default=os.geteuid(),
        metavar="USER",
        help="the user the workers run as, for the RemoveIPC check (default: this one)",
    )
    p.add_argument(
        "--prefix",
        default="",
        help="look for leftover segments only among names that start with this",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
