"""The peers' applications for ``bench/redis_peers.py``: the same task,
``add((i, 1))``, as a Celery task, a huey task and a Dramatiq actor, each on
the redis-server named by ``RINGBUS_BENCH_REDIS_URL`` (broker and results).

Their workers import this module (``celery -A``, ``huey_consumer``,
``dramatiq``); each peer is built only when asked for, so a missing package
only makes its row n/a.
"""

from __future__ import annotations

import os
from typing import Any

URL = os.environ.get("RINGBUS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def add(task: tuple[int, int]) -> int:
    return task[0] + task[1]


def make_celery() -> Any:
    from celery import Celery

    app = Celery("ringbus_bench", broker=URL, backend=URL)
    app.conf.update(
        task_serializer="pickle",
        result_serializer="pickle",
        accept_content=["pickle"],
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    app.task(name="add")(add)
    return app


def make_huey() -> tuple[Any, Any]:
    """The huey instance and its task (calling the task enqueues it)."""
    from huey import RedisHuey

    # notify_result: a waiting caller blocks on a list instead of polling.
    huey = RedisHuey("ringbus-bench", url=URL, results=True, notify_result=True)
    return huey, huey.task(name="add")(add)


def make_dramatiq() -> Any:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.results import Results
    from dramatiq.results.backends import RedisBackend

    broker = RedisBroker(url=URL)
    broker.add_middleware(Results(backend=RedisBackend(url=URL)))
    dramatiq.set_broker(broker)
    actor: Any = dramatiq.actor(actor_name="add", store_results=True)
    return actor(add)


_which = os.environ.get("RINGBUS_BENCH_PEER", "")
celery_app = make_celery() if _which == "celery" else None
huey_app = make_huey()[0] if _which == "huey" else None
dramatiq_add = make_dramatiq() if _which == "dramatiq" else None
