"""At-least-once delivery: retries with backoff, redelivery after a real
SIGKILL, poison tasks, malformed envelopes and dead letters that outlive the
server (also through the ``ringbus dead-letters`` command)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from _tasks_retry import Broken, DieOnce, Flaky, Hang, Poison, Square, make_bus
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401
from ringbus import Queue, RetryPolicy, TaskBus, TaskServer, TaskTimeout, Unrecoverable, WorkerLost
from ringbus.tasks.handlers import DEFAULT_REDELIVERIES
from ringbus.transport.record_file import RecordFile

TESTS = Path(__file__).parent


@pytest.fixture
def rbus(bus_name: str) -> Iterator[TaskBus]:
    b = make_bus(bus_name)
    try:
        yield b
    finally:
        b.destroy()


def _runs(log: Path) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def _dead_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringbus.cli", "dead-letters", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path])),
    )


# ---------------------------------------------------------------- the policy


def test_backoff_doubles_is_capped_and_jittered() -> None:
    p = RetryPolicy(retries=5, backoff=0.1, max_backoff=0.35)
    for attempt, base in ((1, 0.1), (2, 0.2), (3, 0.35), (6, 0.35)):
        delays = [p.delay(attempt) for _ in range(200)]
        assert all(0.5 * base <= d < 1.5 * base for d in delays)
        assert len(set(delays)) > 150  # jitter: retries do not move in lockstep
    assert p.max_attempts == 6 and p.max_deliveries == 6
    default = RetryPolicy()
    assert default.max_attempts == 1 and default.max_deliveries == 1 + DEFAULT_REDELIVERIES


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"retries": True}, "retries"),
        ({"backoff": -0.1}, "backoff"),
        ({"max_backoff": "1"}, "max_backoff"),
    ],
)
def test_bad_retry_settings_are_refused(rbus: TaskBus, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rbus.register(Square, lambda t: t, **kwargs)
    assert rbus.policy(Square).retries == 20  # the earlier registration stands


# ---------------------------------------------------------------- retries


def test_a_flaky_handler_is_retried_until_it_succeeds(
    rbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    server = TaskServer(rbus, workers=2).start()
    servers.append(server)
    log = tmp_path / "flaky"
    assert rbus.dispatch(Flaky(str(log), 2)).result(timeout=30) == "ok after 2 failures"
    assert len(_runs(log)) == 3
    retried = wait_for(lambda: sum(w.tasks_retried for w in server.worker_info()), what="count")
    assert retried == 2
    assert rbus.dead_letters() == []


def test_the_last_exception_fails_the_future_and_is_dead_lettered(
    rbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    servers.append(TaskServer(rbus, workers=2).start())
    log = tmp_path / "broken"
    with pytest.raises(ValueError, match=r"still broken \(run 3\)"):
        rbus.dispatch(Broken(str(log))).result(timeout=30)
    assert len(_runs(log)) == 3  # retries=2: three attempts
    (dead,) = wait_for(rbus.dead_letters, what="a dead letter")
    assert dead.attempts == 3 and dead.task_type == "_tasks_retry.Broken"
    assert "ValueError: still broken (run 3)" in dead.reason


def test_stats_show_each_workers_failed_retried_and_dead_lettered_counts(
    rbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    servers.append(TaskServer(rbus, workers=2).start())
    for i in range(2):
        with pytest.raises(ValueError):
            rbus.dispatch(Broken(str(tmp_path / f"b{i}"))).result(timeout=30)
    assert rbus.dispatch(Flaky(str(tmp_path / "f"), 1)).result(timeout=30)
    out = subprocess.run(
        [sys.executable, "-m", "ringbus.cli", "stats", rbus.name, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    workers = [w for srv in doc["bus"]["servers"] for w in srv["workers"]]
    total = {
        k: sum(w[k] for w in workers) for k in ("tasks_failed", "tasks_retried", "dead_lettered")
    }
    # Broken: 3 attempts each (2 retries), failed and dead-lettered; Flaky: 1 retry.
    assert total == {"tasks_failed": 2, "tasks_retried": 5, "dead_lettered": 2}
    assert doc["bus"]["dead_letters"] == 2


def test_unrecoverable_is_not_retried(
    rbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    servers.append(TaskServer(rbus, workers=1).start())
    log = tmp_path / "fatal"
    with pytest.raises(Unrecoverable, match="bad input"):
        rbus.dispatch(Broken(str(log), fatal=True)).result(timeout=30)
    assert len(_runs(log)) == 1
    (dead,) = wait_for(rbus.dead_letters, what="a dead letter")
    assert dead.attempts == 1 and "Unrecoverable" in dead.reason


def test_fire_and_forget_failures_are_dead_lettered_too(
    rbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    servers.append(TaskServer(rbus, workers=1).start())
    rbus.send(Broken(str(tmp_path / "ff")))
    (dead,) = wait_for(rbus.dead_letters, what="a dead letter")
    assert dead.attempts == 3


# ---------------------------------------------------------------- worker death


def test_sigkill_mid_task_redelivers_to_another_worker(
    rbus: TaskBus, servers: list[TaskServer], tmp_path: Path, shm_name: str
) -> None:
    server = TaskServer(rbus, workers=2).start()
    servers.append(server)
    log = tmp_path / "once"
    with Queue(name=shm_name) as report:
        fut = rbus.dispatch(DieOnce(str(log), shm_name))
        victim = report.get(timeout=30)
    os.kill(victim, signal.SIGKILL)  # a real kill -9 with the task in hand
    survivor = fut.result(timeout=30)
    assert survivor != victim and _runs(log) == [victim, survivor]
    assert server.redelivered == 1
    assert rbus.dead_letters() == []
    wait_for(lambda: len(server.pids) == 2, what="the replacement worker")


def test_a_poison_task_ends_in_dead_letters_and_the_pool_lives_on(
    rbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    server = TaskServer(rbus, workers=2).start()
    servers.append(server)
    log = tmp_path / "poison"
    with pytest.raises(WorkerLost, match="attempt 3 of at most 3"):
        rbus.dispatch(Poison(str(log))).result(timeout=60)
    killed = _runs(log)
    assert len(killed) == 3 and len(set(killed)) == 3  # three workers, each killed once
    assert server.redelivered == 2
    (dead,) = rbus.dead_letters()
    assert dead.attempts == 3 and "SIGKILL" in dead.reason
    assert dead.task_type == "_tasks_retry.Poison"
    # Not a crash loop: the pool serves the next tasks at once.
    assert [f.result(timeout=30) for f in rbus.dispatch_many([Square(i) for i in range(50)])] == [
        i * i for i in range(50)
    ]


def test_an_overrun_is_a_timeout_and_a_dead_letter(
    rbus: TaskBus, servers: list[TaskServer]
) -> None:
    servers.append(TaskServer(rbus, workers=1, task_timeout=0.3).start())
    with pytest.raises(TaskTimeout, match="task_timeout"):
        rbus.dispatch(Hang(30)).result(timeout=30)
    (dead,) = wait_for(rbus.dead_letters, what="a dead letter")
    assert "task_timeout" in dead.reason and dead.task_type == "_tasks_retry.Hang"


# ---------------------------------------------------------------- bad input


def test_a_malformed_envelope_is_dead_lettered_and_the_worker_survives(
    rbus: TaskBus, servers: list[TaskServer]
) -> None:
    server = TaskServer(rbus, workers=1).start()
    servers.append(server)
    assert rbus.dispatch(Square(3)).result(timeout=30) == 9
    pid = server.pids[0]
    rbus.transport.open()
    with Queue.attach(f"/ringbus-{rbus.name}-tasks") as q:
        q.put_bytes(b"this is not an envelope")
        q.put_bytes(b"\xb3" + bytes(31) + b"\xff\xff" + bytes(16))  # reply address past the end
    dead = wait_for(lambda: len(rbus.dead_letters()) == 2 and rbus.dead_letters())
    assert dead[0].data == b"this is not an envelope"
    assert all(d.reason.startswith("malformed task envelope") for d in dead)
    assert "runs past the end" in dead[1].reason
    assert rbus.dispatch(Square(4)).result(timeout=30) == 16
    assert server.pids == [pid]


def test_a_torn_dead_letter_record_is_skipped(tmp_path: Path) -> None:
    store = RecordFile(str(tmp_path / "dead"))
    first = store.add(b"one")
    store.add(b"two")
    raw = Path(store.path).read_bytes()
    Path(store.path).write_bytes(raw[:-2])  # a crash in the middle of the last append
    assert store.records() == [(first, b"one")]
    third = store.add(b"three")
    # The torn tail hides what follows it: nothing after it is trusted.
    assert [rid for rid, _ in store.records()] == [first]
    assert third


# ---------------------------------------------------------------- the store and the command


def test_dead_letters_outlive_the_server_and_the_command_retries_them(
    bus_name: str, tmp_path: Path
) -> None:
    bus = make_bus(bus_name)
    try:
        log = tmp_path / "later"
        server = TaskServer(bus, workers=1).start()
        try:
            # Fails 3 times (its retries=3 allow 4 attempts, so make it fail 9).
            with pytest.raises(ConnectionError):
                bus.dispatch(Flaky(str(log), 9)).result(timeout=30)
        finally:
            server.stop()
        bus.close()
        # Another process (the command) sees the dead letter.
        listed = _dead_cli(bus_name, "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)["dead_letters"]
        assert len(rows) == 1 and rows[0]["task_type"] == "_tasks_retry.Flaky"
        assert rows[0]["attempts"] == 4 and "ConnectionError" in rows[0]["reason"]
        table = _dead_cli(bus_name)
        assert rows[0]["id"] in table.stdout and "Flaky" in table.stdout
        # Retry: queued again with attempt 1, run by the next server.
        retried = _dead_cli(bus_name, "--retry", "--id", rows[0]["id"])
        assert retried.returncode == 0 and "queued 1" in retried.stdout
        assert bus.dead_letters() == []
        with TaskServer(bus, workers=1):
            # 4 runs before, 4 more now: it fails again (9 failures) and comes back.
            wait_for(lambda: len(_runs(log)) == 8, what="the retried task's runs")
            back = wait_for(bus.dead_letters, what="the dead letter again")
        assert back[0].attempts == 4
        purged = _dead_cli(bus_name, "--purge")
        assert purged.returncode == 0 and "dropped 1" in purged.stdout
        assert bus.dead_letters() == []
        assert _dead_cli(bus_name).stdout.strip().endswith("has no dead letters")
    finally:
        bus.destroy()
    assert not os.path.exists(f"/dev/shm/ringbus-{bus_name}-dead")


def test_the_command_rejects_bad_input() -> None:
    bad = _dead_cli("no/slashes")
    assert bad.returncode == 2 and "invalid bus name" in bad.stderr
    both = _dead_cli("x", "--retry", "--purge")
    assert both.returncode == 2 and "not allowed with" in both.stderr
