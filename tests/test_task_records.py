"""The task table's per-record steps in C (csrc/task_records.h), driven
through the cffi binding with no Cython: fill, begin, finish, cancel and
reuse, and a start racing a cancel across real processes (exactly one
wins).  Also runs under AddressSanitizer in CI."""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Any

import pytest

from _cffi_ring import load

ffi, lib = load()

SIZE = 1024
REC = struct.Struct("<16sBBHIIIQddddfHH")


def gid(n: int) -> bytes:
    return b"N" * 8 + struct.pack("<II", n, 0)


def fields(buf: Any, off: int = 0) -> tuple[Any, ...]:
    return REC.unpack_from(bytes(ffi.buffer(buf)[off : off + REC.size]))


def test_fill_writes_every_field_then_the_id() -> None:
    buf = ffi.new("uint8_t[]", SIZE)
    ffi.memmove(buf, b"\xff" * SIZE, SIZE)  # a dirty record from an earlier task
    lib.task_record_fill(buf, gid(1), lib.TASK_QUEUED, 4321, 77, 1000.5)
    f = fields(buf)
    assert f[:9] == (gid(1), lib.TASK_QUEUED, 0, 1, 0, 4321, 0, 77, 1000.5)
    assert f[9:12] == (0.0, 0.0, 0.0) and math.isnan(f[12]) and f[13] == 0


def test_begin_runs_a_queued_task_and_finish_frees_or_keeps() -> None:
    buf = ffi.new("uint8_t[]", SIZE)
    lib.task_record_fill(buf, gid(1), lib.TASK_QUEUED, 1, 1, 1.0)
    assert lib.task_record_begin(buf, gid(2), 1, 55, 2.0) == lib.TASK_RECORD_NOT_MINE
    assert lib.task_record_begin(buf, gid(1), 3, 55, 2.0) == 1
    f = fields(buf)
    assert (f[1], f[3], f[4], f[9]) == (lib.TASK_RUNNING, 3, 55, 2.0)
    assert lib.task_record_usable(buf, 10.0, 1) == 0  # never replaced while running
    result = b"R" * 10
    assert lib.task_record_finish(buf, gid(1), lib.TASK_DONE, 3.0, 60.0, result, 10, 816) == 0
    f = fields(buf)
    assert (f[1], f[6], f[10], f[11]) == (lib.TASK_DONE, 10, 3.0, 63.0)
    assert bytes(ffi.buffer(buf)[208:218]) == result
    assert lib.task_record_usable(buf, 62.0, 0) == 0  # kept until 63
    assert lib.task_record_usable(buf, 62.0, 1) == 1  # unless evicted
    assert lib.task_record_usable(buf, 63.0, 0) == 1
    # No keep: the record is freed at once (empty, id cleared).
    lib.task_record_fill(buf, gid(3), lib.TASK_QUEUED, 1, 1, 1.0)
    assert lib.task_record_begin(buf, gid(3), 1, 55, 2.0) == 1
    assert lib.task_record_finish(buf, gid(3), lib.TASK_DONE, 3.0, 0.0, ffi.NULL, 0, 816) == 0
    assert fields(buf)[:2] == (bytes(16), lib.TASK_EMPTY)
    assert lib.task_record_finish(buf, gid(3), lib.TASK_DONE, 3.0, 0.0, ffi.NULL, 0, 816) == -1


def test_a_result_too_large_to_keep_is_marked_not_kept() -> None:
    buf = ffi.new("uint8_t[]", SIZE)
    lib.task_record_fill(buf, gid(1), lib.TASK_QUEUED, 1, 1, 1.0)
    big = b"x" * 900
    assert lib.task_record_finish(buf, gid(1), lib.TASK_DONE, 3.0, 9.0, big, 900, 816) == 0
    assert fields(buf)[6] == lib.TASK_RECORD_NOT_KEPT
    assert bytes(ffi.buffer(buf)[208:216]) == bytes(8)  # nothing written past the room


def test_cancel_of_a_queued_task_wins_and_begin_refuses_it() -> None:
    buf = ffi.new("uint8_t[]", SIZE)
    lib.task_record_fill(buf, gid(1), lib.TASK_QUEUED, 1, 1, 1.0)
    assert lib.task_record_cancel(buf, gid(1), 1, 5.0, 100.0) == lib.TASK_QUEUED
    f = fields(buf)
    assert (f[1], f[2], f[10], f[11]) == (lib.TASK_CANCELLED, 1, 5.0, 105.0)
    assert lib.task_record_begin(buf, gid(1), 1, 55, 6.0) == 0
    assert lib.task_record_usable(buf, 1e9, 1) == 0  # held until a worker met it
    assert lib.task_record_cancel(buf, gid(9), 1, 5.0, 100.0) == lib.TASK_RECORD_NOT_MINE


def test_cancel_of_a_running_task_only_flags_it() -> None:
    buf = ffi.new("uint8_t[]", SIZE)
    lib.task_record_fill(buf, gid(1), lib.TASK_QUEUED, 1, 1, 1.0)
    assert lib.task_record_begin(buf, gid(1), 1, 55, 2.0) == 1
    assert lib.task_record_cancel_flag(buf) == 0
    assert lib.task_record_cancel(buf, gid(1), 2, 5.0, 100.0) == lib.TASK_RUNNING
    assert lib.task_record_cancel_flag(buf) == 2 and fields(buf)[1] == lib.TASK_RUNNING
    # It ends (kept): the flag is cleared so the kept record can be reused later.
    lib.task_record_finish(buf, gid(1), lib.TASK_CANCELLED, 6.0, 10.0, ffi.NULL, 0, 816)
    assert lib.task_record_cancel_flag(buf) == 0
    assert lib.task_record_usable(buf, 16.0, 0) == 1


@pytest.mark.timeout(60)
def test_start_racing_cancel_across_processes_has_exactly_one_winner() -> None:
    n = 2000
    mm = mmap.mmap(-1, n * SIZE)  # shared with the forked child
    base = ffi.from_buffer(mm)
    for i in range(n):
        lib.task_record_fill(base + i * SIZE, gid(i), lib.TASK_QUEUED, 1, 1, 1.0)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the canceller
        try:
            os.close(read_fd)
            os.write(write_fd, b"go")
            for i in range(n):
                lib.task_record_cancel(base + i * SIZE, gid(i), 1, 2.0, 100.0)
        finally:
            os._exit(0)
    try:
        os.close(write_fd)
        os.read(read_fd, 2)
        started = [lib.task_record_begin(base + i * SIZE, gid(i), 1, 7, 2.0) for i in range(n)]
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(read_fd)
    assert os.waitstatus_to_exitcode(status) == 0
    for i in range(n):
        state, flag = fields(base, i * SIZE)[1:3]
        assert flag == 1  # every cancel landed
        if state == lib.TASK_CANCELLED:
            assert started[i] == 0  # cancelled first: never run
        else:
            assert state == lib.TASK_RUNNING  # started first: it runs, its handler is told
    del base
    mm.close()
