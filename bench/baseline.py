"""The baseline: a workflow that runs as many activities as a deploy, and they do nothing.

`python -m bench.baseline` runs a worker for it, configured exactly as `python worker.py`
configures the deploy worker (same settings, same `Worker` options, taken from the deploy
worker itself), so that the only difference the benchmark sees is the deploy's own work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.worker import Worker

BASELINE_QUEUE_ENV = "TURBODEPLOY_BENCH_BASELINE_QUEUE"


@activity.defn(name="bench_noop")
async def noop() -> None:
    return None


@workflow.defn(name="BenchBaselineWorkflow")
class BaselineWorkflow:
    @workflow.run
    async def run(self, activities: int) -> int:
        # One after the other, as a deploy runs its steps.
        for _ in range(activities):
            await workflow.execute_activity(
                "bench_noop", start_to_close_timeout=timedelta(seconds=30)
            )
        return activities


async def _serve() -> None:
    from core import metrics
    from core.logs import configure_logging
    from core.settings import Settings
    from worker import connect, create_worker

    settings = Settings()
    configure_logging(settings.log_level, json_format=settings.log_json)
    client = await connect(settings, metrics.make_runtime(settings.metrics_bind_address))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with create_worker(client, settings) as deploy_worker:
        # The deploy worker is never run: only its configuration is reused.
        config = deploy_worker.config()
        config["task_queue"] = os.environ.get(BASELINE_QUEUE_ENV, settings.task_queue)
        config["workflows"] = [BaselineWorkflow]
        config["activities"] = [noop]
        baseline = Worker(**config)
        run = asyncio.create_task(baseline.run())
        await asyncio.wait([run, asyncio.create_task(stop.wait())], return_when="FIRST_COMPLETED")
        if not run.done():
            await baseline.shutdown()
        with contextlib.suppress(Exception):
            await run


if __name__ == "__main__":
    asyncio.run(_serve())
