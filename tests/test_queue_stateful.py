"""Hypothesis state machine: a ringbus.Queue against a collections.deque model of its slots.

The model implements the geometry contract exactly: a message of L bytes takes
k = max(1, ceil(L / slot_size)) slots; one that would cross the end of the slot
array is preceded by padding to the end; with limit = maxsize if 0 < maxsize <
capacity else capacity, a put needing `need` slots (padding + k) at tail t with
head h fits iff (t-h)+need <= capacity and ((t-h)+need <= limit or t == h);
full() <=> (t-h) >= limit; qsize() counts messages.  Batch puts queue the
longest prefix that fits and report it in queue.Full.done.  The small slot size
and message limits make multi-slot messages and wrap padding common.
"""

from __future__ import annotations

import math
import os
import queue
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ringbus import DEFAULT_CAPACITY, MessageTooLarge, Queue
from ringbus._ring import _encode

SLOT = 64
MAX_MESSAGE_SIZES = [1, 40, SLOT, SLOT + 1, 3 * SLOT, 5 * SLOT - 7, 8 * SLOT]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def expected_capacity(maxsize: int, slot: int, max_msg: int) -> int:
    return max(next_pow2(maxsize or DEFAULT_CAPACITY), next_pow2(2 * math.ceil(max_msg / slot)))


@dataclass
class Msg:
    raw: bytes  # the bytes in the ring
    pickled: bool  # put with the serializer (raw is the message it wrote)
    obj: Any  # the object put (pickled messages)
    need: int  # slots taken, padding included


class Model:
    """The ring's documented slot accounting, with FIFO content in a deque."""

    def __init__(
        self,
        capacity: int,
        maxsize: int,
        slot: int,
        max_msg: int,
        note: Callable[[str], object] = lambda _: None,
    ) -> None:
        self.note = note  # hypothesis.event inside the state machine: coverage statistics
        self.cap = capacity
        self.limit = maxsize if 0 < maxsize < capacity else capacity
        self.slot = slot
        self.max_msg = max_msg
        self.head = 0
        self.tail = 0
        self.items: deque[Msg] = deque()

    def need(self, size: int, tail: int) -> int:
        k = max(1, math.ceil(size / self.slot))
        idx = tail % self.cap
        pad = self.cap - idx if idx + k > self.cap else 0
        return pad + k

    def fits(self, size: int) -> bool:
        used = self.tail - self.head
        need = self.need(size, self.tail)
        return used + need <= self.cap and (used + need <= self.limit or used == 0)

    def put(self, raw: bytes, pickled: bool = False, obj: Any = None) -> bool:
        if not self.fits(len(raw)):
            return False
        need = self.need(len(raw), self.tail)
        k = max(1, math.ceil(len(raw) / self.slot))
        self.note("multi-slot message" if k > 1 else "one-slot message")
        if need > k:
            self.note("padding at the wrap")
        if self.tail - self.head + need > self.limit:
            self.note("admitted past the soft limit into an empty ring")
        self.items.append(Msg(raw, pickled, obj, need))
        self.tail += need
        return True

    def put_prefix(self, raws: list[bytes], pickled: bool, objs: list[Any]) -> int:
        """Queue the longest prefix that fits; return its length."""
        for i, raw in enumerate(raws):
            if not self.put(raw, pickled, objs[i]):
                return i
        return len(raws)

    def pop(self) -> Msg:
        m = self.items.popleft()
        self.head += m.need
        return m

    def leading_pickled(self) -> int:
        n = 0
        for m in self.items:
            if not m.pickled:
                break
            n += 1
        return n

    def full(self) -> bool:
        return self.tail - self.head >= self.limit


def payload(n: int, salt: int) -> bytes:
    """n bytes whose content depends on salt, so a misplaced message is seen."""
    return bytes((salt + i * 7) % 256 for i in range(n))


class RingMachine(RuleBasedStateMachine):
    """Drives one queue with non-blocking (or tiny-timeout) calls; compares with Model."""

    q: Queue
    model: Model
    counter: int

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0

    def setup(self, maxsize: int, max_msg: int) -> None:
        name = f"/ringbus-test-{os.getpid()}-sm-{uuid.uuid4().hex[:12]}"  # conftest's prefix
        self.q = Queue(maxsize, name=name, slot_size=SLOT, max_message_size=max_msg)
        cap = self.q.capacity
        assert cap == expected_capacity(maxsize, SLOT, max_msg)
        assert self.q.slot_size == SLOT
        assert self.q.max_message_size == max_msg
        self.model = Model(cap, maxsize, SLOT, max_msg, event)
        assert self.q.maxsize == self.model.limit

    def teardown(self) -> None:
        if hasattr(self, "q"):
            self.q.close()

    # ---------------------------------------------------------- helpers

    def fresh(self, size: int) -> bytes:
        self.counter += 1
        return payload(size, self.counter)

    def obj_of_size(self, size: int) -> tuple[Any, bytes]:
        """An object whose message is about `size` bytes: every other one a
        tuple the default serializer writes in its short form, the others a
        dict it pickles."""
        self.counter += 1
        blob = payload(max(0, size - 24), self.counter)
        obj: Any = (self.counter, blob) if self.counter % 2 else {self.counter: blob}
        return obj, _encode(obj)

    def sizes(self) -> st.SearchStrategy[int]:
        return st.integers(0, self.model.max_msg)

    # ---------------------------------------------------------- puts

    @rule(data=st.data(), how=st.sampled_from(["block_false", "nowait", "timeout"]))
    def put_bytes(self, data: st.DataObject, how: str) -> None:
        raw = self.fresh(data.draw(self.sizes(), label="size"))
        expect = self.model.fits(len(raw))
        try:
            if how == "timeout":
                self.q.put_bytes(raw, timeout=0.001)
            else:
                self.q.put_bytes(raw, block=False)
        except queue.Full:
            assert not expect, f"Full for {len(raw)} bytes where the model has room"
        else:
            assert expect, f"put {len(raw)} bytes where the model has no room"
            self.model.put(raw)

    @rule(data=st.data(), how=st.sampled_from(["put", "put_nowait", "timeout"]))
    def put_object(self, data: st.DataObject, how: str) -> None:
        obj, raw = self.obj_of_size(data.draw(self.sizes(), label="size"))
        if len(raw) > self.model.max_msg:
            with pytest.raises(MessageTooLarge):
                self.q.put(obj, block=False)
            return
        expect = self.model.fits(len(raw))
        try:
            if how == "put":
                self.q.put(obj, block=False)
            elif how == "put_nowait":
                self.q.put_nowait(obj)
            else:
                self.q.put(obj, True, 0.001)
        except queue.Full:
            assert not expect
        else:
            assert expect
            self.model.put(raw, True, obj)

    @rule(data=st.data(), n=st.integers(0, 6), timeout=st.booleans())
    def put_bytes_many(self, data: st.DataObject, n: int, timeout: bool) -> None:
        raws = [self.fresh(data.draw(self.sizes(), label="size")) for _ in range(n)]
        done = self.model.put_prefix(raws, False, [None] * n)
        try:
            if timeout:
                self.q.put_bytes_many(raws, timeout=0.001)
            else:
                self.q.put_bytes_many(iter(raws), block=False)
        except queue.Full as exc:
            assert done < n
            assert exc.done == done  # type: ignore[attr-defined]
        else:
            assert done == n

    @rule(data=st.data(), n=st.integers(0, 6))
    def put_many(self, data: st.DataObject, n: int) -> None:
        pairs = [self.obj_of_size(data.draw(self.sizes(), label="size")) for _ in range(n)]
        if any(len(raw) > self.model.max_msg for _, raw in pairs):
            before = self.q.qsize()
            with pytest.raises(MessageTooLarge):
                self.q.put_many([o for o, _ in pairs], block=False)
            assert self.q.qsize() == before
            return
        done = self.model.put_prefix([r for _, r in pairs], True, [o for o, _ in pairs])
        try:
            self.q.put_many((o for o, _ in pairs), block=False)
        except queue.Full as exc:
            assert done < n
            assert exc.done == done  # type: ignore[attr-defined]
        else:
            assert done == n

    @rule(data=st.data(), batch=st.booleans())
    def too_large_changes_nothing(self, data: st.DataObject, batch: bool) -> None:
        limit = self.model.max_msg
        size = data.draw(st.integers(limit + 1, limit + 3 * SLOT), label="size")
        before = self.q.qsize()
        with pytest.raises(MessageTooLarge) as info:
            if batch:
                self.q.put_bytes_many([b"k", bytes(size), b"k"], block=False)
            else:
                self.q.put_bytes(bytes(size), block=False)
        assert str(size) in str(info.value) and str(limit) in str(info.value)
        assert isinstance(info.value, ValueError)
        assert self.q.qsize() == before

    # ---------------------------------------------------------- gets

    @precondition(lambda self: len(self.model.items) > 0)
    @rule(timeout=st.booleans())
    def get_bytes(self, timeout: bool) -> None:
        got = self.q.get_bytes(timeout=0.5) if timeout else self.q.get_bytes(block=False)
        assert got == self.model.pop().raw

    @precondition(lambda self: len(self.model.items) > 0)
    @rule(n=st.integers(1, 10))
    def get_bytes_many(self, n: int) -> None:
        got = self.q.get_bytes_many(n, block=False)
        want = [self.model.pop().raw for _ in range(min(n, len(self.model.items)))]
        assert got == want

    @precondition(lambda self: self.model.leading_pickled() > 0)
    @rule(how=st.sampled_from(["get", "get_nowait", "timeout"]))
    def get_object(self, how: str) -> None:
        if how == "get":
            got = self.q.get(block=False)
        elif how == "get_nowait":
            got = self.q.get_nowait()
        else:
            got = self.q.get(timeout=0.5)
        assert got == self.model.pop().obj

    @precondition(lambda self: self.model.leading_pickled() > 0)
    @rule(data=st.data())
    def get_many(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, self.model.leading_pickled()), label="n")
        got = self.q.get_many(n, block=False)
        assert got == [self.model.pop().obj for _ in range(n)]

    @precondition(lambda self: len(self.model.items) == 0)
    @rule(which=st.sampled_from(["get", "get_bytes", "get_many", "get_bytes_many", "timeout"]))
    def get_from_empty(self, which: str) -> None:
        with pytest.raises(queue.Empty):
            if which == "get":
                self.q.get_nowait()
            elif which == "get_bytes":
                self.q.get_bytes(block=False)
            elif which == "get_many":
                self.q.get_many(3, block=False)
            elif which == "get_bytes_many":
                self.q.get_bytes_many(3, block=False)
            else:
                self.q.get(timeout=0.001)

    # ---------------------------------------------------------- invariants

    @invariant()
    def sizes_agree(self) -> None:
        if not hasattr(self, "q"):
            return
        assert self.q.qsize() == len(self.model.items)
        assert self.q.empty() == (len(self.model.items) == 0)
        assert self.q.full() == self.model.full()


class AnyMaxsize(RingMachine):
    """maxsize from 8 to 32 with assorted max_message_size (limit < capacity or not)."""

    @initialize(maxsize=st.integers(8, 32), max_msg=st.sampled_from(MAX_MESSAGE_SIZES))
    def create(self, maxsize: int, max_msg: int) -> None:
        self.setup(maxsize, max_msg)


class SoftLimit(RingMachine):
    """maxsize strictly below capacity: the soft limit decides, except on an empty ring."""

    @initialize(maxsize=st.integers(2, 15), max_msg=st.sampled_from([5 * SLOT, 8 * SLOT]))
    def create(self, maxsize: int, max_msg: int) -> None:
        self.setup(maxsize, max_msg)
        assert 0 < maxsize < self.q.capacity
        assert self.model.limit == maxsize


_settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
AnyMaxsize.TestCase.settings = _settings
SoftLimit.TestCase.settings = _settings
TestAnyMaxsize = AnyMaxsize.TestCase
TestSoftLimit = SoftLimit.TestCase


def test_model_pads_at_the_wrap() -> None:
    """The model itself: a 3-slot message at index 6 of 8 pads 2 slots (guards the oracle)."""
    m = Model(8, 8, SLOT, 3 * SLOT)
    for _ in range(6):
        assert m.put(b"x")
    for _ in range(6):
        m.pop()
    assert m.need(3 * SLOT, m.tail) == 2 + 3
    assert m.put(bytes(3 * SLOT))
    assert m.tail - m.head == 5
    soft = Model(16, 4, SLOT, 5 * SLOT)
    assert soft.put(bytes(5 * SLOT))  # empty ring: the soft limit does not apply
    assert not soft.put(b"")
    assert soft.full()
