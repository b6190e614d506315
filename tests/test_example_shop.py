"""An app's own tests, written once against the bus they are given, run
against the inline bus (test mode) and against a real pool of workers."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

import example_shop
from example_shop import Order, checkout, receipt
from ringbus import TaskBus, Unrecoverable, current_task
from ringbus.testing.pytest_plugin import ringbus_inline_bus, ringbus_pool  # noqa: F401


@pytest.fixture(params=["inline", "pool"])
def shop(
    request: pytest.FixtureRequest,
    ringbus_inline_bus: Callable[..., TaskBus],  # noqa: F811
    ringbus_pool: Callable[..., TaskBus],  # noqa: F811
) -> TaskBus:
    if request.param == "inline":
        return ringbus_inline_bus(example_shop.bus)
    return ringbus_pool(example_shop.bus, workers=1)


def test_checkout_then_receipt(shop: TaskBus) -> None:
    tid = checkout(shop, Order(1, ["book", "pen"]))
    assert receipt(shop, tid) == "order 1: 2 items, attempt 1"
    status = shop.status(tid)
    assert status.state == "done" and status.progress == 0.5 and status.message == "charging"


def test_a_flaky_provider_is_retried(shop: TaskBus) -> None:
    fut = shop.dispatch(Order(2, ["lamp"], flaky=True))
    assert fut.result(timeout=60) == "order 2: 1 items, attempt 2"
    assert shop.status(fut.task_id).attempt == 2


def test_an_empty_order_fails_and_is_dead_lettered(shop: TaskBus) -> None:
    fut = shop.dispatch(Order(3))
    with pytest.raises(Unrecoverable, match="empty"):
        fut.result(timeout=60)
    assert shop.status(fut.task_id).state == "failed"
    with pytest.raises(Unrecoverable):
        shop.result(fut.task_id)
    assert [d.task_type for d in shop.dead_letters()] == ["example_shop.Order"]


def test_an_unpicklable_order_fails_at_dispatch(shop: TaskBus) -> None:
    with pytest.raises(TypeError, match="pickle"):
        shop.dispatch(Order(4, [threading.Lock()]))


def test_a_delayed_order_can_be_cancelled(shop: TaskBus) -> None:
    tid = shop.send(Order(5, ["x"]), delay=3600)
    assert shop.status(tid).state == "scheduled"
    assert shop.cancel(tid) is True
    assert shop.status(tid).state == "cancelled"


def test_current_task_outside_a_handler() -> None:
    with pytest.raises(RuntimeError, match="only available inside"):
        current_task()
