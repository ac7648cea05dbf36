"""The deploy worker: `python worker.py`.

Settings come from the environment (see core/settings.py). The worker holds one
PostgreSQL pool, one Fly API connection pool and one SSM client for all the deploys it runs,
and shuts down cleanly on SIGTERM: it stops polling, lets running activities finish within
`TURBODEPLOY_GRACEFUL_SHUTDOWN_SECONDS`, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from datetime import timedelta

from temporalio import activity
from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities._git_credentials import GitCredentials
from activities._heartbeat import heartbeat_if_in_activity
from activities._machines import lease_room
from activities._ssm import build_ssm_client
from activities.app_secrets import AppSecretActivities
from activities.build import BuildActivities
from activities.deployments import DeploymentActivities
from activities.destroy import DestroyActivities
from activities.fly_apps import FlyAppActivities
from activities.fly_config import FlyConfigActivities
from activities.health import HealthActivities
from activities.lifecycle import LifecycleActivities
from activities.notify import NotifyActivities
from activities.restore import ReleaseActivities
from activities.rollout import RolloutActivities
from activities.secrets import CredentialActivities, CredentialStore
from core import metrics, temporal, tracing
from core.db import DeploymentStore, create_pool
from core.logs import configure_logging
from core.models import DeployTimings
from core.settings import Settings
from flyapi import FlyClient, RateLimiter, RequestRetry
from workflows.deploy_project import DeployProjectWorkflow, NotifyWorkflow

log = logging.getLogger("turbodeploy.worker")


async def connect(settings: Settings, runtime: Runtime | None = None) -> Client:
    """The worker's client: the connection of `core/temporal.py` (profile, TEMPORAL_*
    variables, settings), with tracing when OpenTelemetry is on."""
    return await temporal.connect(settings, runtime=runtime)


def _work_key() -> str | None:
    """The work a Fly API request belongs to, for the rate limiter's order: the workflow
    (one project's deploys) of the activity sending it."""
    return activity.info().workflow_id if activity.in_activity() else None


@contextlib.asynccontextmanager
async def create_worker(client: Client, settings: Settings) -> AsyncIterator[Worker]:
    """A worker with every workflow and activity of the service, and their dependencies."""
    if not settings.database_url:
        raise SystemExit("DATABASE_URL (or TURBODEPLOY_DATABASE_URL) is required")
    pool = await create_pool(settings.database_url, settings.db_pool_min, settings.db_pool_max)
    store = DeploymentStore(pool, settings.db_schema)
    await store.migrate()
    ssm = build_ssm_client(settings)
    credentials = CredentialStore(settings, ssm_client=ssm)
    git = GitCredentials(settings, ssm_client=ssm)
    fly = FlyClient(
        settings.fly_api_base_url,
        credentials.fly_token,
        timeout=settings.fly_api_timeout_seconds,
        rate_limiter=(
            RateLimiter(
                settings.fly_api_rate,
                settings.fly_api_burst,
                key=_work_key,
                # In a burst a deploy's next activity may wait minutes for a slot of this
                # worker, held by younger deploys waiting for the budget: not idleness.
                forget_after=300.0,
                # Sized for the production lease TTL; shorter TTLs refresh more often.
                max_leases=lease_room(settings.fly_api_rate, DeployTimings().lease_ttl),
            )
            if settings.fly_api_rate > 0
            else None
        ),
        on_response=metrics.record_fly_response,
        on_wait=heartbeat_if_in_activity,
        retry=RequestRetry(attempts=settings.fly_api_request_attempts),
        max_connections=settings.fly_api_max_connections,
        max_waiting=settings.max_concurrent_activities,
    )
    health = HealthActivities(max_connections=settings.max_concurrent_activities)
    notify = NotifyActivities(settings)
    records = DeploymentActivities(store, settings)
    apps = FlyAppActivities(fly, credentials, settings)
    rollout = RolloutActivities(fly)
    releases = ReleaseActivities(fly)
    builds = BuildActivities(credentials, settings, fly=fly, git=git)
    app_secrets = AppSecretActivities(fly, credentials, settings)
    lifecycle = LifecycleActivities(fly, credentials)
    destroy = DestroyActivities(fly, credentials, store)
    try:
        yield Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[DeployProjectWorkflow, NotifyWorkflow],
            activities=[
                records.record_started,
                records.record_queued,
                records.record_result,
                records.load_release,
                CredentialActivities(credentials).resolve_credentials,
                FlyConfigActivities(settings, git=git).prepare_fly_config,
                apps.ensure_app,
                app_secrets.set_app_secrets,
                app_secrets.restore_app_secrets,
                builds.build_image,
                builds.flyctl_deploy,
                releases.snapshot,
                rollout.roll_out,
                releases.restore,
                health.check_health,
                notify.notify_deployment,
                lifecycle.stop_machines,
                lifecycle.start_machines,
                destroy.survey,
                destroy.destroy_machines,
                destroy.delete_volumes,
                destroy.release_ips,
                destroy.delete_secrets,
                destroy.delete_app,
            ],
            # The workflow modules (and the models and policies they import) are loaded once,
            # not again in each run's sandbox: they hold no state a run could change, and
            # running their top level for every new run was a tenth of the event loop's
            # time with many deploys at once (BENCHMARKS.md).
            workflow_runner=SandboxedWorkflowRunner(
                restrictions=SandboxRestrictions.default.with_passthrough_modules(
                    "workflows", "core", "activities"
                )
            ),
            max_concurrent_activities=settings.max_concurrent_activities,
            max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
            max_cached_workflows=settings.max_cached_workflows,
            graceful_shutdown_timeout=timedelta(seconds=settings.graceful_shutdown_seconds),
            max_heartbeat_throttle_interval=timedelta(
                seconds=settings.max_heartbeat_throttle_seconds
            ),
        )
    finally:
        await notify.aclose()
        await health.aclose()
        await fly.aclose()
        await pool.close()


async def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level, json_format=settings.log_json)
    tracing.configure()
    connection = temporal.temporal_connection(settings)
    client = await connection.connect(runtime=metrics.make_runtime(settings.metrics_bind_address))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with create_worker(client, settings) as worker:
        log.info(
            "worker polling task queue %r on %s%s",
            settings.task_queue,
            connection.describe(),
            ", tracing on" if tracing.active() else "",
        )
        run = asyncio.create_task(worker.run())
        await asyncio.wait([run, asyncio.create_task(stop.wait())], return_when="FIRST_COMPLETED")
        if not run.done():
            log.info("shutting down: finishing running activities")
            await worker.shutdown()
        await run
    tracing.shutdown()
    log.info("worker stopped")


if __name__ == "__main__":
    asyncio.run(main())
