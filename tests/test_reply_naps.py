"""A dispatcher with many results to come polls its reply ring between naps
instead of spinning on it (tasks/results.py, ``_read_once``): results,
deadlines and close still answer every future (real workers, shared memory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from _tasks_basic import Add, Sleep, make_bus
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import BusClosed, TaskServer, TaskTimeout
from ringbus.tasks.results import _NAP_PENDING


def test_results_and_deadlines_of_many_pending_tasks_while_polling(
    bus_name: str, servers: list[TaskServer], tmp_path: Path
) -> None:
    bus = make_bus(bus_name)
    try:
        servers.append(TaskServer(bus, workers=1).start())
        started = tmp_path / "started"
        blocker = bus.dispatch(Sleep(1.5, started=str(started)))
        wait_for(started.exists, what="the blocking task to start")
        n = 2 * _NAP_PENDING
        late = [bus.dispatch(Add(i, 0), timeout=0.3) for i in range(n)]  # behind the blocker
        sums = [bus.dispatch(Add(i, 1)) for i in range(n)]
        st = bus._st
        assert st is not None and st.transport.replies_poll_cheaply
        for fut in late:  # failed by the reader at their deadline, none run
            with pytest.raises(TaskTimeout):
                fut.result(timeout=30)
        assert [f.result(timeout=30) for f in sums] == [i + 1 for i in range(n)]
        assert blocker.result(timeout=30) > 0
        assert st.naps > 0, "the reader never polled between naps"
        # After the burst, a lone task is answered as ever.
        assert bus.dispatch(Add(20, 22)).result(timeout=30) == 42
    finally:
        for s in servers:
            s.stop(timeout=5)
        bus.destroy()


def test_close_answers_many_pending_futures_while_polling(
    bus_name: str, servers: list[TaskServer]
) -> None:
    bus = make_bus(bus_name)
    try:
        servers.append(TaskServer(bus, workers=1).start())
        futs = [bus.dispatch(Sleep(0.01)) for _ in range(4 * _NAP_PENDING)]  # 2.5 s of work
        st = bus._st
        assert st is not None
        wait_for(lambda: st.naps > 0, what="the reader to poll between naps")
        bus.close()
        closed = 0
        for fut in futs:
            try:
                assert fut.result(timeout=30) > 0  # answered before the close
            except BusClosed:
                closed += 1
        assert closed > 0
    finally:
        for s in servers:
            s.stop(timeout=5)
        bus.destroy(force=True)
