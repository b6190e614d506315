"""``from ringbus.otel import OpenTelemetryMiddleware`` (``pip install 'ringbus[otel]'``):
see ``ringbus/tasks/otel.py``."""

from ringbus.tasks.otel import OpenTelemetryMiddleware

__all__ = ["OpenTelemetryMiddleware"]
