"""OpenTelemetry traces, optional: `pip install 'turbodeploy[otel]'`.

With the packages installed, tracing is on when the standard variables ask for an exporter
(`OTEL_TRACES_EXPORTER=otlp|console`, or an `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), or when the application embedding the Python API
has set an SDK tracer provider of its own; `OTEL_SDK_DISABLED=true` turns it off. The SDK
reads the rest itself: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`.

When on, every Temporal client made by `core.temporal` carries the SDK's
`TracingInterceptor` (so do the workers built on it): the start call, the workflow, each
activity; and every httpx request (the Fly Machines API, health checks, callbacks) is a
child span of the activity that made it. Without the packages nothing here imports them.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from temporalio.client import Interceptor

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_configured: Any = None  # the SDK TracerProvider this module set up, if any
_httpx_instrumented = False


def available() -> bool:
    try:
        import opentelemetry.trace  # noqa: F401
        import temporalio.contrib.opentelemetry  # noqa: F401
    except ImportError:
        return False
    return True


def disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE


def _exporters_requested() -> list[str]:
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if names:
        return [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        return ["otlp"]
    return []


def active() -> bool:
    """Whether spans are recorded: a real (SDK) tracer provider is in place."""
    if disabled() or not available():
        return False
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def configure() -> bool:
    """Set up the SDK from the `OTEL_*` variables when they ask for it (once per process)
    and trace httpx; True when tracing is on. Safe to call without the packages."""
    global _configured
    if disabled() or not available():
        return False
    requested = _exporters_requested()
    if requested and _configured is None and not active():
        _configured = _provider_from_environment(requested)
    if not active():
        return False
    instrument_httpx()
    return True


def _provider_from_environment(exporters: list[str]) -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create())
    for name in exporters:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning(
                    "OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http "
                    "(pip install 'turbodeploy[otel]'): no spans are exported"
                )
                continue
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r: ignored (otlp, console)", name)
    trace.set_tracer_provider(provider)
    log.info("OpenTelemetry tracing on (exporters: %s)", ", ".join(exporters))
    return provider


def instrument_httpx() -> None:
    """Trace every httpx request of this process (the Fly API client's included)."""
    global _httpx_instrumented
    if _httpx_instrumented:
        return
    try:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    except ImportError:
        log.warning("opentelemetry-instrumentation-httpx is not installed: no Fly API spans")
        return
    HTTPXClientInstrumentor().instrument()
    _httpx_instrumented = True


def uninstrument_httpx() -> None:
    global _httpx_instrumented
    if _httpx_instrumented:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor().uninstrument()
        _httpx_instrumented = False


def client_interceptors() -> list[Interceptor]:
    """The interceptors a new Temporal client gets: tracing when it is on."""
    if not active():
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    instrument_httpx()
    return [TracingInterceptor()]


def shutdown() -> None:
    """Export what is buffered (at the worker's exit)."""
    if _configured is not None:
        _configured.shutdown()
