"""Task types and handlers for the task-layer tests (importable by workers and
by ``ringbus worker _tasks_basic:bus``)."""

from __future__ import annotations

import abc
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ringbus import Queue, TaskBus


@dataclass
class Add:
    a: int
    b: int


@dataclass
class Echo:
    value: object


class Animal:
    pass


class Dog(Animal):
    pass


class Puppy(Dog):
    pass


class Shape(abc.ABC):
    @abc.abstractmethod
    def area(self) -> float: ...


class Circle:  # registered as a virtual subclass of Shape below
    def area(self) -> float:
        return 3.0


Shape.register(Circle)


@dataclass
class Fail:
    kind: str


@dataclass
class Sleep:
    seconds: float
    marker: str = ""  # a file written when the handler finishes
    started: str = ""  # a file written when the handler starts


@dataclass
class Touch:
    path: str
    content: str = "done"


@dataclass
class WhoAmI:
    pass


@dataclass
class Victim:
    """Reports its worker's pid on a ringbus queue, then hangs (to be killed)."""

    report_to: str


class Unpicklable(Exception):
    """Its args hold a lock: it cannot be pickled."""


class NeedsTwoArgs(Exception):
    """Pickles, but cannot be rebuilt from its args (the caller gets TaskFailed)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def add(task: Add) -> int:
    return task.a + task.b


def echo(task: Echo) -> object:
    return task.value


def animal(task: Animal) -> str:
    return "animal"


def dog(task: Dog) -> str:
    return "dog"


def shape(task: Shape) -> str:
    return f"shape {task.area()}"


def fail(task: Fail) -> object:
    if task.kind == "value":
        raise ValueError("boom from the handler")
    if task.kind == "unpicklable":
        raise Unpicklable("cannot travel", threading.Lock())
    if task.kind == "needs-two":
        raise NeedsTwoArgs(1, 2)
    if task.kind == "result":
        return threading.Lock()
    if task.kind == "exit":
        raise SystemExit(3)
    raise AssertionError(task.kind)


def sleep(task: Sleep) -> int:
    if task.started:
        Path(task.started).write_text(str(os.getpid()))
    time.sleep(task.seconds)
    if task.marker:
        Path(task.marker).write_text(str(os.getpid()))
    return os.getpid()


def touch(task: Touch) -> str:
    Path(task.path).write_text(task.content)
    return task.path


def whoami(task: WhoAmI) -> int:
    return os.getpid()


def victim(task: Victim) -> None:
    q = Queue.attach(task.report_to)
    q.put(os.getpid())
    q.close()
    time.sleep(120)


def make_bus(name: str, **kwargs: object) -> TaskBus:
    bus = TaskBus(name, **kwargs)  # type: ignore[arg-type]
    bus.register(Add, add)
    bus.register(Echo, echo)
    bus.register(Animal, animal)
    bus.register(Dog, dog)
    bus.register(Shape, shape)
    bus.register(Fail, fail)
    bus.register(Sleep, sleep)
    bus.register(Touch, touch)
    bus.register(WhoAmI, whoami)
    # No redelivery: tests of WorkerLost kill the worker once (test_redelivery.py
    # covers retries and redelivery).
    bus.register(Victim, victim, retries=0)
    return bus


# For `ringbus worker _tasks_basic:bus` in a subprocess: the test picks the name.
bus = make_bus(os.environ.get("RINGBUS_TEST_BUS", "ringbus-test-default"))
