"""Scope: the bus on a real 3-node Redis Cluster (``redis+cluster://``):
every key of a bus in one hash slot (the ``{bus}`` tag), tasks, results,
delayed tasks, dead letters and the leader through the node that holds it,
reached from a seed node that may not; buses spread over the shards."""

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
