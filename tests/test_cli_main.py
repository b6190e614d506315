"""The ``ringbus`` command's own options: ``-v`` before or after any command,
also before the commands that parse their own options (bench, demo)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ringbus.cli.main import build_parser


def ringbus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringbus.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("command", ["bench", "demo"])
@pytest.mark.parametrize("verbose", [["-v"], ["--verbose"], ["-v", "-v"], []])
def test_verbose_before_a_command_with_its_own_parser(command: str, verbose: list[str]) -> None:
    proc = ringbus(*verbose, command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith(f"usage: ringbus {command}")


COMMANDS = {
    "worker": ["app:bus"],
    "stats": ["shop"],
    "ls": [],
    "rm": ["/x"],
    "gc": [],
    "recover": ["/x"],
    "dead-letters": ["shop"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_verbose_before_or_after_the_command(command: str) -> None:
    rest = COMMANDS[command]
    parser = build_parser()
    assert parser.parse_args([command, *rest]).verbose is False
    assert parser.parse_args(["-v", command, *rest]).verbose is True
    assert parser.parse_args([command, "-v", *rest]).verbose is True
    assert parser.parse_args([command, *rest, "--verbose"]).verbose is True


def test_worker_takes_verbose_after_the_command() -> None:
    proc = ringbus("worker", "-v", "no_such_module_here:bus")
    assert proc.returncode == 2
    assert "cannot load 'no_such_module_here:bus'" in proc.stderr, proc.stderr
    assert "unrecognized arguments" not in proc.stderr
