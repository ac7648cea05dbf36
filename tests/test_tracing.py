"""OpenTelemetry: a deploy is one trace, from the client's start call through the workflow
to every activity, with the Fly API's HTTP requests as child spans of the activities that
made them. Recorded with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from harness import deploy_request, new_project_id, running_worker
from temporalio.client import Client

from core import tracing
from core.settings import Settings

otel_trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.util._once import Once  # noqa: E402


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider for this test only (the API allows setting it once per
    process: the test puts the unset state back)."""
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert not tracing.active()
    otel_trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        tracing.uninstrument_httpx()
        provider.shutdown()
        otel_trace._TRACER_PROVIDER = None
        otel_trace._TRACER_PROVIDER_SET_ONCE = Once()
        assert not tracing.active()


def _is_http(span: Any) -> bool:
    return span.kind == otel_trace.SpanKind.CLIENT and (
        "http.request.method" in span.attributes or "http.method" in span.attributes
    )


@pytest.mark.usefixtures("calm_emulator")
async def test_a_deploy_is_one_trace_with_fly_calls_as_child_spans(
    spans: InMemorySpanExporter,
    temporal_client: Client,
    settings: Settings,
    repo: str,
) -> None:
    from turbodeploy.client import connect, start_deploy

    assert tracing.active()
    client = await connect(settings)
    request = deploy_request(new_project_id("o"), repo)
    async with running_worker(client, settings):
        handle = await start_deploy(client, request, task_queue=settings.task_queue)
        result = await asyncio.wait_for(handle.result(), 60)
    assert result.status == "deployed"

    finished = spans.get_finished_spans()
    [start] = [
        s for s in finished if s.name == "StartUpdateWithStartWorkflow:DeployProjectWorkflow"
    ]
    trace_id = start.context.trace_id
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in in_trace}
    names = {s.name for s in in_trace}
    assert "RunWorkflow:DeployProjectWorkflow" in names
    activities = {
        s.name.removeprefix("RunActivity:") for s in in_trace if s.name.startswith("RunActivity:")
    }
    assert {
        "record_deploy_started",
        "resolve_credentials",
        "prepare_fly_config",
        "ensure_fly_app",
        "roll_out_release",
        "check_app_health",
        "record_deploy_result",
    } <= activities, activities
    # No activity of this deploy ran outside its trace.
    outside = [
        s.name
        for s in finished
        if s.name.startswith("RunActivity:") and s.context.trace_id != trace_id
    ]
    assert outside == []

    def ancestors(span: Any) -> list[str]:
        chain = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            chain.append(span.name)
        return chain

    # Every span leads back to the start call; the Fly calls sit under their activity.
    assert all(s is start or start.name in ancestors(s) for s in in_trace)
    fly_calls = [
        s
        for s in in_trace
        if _is_http(s)
        and "/apps" in str(s.attributes.get("url.full", s.attributes.get("http.url", "")))
    ]
    assert fly_calls, sorted(names)
    assert all(any(a.startswith("RunActivity:") for a in ancestors(s)) for s in fly_calls)
    parents = {ancestors(s)[0] for s in fly_calls}
    assert "RunActivity:ensure_fly_app" in parents and "RunActivity:roll_out_release" in parents
    # The token never becomes a span attribute.
    assert not any(
        "FlyV1" in str(v) or "Bearer" in str(v) for s in finished for v in s.attributes.values()
    )


def test_off_without_a_provider_or_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ):
        monkeypatch.delenv(key, raising=False)
    assert tracing.configure() is False
    assert tracing.client_interceptors() == []
