"""The serializers a Queue takes by name: "pickle" (the default), "msgpack"
and "json" (the last two through msgspec, the optional extra ``msgpack``)."""

from __future__ import annotations

from typing import Any

NAMES = ("pickle", "msgpack", "json")


class MsgspecSerializer:
    """msgpack or JSON through msgspec, with the dumps/loads of any serializer.

    Messages are plain msgpack or JSON (no tag byte), so a consumer in
    another language can read them with get_bytes.
    """

    __slots__ = ("dumps", "loads", "name")

    def __init__(self, name: str) -> None:
        try:
            import msgspec
        except ImportError as exc:
            raise ImportError(
                f"serializer={name!r} needs msgspec: pip install 'ringbus[msgpack]'"
            ) from exc
        mod: Any = msgspec.msgpack if name == "msgpack" else msgspec.json
        self.name = name
        self.dumps = mod.Encoder().encode
        self.loads = mod.Decoder().decode

    def __repr__(self) -> str:
        return f"<MsgspecSerializer {self.name}>"


def resolve_serializer(serializer: Any) -> Any:
    """None for the default (tagged pickle) format, else an object with
    dumps/loads; ValueError or TypeError for anything else."""
    if serializer is None or serializer == "pickle":
        return None
    if isinstance(serializer, str):
        if serializer in NAMES:
            return MsgspecSerializer(serializer)
        raise ValueError(
            f"unknown serializer {serializer!r}: use one of {', '.join(map(repr, NAMES))} "
            "or an object with dumps(obj) and loads(data) methods"
        )
    if not (hasattr(serializer, "dumps") and hasattr(serializer, "loads")):
        raise TypeError("serializer must have dumps(obj) and loads(data) methods")
    return serializer
