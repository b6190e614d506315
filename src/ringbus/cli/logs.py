"""Logging of the ``ringbus`` commands: text for people, JSON for collectors.

``--log-format json`` writes one JSON object per line (``time`` in ISO 8601
UTC, ``level``, ``logger``, ``message``, ``pid``, and ``exc`` with the
traceback when there is one), which Loki, Elasticsearch, CloudWatch and
journald's JSON tooling ingest without a parsing rule.  Forked workers
inherit the configuration.
"""

from __future__ import annotations

import datetime
import json
import logging

__all__ = ["LEVELS", "JsonFormatter", "setup_logging"]

LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


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
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
