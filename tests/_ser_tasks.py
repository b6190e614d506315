"""Task types and handlers for the serializer and signing tests: a dataclass
with a subclass, a msgspec Struct, a tuple, and a task whose
only effect is a file (to tell that something ran, or did not)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from ringbus import TaskBus


@dataclass
class Order:
    id: int
    qty: int
    note: str = ""  # a file to write the decoded type's name into


@dataclass
class RushOrder(Order):
    """Not registered: served by Order's handler."""

    rush: bool = True


class Point(msgspec.Struct):
    x: int
    y: int


@dataclass
class Touch:
    path: str


def order(task: Order) -> dict[str, Any]:
    if task.note:
        Path(task.note).write_text(type(task).__name__)
    return {"type": type(task).__name__, "total": task.id * task.qty}


def point(task: Point) -> list[Any]:
    return [task.x, task.y, type(task).__name__]


def pair(task: tuple[int, int]) -> int:
    return task[0] + task[1]


def touch(task: Touch) -> str:
    Path(task.path).write_text("ran")
    return "ran"


def make_ser_bus(name: str, **kwargs: Any) -> TaskBus:
    bus = TaskBus(name, **kwargs)
    bus.register(Order, order)
    bus.register(Point, point, name="test.point")  # a short name for other languages
    bus.register(tuple, pair)
    bus.register(Touch, touch)
    return bus


class Evil:
    """Unpickling it creates the file ``path`` (what a forged pickle could do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mknod, (self.path,))


def evil_pickle(path: str) -> bytes:
    return pickle.dumps(Evil(path), 5)
