"""Scope: a handler's max_concurrency on a bus over a real redis-server, held
across two TaskServers (the cap lives in Redis, not in either machine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from _redis_tasks import TEST_SECRET
from _tasks_limits import Capped, CappedSlot, capped, most_at_once, spans
from _tasks_support import bus_name_fixture, servers_fixture  # noqa: F401
from ringbus import TaskBus, TaskServer

pytest.importorskip("redis", reason="redis-py is not installed")


def _bus(name: str, url: str) -> TaskBus:
    from ringbus.transport.redis import RedisTransport

    bus = TaskBus(name, transport=RedisTransport(url, visibility_timeout=5), secret=TEST_SECRET)
    bus.register(Capped, capped, max_concurrency=2)
    return bus


def test_a_cap_holds_across_servers_over_redis(
    bus_name: str, servers: list[TaskServer], redis_server: Any, tmp_path: Path
) -> None:
    bus = _bus(bus_name, redis_server.url)
    try:
        for _ in range(2):
            server = TaskServer(_bus(bus_name, redis_server.url), workers=2, concurrency=4)
            servers.append(server)
            server.start()
        log = str(tmp_path / "spans")
        futs = [bus.dispatch(CappedSlot(log, 0.05)) for _ in range(24)]
        for f in futs:
            f.result(timeout=120)
        assert len(spans(log)) == 24
        assert most_at_once(spans(log)) == 2
    finally:
        for s in servers:
            s.stop(timeout=10)
        bus.destroy()
