"""The shared-memory task table under load and when full (real workers)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import cast

import pytest

from _identity_tasks import Report, Tiny, make_identity_bus
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import ShmTransport, TaskBus, TaskServer, TaskTimeout
from ringbus.tasks.results import BusFuture
from ringbus.transport.shm_results import ShmTaskTable
from ringbus.transport.task_table import QUEUED, StoreFull


def _bus(name: str, slots: int, record: int = 512) -> TaskBus:
    transport = ShmTransport(task_slots=slots, task_record_size=record)
    return make_identity_bus(name, transport=transport)


@pytest.fixture(name="small")
def small_fixture(bus_name: str) -> Iterator[TaskBus]:
    bus = _bus(bus_name, 512)
    try:
        yield bus
    finally:
        bus.destroy(force=True)


def test_100k_kept_results_expire(bus_name: str, servers: list[TaskServer]) -> None:
    bus = _bus(bus_name, 131072)
    try:
        servers.append(TaskServer(bus, workers=2).start())
        n = 100_000
        futs = bus.dispatch_many(Tiny(i) for i in range(n))  # keep_result=1
        assert [f.result(timeout=300) for f in futs[:: n // 10]] == list(range(0, n, n // 10))
        last = cast(BusFuture, futs[-1])  # dispatch_many's futures carry task_id too
        assert last.result(timeout=300) == n - 1
        table = bus.transport.task_table()
        assert isinstance(table, ShmTaskTable)
        assert table.stats()["live"] == 0
        # Kept for 1 s, then gone: no record left, lookups say so.
        wait_for(lambda: table.stats()["kept"] == 0, timeout=60, what="kept results to expire")
        assert bus.status(last.task_id).state == "unknown"
        with pytest.raises(LookupError, match=r"not kept|unknown"):
            bus.result(last.task_id)
        assert table.stats()["evicted"] == 0
        assert bus.dispatch(Tiny(7)).result(timeout=60) == 7  # expired slots are reused
    finally:
        bus.destroy(force=True)


def test_a_table_full_of_unfinished_tasks_refuses_new_ones(small: TaskBus) -> None:
    ids = [small.send(Tiny(i)) for i in range(512)]  # no server: all stay queued
    assert len(set(ids)) == 512
    queued = small.pending_tasks()
    with pytest.raises(StoreFull, match="full"):
        small.send(Tiny(-1))
    with pytest.raises(StoreFull):
        small.dispatch(Tiny(-1))
    assert small.pending_tasks() == queued  # nothing was queued
    assert all(small.status(i).state == "queued" for i in ids[:5])


def test_kept_results_are_evicted_when_full(small: TaskBus, servers: list[TaskServer]) -> None:
    servers.append(TaskServer(small, workers=1).start())
    futs = [small.dispatch(Report(i)) for i in range(512)]  # keep_result=60
    assert [f.result(timeout=120) for f in futs] == [2 * i for i in range(512)]
    fut = small.dispatch(Report(1000))  # no free slot: replaces a kept result
    assert fut.result(timeout=60) == 2000
    assert small.result(fut.task_id) == 2000
    table = small.transport.task_table()
    assert isinstance(table, ShmTaskTable)
    assert table.stats()["evicted"] >= 1
    gone = [f.task_id for f in futs if small.status(f.task_id).state == "unknown"]
    assert 1 <= len(gone) <= 256
    with pytest.raises(LookupError):
        small.result(gone[0])


def test_a_result_too_large_to_keep_says_so(small: TaskBus, servers: list[TaskServer]) -> None:
    from _tasks_basic import Echo

    small.register(Echo, lambda t: t.value, keep_result=60)
    servers.append(TaskServer(small, workers=1).start())
    fut = small.dispatch(Echo(b"x" * 4096))
    assert fut.result(timeout=60) == b"x" * 4096  # the caller's future still gets it
    assert small.status(fut.task_id).state == "done"
    with pytest.raises(LookupError, match="larger than"):
        small.result(fut.task_id)
    assert os.path.exists(f"/dev/shm/ringbus-{small.name}-tasktable")


def test_a_steady_dispatcher_reuses_its_own_block(bus_name: str) -> None:
    """Tasks that finish free their records: the dispatcher fills the same
    block again instead of walking (and faulting in) the whole table."""
    bus = _bus(bus_name, 4096)
    try:
        table = bus.transport.task_table()
        assert isinstance(table, ShmTaskTable)
        slots = set()
        for i in range(5 * 256):
            gid = table.add(2, os.getpid(), i)  # QUEUED
            slots.add(int.from_bytes(gid[12:16], "little"))
            table.finish(gid, 4, 0.0, None)  # DONE, not kept: freed
        assert slots == set(range(256))
        # A block full of unfinished tasks is passed over, not scanned forever.
        held = [table.add(2, os.getpid(), i) for i in range(300)]
        assert len({int.from_bytes(g[12:16], "little") // 256 for g in held}) == 2
    finally:
        bus.destroy(force=True)


def test_a_dispatchers_adder_claims_blocks_and_outlives_a_closed_map(bus_name: str) -> None:
    """``adder()`` (dispatch's quick path to a new record) claims the next
    block when one is used up, and keeps working after the table was closed
    and opened again (its old records released)."""
    bus = _bus(bus_name, 4 * 256)
    try:
        table = bus.transport.task_table()
        assert isinstance(table, ShmTaskTable)
        add = table.adder()
        first = [add(QUEUED, os.getpid(), i) for i in range(300)]  # over two blocks
        assert {int.from_bytes(g[12:16], "little") // 256 for g in first} == {0, 1}
        table.close()
        after = [add(QUEUED, os.getpid(), i) for i in range(300)]
        for gid in first + after:
            rec = table.get(gid)
            assert rec is not None and rec.state == QUEUED, gid.hex()
        assert len(set(first + after)) == 600
    finally:
        bus.destroy(force=True)


def _allocated(table: ShmTaskTable) -> int:
    """Bytes of the table's file that hold memory (/dev/shm is sparse)."""
    return os.stat(table.path).st_blocks * 512


def test_after_a_burst_the_dispatcher_refills_blocks_it_used_before(bus_name: str) -> None:
    """A burst that needed several blocks, once finished, leaves them free:
    the next tasks go back to those blocks (pages allocated and mapped)
    instead of on through the table's fresh blocks, whose pages cost
    allocation, zeroing and a fault per four records in every process.
    Before, a dispatcher walked all 65,536 records (64 MiB of /dev/shm) in
    turn however few tasks it had in flight."""
    bus = _bus(bus_name, 16 * 256)
    try:
        table = bus.transport.task_table()
        assert isinstance(table, ShmTaskTable)
        for _ in range(3):  # bursts of 3 blocks, each finished before the next
            burst = [table.add(2, os.getpid(), i) for i in range(3 * 256)]
            for gid in burst:
                table.finish(gid, 4, 0.0, None)  # DONE, not kept: freed
        after_bursts = _allocated(table)
        for i in range(4 * 256):  # a steady trickle after the bursts
            table.finish(table.add(2, os.getpid(), i), 4, 0.0, None)
        blocks = {int.from_bytes(g[12:16], "little") // 256 for g in burst}
        assert blocks == {0, 1, 2}, f"the last burst went to blocks {sorted(blocks)}"
        assert _allocated(table) == after_bursts
        assert after_bursts <= 4 * 256 * table.record_size + 64 * 1024  # 3 blocks and the header
    finally:
        bus.destroy(force=True)


@pytest.mark.parametrize("secret", [None, "a secret of the test bus"], ids=["plain", "signed"])
def test_dispatch_many_longer_than_the_table_waits_for_records(
    bus_name: str, servers: list[TaskServer], secret: str | None
) -> None:
    """A list longer than the task table gets its records a wave at a time
    as it is queued (it used to claim them all first and fail with
    StoreFull); the ids patched into signed envelopes still verify."""
    bus = (
        _bus(bus_name, 512)
        if secret is None
        else make_identity_bus(
            bus_name, transport=ShmTransport(task_slots=512, task_record_size=512), secret=secret
        )
    )
    try:
        servers.append(TaskServer(bus, workers=2).start())
        n = 3000
        futs = bus.dispatch_many(Tiny(i) for i in range(n))
        assert [f.result(timeout=120) for f in futs] == list(range(n))
        ids = [cast(BusFuture, f).task_id for f in futs]
        assert len(set(ids)) == n
        assert bus.status(ids[-1]).state in ("done", "unknown")  # kept 1 s, maybe evicted
    finally:
        bus.destroy(force=True)


def test_dispatch_many_of_unsigned_pickle_takes_records_a_chunk_at_a_time(
    bus_name: str, servers: list[TaskServer]
) -> None:
    """Unsigned pickle: a wave is a chunk of 512, its records and envelopes
    made right before it is queued (workers start once the payloads are
    pickled); over many waves every task runs once under its own id."""
    bus = _bus(bus_name, 4096)  # waves of 512 (a quarter of the table is 1024)
    try:
        servers.append(TaskServer(bus, workers=2).start())
        n = 3000
        futs = bus.dispatch_many(Tiny(i) for i in range(n))
        assert [f.result(timeout=120) for f in futs] == list(range(n))
        assert len({cast(BusFuture, f).task_id for f in futs}) == n
    finally:
        bus.destroy(force=True)


def test_dispatch_many_gives_up_on_a_full_table_at_its_deadline(small: TaskBus) -> None:
    """No worker: the first 512 tasks fill the table and stay queued (their
    deadline then passes too); the rest wait for a record until the
    timeout, then fail, not queued."""
    futs = small.dispatch_many((Tiny(i) for i in range(1000)), timeout=0.5)
    assert len(futs) == 1000
    for f in futs[512:]:
        with pytest.raises(TaskTimeout, match="task table stayed full"):
            f.result(timeout=0)
    for f in futs[:512]:
        with pytest.raises(TaskTimeout) as exc:
            f.result(timeout=30)
        assert "task table" not in str(exc.value)
    assert small.pending_tasks() == 512
