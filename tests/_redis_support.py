"""The redis-server fixtures: ``ringbus.testing.redis_server.RedisServer``
(a free loopback port, a temporary directory, persistence off unless a test
asks for AOF, stopped by pid at the end, also when the test fails).  Without
the binary or redis-py the Redis tests skip with the reason."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ringbus.testing.redis_server import RedisCluster, RedisServer, RedisServerNotFound

__all__ = ["RedisCluster", "RedisServer", "redis_aof_server", "redis_cluster", "redis_server"]


def _server(aof: bool = False) -> RedisServer:
    """A started server, or a skip when redis-server or redis-py is missing."""
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'ringbus[redis]')")
    try:
        return RedisServer(aof=aof)
    except RedisServerNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with _server() as server:
        yield server


@pytest.fixture
def redis_aof_server() -> Iterator[RedisServer]:
    """A server of its own with AOF on (for restart tests)."""
    with _server(aof=True) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real 3-node Redis Cluster (skips without redis-server or redis-cli)."""
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'ringbus[redis]')")
    try:
        cluster = RedisCluster(3)
    except RedisServerNotFound as exc:
        pytest.skip(str(exc))
    with cluster:
        yield cluster
