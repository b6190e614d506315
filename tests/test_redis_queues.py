"""Scope: named queues and priorities (issue 16) over Redis Streams, one
stream per (queue, priority) channel: the scenarios of test_queues.py on a
real redis-server (and one on a real Redis Cluster), real worker processes,
a real SIGKILL.  Orders are checked from what the handlers logged, never
from timings; every key of the bus is gone after each test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis_queue_tasks import SlowMail, cpu_seconds, slow_mail
from _redis_support import RedisCluster, RedisServer
from _tasks_queues import (
    DieOnce,
    Doomed,
    Gate,
    Job,
    LimitedMail,
    Mail,
    Report,
    UrgentMail,
    lines,
    make_bus,
)
from _tasks_queues import mail as mail_handler
from _tasks_support import TEST_SECRET, bus_name_fixture, servers_fixture, wait_for  # noqa: F401
from ringbus import TaskBus, TaskServer

redis = pytest.importorskip("redis", reason="redis-py is not installed")

from ringbus.transport.redis import BrokerUnavailable, RedisTransport  # noqa: E402

TESTS = Path(__file__).resolve().parent
VISIBILITY = 2.0  # seconds: a take looks for new channels every VISIBILITY / 4


def _keys(url: str, bus_name: str) -> list[bytes]:
    r = redis.Redis.from_url(url.partition("?")[0])
    try:
        return list(r.keys(f"ringbus:{{{bus_name}}}*"))
    finally:
        r.close()


@pytest.fixture(name="url")
def url_fixture(redis_server: RedisServer) -> str:
    return f"{redis_server.url}?visibility_timeout={VISIBILITY}"


@pytest.fixture(name="qbus")
def qbus_fixture(bus_name: str, url: str) -> Iterator[TaskBus]:
    """The test's dispatching side; destroy() must leave no key of the bus."""
    bus = make_bus(bus_name, transport=url, secret=TEST_SECRET)
    yield bus
    bus.destroy(force=True)
    left = _keys(url, bus_name)
    if left:
        r = redis.Redis.from_url(url.partition("?")[0])
        r.delete(*left)
        r.close()
    assert not left, f"keys left behind by destroy(): {left}"


def _gates(bus: TaskBus, tmp_path: Path, n: int = 1) -> tuple[list[Any], Path]:
    """Occupy ``n`` worker slots of a default-queue server until the gate opens."""
    open_path = tmp_path / "gate-open"
    futs = []
    for i in range(n):
        started = tmp_path / f"gate-started-{i}"
        futs.append(bus.dispatch(Gate(str(open_path), str(started))))
        wait_for(started.exists, what=f"gate task {i} to start")
    return futs, open_path


def _channel_seen() -> None:
    """A busy worker reads the channel set once per slice (VISIBILITY / 4):
    let one pass so its next take knows the channels queued meanwhile.  A
    lower bound on waiting, not a timing assertion."""
    time.sleep(VISIBILITY / 4 + 0.2)


def test_a_server_runs_only_its_queues_and_other_queues_wait(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    reports = TaskServer(qbus, workers=1, queues=["reports"]).start()
    servers.append(reports)
    mail = qbus.dispatch(Mail(log, 1))
    assert qbus.dispatch(Report(log, 2)).result(timeout=30) in reports.pids
    # The report ran after the mail was queued: the reports worker passed it by.
    assert lines(log) == ["report 2"]
    assert qbus.transport.queue_depths()[("mail", 0)] == 1
    assert not mail.done()
    mailer = TaskServer(qbus, workers=1, queues=["mail"]).start()
    servers.append(mailer)
    assert mail.result(timeout=30) in mailer.pids
    assert qbus.queue_of(UrgentMail) == "mail"  # resolved along the MRO
    assert qbus.dispatch(UrgentMail(log, 3)).result(timeout=30) in mailer.pids
    assert lines(log) == ["report 2", "mail 1", "mail 3"]
    assert qbus.transport.queue_depths()[("mail", 0)] == 0


def test_higher_priorities_run_first(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    servers.append(TaskServer(qbus, workers=1, queues=["default"]).start())
    (gate,), open_path = _gates(qbus, tmp_path)
    low = [qbus.dispatch(Job(log, i)) for i in range(100)]
    high = [qbus.dispatch(Job(log, 1000 + i), priority=9) for i in range(10)]
    assert qbus.transport.queue_depths()[("default", 9)] == 10
    _channel_seen()
    open_path.write_text("")
    gate.result(timeout=30)
    for f in high + low:
        f.result(timeout=60)
    ran = lines(log)
    assert ran[:10] == [f"job {1000 + i}" for i in range(10)]  # FIFO within a priority
    assert ran[10:] == [f"job {i}" for i in range(100)]


def test_aging_lets_low_priorities_through(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    """After 32 takes in a row from above a queue's lowest priority, one take
    starts from its lowest non-empty priority (as on shared memory)."""
    from ringbus.transport.redis_channels import AGING_EVERY

    log = str(tmp_path / "log")
    servers.append(TaskServer(qbus, workers=1, queues=["default"]).start())
    (gate,), open_path = _gates(qbus, tmp_path)
    low = [qbus.dispatch(Job(log, i)) for i in range(5)]
    high = [qbus.dispatch(Job(log, 1000 + i), priority=9) for i in range(80)]
    _channel_seen()
    open_path.write_text("")
    for f in [gate, *high, *low]:
        f.result(timeout=60)
    want: list[str] = []
    highs = [f"job {1000 + i}" for i in range(80)]
    lows = [f"job {i}" for i in range(5)]
    while highs or lows:
        want += highs[:AGING_EVERY]
        del highs[:AGING_EVERY]
        want += lows[:1]
        del lows[:1]
    assert lines(log) == want


def test_strict_queue_order(qbus: TaskBus, servers: list[TaskServer], tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    servers.append(TaskServer(qbus, workers=1, queues=["mail", "reports", "default"]).start())
    (gate,), open_path = _gates(qbus, tmp_path)
    jobs = [qbus.dispatch(Job(log, i)) for i in range(20)]
    mails = [qbus.dispatch(Mail(log, i)) for i in range(20)]
    open_path.write_text("")
    for f in [gate, *jobs, *mails]:
        f.result(timeout=60)
    assert lines(log) == [f"mail {i}" for i in range(20)] + [f"job {i}" for i in range(20)]
    servers[-1].stop()
    # A stopped worker leaves no consumer behind in any channel it served.
    r = redis.Redis.from_url(qbus.transport.url)  # type: ignore[attr-defined]
    try:
        prefix = f"ringbus:{{{qbus.name}}}:tasks"
        # reports:0 was only looked at (a consumer there on Redis versions whose
        # empty XREADGROUP makes one)
        for key in (prefix, f"{prefix}:mail:0", f"{prefix}:reports:0"):
            assert r.xinfo_consumers(key, "workers") == [], key
    finally:
        r.close()


def test_batches_keep_the_order_within_one_batch(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    """A worker with 4 slots takes up to 4 entries per round trip, strictly
    in order: no task starts more than 3 places from its place in the order
    (mail before default, priority 5 before 0, FIFO within a channel)."""
    log = str(tmp_path / "log")
    slots = 4
    servers.append(
        TaskServer(qbus, workers=1, concurrency=slots, queues=["mail", "default"]).start()
    )
    gates, open_path = _gates(qbus, tmp_path, slots)
    futs = [qbus.dispatch(Job(log, i)) for i in range(20)]
    futs += [qbus.dispatch(Mail(log, i)) for i in range(10)]
    futs += [qbus.dispatch(Mail(log, 100 + i), priority=5) for i in range(10)]
    futs += [qbus.dispatch(Job(log, 100 + i), priority=5) for i in range(10)]
    _channel_seen()
    open_path.write_text("")
    for f in [*gates, *futs]:
        f.result(timeout=60)
    order = (
        [f"mail {100 + i}" for i in range(10)]
        + [f"mail {i}" for i in range(10)]
        + [f"job {100 + i}" for i in range(10)]
        + [f"job {i}" for i in range(20)]
    )
    ran = lines(log)
    assert sorted(ran) == sorted(order)
    places = {name: i for i, name in enumerate(order)}
    assert all(abs(places[name] - i) < slots for i, name in enumerate(ran)), ran


def test_a_killed_workers_task_goes_back_to_its_queue(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    # A default-only server runs beside: a task put back on the default stream
    # would run there (its handler is registered) and the check below fails.
    default = TaskServer(qbus, workers=1, queues=["default"]).start()
    mailer = TaskServer(qbus, workers=1, queues=["mail"]).start()
    servers.extend([default, mailer])
    marker = tmp_path / "marker"
    fut = qbus.dispatch(DieOnce(str(marker)))
    victim = int(wait_for(lambda: marker.exists() and marker.read_text(), what="the victim"))
    os.kill(victim, signal.SIGKILL)
    pid = fut.result(timeout=60)
    assert pid != victim and pid in mailer.pids
    r = redis.Redis.from_url(qbus.transport.url)  # type: ignore[attr-defined]
    try:
        key = f"ringbus:{{{qbus.name}}}:tasks:mail:0"
        wait_for(lambda: r.xpending(key, "workers")["pending"] == 0, what="its acknowledgement")
        assert r.xlen(key) == 1  # the same entry, taken over: not queued again
        assert r.xlen(f"ringbus:{{{qbus.name}}}:tasks") == 0  # never on the default stream
    finally:
        r.close()


def test_the_claim_keeper_covers_every_channel(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    """A mail task running 2.5 visibility timeouts is kept claimed: the idle
    mail worker beside never takes it over, so it runs once."""
    qbus.register(SlowMail, slow_mail, queue="mail")
    servers.append(TaskServer(qbus, workers=2, queues=["mail"]).start())
    log = str(tmp_path / "log")
    assert qbus.dispatch(SlowMail(log, VISIBILITY * 2.5)).result(timeout=60)
    assert lines(log) == ["slow 0"]


def test_trimming_a_channel_never_drops_unacknowledged_entries(
    bus_name: str, redis_server: RedisServer, servers: list[TaskServer], tmp_path: Path
) -> None:
    transport = RedisTransport(redis_server.url, stream_maxlen=20, visibility_timeout=30)
    bus = make_bus(bus_name, transport=transport, secret=TEST_SECRET)
    bus.register(SlowMail, slow_mail, queue="mail")
    key = f"ringbus:{{{bus_name}}}:tasks:mail:0"
    r = redis.Redis.from_url(redis_server.url)
    try:
        servers.append(TaskServer(bus, workers=2, queues=["mail"]).start())
        log = str(tmp_path / "log")
        until = tmp_path / "open"
        slow = bus.dispatch(SlowMail(log, 0, -1, str(until)))

        def taken() -> Any:
            try:
                return r.xpending_range(key, "workers", "-", "+", 1)
            except redis.ResponseError:
                return None  # no worker made the group yet

        held = wait_for(taken, what="the slow task taken")[0]["message_id"]
        futs = [bus.dispatch(SlowMail(log, 0, i)) for i in range(400)]
        assert all(f.result(timeout=60) for f in futs)
        assert r.xrange(key, held, held)  # trimmed meanwhile, but never its entry
        until.write_text("")
        assert slow.result(timeout=30)
        more = bus.dispatch_many(SlowMail(log, 0, i) for i in range(400))
        assert all(f.result(timeout=60) for f in more)
        assert r.xlen(key) < 300  # acknowledged history was trimmed
        assert sorted(lines(log)) == sorted(["slow -1"] + [f"slow {i}" for i in range(400)] * 2)
    finally:
        r.close()
        for s in servers:
            s.stop(timeout=10)
        bus.destroy(force=True)


def test_delayed_tasks_land_in_their_queue_and_priority(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    # The leader (this server) moves due tasks; it serves neither channel.
    servers.append(TaskServer(qbus, workers=1, queues=["reports"]).start())
    mail = qbus.dispatch(Mail(log, 1), delay=0.2)
    qbus.send(Job(log, 2), delay=0.2, priority=7)
    depths = wait_for(
        lambda: (
            (d := qbus.transport.queue_depths()).get(("mail", 0)) == 1
            and d.get(("default", 7)) == 1
            and d
        ),
        what="the due tasks in their channels",
    )
    assert depths.get(("default", 0), 0) == 0
    mailer = TaskServer(qbus, workers=1, queues=["mail"]).start()
    servers.append(mailer)
    assert mail.result(timeout=30) in mailer.pids


def test_rate_limited_tasks_go_back_to_their_queue(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    """A task its rate limit refuses waits in the delayed set and comes back
    to its own channel (the default-only server beside would run it otherwise)."""
    qbus.register(LimitedMail, mail_handler, queue="mail", rate_limit="5/s")
    default = TaskServer(qbus, workers=1, queues=["default"]).start()
    mailer = TaskServer(qbus, workers=1, queues=["mail"]).start()
    servers.extend([default, mailer])
    log = str(tmp_path / "log")
    futs = [qbus.dispatch(LimitedMail(log, i)) for i in range(8)]
    assert {f.result(timeout=60) for f in futs} <= set(mailer.pids)


def test_a_deadline_holds_on_a_channel(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    """A mail task whose deadline passed while it waited on its channel is
    answered TaskTimeout and never run by the server that comes later."""
    from ringbus import TaskTimeout

    log = str(tmp_path / "log")
    late = qbus.dispatch(Mail(log, 1), timeout=0.3, priority=4)
    with pytest.raises(TaskTimeout):
        late.result(timeout=30)
    mailer = TaskServer(qbus, workers=1, queues=["mail"]).start()
    servers.append(mailer)
    assert qbus.dispatch(Mail(log, 2), priority=4).result(timeout=30) in mailer.pids
    assert lines(log) == ["mail 2"]


def test_dead_letters_retry_into_their_queue(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    server = TaskServer(qbus, workers=1, queues=["mail"]).start()
    with pytest.raises(Exception, match="never works"):
        qbus.dispatch(Doomed(), priority=2).result(timeout=30)
    server.stop()
    assert qbus.retry_dead_letters() == 1
    depths = qbus.transport.queue_depths()
    assert depths[("mail", 2)] == 1 and depths[("default", 0)] == 0  # signed again, same channel


def test_dispatch_many_routes_each_task(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    futs = qbus.dispatch_many([Job(log, 0), Mail(log, 1), Mail(log, 2), Report(log, 3)])
    depths = qbus.transport.queue_depths()
    assert (depths[("default", 0)], depths[("mail", 0)], depths[("reports", 0)]) == (1, 2, 1)
    servers.append(TaskServer(qbus, workers=2, concurrency=2).start())  # every queue of the bus
    assert [type(f.result(timeout=30)) for f in futs] == [int] * 4
    assert sorted(lines(log)) == ["job 0", "mail 1", "mail 2", "report 3"]
    assert set(qbus.transport.queue_depths().values()) == {0}


def test_idle_workers_on_several_channels_sleep(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path
) -> None:
    """Idle workers of several channels block in XREAD: no spinning."""
    log = str(tmp_path / "log")
    a = TaskServer(qbus, workers=2, queues=["mail", "reports"]).start()
    b = TaskServer(qbus, workers=2, queues=["mail", "default"], concurrency=2).start()
    servers.extend([a, b])
    futs = [qbus.dispatch(Mail(log, i), priority=i % 2) for i in range(4)]
    for f in [*futs, qbus.dispatch(Job(log)), qbus.dispatch(Report(log))]:
        f.result(timeout=30)
    time.sleep(0.5)
    pids = a.pids + b.pids
    before = {p: cpu_seconds(p) for p in pids}
    time.sleep(2.0)
    used = {p: cpu_seconds(p) - before[p] for p in pids}
    # A spinning worker burns ~2 s here; a sleeping one a few ms.
    assert all(u < 0.3 for u in used.values()), used


def test_destroy_removes_every_channel_stream(
    qbus: TaskBus, servers: list[TaskServer], tmp_path: Path, url: str
) -> None:
    log = str(tmp_path / "log")
    with TaskServer(qbus, workers=1, queues=["reports"]):  # consumers, a leader, a group
        qbus.send(Mail(log), priority=3)
        qbus.send(Job(log), priority=1)
        assert qbus.dispatch(Report(log)).result(timeout=30)
    names = {k.decode() for k in _keys(url, qbus.name)}
    prefix = f"ringbus:{{{qbus.name}}}"
    assert {f"{prefix}:tasks:mail:3", f"{prefix}:tasks:default:1", f"{prefix}:channels"} <= names
    qbus.destroy()
    assert _keys(url, qbus.name) == []


def test_puts_on_a_channel_raise_broker_unavailable(bus_name: str) -> None:
    """No Redis: a dispatch to a named queue or a priority raises at once, as
    one to the default channel does, and queues nothing."""
    from ringbus.testing.redis_server import free_port

    bus = make_bus(
        bus_name,
        transport=RedisTransport(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1.0),
        secret=TEST_SECRET,
    )
    try:
        with pytest.raises(BrokerUnavailable, match="unavailable"):
            bus.dispatch(Mail("/dev/null"), timeout=1.0)
        with pytest.raises(BrokerUnavailable, match="unavailable"):
            bus.send(Job("/dev/null"), priority=4, timeout=1.0)
        with pytest.raises(BrokerUnavailable, match="unavailable"):
            bus.dispatch_many([Mail("/dev/null"), Report("/dev/null")], timeout=1.0)
    finally:
        bus.close()


def test_a_channel_dispatch_honours_its_timeout_when_redis_does_not_answer(
    bus_name: str,
) -> None:
    """A frozen redis-server (SIGSTOP) accepts connections and answers
    nothing: a dispatch to a named queue or a priority raises
    BrokerUnavailable after its own timeout, not the socket's (120 s)."""
    server = RedisServer()
    bus = make_bus(
        bus_name, transport=RedisTransport(server.url, socket_timeout=120), secret=TEST_SECRET
    )
    assert server.pid is not None
    pid = server.pid
    try:
        bus.send(Mail("/dev/null"))  # connected, reply key made; stays queued (no worker)
        calls = [
            lambda: bus.dispatch(Mail("/dev/null"), timeout=0.5),
            lambda: bus.send(Job("/dev/null"), priority=3, timeout=0.5),
            lambda: bus.dispatch_many([Mail("/dev/null"), Report("/dev/null")], timeout=0.5),
        ]
        os.kill(pid, signal.SIGSTOP)
        try:
            for call in calls:
                start = time.monotonic()
                with pytest.raises(BrokerUnavailable):
                    call()
                assert time.monotonic() - start < 30  # a bound far below the socket's
        finally:
            os.kill(pid, signal.SIGCONT)
        assert bus.transport.queue_depths()[("mail", 0)] >= 1  # Redis answers again
    finally:
        bus.destroy()
        server.close()


def test_bad_input(qbus: TaskBus, servers: list[TaskServer], tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    for bad in (10, -1, "9", 1.5, True):
        with pytest.raises(ValueError, match="priority"):
            qbus.dispatch(Job(log), priority=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"its queues are \['default', 'mail', 'reports'\]"):
        TaskServer(qbus, workers=1, queues=["mail", "nope"]).start()
    t = qbus.transport
    with pytest.raises(ValueError, match="queue name"):
        t.put_task_to("bad name", 0, b"x")
    with pytest.raises(ValueError, match="priority"):
        t.put_task_to("mail", 10, b"x")
    assert set(t.queue_depths()) == {("default", 0)}  # nothing queued, no channel made
    assert not any(s.running for s in servers)


def test_worker_cli_queues_and_stats(bus_name: str, tmp_path: Path, url: str) -> None:
    env = {
        **os.environ,
        "RINGBUS_TEST_BUS": bus_name,
        "RINGBUS_SECRET": TEST_SECRET,
        "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
    }
    worker = [sys.executable, "-m", "ringbus", "worker", "_tasks_queues:bus", "--transport", url]
    proc = subprocess.Popen(
        [*worker, "-w", "1", "-Q", "mail,default"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    bus = make_bus(bus_name, transport=url, secret=TEST_SECRET)
    try:
        log = str(tmp_path / "log")
        assert isinstance(bus.dispatch(Mail(log, 1)).result(timeout=60), int)
        bus.send(Report(log, 2), priority=4)
        out = subprocess.run(
            [sys.executable, "-m", "ringbus", "stats", bus_name, "--transport", url, "--json"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        doc = json.loads(out.stdout)
        broker = {(q["queue"], q["priority"]): q["depth"] for q in doc["broker"]["queues"]}
        assert broker[("reports", 4)] == 1 and broker[("mail", 0)] == 0
        assert [s["queues"] for s in doc["bus"]["servers"]] == [["mail", "default"]]
        rows = {(q["queue"], q["priority"]): q for q in doc["bus"]["queues"]}
        assert rows[("reports", 4)]["depth"] == 1 and rows[("reports", 4)]["served_by"] == []
        assert rows[("mail", 0)]["served_by"] == [proc.pid]
        human = subprocess.run(
            [sys.executable, "-m", "ringbus", "stats", bus_name, "--transport", url],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "queues (strict order" in human.stdout, human.stdout
        assert "(queues mail, default)" in human.stdout, human.stdout
        prom = subprocess.run(
            [sys.executable, "-m", "ringbus", "stats", bus_name, "--transport", url,
             "--format", "prometheus"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        want = f'ringbus_channel_depth{{bus="{bus_name}",priority="4",queue="reports"}} 1.0'
        assert want in prom.stdout, prom.stdout + prom.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        bus.destroy(force=True)
    assert _keys(url, bus_name) == []


def test_prometheus_shows_depth_per_channel_on_both_transports(bus_name: str, url: str) -> None:
    pytest.importorskip("prometheus_client")
    from ringbus.cli.metrics import render_once

    for transport in ("shm", url):
        bus = make_bus(bus_name, transport=transport, secret=TEST_SECRET)
        try:
            bus.send(Mail("/dev/null"), priority=3)
            bus.send(Job("/dev/null"))
            text = render_once(bus_name, None if transport == "shm" else bus.transport)
            for q, p in (("mail", 3), ("default", 0)):
                want = f'ringbus_channel_depth{{bus="{bus_name}",priority="{p}",queue="{q}"}} 1.0'
                assert want in text, (transport, text)
        finally:
            bus.destroy(force=True)


def test_queues_and_priorities_on_a_cluster(
    redis_cluster: RedisCluster, bus_name: str, servers: list[TaskServer], tmp_path: Path
) -> None:
    """Every channel stream of a bus shares its slot (the TAKE script reads
    several in one call); order and routing hold through the node."""
    from redis.cluster import RedisCluster as Client

    url = f"{redis_cluster.url}?visibility_timeout={VISIBILITY}"
    bus = make_bus(bus_name, transport=url, secret=TEST_SECRET)
    c = Client.from_url(redis_cluster.url.replace("redis+cluster://", "redis://"))
    try:
        log = str(tmp_path / "log")
        servers.append(TaskServer(bus, workers=1, queues=["mail", "default"]).start())
        (gate,), open_path = _gates(bus, tmp_path)
        futs = [bus.dispatch(Job(log, i)) for i in range(5)]
        futs += [bus.dispatch(Mail(log, i)) for i in range(5)]
        futs += [bus.dispatch(Mail(log, 10 + i), priority=9) for i in range(5)]
        futs.append(bus.dispatch(Job(log, 99), delay=0.1, priority=3))
        wait_for(lambda: bus.transport.queue_depths().get(("default", 3)) == 1, what="due")
        _channel_seen()
        open_path.write_text("")
        for f in [gate, *futs]:
            f.result(timeout=60)
        assert lines(log) == (
            [f"mail {10 + i}" for i in range(5)]
            + [f"mail {i}" for i in range(5)]
            + ["job 99"]
            + [f"job {i}" for i in range(5)]
        )
        names = [k.decode() for k in c.keys(target_nodes="all")]  # type: ignore[union-attr]
        ours = [k for k in names if f"{{{bus_name}}}" in k]
        assert f"ringbus:{{{bus_name}}}:tasks:mail:9" in ours
        assert len({c.keyslot(k) for k in ours}) == 1
    finally:
        for s in servers:
            s.stop(timeout=10)
        bus.destroy(force=True)
        c.close()
