"""A tiny app that uses ringbus, for ``test_example_shop.py``: its own test
suite runs against the inline bus and against a real pool, unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

from ringbus import TaskBus, Unrecoverable, current_task

bus = TaskBus("example-shop")


@dataclass
class Order:
    id: int
    items: list[object] = field(default_factory=list)
    flaky: bool = False  # the payment provider fails the first attempt


@bus.handler(Order, retries=2, backoff=0.01, keep_result=60)
def place_order(order: Order) -> str:
    ctx = current_task()
    if not order.items:
        raise Unrecoverable(f"order {order.id} is empty")
    ctx.set_progress(0.5, "charging")
    if order.flaky and ctx.attempt == 1:
        raise ConnectionError("payment provider timed out")
    return f"order {order.id}: {len(order.items)} items, attempt {ctx.attempt}"


def checkout(tasks: TaskBus, order: Order) -> str:
    """What the web handler does: queue the order, answer with its id."""
    return tasks.send(order)


def receipt(tasks: TaskBus, task_id: str) -> str:
    """What the receipt page does: the result by id, from any process."""
    value: str = tasks.result(task_id, timeout=60)
    return value
