"""The `health` step: the app answers `GET <url>/api/health` with 200 within its deadline.

A scale-to-zero app has no running machine until a request arrives; the Fly proxy wakes
one and holds the request. So a slow answer or a connection that takes a while is not
"down": the check keeps asking, with backoff, until the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
from pydantic import BaseModel, Field
from temporalio import activity

from activities._errors import HEALTH_CHECK_FAILED
from activities._heartbeat import PeriodicHeartbeat
from core.models import DeployTimings, Model

log = logging.getLogger(__name__)

HEALTH_PATH = "/api/health"


class HealthCheckInput(Model):
    url: str
    timings: DeployTimings = Field(default_factory=DeployTimings)


class HealthCheckResult(Model):
    healthy: bool
    attempts: int
    last_status: int | None = None
    detail: str = ""


class _HealthProgress(BaseModel):
    """Heartbeat details, so a retried attempt keeps the original deadline."""

    started_at: float
    attempts: int
    last_status: int | None = None
    last_error: str = ""


class HealthActivities:
    def __init__(
        self, http: httpx.AsyncClient | None = None, *, max_connections: int = 100
    ) -> None:
        # No credentials ever go through this client: it talks to the public app URL.
        self._http = http or httpx.AsyncClient(
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    @activity.defn(name="check_app_health")
    async def check_health(self, input: HealthCheckInput) -> HealthCheckResult:
        url = input.url.rstrip("/") + HEALTH_PATH
        timings = input.timings
        details = activity.info().heartbeat_details
        progress = (
            _HealthProgress.model_validate(details[0])
            if details
            else _HealthProgress(started_at=time.time(), attempts=0)
        )
        # The proxy may hold a request for as long as a machine takes to wake, and httpx's
        # timeout bounds each phase of it (connect, write, read), not the whole: heartbeats
        # run beside the request so a slow answer is never taken for a dead worker.
        async with PeriodicHeartbeat(progress.model_dump) as beat:
            return await self._poll(url, timings, progress, beat)

    async def _poll(
        self,
        url: str,
        timings: DeployTimings,
        progress: _HealthProgress,
        beat: PeriodicHeartbeat,
    ) -> HealthCheckResult:
        deadline = progress.started_at + timings.health_deadline.total_seconds()
        delay = timings.health_poll_initial.total_seconds()
        while True:
            progress.attempts += 1
            remaining = deadline - time.time()
            request_timeout = max(
                0.1, min(timings.health_request_timeout.total_seconds(), remaining)
            )
            try:
                # The whole request, not only each phase of it (a server that sends its
                # answer a byte at a time would keep every read inside httpx's timeout).
                async with asyncio.timeout(request_timeout):
                    response = await self._http.get(url, timeout=request_timeout)
                progress.last_status = response.status_code
                progress.last_error = "" if response.status_code == 200 else _snippet(response)
                if response.status_code == 200:
                    log.info("%s healthy after %d attempt(s)", url, progress.attempts)
                    return HealthCheckResult(
                        healthy=True,
                        attempts=progress.attempts,
                        last_status=200,
                        detail=f"{url} answered 200",
                    )
            except TimeoutError:
                progress.last_error = f"no whole answer within {request_timeout:.3g}s"
            except httpx.HTTPError as exc:
                progress.last_error = f"{type(exc).__name__}: {exc}"[:300]
            beat.beat()
            remaining = deadline - time.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, timings.health_poll_max.total_seconds())

        last = (f"last answer {progress.last_status}" if progress.last_status else "no answer") + (
            f" ({progress.last_error})" if progress.last_error else ""
        )
        raise HEALTH_CHECK_FAILED(
            f"{url} did not answer 200 within {timings.health_deadline.total_seconds():g}s "
            f"after {progress.attempts} attempt(s); {last}",
            progress.model_dump(),
        )


def _snippet(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return f"HTTP {response.status_code}: {text[:200]}"
