"""Functions for the RingExecutor conformance tests (pickled by reference)."""

from __future__ import annotations

import os
import time
from pathlib import Path

INIT_VALUE: str | None = None


def mul(a: int, b: int) -> int:
    return a * b


def square(x: int) -> int:
    return x * x


def slow_identity(x: float) -> float:
    time.sleep(x)
    return x


def raise_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise ZeroDivisionError(f"bad {x}")
    return x


def pid(_: object = None) -> int:
    return os.getpid()


def kwargs_echo(*args: object, **kwargs: object) -> tuple[object, ...]:
    return (args, sorted(kwargs.items()))


def touch_after(path: str, seconds: float) -> str:
    time.sleep(seconds)
    Path(path).write_text("ran")
    return path


def init(value: str) -> None:
    global INIT_VALUE
    INIT_VALUE = value


def get_init_value() -> str | None:
    return INIT_VALUE


def failing_init() -> None:
    raise RuntimeError("initializer failed on purpose")


def hang_and_report(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(120)
