"""Argument converters shared by the ``ringbus`` commands (argparse ``type=``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["float_above", "float_at_least", "int_at_least", "queue_list"]


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, not {value}")
        return value

    return convert


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def float_above(low: float) -> Callable[[str], float]:
    """A number > ``low``."""

    def convert(text: str) -> float:
        value = _float(text)
        if not value > low:
            raise argparse.ArgumentTypeError(f"must be > {low:g}, not {value}")
        return value

    return convert


def float_at_least(low: float) -> Callable[[str], float]:
    """A number >= ``low``."""

    def convert(text: str) -> float:
        value = _float(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, not {value}")
        return value

    return convert


def queue_list(text: str) -> list[str]:
    """Comma-separated queue names (``--queues mail,default``)."""
    from ringbus._names import validate_queue_name

    names = [q.strip() for q in text.split(",") if q.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one queue")
    try:
        return [validate_queue_name(q) for q in names]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
