"""Payload formats: pickle, and msgpack / JSON through msgspec.

A format turns a task, a result value or a handler's exception into the
bytes after an envelope's header and back; ``codec.py`` puts them in
envelopes.  Bytes of a msgspec task payload::

    0   1  type name length n (1..255)
    1   n  type name (UTF-8), e.g. ``shop.tasks.SendEmail``
    1+n    the task as a msgpack / JSON document

The type name is the registered name of the task's class (``module.QualName``
unless the handler was registered with ``name=``).  A task whose class is a
subclass of the registered one travels as ``"<its name> <registered name>"``:
a worker decodes it into the first of those it knows (a registered type, or
a class of a module the worker has already imported that resolves to a
handler; nothing is imported on behalf of a message), so a subclass arrives
as itself where it is known and as the registered type (its extra fields
dropped) elsewhere.  Decoding validates: a payload that does not match the
type raises ``CodecError`` with msgspec's message; the handler never sees it.

Results decode as plain msgspec values (dicts, lists, ...).  An exception
travels as ``{"type": "module.QualName", "message": str(exc), "traceback": text}``
and comes back as that builtin or ringbus exception when it is one, else as
``RemoteError``; the worker's traceback is its ``__cause__``.
"""

from __future__ import annotations

import pickle
import sys
import time
from typing import Any

from ringbus.errors import CodecError, RemoteError, RemoteTraceback, TaskFailed
from ringbus.tasks.envelope import NO_ID, TASK_HEADER
from ringbus.tasks.handlers import HandlerRegistry

__all__ = ["FORMATS", "SER_JSON", "SER_MSGPACK", "SER_PICKLE", "MsgspecFormat", "PickleFormat"]

SER_PICKLE, SER_MSGPACK, SER_JSON = 0, 1, 2
FORMATS = {"pickle": SER_PICKLE, "msgpack": SER_MSGPACK, "json": SER_JSON}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}

env_pack_task = TASK_HEADER.pack
_dumps = pickle.dumps
_loads = pickle.loads
# Below this size a bytes slice (one small copy) is cheaper than a memoryview.
_VIEW_FROM = 4096


def _view(data: bytes, start: int, end: int) -> Any:
    if end - start < _VIEW_FROM:
        return data[start:end]
    return memoryview(data)[start:end]


def _remote(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


class PickleFormat:
    """Any picklable object; only for peers that trust each other."""

    kind = SER_PICKLE

    def encode_task(self, task: Any) -> bytes:
        return _dumps(task, 5)

    def decode_task(self, data: bytes, start: int, end: int) -> Any:
        return _loads(_view(data, start, end))

    def encode_value(self, value: Any) -> bytes:
        return _dumps(value, 5)

    def decode_value(self, data: bytes, start: int, end: int) -> Any:
        return _loads(_view(data, start, end))

    def encode_error(self, exc: BaseException, tb: str) -> bytes:
        return _dumps((exc, tb), 5)

    def decode_error(self, data: bytes, start: int, end: int) -> BaseException:
        try:
            remote, tb = _loads(_view(data, start, end))
        except Exception as uerr:
            return TaskFailed(
                f"the task raised an exception that could not be unpickled here: {uerr!r}"
            )
        if not isinstance(remote, BaseException):
            return TaskFailed(f"malformed error result: {remote!r}")
        return _remote(remote, tb)


def _find_class(name: str) -> type | None:
    """``module.QualName`` of a module already imported (never imports)."""
    at = len(name)
    while (at := name.rfind(".", 0, at)) > 0:
        mod = sys.modules.get(name[:at])
        if mod is None:
            continue
        obj: Any = mod
        for part in name[at + 1 :].split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, type) else None
    return None


_MAX_DECODERS = 1024
_REBUILT = ("builtins", "ringbus.errors")  # exception classes rebuilt by name


class MsgspecFormat:
    """msgpack or JSON through msgspec, typed by the registry's handlers.

    Encoders and decoders are made once (per type for decoders) and kept.
    """

    def __init__(self, kind: int, registry: HandlerRegistry) -> None:
        try:
            import msgspec
        except ImportError as exc:  # an optional dependency
            raise ImportError(
                "serializer='msgpack' or 'json' needs msgspec: pip install 'ringbus[msgpack]'"
            ) from exc
        self.kind = kind
        self._ms = msgspec
        mod: Any = msgspec.json if kind == SER_JSON else msgspec.msgpack
        self._mod = mod
        self._encode = mod.Encoder().encode
        self._any = mod.Decoder().decode
        self._registry = registry
        self._prefix: dict[type, bytes] = {}
        self._decoders: dict[bytes, Any] = {}
        self._errors = (msgspec.ValidationError, msgspec.DecodeError)

    def clear(self) -> None:
        """The registry changed: names and types may mean something else now."""
        self._prefix.clear()  # in place: encoders made by ``task_encoder`` hold it
        self._decoders.clear()

    # ------------------------------------------------------------ tasks

    def _name_of(self, cls: type) -> bytes:
        reg = self._registry
        base = reg.registered_type(cls)  # NoHandlerError when none
        name = reg.type_name(cls)
        if base is not cls and base is not object:
            name = f"{name} {reg.type_name(base)}"
        raw = name.encode("utf-8")
        if not 0 < len(raw) < 256:
            raise CodecError(f"task type name {name!r} is longer than 255 bytes")
        prefix = bytes((len(raw),)) + raw
        self._prefix[cls] = prefix
        return prefix

    def encode_task(self, task: Any) -> bytes:
        prefix = self._prefix.get(type(task)) or self._name_of(type(task))
        try:
            return prefix + self._encode(task)
        except (TypeError, ValueError, OverflowError) as exc:
            kind = FORMAT_NAMES[self.kind]
            raise CodecError(
                f"task of type {type(task).__qualname__} cannot be encoded as {kind}: {exc}"
            ) from None

    def task_encoder(self, magic: int, bits: int) -> Any:
        """``Codec.encode_task`` for unsigned envelopes of this format, in one
        frame (a dispatch's own cost is a few microseconds: calls count)."""
        prefixes, name_of, enc, encode_task = (
            self._prefix,
            self._name_of,
            self._encode,
            self.encode_task,
        )
        pack = env_pack_task
        now = time.time  # the enqueued-at field

        def encode(
            task: Any,
            tid: int,
            flags: int,
            pid: int,
            reply: bytes,
            deadline: float = 0.0,
            wall: float = 0.0,
            gid: bytes = NO_ID,
        ) -> bytes:
            prefix = prefixes.get(type(task))
            if prefix is None:
                prefix = name_of(type(task))
            head = pack(magic, flags | bits, 1, pid, tid, deadline, wall, len(reply), gid, now())
            try:
                return head + reply + prefix + enc(task)
            except Exception:
                return head + reply + encode_task(task)  # raises CodecError

        return encode

    def _decoder(self, raw: bytes) -> Any:
        for name in raw.decode("utf-8", "replace").split(" "):
            cls = self._known(name)
            if cls is None:
                continue
            try:
                decoder = self._mod.Decoder(cls).decode
            except TypeError as exc:
                raise CodecError(f"msgspec cannot decode into {name}: {exc}") from None
            if len(self._decoders) >= _MAX_DECODERS:  # names are the senders' to choose
                self._decoders.clear()
            entry = self._decoders[raw] = (cls, decoder)
            return entry
        raise CodecError(f"unknown task type {raw.decode('utf-8', 'replace')!r}: no handler")

    def _known(self, name: str) -> type | None:
        reg = self._registry
        for t in list(reg._handlers):
            if reg.type_name(t) == name:
                return t
        cls = _find_class(name)
        if cls is None:
            return None
        try:
            reg.registered_type(cls)
        except LookupError:
            return None
        return cls

    def decode_task(self, data: bytes, start: int, end: int) -> Any:
        if start >= end:
            raise CodecError("empty task payload")
        n = data[start]
        raw = data[start + 1 : start + 1 + n]
        entry = self._decoders.get(raw) or self._decoder(raw)
        try:
            return entry[1](_view(data, start + 1 + n, end))
        except self._errors as exc:
            what = entry[0].__qualname__
            raise CodecError(f"task payload does not match {what}: {exc}") from None

    # ------------------------------------------------------------ results

    def encode_value(self, value: Any) -> bytes:
        return self._encode(value)

    def decode_value(self, data: bytes, start: int, end: int) -> Any:
        return self._any(_view(data, start, end))

    def decode_bytes(self, data: bytes) -> Any:
        """A whole document (the reader's fast path for OK results)."""
        return self._any(data)

    def encode_error(self, exc: BaseException, tb: str) -> bytes:
        cls = type(exc)
        try:
            message = str(exc)
        except Exception:
            message = repr(exc)
        return self._encode(
            {"type": f"{cls.__module__}.{cls.__qualname__}", "message": message, "traceback": tb}
        )

    def decode_error(self, data: bytes, start: int, end: int) -> BaseException:
        try:
            body = self._any(_view(data, start, end))
            type_name, message = str(body["type"]), str(body["message"])
            tb = str(body.get("traceback", ""))
        except Exception as exc:
            return TaskFailed(f"malformed error result: {exc!r}")
        mod, _, qual = type_name.rpartition(".")
        cls = getattr(sys.modules[mod], qual, None) if mod in _REBUILT else None
        rebuilt: BaseException | None = None
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                rebuilt = cls(message)
            except Exception:  # needs other arguments
                rebuilt = None
        return _remote(rebuilt or RemoteError(type_name, message), tb)


def make_format(kind: int, registry: HandlerRegistry) -> PickleFormat | MsgspecFormat:
    return PickleFormat() if kind == SER_PICKLE else MsgspecFormat(kind, registry)
