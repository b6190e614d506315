"""Handlers per task type, resolved along the MRO, and their retry policies."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from ringbus._names import DEFAULT_QUEUE, validate_queue_name
from ringbus.errors import NoHandlerError
from ringbus.tasks.limits import HandlerLimits, check_limits, limit_key

__all__ = ["DEFAULT_REDELIVERIES", "HandlerRegistry", "RetryPolicy"]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_REDELIVERIES = 3
"""Deliveries after a worker death, for handlers registered without ``retries``."""


class RetryPolicy(NamedTuple):
    """How often a handler's task may be attempted.

    ``retries`` counts extra attempts after the first, shared by handler
    exceptions and worker deaths (one attempt counter travels in the
    envelope).  ``None`` means: exceptions are not retried, but a task whose
    worker died is delivered again up to ``DEFAULT_REDELIVERIES`` times
    (at-least-once).  The delay before retry *n* is
    ``min(max_backoff, backoff * 2**(n-1))`` scaled by a random factor in
    [0.5, 1.5) so failing tasks do not retry in lockstep.
    """

    retries: int | None = None
    backoff: float = 0.1
    max_backoff: float = 30.0
    dead_letter: bool = True
    """Keep tasks whose last attempt raised in dead letters (worker deaths,
    timeouts and malformed envelopes always are)."""
    keep_result: float = 0.0
    """Seconds a finished task's status and result stay for ``bus.status`` /
    ``bus.result`` (0: dropped when the task ends)."""

    @property
    def max_attempts(self) -> int:
        """Attempts allowed when handlers raise."""
        return 1 + (self.retries or 0)

    @property
    def max_deliveries(self) -> int:
        """Attempts allowed when workers die (a poison task stops here)."""
        return 1 + (DEFAULT_REDELIVERIES if self.retries is None else self.retries)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.backoff * 2.0 ** max(0, attempt - 1))
        return base * (0.5 + random.random())


DEFAULT_POLICY = RetryPolicy()


def check_policy(
    retries: int | None,
    backoff: float,
    max_backoff: float,
    dead_letter: bool = True,
    keep_result: float = 0.0,
) -> RetryPolicy:
    if retries is not None and (
        isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 1000
    ):
        raise ValueError(f"retries must be None or an int in 0..1000, not {retries!r}")
    for label, v in (("backoff", backoff), ("max_backoff", max_backoff)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 86400:
            raise ValueError(f"{label} must be a number of seconds in [0, 86400), not {v!r}")
    if isinstance(keep_result, bool) or not isinstance(keep_result, (int, float)) or not (
        0 <= keep_result <= 366 * 86400
    ):
        raise ValueError(f"keep_result must be seconds in [0, 1 year], not {keep_result!r}")
    return RetryPolicy(
        retries, float(backoff), float(max_backoff), bool(dead_letter), float(keep_result)
    )


class HandlerRegistry:
    """The handler table of a bus (``TaskBus`` is one)."""

    name: str

    def __init__(self) -> None:
        self._handlers: dict[type, Callable[[Any], Any]] = {}
        self._policies: dict[type, RetryPolicy] = {}
        self._resolved: dict[type, Callable[[Any], Any]] = {}
        self._resolved_policy: dict[type, RetryPolicy] = {}
        # Names under which task types travel on msgpack/JSON buses.
        self._type_names: dict[type, str] = {}
        self._limits: dict[type, HandlerLimits] = {}  # rate_limit / max_concurrency (limits.py)
        # Named queues (issue 16): registered type -> queue; only types that
        # resolve to another queue than "default" are in _off_default, so a
        # dispatch of a default task tests one set.
        self._queues: dict[type, str] = {}
        self._off_default: dict[type, str] = {}

    # ------------------------------------------------------------ handlers

    def handler(
        self,
        task_type: type,
        *,
        retries: int | None = None,
        backoff: float = 0.1,
        max_backoff: float = 30.0,
        dead_letter: bool = True,
        name: str | None = None,
        rate_limit: str | None = None,
        max_concurrency: int | None = None,
        keep_result: float = 0.0,
        queue: str | None = None,
    ) -> Callable[[F], F]:
        """Decorator: ``@bus.handler(SendEmail)`` registers the function for
        ``SendEmail`` and its subclasses (returns the function unchanged).

        ``retries``/``backoff``/``max_backoff``/``dead_letter``/``keep_result``:
        see ``RetryPolicy``.
        ``name``: the type's name on msgpack/JSON buses (default
        ``module.QualName``), e.g. for producers in other languages.
        ``rate_limit`` (``"N/s"``, ``"N/m"``, ``"N/h"``) and ``max_concurrency``:
        machine-wide limits of this handler's starts (see ``tasks/limits.py``).
        ``queue``: the named queue these tasks go to (default: ``"default"``).
        """
        policy = check_policy(retries, backoff, max_backoff, dead_letter, keep_result)
        limits = check_limits(rate_limit, max_concurrency)
        q = self._check_queue(queue)

        def deco(fn: F) -> F:
            self._register(task_type, fn, policy, name, limits, q)
            return fn

        return deco

    def register(
        self,
        task_type: type,
        fn: Callable[[Any], Any],
        *,
        retries: int | None = None,
        backoff: float = 0.1,
        max_backoff: float = 30.0,
        dead_letter: bool = True,
        name: str | None = None,
        rate_limit: str | None = None,
        max_concurrency: int | None = None,
        keep_result: float = 0.0,
        queue: str | None = None,
    ) -> None:
        """Register ``fn`` for tasks of ``task_type`` (a class or an ABC);
        ``name``, ``rate_limit``, ``max_concurrency``, ``keep_result``,
        ``queue``: see ``handler``."""
        policy = check_policy(retries, backoff, max_backoff, dead_letter, keep_result)
        limits = check_limits(rate_limit, max_concurrency)
        self._register(task_type, fn, policy, name, limits, self._check_queue(queue))

    def _check_queue(self, queue: str | None) -> str:
        return DEFAULT_QUEUE if queue is None else validate_queue_name(queue, self.name)

    def _register(
        self,
        task_type: type,
        fn: Callable[[Any], Any],
        policy: RetryPolicy,
        name: str | None = None,
        limits: HandlerLimits | None = None,
        queue: str = DEFAULT_QUEUE,
    ) -> None:
        if not isinstance(task_type, type):
            raise TypeError(f"task_type must be a class, not {task_type!r}")
        if not callable(fn):
            raise TypeError(f"handler for {task_type.__qualname__} is not callable: {fn!r}")
        if name is not None and (
            not isinstance(name, str) or not 0 < len(name.encode()) < 256 or " " in name
        ):
            raise ValueError(f"a task type name must be 1-255 UTF-8 bytes, no spaces: {name!r}")
        if limits is not None:
            limit_key(task_type)  # a name too long to key the limit: ValueError now
        self._handlers[task_type] = fn
        self._policies[task_type] = policy
        if name is not None:
            self._type_names[task_type] = name
        # -- limits (rate_limit / max_concurrency)
        if limits is None:
            self._limits.pop(task_type, None)
        else:
            self._limits[task_type] = limits
        # -- end limits
        self._queues[task_type] = queue
        self._resolved.clear()
        self._resolved_policy.clear()
        self._off_default.clear()
        self._registry_changed()

    def _registry_changed(self) -> None:
        """Hook: a handler was registered (a bus drops what it cached)."""

    def type_name(self, task_type: type) -> str:
        """The name ``task_type`` travels under on msgpack/JSON buses."""
        return self._type_names.get(task_type) or f"{task_type.__module__}.{task_type.__qualname__}"

    def registered_type(self, task_type: type) -> type:
        """The registered type whose handler serves ``task_type``."""
        return self._lookup(task_type)

    def policy(self, task_type: type) -> RetryPolicy:
        """The retry policy of the handler that serves ``task_type``."""
        p = self._resolved_policy.get(task_type)
        if p is None:
            p = self._policies.get(self._lookup(task_type), DEFAULT_POLICY)
            self._resolved_policy[task_type] = p
        return p

    def limits_of(self, task_type: type) -> tuple[type, HandlerLimits] | None:
        """(the registered type, its limits) of the handler that serves
        ``task_type``, or None when that handler is not limited."""
        found = self._lookup(task_type)
        lim = self._limits.get(found)
        return None if lim is None else (found, lim)

    def resolve(self, task_type: type) -> Callable[[Any], Any]:
        """The handler for ``task_type``: the first class of its MRO that has
        one (most specific wins), else a registered ABC it is a virtual
        subclass of, else a handler for ``object``.  Cached per type."""
        fn = self._resolved.get(task_type)
        if fn is not None:
            return fn
        found = self._lookup(task_type)
        fn = self._handlers[found]
        q = self._queues.get(found, DEFAULT_QUEUE)
        if q != DEFAULT_QUEUE:
            self._off_default[task_type] = q
        self._resolved[task_type] = fn
        return fn

    def queue_of(self, task_type: type) -> str:
        """The queue of ``task_type``: that of the handler serving it."""
        if task_type not in self._resolved:
            self.resolve(task_type)
        return self._off_default.get(task_type, DEFAULT_QUEUE)

    @property
    def queues(self) -> list[str]:
        """Every queue the handlers use, in the order first registered, and
        ``"default"`` (first) always: what a TaskServer serves by default."""
        out = [DEFAULT_QUEUE]
        for q in self._queues.values():
            if q not in out:
                out.append(q)
        return out

    def _lookup(self, task_type: type) -> type:
        """The registered type whose handler serves ``task_type``."""
        handlers = self._handlers
        found: type | None = None
        for base in task_type.__mro__:
            if base is not object and base in handlers:
                found = base
                break
        if found is None:
            virtual = [k for k in handlers if k is not object and issubclass(task_type, k)]
            # Most specific: an ABC no other match is a subclass of.
            for k in virtual:
                if not any(o is not k and issubclass(o, k) for o in virtual):
                    found = k
                    break
        if found is None and object in handlers:
            found = object
        if found is None:
            raise NoHandlerError(
                f"no handler registered on bus {self.name!r} for "
                f"{task_type.__module__}.{task_type.__qualname__} or any of its bases"
            )
        return found

    @property
    def handlers(self) -> dict[type, Callable[[Any], Any]]:
        """A copy of the registry (type -> handler)."""
        return dict(self._handlers)
