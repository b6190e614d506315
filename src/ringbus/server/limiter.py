"""What a worker asks before it starts a task whose handler is limited.

``acquire(cls)`` says whether a task of type ``cls`` may start now (its
handler's ``rate_limit`` token bucket and ``max_concurrency`` permits, shared
machine-wide through the transport's limits backend); ``release(cls,
permit)`` gives the permit back when the task is done.  A task that may not
start now is **handed back**, never waited for: ``hand_back`` puts it into
the bus's timer store, due when the bucket has a token for it (the exact
wait, spread one token interval apart per refused task) or, for a full cap,
after 20-40 ms; the worker's slot takes the next task at once.  A refusal is
not an attempt: the task's attempt count is unchanged.
"""

from __future__ import annotations

import logging
import time

from ringbus.tasks import envelope as env
from ringbus.tasks.bus import TaskBus
from ringbus.tasks.limits import limit_key
from ringbus.tasks.routing import put_envelope
from ringbus.transport.base import Transport
from ringbus.transport.limits import LimitGate

__all__ = ["REFUSED", "UNREACHABLE_RETRY_NS", "Limiter"]

log = logging.getLogger("ringbus.server")

REFUSED = -1
"""``acquire``'s answer when the task may not start now (see ``retry_after``)."""
UNREACHABLE_RETRY_NS = 1_000_000_000
"""A task whose limits cannot be asked (a broker down) is tried again in 1 s."""


class Limiter:
    """One per worker process: the gates of its bus's limited handlers.

    Not thread-safe: each worker loop calls it from one thread (the main
    thread, or the concurrent worker's event loop)."""

    def __init__(self, bus: TaskBus) -> None:
        self.bus = bus
        self._gates: dict[type, LimitGate | None] = {}
        self.retry_after = 0.0
        """Seconds until a refused task should be tried again (set by ``acquire``)."""

    def limited(self, cls: type) -> bool:
        """Whether tasks of type ``cls`` go through a gate (cached per type)."""
        if cls not in self._gates:
            self._gates[cls] = self._gate(cls)
        return self._gates[cls] is not None

    def _gate(self, cls: type) -> LimitGate | None:
        found = self.bus.limits_of(cls)
        if found is None:
            return None
        registered, lim = found
        backend = self.bus.transport.limits()
        if backend is None:
            log.error(
                "ringbus: %s enforces no limits: handler of %s (%s) runs unlimited",
                self.bus.transport.describe(),
                registered.__qualname__,
                lim.describe(),
            )
            return None
        return backend.gate(limit_key(registered), lim.interval_ns, lim.burst, lim.max_concurrency)

    def acquire(self, cls: type) -> int:
        """May a task of type ``cls`` start now?  A permit (``> 0``) to give
        back with ``release``, 0 (yes, nothing to give back), or ``REFUSED``
        (``retry_after`` then says when to try again)."""
        try:
            gate = self._gates[cls]
        except KeyError:
            gate = self._gates[cls] = self._gate(cls)
        if gate is None:
            return 0
        try:
            answer = gate.try_start()
        except Exception as exc:  # a broker down: never run past the limit
            log.warning("ringbus: limits of %s unreachable, task handed back: %s", cls, exc)
            answer = -UNREACHABLE_RETRY_NS
        if answer >= 0:
            return answer
        self.retry_after = -answer / 1e9
        return REFUSED

    def release(self, cls: type, permit: int) -> None:
        """The task started with ``permit`` is done."""
        if permit > 0:
            gate = self._gates.get(cls)
            try:
                kept = gate is None or gate.finish(permit)
            except Exception as exc:  # a broker down: its permit expires there
                log.warning("ringbus: could not give back a permit of %s: %s", cls, exc)
                return
            if not kept:
                log.warning(
                    "ringbus: a permit of %s was taken back before this worker gave it "
                    "(judged dead from another pid namespace?)",
                    cls.__qualname__,
                )

    def hand_back(self, transport: Transport, data: bytes, attempt: int) -> None:
        """Queue a refused task again for ``retry_after`` seconds from now (the
        caller then finishes its journal).  ``attempt``: the attempt it was
        taken at (a broker's delivery count is kept in the envelope)."""
        data = env.with_attempt(data, attempt)
        if transport.holds_delayed:
            try:
                transport.put_delayed(data, time.time() + self.retry_after)
                return
            except Exception as exc:
                log.warning("ringbus: a rate-limited task goes back at once: %s", exc)
        put_envelope(transport, data)  # its own (queue, priority): routing.py
