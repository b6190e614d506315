"""Logging of the ``ringbus`` commands: text for people, JSON for collectors.

``--log-format json`` writes one JSON object per line (``time`` in ISO 8601
UTC, ``level``, ``logger``, ``message``, ``pid``, ``task_id`` and
``task_type`` while a handler runs, and ``exc`` with the traceback when
there is one), which Loki, Elasticsearch, CloudWatch and journald's JSON
tooling ingest without a parsing rule.  Text lines name the task as
`` [type id]`` after the logger.  ``TaskLogFilter`` adds the task to each
record; apps that configure logging themselves add it to their handlers.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["LEVELS", "JsonFormatter", "TaskLogFilter", "setup_logging", "worker_logging"]

LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s%(task)s: %(message)s"
"""``%(task)s`` is `` [type id]`` while a handler runs, "" otherwise (``TaskLogFilter``)."""


class TaskLogFilter(logging.Filter):
    """Sets ``task_id``, ``task_type`` and ``task`` (`` [type id]``) on each
    record from ``current_task()``: "" outside a handler.  It follows each
    task of a worker with ``concurrency`` (a context variable per asyncio
    task; plain handlers' threads set it).  Add it to a *handler*
    (``handler.addFilter(TaskLogFilter())``): records of child loggers pass
    their handlers' filters, not the root logger's."""

    _current: Callable[[], Any] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "task_id"):
            current = TaskLogFilter._current
            if current is None:  # imported here: the ringbus command's start stays light
                from ringbus.tasks.context import current_context

                current = TaskLogFilter._current = current_context
            ctx = current()
            if ctx is None:
                record.task_id = record.task_type = record.task = ""
            else:
                record.task_id, record.task_type = ctx.id, ctx.type
                record.task = f" [{ctx.type} {ctx.id or '-'}]"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        doc: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        task_id = getattr(record, "task_id", "")
        task_type = getattr(record, "task_type", "")
        if task_id or task_type:
            doc["task_id"] = task_id
            doc["task_type"] = task_type
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger (replacing handlers set up before)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(TaskLogFilter())  # the task a line was logged from
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def worker_logging(level: str = "info", fmt: str = "text") -> None:
    """``ringbus worker``'s initializer of its workers: one started fresh
    (spawn, in a rolling restart) logs as the server does; a forked one
    has the server's handlers already (and maybe the app's: kept)."""
    if not logging.getLogger().handlers:
        setup_logging(level, fmt)
