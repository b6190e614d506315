"""Scope: the Redis limits (transport/redis_limits.py) on a real
redis-server: the Lua token bucket, the ZSET semaphore across holders, and
the permits of a SIGKILLed holder expiring.  Bounds, not timings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("redis", reason="redis-py is not installed (pip install 'ringbus[redis]')")

import redis

from _tasks_support import wait_for
from ringbus.transport.redis_limits import RedisLimits

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def prefix() -> str:
    return f"ringbus:{{test-{os.getpid()}-{uuid.uuid4().hex[:8]}}}"


def _limits(server: Any, prefix: str, ttl: float = 30.0) -> RedisLimits:
    client = redis.Redis.from_url(server.url)
    return RedisLimits(lambda: client, prefix, holder_ttl=ttl)


def test_bucket_grants_its_burst_then_says_when(redis_server: Any, prefix: str) -> None:
    a, b = _limits(redis_server, prefix), _limits(redis_server, prefix)
    ga = a.gate("pkg.Task", 50_000_000, 5, 0)  # 20/s, 5 at once
    gb = b.gate("pkg.Task", 50_000_000, 5, 0)  # another process's view: the same bucket
    answers = [g.try_start() for g in (ga, gb) * 5]
    granted = [x for x in answers if x == 0]
    assert len(granted) <= 5 + 1  # +1: a token may come due during the ten calls
    assert len(granted) >= 5
    refused = [-x for x in answers if x < 0]
    assert refused and all(0 < ns <= 50_000_000 * 10 for ns in refused)
    time.sleep(0.06)  # a bound: one token later there is one more
    assert ga.try_start() == 0 or gb.try_start() == 0


def test_cap_is_shared_and_permits_come_back(redis_server: Any, prefix: str) -> None:
    a, b = _limits(redis_server, prefix), _limits(redis_server, prefix)
    ga, gb = a.gate("pkg.Capped", 0, 0, 2), b.gate("pkg.Capped", 0, 0, 2)
    p1, p2 = ga.try_start(), gb.try_start()
    assert p1 > 0 and p2 > 0
    assert ga.try_start() < 0 and gb.try_start() < 0
    assert ga.finish(p1)
    p3 = gb.try_start()
    assert p3 > 0
    assert gb.finish(p2) and gb.finish(p3)
    assert not gb.finish(p3)  # twice: not ours any more
    a.close()
    b.close()


def test_a_killed_holders_permit_expires(redis_server: Any, prefix: str) -> None:
    code = (
        "import redis, sys, time\n"
        "from ringbus.transport.redis_limits import RedisLimits\n"
        f"c = redis.Redis.from_url({redis_server.url!r})\n"
        f"g = RedisLimits(lambda: c, {prefix!r}, holder_ttl=2.0).gate('pkg.Capped', 0, 0, 1)\n"
        "assert g.try_start() > 0\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        mine = _limits(redis_server, prefix, ttl=2.0).gate("pkg.Capped", 0, 0, 1)
        time.sleep(2.5)  # past the holder's ttl: its keeper refreshed it meanwhile
        assert mine.try_start() < 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        permit = wait_for(lambda: max(mine.try_start(), 0), timeout=10, what="the permit")
        assert mine.finish(permit)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
