"""OpenTelemetry tracing: exporters chosen by the standard ``OTEL_*`` variables, off by default.

``OTEL_TRACES_EXPORTER`` = ``none`` (default) | ``console`` | ``otlp`` (needs the
``opentelemetry-exporter-otlp-proto-http`` package). ``OTEL_SERVICE_NAME`` overrides the
service name. The trace context crosses processes as W3C ``traceparent``: in HTTP headers and,
through arq, in a ``trace`` dict among the job's arguments.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

log = logging.getLogger("bulkhead.telemetry")


def setup_tracing(service: str, env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Install a tracer provider if an exporter is configured; return it (for shutdown)."""
    env = os.environ if env is None else env
    choice = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if choice in ("", "none"):
        return None
    exporter: SpanExporter
    if choice == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr)
    elif choice == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.error(
                "OTEL_TRACES_EXPORTER=otlp but opentelemetry-exporter-otlp-proto-http is not "
                "installed; tracing stays off"
            )
            return None
        exporter = OTLPSpanExporter()
    else:
        log.error("OTEL_TRACES_EXPORTER=%s is not supported (none|console|otlp)", choice)
        return None
    name = env.get("OTEL_SERVICE_NAME") or f"bulkhead-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject() -> dict[str, str]:
    """The current trace context as a carrier dict (for headers or job arguments)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(carrier or {}))
