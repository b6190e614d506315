"""``ringbus worker`` options from environment variables.

Every option of ``ringbus worker`` can also come from ``RINGBUS_<OPTION>``
(``--max-tasks-per-child`` <- ``RINGBUS_MAX_TASKS_PER_CHILD``), as twelve-factor
deployments, systemd ``Environment=`` lines and container specs like.  A flag
on the command line wins over the environment, which wins over the built-in
default.  A bad value is a usage error (exit 2) that names the variable.

The parser declares these options with ``default=None`` and the help text
says which variable feeds each one (``env_help``); after parsing,
``apply_env`` fills in what the command line left out.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

__all__ = ["EnvOption", "apply_env", "env_help", "env_name"]


def env_name(dest: str) -> str:
    """``max_tasks_per_child`` -> ``RINGBUS_MAX_TASKS_PER_CHILD``."""
    return "RINGBUS_" + dest.upper()


@dataclass(frozen=True)
class EnvOption:
    """An option whose value may come from the environment."""

    dest: str
    convert: Callable[[str], Any]
    default: Any = None

    @property
    def env(self) -> str:
        return env_name(self.dest)


def env_help(text: str, dest: str, default: Any = None) -> str:
    """Help text that names the option's variable (and its default)."""
    tail = f"env {env_name(dest)}"
    if default is not None:
        tail += f"; default {default}"
    return f"{text} ({tail})" if text else f"({tail})"


def apply_env(
    args: argparse.Namespace,
    options: list[EnvOption],
    error: Callable[[str], NoReturn],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Fill options the command line left as None from the environment, then
    from their defaults.  ``error`` (``parser.error``) gets a message naming
    the variable when its value is bad."""
    env = os.environ if environ is None else environ
    for opt in options:
        if getattr(args, opt.dest, None) is not None:
            continue  # given on the command line: flags win
        raw = env.get(opt.env)
        if raw is None or raw.strip() == "":
            setattr(args, opt.dest, opt.default)
            continue
        try:
            value = opt.convert(raw.strip())
        except (argparse.ArgumentTypeError, ValueError) as exc:
            error(f"environment variable {opt.env}={raw!r}: {exc}")
        setattr(args, opt.dest, value)


def choice(*allowed: str) -> Callable[[str], str]:
    """A converter that accepts one of ``allowed`` (case-insensitive)."""

    def convert(text: str) -> str:
        value = text.lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, not {text!r}")
        return value

    convert.__name__ = "choice"
    return convert
