"""Every activity timeout and retry policy of a deploy, named in one place.

Timeouts that depend on the request (how long machines may take to start, how long the
health endpoint may take to answer, how soon a dead worker is noticed) are computed from the
request's `DeployTimings`, so a slow-booting app gets more time by asking for it, not by a
code change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityCancellationType

from activities._errors import NON_RETRYABLE
from core.models import DeployTimings


@dataclass(frozen=True)
class StepPolicy:
    start_to_close: timedelta
    retry: RetryPolicy
    heartbeat: timedelta | None = None
    # Bounds all attempts together, so a step that keeps failing ends the deploy with a
    # clear error instead of retrying until someone notices.
    schedule_to_close: timedelta | None = None
    # Cleanup after a cancellation must never overlap the step it cleans up after.
    cancellation: ActivityCancellationType = field(
        default=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
    )

    def options(self, summary: str) -> dict[str, Any]:
        """The keyword arguments of `workflow.execute_activity_method` for this policy."""
        return {
            "start_to_close_timeout": self.start_to_close,
            "schedule_to_close_timeout": self.schedule_to_close,
            "heartbeat_timeout": self.heartbeat,
            "retry_policy": self.retry,
            "cancellation_type": self.cancellation,
            # The UI shows the summary; the server refuses one above 400 bytes.
            "summary": summary[:390],
        }


def _retry(initial: float, maximum: float, attempts: int = 0, backoff: float = 2.0) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=initial),
        backoff_coefficient=backoff,
        maximum_interval=timedelta(seconds=maximum),
        maximum_attempts=attempts,
        # Derived from the catalogue of failures: a raise that forgot to say it is
        # hopeless still does not retry for minutes.
        non_retryable_error_types=NON_RETRYABLE,
    )


# Writing the deployment row. Unlimited attempts within half an hour: a database restart or
# failover must not lose the record of a deploy that already happened on Fly.
RECORD = StepPolicy(
    start_to_close=timedelta(seconds=15),
    retry=_retry(initial=0.5, maximum=5),
    schedule_to_close=timedelta(minutes=30),
)

# SSM: a handful of quick attempts; no deploy may proceed without a token.
CREDENTIALS = StepPolicy(
    start_to_close=timedelta(seconds=20),
    retry=_retry(initial=1, maximum=10, attempts=5),
)


def fly_config(t: DeployTimings) -> StepPolicy:
    # Clone, render, commit, push: bounded by repository size.
    return StepPolicy(
        start_to_close=timedelta(minutes=5),
        heartbeat=t.heartbeat_timeout,
        retry=_retry(initial=1, maximum=60, attempts=6),
    )


def app(t: DeployTimings) -> StepPolicy:
    # App check/create and IP allocation: short calls; 429s carry their own retry delay.
    return StepPolicy(
        start_to_close=t.app_visible_timeout + timedelta(minutes=2),
        heartbeat=t.heartbeat_timeout,
        retry=_retry(initial=0.5, maximum=30, attempts=10),
    )


def secrets(t: DeployTimings) -> StepPolicy:
    return StepPolicy(
        start_to_close=timedelta(minutes=2),
        heartbeat=t.heartbeat_timeout,
        retry=_retry(initial=0.5, maximum=30, attempts=8),
    )


def build(t: DeployTimings) -> StepPolicy:
    # Remote builds take minutes; a retry rebuilds from the same commit, so keep them few.
    return StepPolicy(
        start_to_close=timedelta(minutes=30),
        heartbeat=t.heartbeat_timeout,
        retry=_retry(initial=5, maximum=60, attempts=3),
    )


def snapshot(t: DeployTimings) -> StepPolicy:
    return StepPolicy(
        start_to_close=timedelta(minutes=1),
        heartbeat=t.heartbeat_timeout,
        retry=_retry(initial=0.5, maximum=15, attempts=10),
    )


def machines_heartbeat(t: DeployTimings) -> timedelta:
    """The heartbeat timeout of a step that holds machine leases (rollout, restore).

    Chosen with the lease TTL: a dead worker is noticed no later than its leases lapse
    (10 s against flyctl's 13 s by default), so the next attempt starts about when they
    would, and takes them over with the nonces the last heartbeat carried instead of
    waiting them out. Kill to progress again: at most the heartbeat timeout, the first
    retry interval and a lease refresh (BENCHMARKS.md, "crash recovery").
    """
    return min(t.heartbeat_timeout, t.lease_ttl)


def _machines_work(t: DeployTimings, machine_count: int) -> timedelta:
    # Each machine may take the whole wait timeout in the worst case (rolling one by one),
    # after a wait for leases held by someone else.
    return (
        t.machine_wait_timeout * (machine_count + 2) + t.lease_wait_timeout + timedelta(minutes=2)
    )


def rollout(t: DeployTimings, machine_count: int) -> StepPolicy:
    # A first retry at once: after a crash, the retry resumes the dead attempt's leases.
    return StepPolicy(
        start_to_close=_machines_work(t, machine_count),
        heartbeat=machines_heartbeat(t),
        retry=_retry(initial=0.5, maximum=30, attempts=8),
    )


def restore(t: DeployTimings, machine_count: int) -> StepPolicy:
    # Putting the last good release back matters more than any other step: it keeps
    # retrying for as long as an operator would reasonably wait.
    return StepPolicy(
        start_to_close=_machines_work(t, machine_count),
        heartbeat=machines_heartbeat(t),
        retry=_retry(initial=1, maximum=60),
        schedule_to_close=timedelta(hours=1),
    )


def health(t: DeployTimings) -> StepPolicy:
    # The deadline is the point of this step: an unhealthy app fails non-retryably inside
    # the activity. Retries only cover a worker that died mid-check. The heartbeat timeout
    # stays above one request and one poll: workers before PeriodicHeartbeat beat only
    # between requests, and one of them may take an attempt during an upgrade.
    return StepPolicy(
        start_to_close=t.health_deadline + t.health_request_timeout + timedelta(seconds=30),
        heartbeat=max(t.heartbeat_timeout, t.health_request_timeout + t.health_poll_max),
        retry=_retry(initial=0.5, maximum=10, attempts=3),
    )


# The callback to the platform: retried for a day (the receiver may be down for a while);
# it runs in its own workflow so it never holds up or fails a deploy.
NOTIFY = StepPolicy(
    start_to_close=timedelta(seconds=30),
    retry=_retry(initial=1, maximum=300),
    schedule_to_close=timedelta(days=1),
)


def machines(t: DeployTimings) -> StepPolicy:
    # Stopping or starting every machine of an app: each is waited for up to the wait timeout
    # (the step repeats what is left, so one slow machine does not make it start over).
    return StepPolicy(
        start_to_close=t.machine_wait_timeout * 2 + timedelta(minutes=2),
        heartbeat=t.heartbeat_timeout,
        retry=_retry(initial=0.5, maximum=30, attempts=8),
    )


def survey(t: DeployTimings) -> StepPolicy:
    # A few reads of the app before a destroy.
    return StepPolicy(
        start_to_close=timedelta(minutes=1),
        heartbeat=t.heartbeat_timeout,
        retry=_retry(initial=0.5, maximum=15, attempts=10),
    )


def teardown(t: DeployTimings) -> StepPolicy:
    # A destroy half done leaves things that cost money: each of its steps keeps retrying,
    # like a restore, for as long as an operator would reasonably wait. Every step is
    # idempotent (what is gone stays gone), so a retry only removes what is left.
    return StepPolicy(
        start_to_close=t.machine_wait_timeout + t.app_visible_timeout + timedelta(minutes=2),
        heartbeat=t.heartbeat_timeout,
        retry=_retry(initial=1, maximum=60),
        schedule_to_close=timedelta(hours=1),
    )
