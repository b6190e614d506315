"""Prometheus metrics of a bus, read from its pool-state segments.

``BusCollector`` is a prometheus_client custom collector: every scrape reads
the pool-state segment of each live server of the bus on this machine (the
same read-only snapshot ``ringbus stats`` takes), the bus's queue depth and
its dead letters.  Nothing is written per process and no multiprocess
directory is needed: the workers already publish their state in shared
memory.

Two ways to use it:

- ``ringbus stats NAME --format prometheus`` prints the exposition once
  (``render_once``);
- ``ringbus worker app:bus --metrics-port 9191`` serves ``/metrics`` from the
  supervisor process (``serve``).  There the collector also sees the
  ``TaskServer`` itself (worker restarts, tasks lost or timed out) and keeps
  the task counters monotonic across worker restarts (a replaced worker's
  slot starts again at zero; what it had counted is kept here).

Task run time and queue wait are histograms the workers keep in the same
segment (``ringbus_task_run_seconds``, ``ringbus_task_queue_wait_seconds``,
by task type and queue; see ``ringbus.server.histograms``).  They survive
worker restarts in the segment itself: nothing is carried here.

prometheus_client is an optional dependency (``pip install ringbus[metrics]``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ringbus import _names
from ringbus._proc import pid_alive
from ringbus.server.histograms import Histogram, TaskTimes
from ringbus.server.pool_state import STATE_NAMES, PoolState, WorkerInfo, read_pool_states

if TYPE_CHECKING:
    from ringbus.server.supervisor import TaskServer
    from ringbus.transport.base import Transport

__all__ = ["COUNTERS", "BusCollector", "cmd_stats_prometheus", "render_once", "serve"]

COUNTERS: tuple[tuple[str, str], ...] = (
    ("succeeded", "Tasks whose handler returned (tasks done minus tasks failed)."),
    ("failed", "Tasks that failed for good (last attempt raised, or never runnable)."),
    ("retried", "Retries: a handler raised and the task was attempted again."),
    ("dead_lettered", "Tasks put in dead letters."),
)
"""``ringbus_tasks_<name>_total``, per server."""


def _slot_counts(w: WorkerInfo) -> dict[str, int]:
    # tasks_done counts every task whose handler ran to an end, failed ones
    # included; failures before the handler (malformed, poison) are in
    # tasks_failed only, hence the floor.
    return {
        "succeeded": max(0, w.tasks_done - w.tasks_failed),
        "failed": w.tasks_failed,
        "retried": w.tasks_retried,
        "dead_lettered": w.dead_lettered,
    }


class _Carry:
    """Task counters of workers that are gone, so totals never go down.

    A slot is reset to zero when its worker is replaced.  Keyed by segment
    and slot, the last values seen for each worker (pid and start time) are
    added to a retired sum once another worker holds the slot.  Counts a
    worker made after the last scrape and before it died are lost (the
    pool state keeps no per-pool totals yet)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, int], tuple[tuple[int, float], dict[str, int]]] = {}
        self._retired: dict[str, dict[str, int]] = {}

    def totals(self, path: str, slots: list[WorkerInfo]) -> dict[str, int]:
        with self._lock:
            retired = self._retired.setdefault(path, dict.fromkeys(dict(COUNTERS), 0))
            for w in slots:
                key = (path, w.slot)
                ident = (w.worker_pid, w.worker_started)
                counts = _slot_counts(w)
                prev = self._last.get(key)
                if prev is not None:
                    (prev_ident, prev_counts) = prev
                    went_down = any(counts[k] < prev_counts[k] for k in counts)
                    if prev_ident != ident or went_down:
                        for k, v in prev_counts.items():
                            retired[k] += v
                if w.worker_pid == 0 and not any(counts.values()):
                    self._last.pop(key, None)  # an empty slot between two workers
                else:
                    self._last[key] = (ident, counts)
            out = dict(retired)
            for (p, _), (_, counts) in self._last.items():
                if p == path:
                    for k, v in counts.items():
                        out[k] += v
            return out


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    return [(floatToGoString(le), n) for le, n in h.cumulative()]


def _own_times(path: str) -> dict[tuple[str, str], TaskTimes]:
    """Task times of this process's own pool (read-only, as a scrape does)."""
    try:
        ps = PoolState.attach(path, writable=False)
    except (OSError, ValueError):
        return {}
    try:
        return ps.histograms()
    finally:
        ps.close()


def _server_pid(path: str) -> str:
    rest = path.rsplit("-pool-", 1)[-1]
    return rest.split("-", 1)[0]


def _is_shm(transport: Transport | None) -> bool:
    if transport is None:
        return True
    from ringbus.transport.shm import ShmTransport

    return isinstance(transport, ShmTransport)


# The outcome counters by task type and queue (histograms.OUTCOMES order).
_OUTCOME_HELP = (
    ("started", "Tasks whose handler ran (counted when it ended)."),
    ("succeeded", "Tasks whose handler returned."),
    ("failed", "Tasks that failed for good (last attempt raised, workers died, time limit)."),
    ("retried", "Attempts that raised and were retried."),
    ("dead_lettered", "Tasks put in dead letters by the workers."),
)


class BusCollector(Collector):
    """Collects the ``ringbus_*`` metrics of one bus at every scrape.

    ``transport``: where the queue and dead letters are (default: shared
    memory, read without attaching).  ``server``: the TaskServer of this
    process, for restarts and monotonic counters (``ringbus worker
    --metrics-port``)."""

    def __init__(
        self,
        bus: str,
        *,
        transport: Transport | None = None,
        server: TaskServer | None = None,
    ) -> None:
        self.bus = bus
        self.transport = transport
        self.server = server
        self._carry = _Carry() if server is not None else None

    # ------------------------------------------------------------ sources

    def queue_depth(self) -> int | None:
        """Tasks waiting in the bus's task channel (None: no channel yet)."""
        if _is_shm(self.transport):
            from ringbus.errors import RingError
            from ringbus.queue import read_stats

            try:
                return int(read_stats(_names.task_ring_name(self.bus))["depth"])
            except (RingError, ValueError, OSError):
                return None
        assert self.transport is not None
        return int(self.transport.pending_tasks())

    def channel_depths(self) -> dict[tuple[str, int], int]:
        """Tasks waiting per (queue, priority) channel (issue 16)."""
        transport = self.transport
        if transport is None or _is_shm(transport):
            from ringbus.transport.shm import ShmTransport

            transport = ShmTransport()
            transport.bind(self.bus)
        return transport.queue_depths()

    def scheduled(self) -> int | None:
        """Delayed tasks waiting for their time (delays, retries held by the
        timer store); None where it cannot be read."""
        transport = self.transport
        if transport is None:
            from ringbus.transport.shm import ShmTransport

            transport = ShmTransport()
            transport.bind(self.bus)
        try:
            return int(transport.scheduled()[0])
        except Exception:  # a broker away, a store not made yet: no sample
            return None

    def dead_letter_types(self) -> dict[str, int]:
        """Dead letters kept now, by task type."""
        from ringbus.tasks.dead_letters import DeadLetterStore

        transport = self.transport
        if transport is None:
            from ringbus.transport.shm import ShmTransport

            transport = ShmTransport()
            transport.bind(self.bus)
        out: dict[str, int] = {}
        for letter in DeadLetterStore(transport).letters():
            out[letter.task_type] = out.get(letter.task_type, 0) + 1
        return out

    # ------------------------------------------------------------ collect

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration time: the bus may not exist yet

    def collect(self) -> Iterator[Metric]:
        bus = self.bus
        now = time.monotonic()
        errors: dict[str, str] = {}
        times: dict[str, dict[tuple[str, str], TaskTimes]] = {}
        pools = read_pool_states(bus, errors, times)
        if self.server is not None and self.server.state_path:
            # This process's own pool first and always (a check of liveness
            # by pid could skip it in an odd pid namespace).
            own = self.server.state_path
            if own not in pools:
                pools[own] = self.server.worker_info()
                times[own] = _own_times(own)

        tasks = {
            name: CounterMetricFamily(f"ringbus_tasks_{name}", doc, labels=["bus", "server"])
            for name, doc in COUNTERS
        }
        workers = GaugeMetricFamily(
            "ringbus_workers",
            "Worker slots by state (starting, idle, running, exited, empty).",
            labels=["bus", "server", "state"],
        )
        alive = GaugeMetricFamily(
            "ringbus_workers_alive",
            "Worker processes alive (their pid exists).",
            labels=["bus", "server"],
        )
        running = GaugeMetricFamily(
            "ringbus_tasks_running",
            "Tasks being run now, by task type.",
            labels=["bus", "server", "task_type"],
        )
        age = GaugeMetricFamily(
            "ringbus_task_running_seconds",
            "How long the task in hand of each busy worker slot has been running.",
            labels=["bus", "server", "slot", "task_type"],
        )
        for path, slots in sorted(pools.items()):
            server = _server_pid(path)
            if self._carry is not None and path == getattr(self.server, "state_path", None):
                counts = self._carry.totals(path, slots)
            else:
                counts = dict.fromkeys(dict(COUNTERS), 0)
                for w in slots:
                    for k, v in _slot_counts(w).items():
                        counts[k] += v
            if self.server is not None and path == self.server.state_path:
                # Tasks the supervisor itself dead-lettered (lost, timed out).
                counts["dead_lettered"] += self.server.dead_lettered
            for name, _ in COUNTERS:
                tasks[name].add_metric([bus, server], counts[name])
            by_state = dict.fromkeys(STATE_NAMES, 0)
            by_type: dict[str, int] = {}
            n_alive = 0
            for w in slots:
                by_state[w.state] = by_state.get(w.state, 0) + 1
                if w.worker_pid and w.state not in ("empty", "exited") and pid_alive(w.worker_pid):
                    n_alive += 1
                if w.state == "running":
                    by_type[w.task_type] = by_type.get(w.task_type, 0) + 1
                    age.add_metric(
                        [bus, server, str(w.slot), w.task_type], max(0.0, now - w.started)
                    )
            for state, n in by_state.items():
                workers.add_metric([bus, server, state], n)
            alive.add_metric([bus, server], n_alive)
            for ttype, n in sorted(by_type.items()):
                running.add_metric([bus, server, ttype], n)
        yield from tasks.values()
        yield from (workers, alive, running, age)
        yield from self._histograms(times)

        unreadable = GaugeMetricFamily(
            "ringbus_pool_states_unreadable",
            "Pool-state segments of the bus that were refused or could not be read.",
            labels=["bus"],
        )
        unreadable.add_metric([bus], len(errors))
        yield unreadable

        depth = self.queue_depth()
        if depth is not None:
            g = GaugeMetricFamily(
                "ringbus_queue_depth", "Tasks waiting in the task channel.", labels=["bus"]
            )
            g.add_metric([bus], depth)
            yield g
        chans = GaugeMetricFamily(
            "ringbus_channel_depth",
            "Tasks waiting per queue and priority (ringbus stats NAME shows them too).",
            labels=["bus", "queue", "priority"],
        )
        for (q, p), n in sorted(self.channel_depths().items()):
            chans.add_metric([bus, q, str(p)], n)
        yield chans
        scheduled = self.scheduled()
        if scheduled is not None:
            g = GaugeMetricFamily(
                "ringbus_scheduled_tasks",
                "Delayed tasks waiting for their time (delay=, eta=, retries).",
                labels=["bus"],
            )
            g.add_metric([bus], scheduled)
            yield g
        dead = GaugeMetricFamily(
            "ringbus_dead_letters",
            "Dead letters kept now, by task type (ringbus dead-letters NAME).",
            labels=["bus", "task_type"],
        )
        for ttype, n in sorted(self.dead_letter_types().items()):
            dead.add_metric([bus, ttype], n)
        yield dead

        if self.server is not None:
            yield from self._server_metrics()

    def _histograms(self, times: dict[str, dict[tuple[str, str], TaskTimes]]) -> Iterator[Metric]:
        labels = ["bus", "server", "task_type", "queue"]
        run = HistogramMetricFamily(
            "ringbus_task_run_seconds",
            "Task run time: from when a worker took the task until it was done with "
            "it, answer sent (one observation per task whose handler ran).",
            labels=labels,
        )
        wait = HistogramMetricFamily(
            "ringbus_task_queue_wait_seconds",
            "Queue wait: from when the task was queued, or became due (a delay, a "
            "retry), until a worker took it.",
            labels=labels,
        )
        outcomes = [
            CounterMetricFamily(f"ringbus_task_{name}", help_text, labels=labels)
            for name, help_text in _OUTCOME_HELP
        ]
        for path, by_type in sorted(times.items()):
            server = _server_pid(path)
            for (task_type, queue), t in sorted(by_type.items()):
                values = [self.bus, server, task_type, queue]
                run.add_metric(values, _buckets(t.run), t.run.sum)
                wait.add_metric(values, _buckets(t.wait), t.wait.sum)
                for family, n in zip(outcomes, t.outcomes, strict=True):
                    family.add_metric(values, n)
        yield run
        yield wait
        yield from outcomes

    def _server_metrics(self) -> Iterator[Metric]:
        srv = self.server
        assert srv is not None
        labels = [self.bus, _server_pid(srv.state_path or "")]
        for name, value, doc in (
            ("ringbus_worker_restarts", srv.restarts, "Workers replaced after they exited."),
            (
                "ringbus_tasks_lost",
                srv.lost,
                "Tasks whose worker died and that were not delivered again.",
            ),
            (
                "ringbus_tasks_timed_out",
                srv.timeouts,
                "Tasks killed for running past task_timeout.",
            ),
            (
                "ringbus_tasks_redelivered",
                srv.redelivered,
                "Tasks of dead workers (or dead servers) queued again.",
            ),
        ):
            c = CounterMetricFamily(name, doc, labels=["bus", "server"])
            c.add_metric(labels, value)
            yield c


def _registry(collector: BusCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render_once(bus: str, transport: Transport | None = None) -> str:
    """The exposition text of ``bus`` now (``ringbus stats --format prometheus``)."""
    return generate_latest(_registry(BusCollector(bus, transport=transport))).decode()


def serve(server: TaskServer, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` of ``server``'s bus from this process, in a daemon
    thread; returns the HTTP server (``shutdown()`` it to stop)."""
    collector = BusCollector(server.bus.name, transport=server.bus.transport, server=server)
    httpd, _thread = start_http_server(port, addr=host, registry=_registry(collector))
    return httpd


def cmd_stats_prometheus(args: argparse.Namespace) -> int:
    """``ringbus stats NAME --format prometheus [--transport URL]``: exit 0, or
    1 when there is no such bus or it cannot be read."""
    from ringbus.cli.probe import resolve_stats_target
    from ringbus.errors import RingError

    url = getattr(args, "transport", None)
    bus = args.name if url else resolve_stats_target(args.name)[1]
    if bus is None:
        print(f"ringbus stats: no bus named {args.name!r} (see `ringbus ls`)", file=sys.stderr)
        return 1
    transport = None
    try:
        if url:
            from ringbus.transport.registry import make_transport

            transport = make_transport(url)
            transport.bind(bus)
        sys.stdout.write(render_once(bus, transport))
    except (RingError, ConnectionError, ValueError, OSError) as exc:
        print(f"ringbus stats: {args.name}: {exc}", file=sys.stderr)
        return 1
    finally:
        if transport is not None:
            transport.close()
    return 0
