"""``ringbus worker`` options from RINGBUS_* environment variables, and its
JSON log: real ``ringbus worker`` subprocesses, plus the parser itself."""

from __future__ import annotations

import argparse
import json
from typing import NoReturn

import pytest

from _ops_support import (
    Worker,
    cli_env,
    ops_bus_fixture,  # noqa: F401 - fixture
    ringbus_cli,
    wait_for,
    workers_fixture,  # noqa: F401 - fixture
)
from _ops_tasks import Ok
from ringbus import TaskBus
from ringbus.cli.config import apply_env
from ringbus.cli.main import WORKER_ENV, build_parser
from ringbus.server.pool_state import read_pool_states


def pool_size(bus_name: str) -> int:
    pools = read_pool_states(bus_name)
    return sum(len(slots) for slots in pools.values())


def test_help_names_the_variable_of_every_option() -> None:
    out = ringbus_cli("worker", "--help", env=cli_env("x"))
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for opt in WORKER_ENV:
        assert f"env {opt.env}" in text, opt.env
    for name in (
        "RINGBUS_WORKERS",
        "RINGBUS_TRANSPORT",
        "RINGBUS_MAX_TASKS_PER_CHILD",
        "RINGBUS_TASK_TIMEOUT",
        "RINGBUS_METRICS_PORT",
        "RINGBUS_LOG_LEVEL",
        "RINGBUS_LOG_FORMAT",
    ):
        assert name in text


def parse(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(["worker", "m:bus", *argv])

    def error(message: str) -> NoReturn:
        raise ValueError(message)

    apply_env(args, WORKER_ENV, error, env)
    return args


def test_flags_win_over_the_environment_which_wins_over_defaults() -> None:
    env = {
        "RINGBUS_WORKERS": "3",
        "RINGBUS_TASK_TIMEOUT": "2.5",
        "RINGBUS_MAX_TASKS_PER_CHILD": "100",
        "RINGBUS_TRANSPORT": "redis://h:1/0",
        "RINGBUS_METRICS_PORT": "9191",
        "RINGBUS_LOG_FORMAT": "JSON",
        "RINGBUS_LOG_LEVEL": "warning",
        "RINGBUS_START_METHOD": "spawn",
    }
    a = parse([], env)
    assert (a.workers, a.task_timeout, a.max_tasks_per_child) == (3, 2.5, 100)
    assert (a.transport, a.metrics_port, a.metrics_host) == ("redis://h:1/0", 9191, "127.0.0.1")
    assert (a.log_format, a.log_level, a.start_method) == ("json", "warning", "spawn")
    b = parse(["-w", "1", "--task-timeout", "9", "--log-format", "text"], env)
    assert (b.workers, b.task_timeout, b.log_format) == (1, 9.0, "text")
    c = parse([], {})
    assert (c.metrics_port, c.log_format, c.start_method) == (0, "text", "fork")
    assert c.task_timeout is None and c.transport is None


@pytest.mark.parametrize(
    ("var", "value", "why"),
    [
        ("RINGBUS_WORKERS", "many", "not an integer"),
        ("RINGBUS_WORKERS", "0", "must be >= 1"),
        ("RINGBUS_TASK_TIMEOUT", "-3", "must be > 0"),
        ("RINGBUS_METRICS_PORT", "70000", "0..65535"),
        ("RINGBUS_LOG_LEVEL", "loud", "must be one of"),
        ("RINGBUS_LOG_FORMAT", "xml", "must be one of"),
        ("RINGBUS_START_METHOD", "vfork", "must be one of"),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_the_variable(
    var: str, value: str, why: str
) -> None:
    out = ringbus_cli("worker", "_ops_tasks:bus", env=cli_env("x", **{var: value}))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert f"environment variable {var}={value!r}" in last and why in last, last
    # a flag given on the command line takes the variable's place: no error
    if var == "RINGBUS_WORKERS":
        ok = parse(["--workers", "2"], {var: value})
        assert ok.workers == 2


def test_worker_takes_its_options_from_the_environment(
    ops_bus: TaskBus, workers: list[Worker]
) -> None:
    env = cli_env(ops_bus.name, RINGBUS_WORKERS="3", RINGBUS_LOG_FORMAT="json")
    w = Worker(ops_bus.name, env=env)
    workers.append(w)
    w.wait_serving()
    assert wait_for(lambda: pool_size(ops_bus.name) == 3, what="three worker slots")
    assert ops_bus.dispatch(Ok(7)).result(timeout=60) == 7
    assert w.stop() == 0
    # --log-format json from the environment: every line is one JSON object
    docs = [json.loads(line) for line in w.lines if line.strip()]
    assert docs, w.lines
    for doc in docs:
        assert {"time", "level", "logger", "message", "pid"} <= set(doc), doc
        assert doc["time"].endswith("Z")
    serving = [d for d in docs if "serving bus" in d["message"]]
    assert serving and serving[0]["pid"] == w.proc.pid and serving[0]["level"] == "info"
    assert "with 3 workers" in serving[0]["message"]
    assert any(d["message"] == "ringbus worker: stopped" for d in docs)


def test_a_flag_wins_over_the_environment(ops_bus: TaskBus, workers: list[Worker]) -> None:
    env = cli_env(ops_bus.name, RINGBUS_WORKERS="3")
    w = Worker(ops_bus.name, "--workers", "1", env=env)
    workers.append(w)
    w.wait_serving()
    assert wait_for(lambda: pool_size(ops_bus.name) == 1, what="one worker slot")
    assert any("with 1 workers" in ln for ln in w.lines)
    assert w.stop() == 0
