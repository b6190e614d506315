"""Transport specs (None, ``"shm"``, a URL or an instance) -> a Transport."""

from __future__ import annotations

from ringbus.transport.base import Transport

__all__ = ["make_transport"]


def make_transport(spec: Transport | str | None) -> Transport:
    """``None`` or ``"shm"`` -> shared memory; ``"inline"`` -> the test mode;
    a ``Transport`` as is; URLs by scheme."""
    if isinstance(spec, Transport):
        return spec
    if spec == "inline":  # the test mode: handlers run in the dispatching process
        from ringbus.transport.inline import InlineTransport

        return InlineTransport()
    if spec is None or spec in ("shm", "shm://"):
        from ringbus.transport.shm import ShmTransport

        return ShmTransport()
    if isinstance(spec, str):
        if spec.startswith(
            ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        ):
            try:
                from ringbus.transport.redis import RedisTransport
            except ImportError as exc:
                raise ValueError(f"the Redis transport is not available: {exc}") from exc
            return RedisTransport(spec)
        raise ValueError(f"unknown transport {spec!r}: use None, 'shm', 'inline' or a redis:// URL")
    raise TypeError(f"transport must be a Transport, a URL or None, not {type(spec).__name__}")
