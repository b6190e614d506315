"""ringbus.Queue behaviour beyond the happy path: timeouts, close waking waiters,
JoinableQueue across processes, ownership of the segment name, bad input and
every attach refusal (with segments forged in /dev/shm, removed afterwards).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ringbus
from ringbus import JoinableQueue, MessageTooLarge, Queue, RingClosed, RingError
from ringbus._ring import _encode

SHM = Path("/dev/shm")
START_METHODS = ["fork", "spawn", "forkserver"]
WAIT = 10.0  # upper bound for a condition to show up; never a pass criterion


def shm_path(name: str) -> Path:
    return SHM / name.lstrip("/")


def wait_for(pred: Callable[[], bool], limit: float = WAIT) -> bool:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


class Outcome:
    """What a call made in a thread returned or raised."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, Outcome]:
    out = Outcome()

    def run() -> None:
        try:
            out.value = call()
        except BaseException as exc:
            out.error = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.fixture
def q(shm_name: str) -> Iterator[Queue]:
    with Queue(4, name=shm_name) as handle:
        yield handle


# ---------------------------------------------------------------- timeouts


def test_get_timeouts_raise_empty(q: Queue) -> None:
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get_bytes(timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get_many(5, timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get_bytes_many(5, timeout=0.05)
    q.put("after")  # a timed-out wait leaves the queue usable
    assert q.get(timeout=0.05) == "after"


def test_put_timeouts_raise_full(q: Queue) -> None:
    for i in range(4):
        q.put(i)
    with pytest.raises(queue.Full):
        q.put("x", timeout=0.05)
    with pytest.raises(queue.Full):
        q.put_bytes(b"x", timeout=0.05)
    with pytest.raises(queue.Full) as info:
        q.put_many(["x"], timeout=0.05)
    assert info.value.done == 0  # type: ignore[attr-defined]
    assert [q.get() for _ in range(4)] == [0, 1, 2, 3]


def test_put_many_timeout_reports_how_many_were_queued(q: Queue) -> None:
    q.put("first")
    with pytest.raises(queue.Full) as info:
        q.put_many(["a", "b", "c", "d", "e"], timeout=0.05)
    assert info.value.done == 3  # type: ignore[attr-defined]
    with pytest.raises(queue.Full) as binfo:
        q.put_bytes_many([b"z"], timeout=0.01)
    assert binfo.value.done == 0  # type: ignore[attr-defined]
    assert q.get_many(10) == ["first", "a", "b", "c"]


def test_get_many_waits_for_one_and_returns_at_most_max(q: Queue) -> None:
    t, out = in_thread(lambda: q.get_many(3, timeout=WAIT))
    time.sleep(0.05)
    q.put_many([1, 2, 3, 4])
    t.join(WAIT)
    assert out.error is None
    assert 1 <= len(out.value) <= 3
    rest = q.get_many(10)
    assert out.value + rest == [1, 2, 3, 4]


def test_signal_handler_exception_escapes_a_blocked_get(q: Queue) -> None:
    """A real SIGALRM whose handler raises ends a get that would block forever."""

    class Alarm(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Alarm

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Alarm):
            q.get()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    q.put(1)
    assert q.get() == 1


# ---------------------------------------------------------------- close wakes waiters


def blocked_on(q: Queue, counter: str, before: int) -> bool:
    """True once a waiter went to sleep on q (the header counts every sleep)."""
    return wait_for(lambda: q.stats()[counter] > before)


def assert_closed_error(out: Outcome) -> None:
    assert isinstance(out.error, ValueError), f"expected 'is closed', got {out.error!r}"
    assert isinstance(out.error, RingClosed)
    assert "is closed" in str(out.error)


@pytest.mark.parametrize("call", ["get", "get_bytes", "get_many", "get_bytes_many"])
def test_close_from_another_thread_wakes_blocked_get(q: Queue, call: str) -> None:
    before = q.stats()["waits_empty"]
    args = (4,) if call.endswith("_many") else ()
    t, out = in_thread(lambda: getattr(q, call)(*args))
    assert blocked_on(q, "waits_empty", before)
    q.close()
    t.join(WAIT)
    assert not t.is_alive(), "close() did not wake the blocked getter"
    assert_closed_error(out)


@pytest.mark.parametrize("call", ["put", "put_bytes", "put_many"])
def test_close_from_another_thread_wakes_blocked_put(q: Queue, call: str) -> None:
    for i in range(4):
        q.put(i)
    before = q.stats()["waits_full"]
    args: dict[str, Any] = {"put": "x", "put_bytes": b"x", "put_many": ["x", "y"]}
    t, out = in_thread(lambda: getattr(q, call)(args[call]))
    assert blocked_on(q, "waits_full", before)
    q.close()
    t.join(WAIT)
    assert not t.is_alive(), "close() did not wake the blocked putter"
    assert_closed_error(out)


def test_close_wakes_every_blocked_thread(q: Queue) -> None:
    before = q.stats()["waits_empty"]
    waiters = [in_thread(q.get) for _ in range(3)]
    assert wait_for(lambda: q.stats()["waits_empty"] >= before + 3)
    q.close()
    for t, out in waiters:
        t.join(WAIT)
        assert not t.is_alive()
        assert_closed_error(out)


def test_close_is_local_to_the_handle(q: Queue) -> None:
    """Closing one handle does not close another handle on the same ring (like mp.Queue)."""
    other = Queue.attach(q.name)
    before = q.stats()["waits_empty"]
    t, out = in_thread(lambda: q.get(timeout=WAIT))
    assert blocked_on(q, "waits_empty", before)
    other.close()
    with pytest.raises(ValueError, match="is closed"):
        other.put(1)
    q.put("still open")
    t.join(WAIT)
    assert out.error is None and out.value == "still open"


# ---------------------------------------------------------------- JoinableQueue


def _worker_task_done(jq: JoinableQueue, n: int, results: Queue) -> None:
    """Child: take n items, report each, mark each done."""
    for _ in range(n):
        item = jq.get(timeout=60)
        results.put(item * 10)
        jq.task_done()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_joinable_queue_task_done_and_join_across_processes(
    shm_name: str, method: str, procs: list[mp.process.BaseProcess]
) -> None:
    ctx: Any = mp.get_context(method)
    jq = JoinableQueue(name=shm_name)
    with jq, Queue(name=shm_name + "-results") as results:
        jq.put_many(range(6))
        jq.put(6)
        jq.put_bytes(pickle.dumps(7))
        with pytest.raises(TimeoutError, match="8 unfinished"):
            jq.join(timeout=0.05)
        workers = [ctx.Process(target=_worker_task_done, args=(jq, 4, results)) for _ in range(2)]
        procs.extend(workers)
        for w in workers:
            w.start()
        jq.join(timeout=120)  # returns only once all 8 were marked done
        assert sorted(results.get(timeout=WAIT) for _ in range(8)) == [i * 10 for i in range(8)]
        for w in workers:
            w.join(timeout=60)
            assert w.exitcode == 0
        assert jq.stats()["unfinished"] == 0
        jq.join()  # nothing unfinished: returns at once


def test_task_done_too_many_times(shm_name: str) -> None:
    jq = JoinableQueue(name=shm_name)
    with jq:
        with pytest.raises(ValueError, match="too many"):
            jq.task_done()
        jq.put("a")
        assert jq.get() == "a"
        jq.task_done()
        with pytest.raises(ValueError, match="too many"):
            jq.task_done()
        jq.join(timeout=WAIT)


def test_joinable_failed_puts_leave_no_unfinished_task(shm_name: str) -> None:
    jq = JoinableQueue(2, name=shm_name)
    with jq:
        with pytest.raises(queue.Full) as info:
            jq.put_many(["a", "b", "c"], block=False)
        assert info.value.done == 2  # type: ignore[attr-defined]
        with pytest.raises(queue.Full):
            jq.put("d", block=False)
        with pytest.raises((pickle.PicklingError, AttributeError)):
            jq.put(lambda: None)
        assert jq.stats()["unfinished"] == 2
        jq.get()
        jq.task_done()
        jq.get()
        jq.task_done()
        jq.join(timeout=WAIT)


# ---------------------------------------------------------------- pickling, attach, ownership


def test_pickle_and_attach_by_name(shm_name: str) -> None:
    with Queue(16, name=shm_name, slot_size=128, max_message_size=5000) as q:
        for other in (pickle.loads(pickle.dumps(q)), Queue.attach(q.name)):
            try:
                assert other.name == q.name
                assert not other.owner
                assert (other.capacity, other.slot_size, other.max_message_size, other.maxsize) == (
                    q.capacity,
                    q.slot_size,
                    q.max_message_size,
                    q.maxsize,
                )
                other.put({"big": "y" * 3000})
                assert q.get(timeout=WAIT) == {"big": "y" * 3000}
            finally:
                other.close()
        assert shm_path(shm_name).exists()  # closing attached handles unlinked nothing


def test_name_without_leading_slash_is_normalized(shm_name: str) -> None:
    with Queue(name=shm_name.lstrip("/")) as q:
        assert q.name == shm_name
        assert shm_path(shm_name).exists()


def test_creator_unlinks_on_close(shm_name: str) -> None:
    q = Queue(name=shm_name)
    assert q.owner
    st = shm_path(shm_name).stat()
    assert st.st_mode & 0o777 == 0o600
    q.close()
    assert not shm_path(shm_name).exists()


def test_creator_unlinks_when_garbage_collected(shm_name: str) -> None:
    q = Queue(name=shm_name)
    assert shm_path(shm_name).exists()
    del q
    gc.collect()
    assert not shm_path(shm_name).exists()


def test_second_create_of_same_name_is_refused(q: Queue) -> None:
    with pytest.raises(RingError):
        Queue(name=q.name)
    q.put(1)  # the refused create touched nothing
    assert q.get() == 1


def test_creator_process_exit_unlinks(shm_name: str) -> None:
    """A Python process that creates a queue and exits (still holding it) removes it."""
    code = (
        "import sys, ringbus\n"
        f"KEEP = ringbus.Queue(name={shm_name!r})\n"
        "KEEP.put('unread')\n"
        "sys.exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert not shm_path(shm_name).exists()


_KEPT: list[Queue] = []


def _create_and_keep(name: str, created: Any) -> None:
    """Child: create a queue, keep it referenced (no GC), exit without closing it."""
    _KEPT.append(Queue(name=name))
    created.set()


@pytest.mark.parametrize("method", START_METHODS)
def test_creator_child_process_exit_unlinks(
    shm_name: str, method: str, procs: list[mp.process.BaseProcess]
) -> None:
    """A multiprocessing child that creates a queue and exits: its segment is gone."""
    ctx: Any = mp.get_context(method)
    created = ctx.Event()
    p = ctx.Process(target=_create_and_keep, args=(shm_name, created))
    procs.append(p)
    p.start()
    p.join(timeout=120)
    assert p.exitcode == 0
    assert created.is_set()
    assert not shm_path(shm_name).exists(), f"segment left behind by a {method} child"


def _attach_use_close(q: Queue) -> None:
    """Child: use the inherited/attached handle, close it, exit."""
    q.put("from child")
    q.close()


@pytest.mark.parametrize("method", START_METHODS)
def test_attached_child_never_unlinks(
    shm_name: str, method: str, procs: list[mp.process.BaseProcess]
) -> None:
    ctx: Any = mp.get_context(method)
    with Queue(name=shm_name) as q:
        p = ctx.Process(target=_attach_use_close, args=(q,))
        procs.append(p)
        p.start()
        p.join(timeout=120)
        assert p.exitcode == 0
        assert shm_path(shm_name).exists()
        assert q.get(timeout=WAIT) == "from child"
        late = Queue.attach(shm_name)  # the name still resolves
        late.close()
    assert not shm_path(shm_name).exists()


def test_attached_handle_never_unlinks_even_when_collected(q: Queue) -> None:
    a = Queue.attach(q.name)
    assert not a.owner
    a.close()
    b = Queue.attach(q.name)
    del b
    gc.collect()
    assert shm_path(q.name).exists()
    q.put(1)
    assert q.get() == 1


def test_open_creates_or_attaches_and_never_unlinks(shm_name: str) -> None:
    first = Queue.open(shm_name, 8, slot_size=64, max_message_size=256)
    try:
        assert shm_path(shm_name).exists()
        assert first.stats()["persistent"]
        second = Queue.open(shm_name, 999, slot_size=128)  # attaches: geometry from the header
        try:
            assert (second.capacity, second.slot_size, second.max_message_size) == (
                first.capacity,
                64,
                256,
            )
            first.put("shared")
            assert second.get(timeout=WAIT) == "shared"
            first.put("kept")
        finally:
            second.close()
        first.close()
        assert shm_path(shm_name).exists(), "Queue.open ring must outlive its handles"
        third = Queue.open(shm_name)
        try:
            assert third.get(timeout=WAIT) == "kept"  # messages survived every handle
            third.unlink()
            assert not shm_path(shm_name).exists()
            third.put("still usable after unlink")
            assert third.get() == "still usable after unlink"
        finally:
            third.close()
    finally:
        shm_path(shm_name).unlink(missing_ok=True)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("maxsize", [2**64, 2**64 + 5, 2**63, 2**31])
def test_a_huge_maxsize_is_a_value_error(shm_name: str, maxsize: int) -> None:
    """Like every other bad size (2**64 used to raise OverflowError)."""
    with pytest.raises(ValueError, match="maxsize"):
        Queue(maxsize, name=shm_name)
    with pytest.raises(ValueError, match="maxsize"):
        Queue.open(shm_name, maxsize)
    assert not shm_path(shm_name).exists()



def test_message_too_large_names_both_sizes(shm_name: str) -> None:
    with Queue(name=shm_name, max_message_size=1000) as q:
        q.put("before")
        with pytest.raises(MessageTooLarge) as info:
            q.put_bytes(bytes(1001))
        assert isinstance(info.value, ValueError)
        assert "1001" in str(info.value) and "1000" in str(info.value)
        assert (info.value.size, info.value.limit) == (1001, 1000)
        blob = "z" * 5000
        size = len(_encode(blob))  # the default serializer's message
        with pytest.raises(MessageTooLarge, match=f"{size}.*1000"):
            q.put(blob)
        with pytest.raises(MessageTooLarge):
            q.put_many(["ok", blob])
        with pytest.raises(MessageTooLarge):
            q.put_bytes_many([b"ok", bytearray(1001)])
        with pytest.raises(MessageTooLarge):
            q.put_bytes(memoryview(bytes(2000)), block=False)
        q.put_bytes(bytes(1000))  # exactly the limit fits
        assert q.qsize() == 2
        assert q.get() == "before"
        assert q.get_bytes() == bytes(1000)


def test_default_max_message_size_is_one_mib(q: Queue) -> None:
    assert q.max_message_size == 1 << 20
    with pytest.raises(MessageTooLarge, match=str(1 << 20)):
        q.put_bytes(bytes((1 << 20) + 1))


def test_unpicklable_object_leaves_queue_unchanged(q: Queue) -> None:
    q.put("first")
    lock = threading.Lock()
    with pytest.raises(TypeError):
        q.put(lock)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        q.put(lambda: None)
    with pytest.raises(TypeError):
        q.put_many(["a", "b", lock, "c"])
    assert q.qsize() == 1
    assert q.get_many(10, block=False) == ["first"]
    assert q.empty()


BAD_NAMES = [
    "",
    "/",
    "a/b",
    "/a/b",
    ".",
    "..",
    "/..",
    "x" * 201,
    "has space",
    "näme",
    "semi;colon",
    "new\nline",
    "/nul\x00byte",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused(name: str) -> None:
    # A core that truncated or mangled the name could create a segment under the
    # text before a NUL; only that candidate is cleaned up (other sessions share /dev/shm).
    stray = shm_path(name.split("\x00")[0]) if "\x00" in name else None
    existed = stray is not None and stray.exists()
    try:
        with pytest.raises((ValueError, RingError)):
            Queue(name=name).close()
        with pytest.raises((ValueError, RingError)):
            Queue.attach(name)
        with pytest.raises((ValueError, RingError)):
            Queue.open(name).close()
    finally:
        if stray is not None and not existed:
            stray.unlink(missing_ok=True)


def test_longest_valid_name_works() -> None:
    prefix = f"ringbus-test-{os.getpid()}-"
    name = "/" + prefix + "n" * (200 - len(prefix))
    with Queue(name=name) as q:
        q.put(1)
        assert q.get() == 1
    assert not shm_path(name).exists()


# ---------------------------------------------------------------- attach refusals


def real_segment(shm_name: str) -> bytes:
    """The bytes of a real (small) ring, captured from a queue that is then closed."""
    with Queue(8, name=shm_name + "-src", slot_size=64, max_message_size=64) as src:
        src.put("payload")
        return shm_path(src.name).read_bytes()


def forge(name: str, data: bytes, mode: int = 0o600) -> Path:
    """Create /dev/shm/<name> with exactly these bytes (O_EXCL; caller removes it)."""
    path = shm_path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


@pytest.fixture
def segment(shm_name: str) -> Iterator[bytes]:
    yield real_segment(shm_name)
    shm_path(shm_name + "-src").unlink(missing_ok=True)


def refused(name: str) -> str:
    """Attach (and open, which must not clobber) must fail with RingError; its message."""
    with pytest.raises(RingError) as info:
        Queue.attach(name)
    assert isinstance(info.value, OSError)
    with pytest.raises(RingError):
        Queue.open(name).close()
    return str(info.value)


def test_an_untouched_copy_attaches(shm_name: str, segment: bytes) -> None:
    """Control for the forgeries below: the same bytes, unmodified, attach fine."""
    path = forge(shm_name, segment)
    try:
        q = Queue.attach(shm_name)
        try:
            assert q.get(timeout=WAIT) == "payload"
        finally:
            q.close()
    finally:
        path.unlink(missing_ok=True)


def test_attach_missing_segment(shm_name: str) -> None:
    msg = refused_attach_only(shm_name)
    assert "no ring named" in msg and "missing" in msg


def refused_attach_only(name: str) -> str:
    with pytest.raises(RingError) as info:
        Queue.attach(name)
    return str(info.value)


def test_attach_truncated_short_file(shm_name: str) -> None:
    path = forge(shm_name, b"RINGBUS1" + bytes(92))
    try:
        msg = refused(shm_name)
        assert "truncated" in msg and "100 bytes" in msg
        assert path.stat().st_size == 100  # refused, not resized
    finally:
        path.unlink(missing_ok=True)


def test_attach_truncated_real_segment(shm_name: str, segment: bytes) -> None:
    path = forge(shm_name, segment[: len(segment) - 4096])
    try:
        msg = refused(shm_name)
        assert "truncated" in msg and str(len(segment)) in msg
    finally:
        path.unlink(missing_ok=True)


def test_attach_foreign_segment(shm_name: str, segment: bytes) -> None:
    path = forge(shm_name, b"NOTARING" + segment[8:])
    try:
        msg = refused(shm_name)
        assert "foreign" in msg and "magic" in msg
        assert path.read_bytes()[:8] == b"NOTARING"  # left untouched
    finally:
        path.unlink(missing_ok=True)


def test_attach_newer_layout_version(shm_name: str, segment: bytes) -> None:
    (version,) = struct.unpack_from("<I", segment, 8)
    assert version == ringbus._ring.LAYOUT_VERSION
    forged = bytearray(segment)
    struct.pack_into("<I", forged, 8, version + 1)
    path = forge(shm_name, bytes(forged))
    try:
        msg = refused(shm_name)
        assert "newer" in msg and "layout version" in msg and str(version + 1) in msg
    finally:
        path.unlink(missing_ok=True)


def test_attach_header_of_another_creator_uid(shm_name: str, segment: bytes) -> None:
    forged = bytearray(segment)
    struct.pack_into("<I", forged, 40, 65534)
    path = forge(shm_name, bytes(forged))
    try:
        msg = refused(shm_name)
        assert "another user" in msg and "65534" in msg
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_attach_segment_owned_by_other_uid(q: Queue) -> None:
    """Even root refuses a segment another user owns (it could be forged by them)."""
    path = shm_path(q.name)
    os.chown(path, 65534, 65534)
    try:
        msg = refused_attach_only(q.name)
        assert "another user" in msg and "65534" in msg and "refused" in msg
    finally:
        os.chown(path, os.geteuid(), os.getegid())
    a = Queue.attach(q.name)  # owned by us again: accepted
    a.close()


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o606])
def test_attach_unsafe_permissions(q: Queue, mode: int) -> None:
    path = shm_path(q.name)
    os.chmod(path, mode)
    try:
        msg = refused_attach_only(q.name)
        assert "unsafe permissions" in msg and oct(mode)[2:] in msg
    finally:
        os.chmod(path, 0o600)
    a = Queue.attach(q.name)
    a.close()


def test_unlink_after_close_is_a_no_op_on_the_creating_handle(shm_name: str) -> None:
    """close() then unlink(), the shared_memory idiom, must not raise."""
    q = Queue(name=shm_name)
    q.close()
    q.unlink()
    q.unlink()
    assert not shm_path(shm_name).exists()


def test_a_creator_that_unlinked_never_removes_the_names_next_owner(shm_name: str) -> None:
    old = Queue(name=shm_name)
    old.unlink()
    with Queue(name=shm_name) as new:  # the name is free again: someone takes it
        old.close()  # must not remove the new ring's name
        old.unlink()
        assert shm_path(shm_name).exists()
        new.put(1)
        assert Queue.attach(shm_name).get(timeout=5) == 1


def test_unlink_of_a_missing_name_from_an_attached_handle_says_so(shm_name: str) -> None:
    with Queue(name=shm_name) as q:
        other = Queue.attach(shm_name)
        q.unlink()
        with pytest.raises(RingError, match="no ring named"):
            other.unlink()
        other.close()
