"""Exceptions shared by every layer (pure Python so the extension can import them)."""

from __future__ import annotations

__all__ = ["MessageTooLarge", "RingClosed", "RingError"]


class RingError(OSError):
    """A shared-memory ring could not be created, attached or used.

    The message says which: missing, truncated, foreign (wrong magic),
    newer/older layout, other user, unsafe permissions, bad name, no space.
    """


class MessageTooLarge(ValueError):
    """A message exceeds the ring's ``max_message_size`` (both sizes are named)."""

    def __init__(self, size: int, limit: int, name: str = "") -> None:
        where = f" of ring {name}" if name else ""
        super().__init__(
            f"message of {size} bytes exceeds max_message_size={limit} bytes{where}"
        )
        self.size = size
        self.limit = limit


class RingClosed(ValueError):
    """The handle was closed (message contains "is closed", like multiprocessing)."""
