"""Hypothesis state machine: ringbus.Queue against a model of its slots.

The model is the documented contract: FIFO order, a message of L bytes takes
max(1, ceil(L / slot_size)) slots, a record that would cross the end of the
array first pads to the end, a put fits when the slots are free and the soft
maxsize allows it (or the ring is empty), qsize counts messages.
"""

from __future__ import annotations

import math
import queue
from collections import deque

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ringbus import MessageTooLarge, Queue

SLOT = 64
MAX_MSG = 4 * SLOT  # a largest message takes 4 slots


class Model:
    def __init__(self, capacity: int, maxsize: int) -> None:
        self.cap = capacity
        self.limit = maxsize if 0 < maxsize < capacity else capacity
        self.tail = self.head = 0
        self.items: deque[tuple[bytes, int]] = deque()  # (payload, slots incl. padding)

    def need(self, size: int) -> int:
        k = max(1, math.ceil(size / SLOT))
        idx = self.tail % self.cap
        return k + (self.cap - idx if idx + k > self.cap else 0)

    def fits(self, size: int) -> bool:
        used, need = self.tail - self.head, self.need(size)
        return used + need <= self.cap and (used + need <= self.limit or used == 0)

    def put(self, data: bytes) -> bool:
        if not self.fits(len(data)):
            return False
        need = self.need(len(data))
        self.items.append((data, need))
        self.tail += need
        return True

    def get(self) -> bytes:
        data, need = self.items.popleft()
        self.head += need
        return data


payloads = st.one_of(
    st.binary(max_size=SLOT),  # one slot
    st.binary(min_size=SLOT + 1, max_size=MAX_MSG),  # several slots
    st.integers(0, MAX_MSG).map(lambda n: bytes([n % 251]) * n),
)


class QueueMachine(RuleBasedStateMachine):
    q: Queue
    model: Model

    @initialize(maxsize=st.sampled_from([8, 16, 5, 11]))
    def create(self, maxsize: int) -> None:
        self.q = Queue(maxsize, slot_size=SLOT, max_message_size=MAX_MSG)
        self.model = Model(self.q.capacity, maxsize)
        assert self.q.capacity == max(1 << (maxsize - 1).bit_length(), 8)

    def teardown(self) -> None:
        if hasattr(self, "q"):
            self.q.close()

    @rule(data=payloads)
    def put_bytes(self, data: bytes) -> None:
        expect = self.model.fits(len(data))
        try:
            self.q.put_bytes(data, block=False)
            assert expect, "put succeeded where the model has no room"
            self.model.put(data)
        except queue.Full:
            assert not expect, "put refused where the model has room"

    @rule(data=payloads)
    def put_object(self, data: bytes) -> None:
        # pickled size is what counts: compute it the way the queue does
        import pickle

        blob = pickle.dumps(data, 5)
        if len(blob) > MAX_MSG:
            return
        expect = self.model.fits(len(blob))
        try:
            self.q.put_nowait(data)
            assert expect
            self.model.put(blob)
        except queue.Full:
            assert not expect

    @rule(items=st.lists(payloads, max_size=6))
    def put_bytes_many(self, items: list[bytes]) -> None:
        done_model = 0
        for it in items:
            if not self.model.fits(len(it)):
                break
            self.model.put(it)
            done_model += 1
        try:
            self.q.put_bytes_many(items, block=False)
            assert done_model == len(items)
        except queue.Full as exc:
            assert exc.done == done_model  # type: ignore[attr-defined]

    @rule(size=st.integers(MAX_MSG + 1, MAX_MSG * 3))
    def too_large_changes_nothing(self, size: int) -> None:
        before = self.q.qsize()
        try:
            self.q.put_bytes(b"x" * size, block=False)
            raise AssertionError("oversized message accepted")
        except MessageTooLarge as exc:
            assert str(size) in str(exc) and str(MAX_MSG) in str(exc)
        try:
            self.q.put_bytes_many([b"ok", b"x" * size], block=False)
            raise AssertionError("oversized batch accepted")
        except MessageTooLarge:
            pass
        assert self.q.qsize() == before

    @precondition(lambda self: self.model.items)
    @rule()
    def get_bytes(self) -> None:
        assert self.q.get_bytes(block=False) == self.model.get()

    @precondition(lambda self: self.model.items)
    @rule(n=st.integers(1, 8))
    def get_bytes_many(self, n: int) -> None:
        got = self.q.get_bytes_many(n, block=False)
        assert got == [self.model.get() for _ in range(min(n, len(self.model.items)))]

    @precondition(lambda self: not self.model.items)
    @rule()
    def empty_raises(self) -> None:
        try:
            self.q.get_bytes(block=False)
            raise AssertionError("get from an empty queue")
        except queue.Empty:
            pass
        try:
            self.q.get_bytes_many(4, block=False)
            raise AssertionError("get_many from an empty queue")
        except queue.Empty:
            pass

    @invariant()
    def sizes_agree(self) -> None:
        if not hasattr(self, "q"):
            return
        assert self.q.qsize() == len(self.model.items)
        assert self.q.empty() == (not self.model.items)
        assert self.q.full() == (self.model.tail - self.model.head >= self.model.limit)


QueueMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestQueueModel = QueueMachine.TestCase
