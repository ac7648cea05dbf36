"""Every activity timeout and retry policy of the deploy, named in one place.

Timeouts that depend on the request (how long machines may take to start, how long the
health endpoint may take to answer) are computed from the request's `DeployTimings`, so a
slow-booting app gets more time by asking for it, not by a code change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityCancellationType

from turbodeploy.models import DeployTimings

# Errors that no retry can fix. Activities raise them as non-retryable already; listing them
# here too keeps a misclassified raise from retrying a hopeless request for minutes.
NON_RETRYABLE = [
    "CredentialsMissing",
    "FlyBadRequest",
    "FlyUnauthorized",
    "FlyForbidden",
    "FlyUnprocessable",
    "AppNameTaken",
    "FlyTomlError",
    "MachineUnhealthy",
    "HealthCheckFailed",
    "InvalidRequest",
    "DeploymentRecordError",
]


@dataclass(frozen=True)
class StepPolicy:
    start_to_close: timedelta
    retry: RetryPolicy
    heartbeat: timedelta | None = None
    # Bounds all attempts together, so a step that keeps failing ends the deploy with a
    # clear error instead of retrying until someone notices.
    schedule_to_close: timedelta | None = None
    cancellation: ActivityCancellationType = field(
        default=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
    )


def _retry(initial: float, maximum: float, attempts: int = 0, backoff: float = 2.0) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=initial),
        backoff_coefficient=backoff,
        maximum_interval=timedelta(seconds=maximum),
        maximum_attempts=attempts,
        non_retryable_error_types=NON_RETRYABLE,
    )


# Writing the deployment row. Unlimited attempts within half an hour: a database restart or
# failover must not lose the record of a deploy that already happened on Fly.
RECORD = StepPolicy(
    start_to_close=timedelta(seconds=30),
    retry=_retry(initial=0.5, maximum=10),
    schedule_to_close=timedelta(minutes=30),
)

# SSM: a handful of quick attempts; no deploy may proceed without a token.
CREDENTIALS = StepPolicy(
    start_to_close=timedelta(seconds=30),
    retry=_retry(initial=1, maximum=15, attempts=6),
)

# Clone, render, commit, push: bounded by repository size; heartbeats detect a dead worker.
FLY_CONFIG = StepPolicy(
    start_to_close=timedelta(minutes=5),
    heartbeat=timedelta(seconds=60),
    retry=_retry(initial=2, maximum=60, attempts=6),
)

# Fly app check/create and IP allocation: short calls; 429s carry their own retry delay.
APP = StepPolicy(
    start_to_close=timedelta(minutes=3),
    heartbeat=timedelta(seconds=30),
    retry=_retry(initial=1, maximum=30, attempts=10),
)


def rollout(timings: DeployTimings, machine_count: int) -> StepPolicy:
    # Each machine may take the whole wait timeout in the worst case (rolling one by one).
    per_attempt = timings.machine_wait_timeout * (machine_count + 1) + timedelta(minutes=2)
    return StepPolicy(
        start_to_close=per_attempt,
        heartbeat=timedelta(seconds=30),
        retry=_retry(initial=1, maximum=30, attempts=8),
    )


def health(timings: DeployTimings) -> StepPolicy:
    # The deadline is the point of this step: an unhealthy app fails non-retryably inside
    # the activity. Retries only cover a worker that died mid-check.
    per_attempt = timings.health_deadline + timings.health_request_timeout + timedelta(seconds=30)
    return StepPolicy(
        start_to_close=per_attempt,
        heartbeat=timedelta(seconds=30),
        retry=_retry(initial=1, maximum=10, attempts=3),
    )
