"""Scope: the bus on a real 3-node Redis Cluster (``redis+cluster://``):
every key of a bus in one hash slot (the ``{bus}`` tag), tasks, results,
delayed tasks, dead letters and the leader through the node that holds it,
reached from a seed node that may not; buses spread over the shards; a
concurrent worker follows its bus's slot to another node."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from _redis_support import RedisCluster
from _redis_tasks import TEST_SECRET, Bad, Double, register
from _tasks_support import wait_for
from ringbus import TaskBus, TaskServer, Unrecoverable

redis = pytest.importorskip("redis", reason="redis-py is not installed")


def _name() -> str:
    return f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cbus(redis_cluster: RedisCluster) -> Iterator[TaskBus]:
    bus = register(
        TaskBus(_name(), transport=f"{redis_cluster.url}?visibility_timeout=2", secret=TEST_SECRET)
    )
    yield bus
    bus.destroy(force=True)


def _client(cluster: RedisCluster) -> Any:
    from redis.cluster import RedisCluster as Client

    return Client.from_url(cluster.url.replace("redis+cluster://", "redis://"))


def test_a_bus_runs_on_a_cluster_with_every_key_in_one_slot(
    cbus: TaskBus, redis_cluster: RedisCluster
) -> None:
    with TaskServer(cbus, workers=2, concurrency=4):
        futs = cbus.dispatch_many(Double(i) for i in range(300))
        assert [f.result(timeout=60)[0] for f in futs] == [2 * i for i in range(300)]
        assert cbus.dispatch(Double(21), delay=0.3).result(timeout=60)[0] == 42
        with pytest.raises(Unrecoverable):
            cbus.dispatch(Bad()).result(timeout=60)
        wait_for(lambda: len(cbus.dead_letters()) == 1, 30, "the dead letter")
        wait_for(lambda: cbus.transport.leader() is not None, 30, "a leader")
        c = _client(redis_cluster)
        try:
            keys = [k.decode() for k in c.keys(target_nodes="all")]
            ours = [k for k in keys if f"{{{cbus.name}}}" in k]
            assert {f"ringbus:{{{cbus.name}}}:{s}" for s in ("tasks", "dead", "leader")} <= set(
                ours
            )
            assert len({c.keyslot(k) for k in ours}) == 1  # one slot: one node serves the bus
        finally:
            c.close()


def test_buses_spread_over_the_shards(redis_cluster: RedisCluster) -> None:
    c = _client(redis_cluster)
    buses: list[TaskBus] = []
    try:
        nodes: set[str] = set()
        while len(nodes) < 3:  # names hash to slots all over: each shard gets some
            bus = register(TaskBus(_name(), transport=redis_cluster.url, secret=TEST_SECRET))
            buses.append(bus)
            node = c.get_node_from_key(f"ringbus:{{{bus.name}}}:tasks")
            nodes.add(f"{node.host}:{node.port}")
            assert len(buses) < 200
        with TaskServer(buses[-1], workers=1):
            assert buses[-1].dispatch(Double(4)).result(timeout=60)[0] == 8
    finally:
        c.close()
        for bus in buses:
            bus.destroy(force=True)


def _move_slot(c: Any, key: str) -> None:
    """Reshard the slot of ``key`` to another primary (as ``redis-cli
    --cluster reshard`` does: IMPORTING, MIGRATING, MIGRATE, SETSLOT NODE)."""
    slot = c.keyslot(key)
    src = c.get_node_from_key(key)
    primaries = c.get_primaries()
    dst = next(n for n in primaries if n.name != src.name)
    rs, rd = src.redis_connection, dst.redis_connection
    src_id, dst_id = rs.execute_command("CLUSTER", "MYID"), rd.execute_command("CLUSTER", "MYID")
    rd.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    rs.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    while keys := rs.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        rs.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *keys)
    for n in primaries:
        n.redis_connection.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


def test_a_concurrent_worker_follows_its_bus_to_another_node(
    cbus: TaskBus, redis_cluster: RedisCluster
) -> None:
    """The slot of the bus moves while a worker with concurrency 4 reads on
    its loop: the worker finds the new node (MOVED) and serves on."""
    c = _client(redis_cluster)
    try:
        with TaskServer(cbus, workers=1, concurrency=4):
            assert [cbus.dispatch(Double(i)).result(timeout=60)[0] for i in range(10)] == [
                2 * i for i in range(10)
            ]
            key = f"ringbus:{{{cbus.name}}}:tasks"
            old = c.get_node_from_key(key)
            _move_slot(c, key)
            old.redis_connection.config_resetstat()
            c.nodes_manager.initialize()
            assert c.get_node_from_key(key).name != old.name
            futs = [cbus.dispatch(Double(i)) for i in range(10, 30)]
            assert [f.result(timeout=60)[0] for f in futs] == [2 * i for i in range(10, 30)]
            for i in range(100):  # a read each, one at a time
                assert cbus.dispatch(Double(i)).result(timeout=60)[0] == 2 * i
            # Each connection of the bus is told once, then asks the new node (a
            # loop whose reads kept the old connection was told at every read).
            moved = old.redis_connection.info("errorstats").get("errorstat_MOVED", {})
            assert int(moved.get("count", 0)) < 40
    finally:
        c.close()
