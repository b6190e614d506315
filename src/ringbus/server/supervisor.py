"""TaskServer: the worker pool (Swoole's ``task_worker_num``).

A supervisor thread in the server process starts the workers
(``worker.py``), reaps them, replaces any that die (their task is delivered
again, or its caller gets ``WorkerLost``), kills those whose task overran
``task_timeout`` (their caller gets ``TaskTimeout``) and drains the pool on
``stop()``.  What each worker does is in the pool-state segment
(``pool_state.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.util  # before our atexit hook is registered (see below)
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ringbus.server.lost_tasks import LostTask, adopt_orphaned_pools, answer, bury, deliver_again
from ringbus.server.pool_control import PoolControl
from ringbus.server.pool_state import (
    DEFAULT_ENVELOPE_AREA,
    MAX_SLOTS,
    SLOT_WORKER,
    PoolState,
    WorkerInfo,
)
from ringbus.server.queues import ChannelWatch, check_queues, served_queues
from ringbus.server.scheduler import Scheduler
from ringbus.server.worker import BLOCK_AT_FORK, EXIT_INIT_FAILED, EXIT_STUCK_THREAD, worker_main
from ringbus.tasks import envelope as env
from ringbus.tasks.bus import TaskBus

__all__ = ["TaskServer"]

log = logging.getLogger("ringbus.server")


class _Worker:
    __slots__ = ("kill_reason", "killed_tid", "pid", "process", "slot", "started")

    def __init__(self, slot: int, process: mp.process.BaseProcess) -> None:
        self.slot = slot
        self.process = process
        self.pid: int = process.pid or 0
        self.started = time.monotonic()
        self.kill_reason: str | None = None
        self.killed_tid = -1


_servers: weakref.WeakSet[TaskServer] = weakref.WeakSet()


@atexit.register
def _stop_servers_at_exit() -> None:
    """Workers are not daemons (handlers may start processes): stop them here,
    before multiprocessing's own exit hook would wait for them forever."""
    for server in list(_servers):
        if server._owner_pid == os.getpid():
            server.stop(timeout=10)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class TaskServer(PoolControl):
    """A pool of ``workers`` processes serving ``bus``'s task channel.

    ``max_tasks_per_child`` recycles a worker after that many tasks;
    ``task_timeout`` (seconds) kills a worker whose task runs longer and
    fails that task with ``TaskTimeout``; ``initializer(*initargs)`` runs in
    each worker before it takes tasks.  ``stop()`` is graceful: workers
    finish the task in hand and take no new one; queued tasks stay queued
    for the next server on the same bus.
    """

    def __init__(
        self,
        bus: TaskBus,
        workers: int | None = None,
        *,
        max_tasks_per_child: int | None = None,
        task_timeout: float | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        start_method: str = "fork",
        concurrency: int = 1,
        queues: list[str] | None = None,
        max_workers: int | None = None,
    ) -> None:
        if not isinstance(bus, TaskBus):
            raise TypeError(f"bus must be a TaskBus, not {type(bus).__name__}")
        if workers is None:
            workers = os.cpu_count() or 1
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, not {workers!r}")
        if max_tasks_per_child is not None and (
            not isinstance(max_tasks_per_child, int) or max_tasks_per_child < 1
        ):
            raise ValueError(f"max_tasks_per_child must be >= 1, not {max_tasks_per_child!r}")
        if task_timeout is not None and not task_timeout > 0:
            raise ValueError(f"task_timeout must be > 0 seconds, not {task_timeout!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive int, not {concurrency!r}")
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise ValueError(f"max_workers must be a positive int, not {max_workers!r}")
        max_workers = max(workers, max_workers or workers)
        if max_workers * concurrency > MAX_SLOTS:
            raise ValueError(
                f"max_workers x concurrency = {max_workers * concurrency} task slots; "
                f"at most {MAX_SLOTS}"
            )
        self.bus = bus
        self.queues: list[str] | None = check_queues(queues)
        """The queues served, in strict order (None until start: all the bus's)."""
        self._watch: ChannelWatch | None = None
        self.workers = workers
        self.max_workers = max_workers
        """The most workers ``add_worker`` (SIGTTIN) may grow the pool to."""
        self.concurrency = concurrency
        self.max_tasks_per_child = max_tasks_per_child
        self.task_timeout = task_timeout
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.start_method = start_method
        self._ctx = mp.get_context(start_method)
        self._lock = threading.RLock()  # stop() may re-enter from a signal handler
        self._state: PoolState | None = None
        self._workers: list[_Worker | None] = [None] * max_workers
        self._respawn_at: dict[int, float] = {}
        self._quick_fails = [0] * max_workers
        self._init_control()
        self._thread: threading.Thread | None = None
        self._scheduler: Scheduler | None = None
        self._wake_r = self._wake_w = -1
        self._started = False
        self._stopping = False
        self._stopped = False
        self._stop_deadline: float | None = None
        self._term_sent = False
        self._owner_pid = os.getpid()
        self.restarts = 0
        self.lost = 0
        self.timeouts = 0
        self.redelivered = 0
        """Tasks of dead workers queued again (attempt + 1)."""
        self.dead_lettered = 0
        """Tasks this supervisor put in dead letters (workers count their own)."""
        self.on_initializer_failure: Callable[[TaskServer], None] | None = None
        """Called (from the supervisor thread) when a worker's initializer raised."""

    # ------------------------------------------------------------ public

    def start(self) -> TaskServer:
        """Open the task channel, start the workers and the supervisor."""
        self.bus.check_serving()  # no unsigned pickle from a network
        with self._lock:
            if self._started:
                raise RuntimeError("TaskServer already started")
            self._started = True
        try:
            self.queues = served_queues(self.bus, self.queues)
            self.bus.transport.open()
            self.bus.transport.serve(self.queues)  # makes their rings (Redis: the workers, streams)
        except BaseException:
            self._started = False  # bad queues=: nothing was started
            raise
        # Servers that died with their workers left their tasks in hand behind.
        adopted = adopt_orphaned_pools(
            self.bus.transport, self.bus.name, self.bus.codec.encode_text
        )
        if adopted:
            log.warning(
                "ringbus: %d task(s) of dead servers of bus %r delivered again",
                adopted,
                self.bus.name,
            )
        self.redelivered += adopted
        limit = self.bus.transport.max_task_size()
        self._state = PoolState.create(
            self.bus.name,
            self.max_workers * self.concurrency,
            max(4096, limit or DEFAULT_ENVELOPE_AREA),
            broker=self.bus.transport.redelivers_lost_tasks,
            per_worker=self.concurrency,
            queues=self.queues,
        )
        self._watch = ChannelWatch(self.bus.transport)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        _servers.add(self)
        # The supervisor thread forks every worker, the first ones too: a
        # worker's parent-death signal fires when its forking thread ends,
        # and that thread must live as long as the pool.
        started = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._supervise,
            args=(started, failure),
            name=f"ringbus-supervisor-{self.bus.name}",
            daemon=True,
        )
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._stopped = True
            self._cleanup()
            raise failure[0]
        # Delayed tasks and periodic schedules: one server per bus leads.
        self._scheduler = Scheduler(self.bus)
        self._scheduler.start()
        log.info("ringbus: serving bus %r with %d workers", self.bus.name, self.workers)
        return self

    def stop(self, timeout: float | None = None, *, wait: bool = True) -> None:
        """Drain the pool: each worker finishes its task in hand and exits.

        After ``timeout`` seconds the workers still busy are killed and their
        callers get ``WorkerLost``.  Tasks still queued stay in the channel.
        ``wait=False`` only asks (safe from a signal handler); a later
        ``stop()`` waits.
        """
        with self._lock:
            if not self._started or self._stopped:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            if not self._stopping:
                self._stopping = True
                self._stop_deadline = deadline
            elif deadline is not None and (
                self._stop_deadline is None or deadline < self._stop_deadline
            ):
                self._stop_deadline = deadline
        self._wake()
        if not wait:
            return
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._cleanup()
        log.info("ringbus: pool of bus %r stopped", self.bus.name)

    def kill(self, *, wait: bool = True) -> None:
        """Stop now: kill every worker (their callers get ``WorkerLost``)."""
        self.stop(timeout=0, wait=wait)

    @property
    def running(self) -> bool:
        return self._started and not self._stopped

    @property
    def pids(self) -> list[int]:
        """Pids of the live workers."""
        return [w.pid for w in list(self._workers) if w is not None]

    @property
    def state_path(self) -> str | None:
        """Path of the pool state segment (for ``ringbus stats``)."""
        return self._state.path if self._state is not None else None

    def worker_info(self) -> list[WorkerInfo]:
        """What each worker is doing now (from the pool state segment)."""
        return self._state.snapshot() if self._state is not None and not self._stopped else []

    def __enter__(self) -> TaskServer:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._stopped else "new")
        return f"<TaskServer bus={self.bus.name!r} workers={self.workers} {state}>"

    # ------------------------------------------------------------ supervisor

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _spawn(self, slot: int) -> None:
        """Start worker number ``slot`` (it owns pool slots ``worker_slots(slot)``)."""
        assert self._state is not None
        for s in self._state.worker_slots(slot):
            self._state.reset(s)
        process = self._worker_ctx(self._ctx).Process(
            target=worker_main,
            args=(
                self.bus,
                slot,
                self._state.path,
                self.max_tasks_per_child,
                self.initializer,
                self.initargs,
                os.getpid(),
                self.task_timeout,
            ),
            name=f"ringbus-worker-{self.bus.name}-{slot}",
            daemon=False,
        )
        # The child starts with stop signals blocked, so none can hit it
        # before its own handlers are installed (it unblocks them).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCK_AT_FORK)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        # Readers outside see the pid as soon as the child exists, not only
        # once it has booted (the worker writes the same value in worker_up).
        for s in self._state.worker_slots(slot):
            SLOT_WORKER.pack_into(self._state.mm, self._state.offset(s), process.pid)
        self._workers[slot] = _Worker(slot, process)

    def _next_timeout(self) -> float | None:
        waits: list[float] = []
        now = time.monotonic()
        if self.task_timeout is not None:
            waits.append(max(0.005, min(0.25, self.task_timeout / 10)))
        if self._respawn_at and not self._stopping:
            waits.append(max(0.0, min(self._respawn_at.values()) - now))
        if self._stopping and self._stop_deadline is not None:
            waits.append(max(0.0, self._stop_deadline - now))
        if not self._stopping and self._watch is not None:
            waits.append(self._watch.every)
        return min(waits) if waits else None

    def _supervise(self, started: threading.Event, failure: list[BaseException]) -> None:
        try:
            for slot in range(self.workers):
                self._spawn(slot)
        except BaseException as exc:
            failure.append(exc)
            for w in self._workers:
                if w is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGKILL)
                    w.process.join()
            return
        finally:
            started.set()
        try:
            self._supervise_loop()
        except BaseException:
            log.exception("ringbus: the supervisor of bus %r failed", self.bus.name)
            raise

    def _supervise_loop(self) -> None:
        while True:
            if self._stopping and not self._term_sent:
                self._term_sent = True
                self._respawn_at.clear()
                for w in self._workers:
                    if w is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w.pid, signal.SIGTERM)
            live = [w for w in self._workers if w is not None]
            if self._stopping:
                if not live:
                    return
                if self._stop_deadline is not None and time.monotonic() >= self._stop_deadline:
                    for w in live:
                        if w.kill_reason is None:
                            w.kill_reason = "stop"
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(w.pid, signal.SIGKILL)
            self._control_step()
            sentinels = {w.process.sentinel: w for w in live}
            ready = mp.connection.wait([*sentinels, self._wake_r], self._next_timeout())
            for obj in ready:
                if obj == self._wake_r:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(self._wake_r, 4096)
                    continue
                w = sentinels.get(obj) if isinstance(obj, int) else None
                if w is not None:
                    self._on_exit(w)
            if not self._stopping and self._respawn_at:
                now = time.monotonic()
                for slot, due in list(self._respawn_at.items()):
                    if due <= now:
                        del self._respawn_at[slot]
                        self._respawn(slot)
            if self.task_timeout is not None:
                self._check_overruns(self.task_timeout)
            if not self._stopping and self._watch is not None:
                self._watch.poll(self.pids)

    def _respawn(self, slot: int) -> None:
        try:
            self._spawn(slot)
            self.restarts += 1
        except Exception:
            log.exception("ringbus: could not start a worker for bus %r", self.bus.name)
            self._respawn_at[slot] = time.monotonic() + 1.0

    def _check_overruns(self, limit: float) -> None:
        """Kill a worker whose task overran.  With ``concurrency`` above 1 the
        worker enforces the limit itself (its other tasks go on); this is the
        fallback for a worker whose loop is wedged (a handler holding the GIL)."""
        assert self._state is not None
        if self.concurrency > 1:
            limit += max(2.0, limit)
        now = time.monotonic()
        for w in self._workers:
            if w is None or w.kill_reason is not None:
                continue
            over = [
                info
                for s in self._state.worker_slots(w.slot)
                if (info := self._state.read(s)).state == "running" and now - info.started > limit
            ]
            if over:
                info = over[0]
                w.kill_reason = "timeout"
                w.killed_tid = info.task_id
                log.warning(
                    "ringbus: task #%d (%s) ran past task_timeout=%s s: killing worker %d",
                    info.task_id,
                    info.task_type,
                    limit,
                    w.pid,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)

    def _on_exit(self, w: _Worker) -> None:
        assert self._state is not None
        w.process.join(timeout=5)
        code = w.process.exitcode
        self._workers[w.slot] = None
        infos = [self._state.read(s) for s in self._state.worker_slots(w.slot)]
        info = infos[0]  # the worker's counters
        held = [
            (i, record)
            for i in infos
            if i.worker_pid in (0, w.pid) and (record := self._state.inflight(i.slot)) is not None
        ]
        if code is not None and code < 0:
            # A worker killed inside a get may hold claimed slots: hand them back.
            with contextlib.suppress(Exception):
                self.bus.transport.recover()
        # Exit 0 is a worker's answer to a stop or to max_tasks_per_child; at
        # any other time it stopped by itself (e.g. it judged its parent dead).
        recycled = bool(self.max_tasks_per_child) and info.tasks_done >= (
            self.max_tasks_per_child or 0
        )
        retired = self._retired(w.slot)  # asked to leave: a rolling restart, a smaller pool
        on_its_own = code == 0 and not self._stopping and not recycled and not retired
        for slot_info, record in held:
            self._task_in_hand(w, slot_info, record, code)
        if held:
            pass  # each task in hand was logged with what became of it
        elif code == EXIT_STUCK_THREAD:
            log.warning(
                "ringbus: worker %d of bus %r replaced: a handler thread ran past its time limit",
                w.pid,
                self.bus.name,
            )
        elif on_its_own:
            log.warning(
                "ringbus: worker %d of bus %r stopped by itself after %d task(s), %.1f s "
                "after it started",
                w.pid,
                self.bus.name,
                info.tasks_done,
                time.monotonic() - w.started,
            )
        elif code not in (0, None) and not (self._stopping and code == -signal.SIGTERM):
            if code == EXIT_INIT_FAILED:
                log.error("ringbus: worker %d of bus %r: initializer failed", w.pid, self.bus.name)
            else:
                log.warning(
                    "ringbus: worker %d of bus %r exited (%s)",
                    w.pid,
                    self.bus.name,
                    _describe_exit(code),
                )
        for s in self._state.worker_slots(w.slot):
            self._state.reset(s)
        if code == EXIT_INIT_FAILED and self.on_initializer_failure is not None:
            try:
                self.on_initializer_failure(self)
            except Exception:
                log.exception("ringbus: on_initializer_failure hook failed")
        if self._stopping or retired == "shrink":
            return
        if retired == "reload":
            self.reloads += 1
            self._respawn(w.slot)
            return
        # Back off only for workers that die on their own without a task in
        # hand (a failing start); a poison task ends in dead letters instead.
        quick = (
            (code != 0 or on_its_own)
            and code != EXIT_STUCK_THREAD
            and not held
            and w.kill_reason is None
            and time.monotonic() - w.started < 1.0
        )
        if quick:
            self._quick_fails[w.slot] += 1
            delay = min(5.0, 0.1 * 2 ** (self._quick_fails[w.slot] - 1))
            self._respawn_at[w.slot] = time.monotonic() + delay
        else:
            self._quick_fails[w.slot] = 0
            self._respawn(w.slot)

    def _task_in_hand(self, w: _Worker, info: WorkerInfo, record: bytes, code: int | None) -> None:
        """The worker died holding a task: deliver it again, or fail it for good."""
        transport = self.bus.transport
        try:
            task = LostTask(record, info)
        except env.EnvelopeError as exc:
            self._bury(record, f"malformed envelope in the journal of worker {w.pid}: {exc}")
            return
        status = env.LOST
        if w.kill_reason == "timeout" and w.killed_tid == task.hdr.task_id:
            self.timeouts += 1
            status = env.TIMEOUT
            text = (
                f"{task.what} ran longer than task_timeout={self.task_timeout} s; "
                f"worker pid {w.pid} was killed"
            )
        elif w.kill_reason == "stop":
            self.lost += 1
            text = f"worker pid {w.pid} was killed at stop while running {task.what}"
        else:
            died = f"worker pid {w.pid} died ({_describe_exit(code)}) while running {task.what}"
            if transport.redelivers_lost_tasks:
                log.warning("ringbus: %s; the transport delivers it again", died)
                return
            if deliver_again(transport, task, died):
                self.redelivered += 1
                return
            self.lost += 1
            text = f"{died}, attempt {task.attempt} of at most {task.allowed or task.attempt}"
            log.error("ringbus: %s; it goes to dead letters", text)
        self._bury(record, text, task.type_name, task.attempt)
        answer(transport, task, status, text, self.bus.codec.encode_text)

    def _bury(self, record: bytes, reason: str, type_name: str = "", attempt: int = 0) -> None:
        if bury(self.bus.transport, record, reason, type_name, attempt):
            self.dead_lettered += 1
            if self.bus._mw is not None and attempt:  # on_dead_letter: no worker can call it
                self.bus._mw.dead_letter(self.bus, record, reason, type_name, attempt)

    @property
    def leading(self) -> bool:
        """Whether this server leads the bus's scheduler (delayed and periodic tasks)."""
        return self._scheduler is not None and self._scheduler.leading

    def _cleanup(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()
        _servers.discard(self)
        if self._state is not None:
            self._state.close()
            self._state.unlink()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
