"""The admin commands (stats, ls, rm, gc, recover) run as real subprocesses
against live rings, dead processes' rings and a live TaskServer pool; their
real output (mostly --json) is parsed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ringbus import Queue, TaskBus, TaskServer

SHM = Path("/dev/shm")


def admin(*args: str, check: int | None = 0, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m ringbus.cli.admin ARGS`` and return the finished process."""
    proc = subprocess.run(
        [sys.executable, "-m", "ringbus.cli.admin", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def admin_json(*args: str) -> Any:
    return json.loads(admin(*args, "--json").stdout)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique name prefix; every segment under it is removed afterwards."""
    p = f"ringbus-test-{os.getpid()}-{uuid.uuid4().hex[:10]}-"
    yield p
    for f in SHM.glob(p + "*"):
        f.unlink(missing_ok=True)


@pytest.fixture
def popen() -> Iterator[list[subprocess.Popen]]:
    """Helper processes of a test: killed and reaped afterwards, also on failure."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def helper(popen: list[subprocess.Popen], code: str, *args: str) -> subprocess.Popen:
    """Start ``python -c code ARGS``; it prints 'ready' once set up."""
    p = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    popen.append(p)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "ready", f"helper failed to start: {line!r}"
    return p


CREATE_AND_DIE = """
import os, sys
from ringbus import Queue
q = Queue.open(sys.argv[1]) if sys.argv[2] == "open" else Queue(name=sys.argv[1])
for i in range(int(sys.argv[3])):
    q.put(i)
os._exit(0)   # no close, no atexit: the name stays behind
"""


def create_dead(name: str, how: str = "owned", messages: int = 0) -> None:
    """A ring whose creator exited without unlinking it (and nobody else holds it)."""
    subprocess.run(
        [sys.executable, "-c", CREATE_AND_DIE, name, how, str(messages)], check=True, timeout=60
    )
    assert (SHM / name.lstrip("/")).exists()


HOLD = """
import sys
from ringbus import Queue
q = Queue.attach(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()   # hold the ring until the test closes our stdin or kills us
"""


# ---------------------------------------------------------------- help and usage


@pytest.mark.parametrize("cmd", ["stats", "ls", "rm", "gc", "recover"])
def test_every_command_has_help_with_examples_and_exit_codes(cmd: str) -> None:
    out = admin(cmd, "--help").stdout
    assert "examples:" in out
    assert f"ringbus {cmd}" in out
    assert "exit codes:" in out and "2  usage" in out


def test_usage_errors_exit_2() -> None:
    assert admin("stats", check=2).returncode == 2  # NAME missing
    assert "--interval" in admin("stats", "x", "--interval", "soon", check=2).stderr
    admin("frobnicate", check=2)


def test_missing_ring_exits_1() -> None:
    name = f"/ringbus-test-missing-{uuid.uuid4().hex}"
    for cmd in ("stats", "rm", "recover"):
        proc = admin(cmd, name, check=1)
        assert "no " in proc.stderr and name.lstrip("/") in proc.stderr


# ---------------------------------------------------------------- ls and stats


def test_ls_finds_a_live_ring(prefix: str) -> None:
    with Queue(16, name="/" + prefix + "live") as q:
        q.put("a")
        q.put("b")
        rows = admin_json("ls", "--prefix", prefix)
        assert [r["name"] for r in rows] == [q.name]
        (row,) = rows
        assert row["kind"] == "ring"
        assert row["depth"] == 2 and row["capacity"] == q.capacity
        assert row["creator_pid"] == os.getpid() and row["creator_alive"] is True
        assert row["live"] is True and os.getpid() in row["live_pids"]
        assert row["persistent"] is False
        assert row["size"] == (SHM / q.name.lstrip("/")).stat().st_size
        human = admin("ls", "--prefix", prefix).stdout
        assert q.name in human and "1 segment(s)" in human
    assert admin_json("ls", "--prefix", prefix) == []


def test_stats_json_numbers_match_the_traffic(prefix: str, popen: list[subprocess.Popen]) -> None:
    with Queue(64, name="/" + prefix + "s") as q:
        for i in range(7):
            q.put(i)
        for _ in range(3):
            q.get(timeout=5)
        attached = helper(popen, HOLD, q.name)  # attached, never puts or gets

        doc = admin_json("stats", q.name, "--interval", "0")
        ring = doc["ring"]
        assert (ring["puts"], ring["gets"], ring["depth"]) == (7, 3, 4)
        assert ring["capacity"] == q.capacity and ring["slot_size"] == q.slot_size
        assert ring["tail"] - ring["head"] == 4
        assert doc["creator"] == {"pid": os.getpid(), "alive": True}
        procs = {p["pid"]: p for p in doc["processes"]}
        assert procs[os.getpid()]["creator"] is True and procs[os.getpid()]["alive"] is True
        # attached but idle: not in the ring's participant table, found through its mapping
        assert procs[attached.pid]["alive"] is True and procs[attached.pid]["mapped"] is True
        assert doc["rates"] is None  # --interval 0: one snapshot, no rates
        assert doc["bus"] is None

        # --watch --json: one document per refresh; rates between two snapshots
        watch = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ringbus.cli.admin",
                "stats",
                q.name,
                "--watch",
                "--json",
                "--count",
                "2",
                "--interval",
                "1.0",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        popen.append(watch)
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())
        q.put_many(range(50))
        for _ in range(20):
            q.get(timeout=5)
        second = json.loads(watch.stdout.readline())
        assert watch.wait(timeout=30) == 0
        # Rates come from the two snapshots, whenever the puts landed relative to them.
        puts = second["ring"]["puts"] - first["ring"]["puts"]
        gets = second["ring"]["gets"] - first["ring"]["gets"]
        assert puts in (0, 50) and 0 <= gets <= 20  # 0: this test was descheduled for >1 s
        rates = second["rates"]
        assert rates["interval"] > 0
        assert rates["puts_per_s"] == pytest.approx(puts / rates["interval"], rel=1e-3)
        assert rates["gets_per_s"] == pytest.approx(gets / rates["interval"], rel=1e-3)
        final = admin_json("stats", q.name, "--interval", "0")["ring"]
        assert (final["puts"], final["gets"], final["depth"]) == (57, 23, 34)

        human = admin("stats", q.name, "--interval", "0.1").stdout
        for word in ("depth", "capacity", "put rate", "waits full", "abandoned", "creator"):
            assert word in human
        assert str(attached.pid) in human
        attached.kill()
        attached.wait()


# ---------------------------------------------------------------- a live pool


@dataclass
class Hold:
    """A task that runs until its release file exists."""

    release: str


@dataclass
class Quick:
    n: int


BUS_NAME = f"test-admin-{os.getpid()}-{uuid.uuid4().hex[:6]}"
bus = TaskBus(BUS_NAME)


@bus.handler(Hold)
def _hold(task: Hold) -> str:
    end = time.monotonic() + 60
    while not os.path.exists(task.release) and time.monotonic() < end:
        time.sleep(0.01)
    return "released"


@bus.handler(Quick)
def _quick(task: Quick) -> int:
    return task.n * 2


def test_stats_of_a_bus_shows_workers_and_counters(tmp_path: Path) -> None:
    release = tmp_path / "release"
    server = TaskServer(bus, workers=2, start_method="fork")
    try:
        server.start()
        assert [f.result(timeout=30) for f in bus.dispatch_many(Quick(i) for i in range(10))] == [
            i * 2 for i in range(10)
        ]
        held = bus.dispatch(Hold(str(release)))
        doc: dict[str, Any] = {}
        for _ in range(300):  # until a worker took the held task
            doc = admin_json("stats", BUS_NAME, "--interval", "0")
            workers = doc["bus"]["servers"][0]["workers"] if doc["bus"]["servers"] else []
            if any(w["state"] == "running" for w in workers):
                break
            time.sleep(0.05)
        assert doc["ring"]["name"] == f"/ringbus-{BUS_NAME}-tasks"
        assert doc["ring"]["persistent"] is True
        assert doc["ring"]["puts"] == 11
        (srv,) = doc["bus"]["servers"]
        assert srv["server_pid"] == os.getpid()
        workers = srv["workers"]
        assert sorted(w["worker_pid"] for w in workers) == sorted(server.pids)
        running = [w for w in workers if w["state"] == "running"]
        assert len(running) == 1
        assert running[0]["task_type"].endswith("Hold")
        assert running[0]["running_for"] >= 0
        assert [w["state"] for w in workers if w is not running[0]] == ["idle"]
        assert sum(w["tasks_done"] for w in workers) == 10
        assert doc["bus"]["totals"]["tasks_done"] == 10
        assert [r["dispatcher_pid"] for r in doc["bus"]["reply_rings"]] == [os.getpid()]
        # the task ring's name gives the same bus view
        by_ring = admin_json("stats", f"/ringbus-{BUS_NAME}-tasks", "--interval", "0")
        assert by_ring["bus"]["name"] == BUS_NAME
        human = admin("stats", BUS_NAME, "--interval", "0").stdout
        assert "running" in human and "Hold" in human and str(server.pids[0]) in human
        release.touch()
        assert held.result(timeout=30) == "released"
        # ls lists the pool state segment too, held by the live server
        rows = {r["name"]: r for r in admin_json("ls", "--prefix", f"ringbus-{BUS_NAME}-")}
        pools = [r for r in rows.values() if r["kind"] == "pool"]
        assert len(pools) == 1 and pools[0]["creator_pid"] == os.getpid() and pools[0]["live"]
        # gc never touches a live pool's segments
        plan = admin_json("gc", "--dry-run", "--prefix", f"ringbus-{BUS_NAME}-")
        assert plan and all(r["action"] == "keep" for r in plan)
    finally:
        release.touch()
        server.stop(timeout=30)
        bus.destroy()
    assert not list(SHM.glob(f"ringbus-{BUS_NAME}-*"))


# ---------------------------------------------------------------- rm


def test_rm_refuses_a_live_ring_and_removes_a_dead_one(
    prefix: str, popen: list[subprocess.Popen]
) -> None:
    name = "/" + prefix + "rm"
    create_dead(name, messages=3)
    # the creator is dead but a live process still maps the ring
    holder = helper(popen, HOLD, name)
    proc = admin("rm", name, check=1)
    assert "refusing" in proc.stderr and str(holder.pid) in proc.stderr
    assert (SHM / name.lstrip("/")).exists()
    holder.kill()
    holder.wait()
    proc = admin("rm", name)
    assert "removed" in proc.stdout and "3 queued message(s) dropped" in proc.stdout
    assert not (SHM / name.lstrip("/")).exists()
    admin("rm", name, check=1)


def test_rm_refuses_our_own_live_ring_unless_forced(prefix: str) -> None:
    with Queue(8, name="/" + prefix + "own") as q:
        assert "refusing" in admin("rm", q.name, check=1).stderr
        assert (SHM / q.name.lstrip("/")).exists()
        admin("rm", q.name, "--force")
        assert not (SHM / q.name.lstrip("/")).exists()
        q.put("still works through the open mapping")
        assert q.get(timeout=5) == "still works through the open mapping"


def test_rm_never_removes_a_foreign_file(prefix: str) -> None:
    foreign = SHM / (prefix + "foreign")
    foreign.write_bytes(b"NOTRINGBUS" + bytes(100))
    for flags in ((), ("--force",)):
        assert "not a ringbus segment" in admin("rm", foreign.name, *flags, check=1).stderr
        assert foreign.exists()
    assert admin_json("ls", "--prefix", prefix) == []


# ---------------------------------------------------------------- gc


def test_gc_removes_dead_creators_segments_and_keeps_live_ones(prefix: str) -> None:
    dead = "/" + prefix + "dead"
    dead_open_empty = "/" + prefix + "dead-open-empty"
    dead_open_full = "/" + prefix + "dead-open-full"
    create_dead(dead, "owned", 2)
    create_dead(dead_open_empty, "open", 0)
    create_dead(dead_open_full, "open", 5)
    with Queue(8, name="/" + prefix + "live") as live:
        live.put(1)
        names = {dead, dead_open_empty, dead_open_full, live.name}

        plan = {r["name"]: r for r in admin_json("gc", "--dry-run", "--prefix", prefix)}
        assert set(plan) == names
        assert plan[dead]["action"] == "would remove"
        assert plan[dead_open_empty]["action"] == "would remove"
        assert plan[dead_open_full]["action"] == "keep"
        assert "5 queued message(s)" in plan[dead_open_full]["reason"]
        assert plan[live.name]["action"] == "keep"
        assert all((SHM / n.lstrip("/")).exists() for n in names)  # dry run: nothing removed

        done = {r["name"]: r["action"] for r in admin_json("gc", "--prefix", prefix)}
        assert done == {
            dead: "removed",
            dead_open_empty: "removed",
            dead_open_full: "keep",
            live.name: "keep",
        }
        left = {"/" + p.name for p in SHM.glob(prefix + "*")}
        assert left == {dead_open_full, live.name}

        out = admin("gc", "--prefix", prefix, "--force").stdout
        assert "removed 1 of 2" in out
        assert {"/" + p.name for p in SHM.glob(prefix + "*")} == {live.name}
        live.put(2)
        assert live.get(timeout=5) == 1


# ---------------------------------------------------------------- recover


def test_recover_after_a_killed_consumer(prefix: str, popen: list[subprocess.Popen]) -> None:
    with Queue(16, name="/" + prefix + "rec") as q:
        q.put("held")
        q.put("second")
        # A consumer dies between taking a message and freeing its slot (fault point).
        died = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from ringbus import Queue; Queue.attach(sys.argv[1]).get(timeout=10)",
                q.name,
            ],
            env={**os.environ, "RINGBUS_FAULT": "get-before-release"},
            timeout=60,
        )
        assert died.returncode == 77
        # A consumer blocked in get is killed with SIGKILL.
        blocked_name = "/" + prefix + "blocked"
        with Queue(4, name=blocked_name) as empty:
            consumer = helper(
                popen,
                "import sys; from ringbus import Queue; q = Queue.attach(sys.argv[1]); "
                "print('ready', flush=True); q.get()",
                blocked_name,
            )
            for _ in range(200):  # until it registered as a participant
                procs = admin_json("stats", blocked_name, "--interval", "0")["processes"]
                if any(p["pid"] == consumer.pid and p["threads"] for p in procs):
                    break
                time.sleep(0.05)
            os.kill(consumer.pid, signal.SIGKILL)
            consumer.wait()
            procs = admin_json("stats", blocked_name, "--interval", "0")["processes"]
            assert {p["pid"]: p["alive"] for p in procs}[consumer.pid] is False
            counts = admin_json("recover", blocked_name)
            assert counts["recovered"] == 0 and counts["reclaimed"] >= 1
            procs = admin_json("stats", blocked_name, "--interval", "0")["processes"]
            assert consumer.pid not in {p["pid"] for p in procs}
            empty.put("after")
            assert empty.get(timeout=5) == "after"

        doc = admin_json("stats", q.name, "--interval", "0")
        assert doc["ring"]["depth"] == 1  # "held" is taken, never freed
        assert any(not p["alive"] for p in doc["processes"])
        counts = admin_json("recover", q.name)
        assert counts["name"] == q.name
        assert counts["recovered"] == 1 and counts["reclaimed"] >= 1 and counts["abandoned"] == 0
        assert sorted([q.get(timeout=5), q.get(timeout=5)]) == ["held", "second"]
        doc = admin_json("stats", q.name, "--interval", "0")
        assert doc["ring"]["recovered"] == 1
        assert all(p["alive"] for p in doc["processes"])
        human = admin("recover", q.name).stdout
        assert "0 message(s) of dead consumers put back (recovered)" in human
