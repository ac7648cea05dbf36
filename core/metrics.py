"""Prometheus metrics of the worker: Temporal's own and the service's, on one endpoint.

The worker's client is connected with `make_runtime(bind_address)`, which serves the SDK's
metrics at `http://<bind_address>/metrics`. The service's metrics are recorded through the
SDK's meters so they appear on the same endpoint:

    turbodeploy_deploys_total{status}                 deploys that ended, by final status
    turbodeploy_deploy_duration_seconds{status}       how long they took (histogram)
    turbodeploy_fly_api_requests_total{method,status_code}   every Fly API response
    turbodeploy_rollbacks_total{kind}                 releases put back (automatic/manual)

The recording functions work in workflow code (through `workflow.metric_meter()`, which
records nothing while a history is replayed, so a replay never counts a deploy twice), in
activities (through `activity.metric_meter()`, tagged with the activity), and elsewhere
(through the meter of the runtime `make_runtime` built, or nowhere). This module does no I/O
at import, so the workflow sandbox may import it.
"""

from __future__ import annotations

from temporalio import activity, workflow
from temporalio.common import MetricMeter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

DEPLOYS_TOTAL = "turbodeploy_deploys_total"
DEPLOY_DURATION = "turbodeploy_deploy_duration_seconds"
FLY_API_REQUESTS_TOTAL = "turbodeploy_fly_api_requests_total"
ROLLBACKS_TOTAL = "turbodeploy_rollbacks_total"

# A deploy takes from seconds (an unchanged release) to tens of minutes (a slow build).
DEPLOY_DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)

_process_meter: MetricMeter | None = None


def make_runtime(bind_address: str | None) -> Runtime:
    """A Temporal runtime serving Prometheus metrics on `bind_address` (`host:port`).

    Without an address the default runtime is returned and nothing is served. Pass the
    runtime to `Client.connect(runtime=...)`; one runtime per process.
    """
    global _process_meter
    if not bind_address:
        return Runtime.default()
    runtime = Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=bind_address,
                histogram_bucket_overrides={DEPLOY_DURATION: list(DEPLOY_DURATION_BUCKETS)},
            )
        )
    )
    _process_meter = runtime.metric_meter
    return runtime


def deploy_finished(status: str, duration_s: float) -> None:
    """A deploy ended with final `status` after `duration_s` seconds. Workflow-safe."""
    meter = _meter()
    attributes = {"status": str(status)}
    meter.create_counter(DEPLOYS_TOTAL, "Deploys that ended, by final status").add(1, attributes)
    meter.create_histogram_float(
        DEPLOY_DURATION, "Time from the start of a deploy to its end", "s"
    ).record(max(duration_s, 0.0), attributes)


def rollback_performed(kind: str = "automatic") -> None:
    """A release was put back: `automatic` after a failed deploy, `manual` on request."""
    _meter().create_counter(ROLLBACKS_TOTAL, "Releases put back, by kind").add(1, {"kind": kind})


def record_fly_response(method: str, status_code: int) -> None:
    """One Fly Machines API response; matches `flyapi.FlyClient(on_response=...)`."""
    _meter().create_counter(FLY_API_REQUESTS_TOTAL, "Fly Machines API responses").add(
        1, {"method": method, "status_code": str(status_code)}
    )


def _meter() -> MetricMeter:
    if workflow.in_workflow():
        return workflow.metric_meter()
    if activity.in_activity():
        return activity.metric_meter()
    return _process_meter or MetricMeter.noop
