"""The transport boundary: opaque bytes between processes.

A transport never parses what it carries.  The task layer above it
(``ringbus.tasks``) owns every byte of a task, a result and a dead-letter
record; the transport only moves and keeps them:

- a **task channel** per bus: many producers, many consumers; a consumer
  takes one envelope at a time into its *journal* (below) and tells how
  often that envelope was delivered;
- a **reply channel** per dispatching process, written by any worker and
  read by the dispatcher's reader thread; its *address* (opaque bytes)
  travels inside each task envelope;
- a **record store** per bus (dead letters live there), which outlives
  servers and dispatchers.

Every transport keeps per-process state (handles, connections) and makes it
anew after ``fork()``.  All methods are thread-safe unless they say so.

The journal: a consumer passes a writable buffer; the transport writes the
taken envelope's length (u32, little-endian) at offset 0 and its bytes from
``JOURNAL_DATA_AT`` (length 0 when it does not fit) before the envelope
leaves the channel, where the channel allows it (shared memory does it
before the ring frees the slots, so a kill at any instant leaves the task
either in the ring or in the journal).  A broker that redelivers
unacknowledged envelopes may write it afterwards.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ringbus._names import DEFAULT_QUEUE, validate_bus_name
from ringbus.errors import TransportClosed
from ringbus.transport.limits import LimitsBackend

if TYPE_CHECKING:
    from ringbus.transport.task_table import TaskTable

__all__ = ["JOURNAL_DATA_AT", "Record", "Transport", "TransportClosed"]

JOURNAL_DATA_AT = 8
"""Offset of the envelope's bytes in a journal (its u32 length sits at 0)."""

Record = tuple[str, bytes]
"""(id, bytes) of an entry of a transport's record store."""


def write_journal(journal: Any, data: bytes) -> None:
    """Record ``data`` in ``journal`` (length 0 when it does not fit)."""
    mv = memoryview(journal)
    n = len(data) if len(data) <= len(mv) - JOURNAL_DATA_AT else 0
    if n:
        mv[JOURNAL_DATA_AT : JOURNAL_DATA_AT + n] = data
    mv[0:4] = n.to_bytes(4, "little")


class Transport(abc.ABC):
    """Moves opaque envelopes; see the module docstring for the channels."""

    bus_name: str = ""

    redelivers_lost_tasks: bool = False
    """True when the transport itself delivers again the envelopes a dead
    consumer had taken (a broker's visibility timeout).  The server then
    leaves a dead worker's task to the transport instead of queueing it
    again itself."""

    spans_hosts: bool = False
    """True when producers and consumers may run on different machines (the
    task layer then trusts wall-clock deadlines, not this host's monotonic
    clock)."""

    replies_poll_cheaply: bool = False
    """True when ``recv_replies(n, 0)`` costs no more than a look at memory
    (no round trip): a dispatcher with many results to come then polls its
    reply channel between short naps instead of spinning on it."""

    deliveries: int = 1
    """How many times the envelope this process took last was delivered
    (1 = first delivery; a broker counts redeliveries after consumer deaths)."""

    delivery_tag: object = None
    """What identifies the envelope this process took last, for ``ack_task``
    (a broker's entry id; None where acknowledging is a no-op)."""

    def bind(self, bus_name: str) -> None:
        """Called once by the TaskBus that owns this transport."""
        if self.bus_name and self.bus_name != bus_name:
            raise ValueError(f"transport already bound to bus {self.bus_name!r}")
        self.bus_name = validate_bus_name(bus_name)

    # ------------------------------------------------------------ tasks

    @abc.abstractmethod
    def open(self) -> None:
        """Make sure the task channel exists (a server calls it at start)."""

    @abc.abstractmethod
    def put_task(self, data: bytes, timeout: float | None = None) -> None:
        """Queue one envelope; ``queue.Full`` if ``timeout`` passes first."""

    @abc.abstractmethod
    def put_tasks(self, items: list[bytes], timeout: float | None = None) -> None:
        """Queue envelopes in order; ``queue.Full`` carries ``.done`` (how many went)."""

    @abc.abstractmethod
    def get_tasks(self, max_items: int = 1, timeout: float | None = None) -> list[bytes]:
        """Wait for at least one envelope (no journal: for draining a channel).

        ``queue.Empty`` when ``timeout`` passes, ``TransportClosed`` once
        ``interrupt()`` or ``close()`` was called in this process.
        """

    def take_task(self, journal: Any, timeout: float | None = None) -> bytes:
        """Wait for one envelope and record it in ``journal`` (see the module
        docstring); ``deliveries`` then tells how often it was delivered."""
        data = self.get_tasks(1, timeout)[0]
        write_journal(journal, data)
        return data

    def task_taker(self, journal: Any) -> Callable[[], bytes]:
        """A zero-argument ``take_task(journal)`` for a consumer's loop (a
        transport may return a faster callable with the same behaviour; it
        raises ``TransportClosed`` once interrupted)."""
        return lambda: self.take_task(journal)

    puts_off_loop: bool = False
    """Whether ``dispatch_async`` queues from an executor thread rather than on
    the event loop (a put that waits for a network round trip)."""

    takes_batches: bool = False
    """Whether ``take_tasks`` takes several envelopes in one call (a broker's
    batched read); a consumer with several free slots then uses it."""

    def take_tasks(
        self, journals: list[Any], timeout: float | None = None
    ) -> list[tuple[bytes, int, object]]:
        """Wait for at least one and at most ``len(journals)`` envelopes, the
        i-th recorded in ``journals[i]``; returns (envelope, deliveries,
        delivery_tag) per envelope taken, in order.  This default takes one."""
        data = self.take_task(journals[0], timeout)
        return [(data, self.deliveries, self.delivery_tag)]

    def ack_tasks(self, n: int = 1) -> None:  # noqa: B027 - optional hook
        """The oldest ``n`` envelopes this process took are finished."""

    def ack_task(self, tag: object) -> None:
        """The envelope taken with ``delivery_tag`` ``tag`` is finished (tasks
        may finish in any order).  Transports that acknowledge override it."""
        self.ack_tasks(1)

    def settle(self, data: bytes) -> None:  # noqa: B027 - optional hook
        """The envelope ``data``, taken by a consumer that died, is finished
        for good (buried by a supervisor): never deliver it again."""

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Wake a blocked take in this process; later calls raise
        ``TransportClosed``.  Must be safe to call from a signal handler."""

    @abc.abstractmethod
    def pending_tasks(self) -> int:
        """Envelopes waiting in the task channel (an estimate)."""

    def max_task_size(self) -> int | None:
        """Largest envelope the task channel takes, if it has a limit (sizes
        the consumers' journals)."""
        return None

    def recover(self) -> int:
        """Repair the task channel after a consumer or producer died mid-operation.
        Returns how many envelopes were handed back for delivery."""
        return 0

    # ------------------------------------------------------------ queues
    #
    # Named queues and priorities (issue 16): a *channel* is a (queue,
    # priority 0..9) pair, each its own FIFO; ("default", 0) is the task
    # channel above, so every method of the task section is about it.  A
    # consumer serves queues in strict order and, within a queue, higher
    # priorities first.  The defaults below are a transport with the default
    # channel only: anything else raises NotImplementedError.

    router: Callable[[bytes], tuple[str, int]] | None = None
    """Set by the task layer: the channel an envelope belongs to.  The
    transport never parses envelopes itself; it asks this where it moves
    envelopes on its own (due delayed tasks).  None: everything is default."""

    def put_task_to(
        self, queue: str, priority: int, data: bytes, timeout: float | None = None
    ) -> None:
        """``put_task`` on channel (``queue``, ``priority``); a consumer serving
        several channels is woken."""
        if queue == DEFAULT_QUEUE and priority == 0:
            self.put_task(data, timeout)
            return
        raise NotImplementedError(
            f"{type(self).__name__} has no named queues or priorities yet "
            f"(queue {queue!r}, priority {priority}): use the default queue at priority 0"
        )

    def put_tasks_to(
        self, queue: str, priority: int, items: list[bytes], timeout: float | None = None
    ) -> None:
        """``put_tasks`` on one channel (``queue.Full`` carries ``.done``)."""
        if queue == DEFAULT_QUEUE and priority == 0:
            self.put_tasks(items, timeout)
            return
        self.put_task_to(queue, priority, b"", timeout)  # raises the same error

    def serve(self, queues: list[str]) -> None:
        """This process consumes ``queues``, in that order: ``take_task``,
        ``task_taker`` and ``get_tasks`` then take from the first non-empty
        channel (queue order first, then higher priority first)."""
        if list(queues) != [DEFAULT_QUEUE]:
            raise NotImplementedError(
                f"{type(self).__name__} serves the default queue only, not {list(queues)!r}"
            )

    def queue_depths(self) -> dict[tuple[str, int], int]:
        """Envelopes waiting per existing channel (queue, priority)."""
        return {(DEFAULT_QUEUE, 0): self.pending_tasks()}

    def channels_key(self) -> object:
        """Something that changes when a channel of the served queues appears
        (a supervisor compares it now and then, and calls ``rescan`` in its
        busy workers: a worker busy on one ring would not see a new one)."""
        return None

    def rescan(self) -> None:  # noqa: B027 - optional hook
        """Make the next take look for new channels of the served queues.
        Safe from a signal handler; a take blocked now raises
        ``TransportClosed`` (then ``rescanning()`` is True) or ``queue.Empty``."""

    def rescanning(self) -> bool:
        """True once after ``rescan``: a ``TransportClosed`` came from it, not
        from ``interrupt``, so the consumer builds its taker again."""
        return False

    # ------------------------------------------------------------ time

    holds_delayed: bool = False
    """Whether ``put_delayed`` works (delayed dispatch, retries that hold no worker)."""

    def put_delayed(self, data: bytes, due: float) -> None:
        """Keep an envelope until ``due`` (Unix seconds), durably, then queue
        it (the leader moves it: ``move_due``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold delayed tasks")

    def move_due(self) -> float | None:
        """Leader: queue the delayed envelopes that are due, in due order;
        returns when the next one is due (Unix seconds; None: none wait)."""
        return None

    def wait_timers(self, timeout: float) -> None:
        """Leader: sleep up to ``timeout`` seconds, less when a new delayed
        envelope arrives."""
        time.sleep(max(0.0, timeout))

    def scheduled(self) -> tuple[int, float | None]:
        """(delayed envelopes waiting, the earliest due time)."""
        return 0, None

    def try_lead(self) -> bool:
        """Become (or stay) the bus's leader if no live process is; True
        while this process leads.  Leadership ends with ``resign`` or death."""
        return False

    def resign(self) -> None:  # noqa: B027 - optional hook
        """Stop leading (another process may take over at once)."""

    def retire(self, keep_state: bool) -> None:
        """A server stops: resign, and remove what only a running scheduler
        needs (``keep_state``: the schedule state, for the next leader)."""
        self.resign()

    def leader(self) -> str | None:
        """Who leads now (a pid, or a broker's token), if anyone does."""
        return None

    def write_schedule_state(self, data: bytes) -> None:  # noqa: B027 - optional hook
        """Leader: keep the schedule state (opaque bytes) for later leaders and
        for ``ringbus stats``."""

    def read_schedule_state(self) -> bytes | None:
        return None

    # ------------------------------------------------------------ limits

    def limits(self) -> LimitsBackend | None:
        """Where handlers' ``rate_limit``/``max_concurrency`` are kept, shared
        by every consumer of the bus (None: this transport enforces none)."""
        return None

    # ------------------------------------------------------------ replies

    @abc.abstractmethod
    def reply_address(self) -> bytes:
        """This process's reply channel, created on first use (and after fork)."""

    @abc.abstractmethod
    def recv_replies(self, max_items: int, timeout: float | None = None) -> list[bytes]:
        """Wait for messages on this process's reply channel (``queue.Empty``
        on timeout, ``TransportClosed`` after ``close_replies``)."""

    @abc.abstractmethod
    def close_replies(self) -> None:
        """Close and remove this process's reply channel (wakes its reader)."""

    @abc.abstractmethod
    def send_reply(
        self, address: bytes, pid: int, data: bytes, patience: float | None = None
    ) -> bool:
        """Deliver a message to a dispatcher's reply channel.

        Waits while the channel is full and its dispatcher (``pid``) lives;
        gives up (False, with a log line) when the dispatcher is gone or
        ``patience`` seconds passed.  ``MessageTooLarge`` propagates so the
        caller can send a smaller message instead.
        """

    def reply_putter(self, address: bytes) -> Callable[[bytes, bool], object] | None:
        """A direct ``put(data, block)`` into a reply channel, or None.  Any
        exception it raises means: deliver through ``send_reply`` instead."""
        return None

    # ------------------------------------------------------------ records

    @abc.abstractmethod
    def add_record(self, data: bytes) -> str:
        """Keep ``data`` in the bus's record store; returns its id."""

    @abc.abstractmethod
    def records(self) -> list[Record]:
        """Every record of the bus, oldest first."""

    @abc.abstractmethod
    def take_records(
        self,
        ids: Iterable[str] | None = None,
        handle: Callable[[Record], object] | None = None,
    ) -> list[Record]:
        """Remove the selected records (all when ``ids`` is None) and return
        them; ``handle(record)`` runs before each one is removed (a crash in
        between duplicates, never loses)."""

    # ------------------------------------------------------------ task table

    def task_table(self) -> TaskTable | None:
        """The bus's task table (``task_table.py``: a status record per task,
        kept results), or None where the transport keeps none (then every
        status reads "unknown" and nothing can be cancelled)."""
        return None

    # ------------------------------------------------------------ lifecycle

    @abc.abstractmethod
    def close(self) -> None:
        """Release this process's handles (the channels stay)."""

    @abc.abstractmethod
    def destroy(self, *, force: bool = False) -> None:
        """Remove the bus's channels and records (queued envelopes are dropped).

        Refused with ``RingbusError`` while other live processes use the task
        channel, where the transport can tell, unless ``force``."""

    def check_channel(self) -> None:  # noqa: B027 - optional hook
        """A consumer found nothing for a while: make sure its handle is still
        the bus's task channel (it may have been removed and made anew)."""

    def describe(self) -> str:
        return f"{type(self).__name__}({self.bus_name!r})"
