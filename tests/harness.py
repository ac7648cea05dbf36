"""Shared machinery of the tests: requests, settings and workers against the session's
servers, worker processes, stalling proxies, a logging `git`, and black-box readers of what
a deploy left behind (rows, machines, commits). conftest.py binds them into fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from temporalio.api.enums.v1 import PendingActivityState, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle

from activities.rollout import RolloutInput
from core.models import DeployRequest, DeployTimings
from core.settings import Settings
from flysim import FlySim, SimConfig
from worker import create_worker

# Not resolved: the tests may run from a copy whose files link back here, and the worker
# must start from the copy the test imports.
PROJECT_ROOT = Path(__file__).absolute().parent.parent
IMAGE = "registry.fly.io/turbobackend-test:deployment-1"


def fast_timings(**overrides: timedelta) -> DeployTimings:
    """Millisecond polls and second-scale deadlines, so a crash is noticed within seconds."""
    values: dict[str, timedelta] = {
        "health_deadline": timedelta(seconds=5),
        "health_poll_initial": timedelta(milliseconds=20),
        "health_poll_max": timedelta(milliseconds=100),
        "health_request_timeout": timedelta(seconds=1),
        "machine_wait_timeout": timedelta(seconds=10),
        "machine_poll_interval": timedelta(milliseconds=20),
        "app_visible_timeout": timedelta(seconds=3),
        "app_visible_poll": timedelta(milliseconds=20),
        "lease_ttl": timedelta(seconds=3),
        "lease_wait_timeout": timedelta(seconds=5),
        "heartbeat_timeout": timedelta(seconds=2),
    }
    values.update(overrides)
    return DeployTimings.model_validate(values)


def new_project_id(prefix: str = "p") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def deploy_request(project_id: str, repo_url: str, **fields: Any) -> DeployRequest:
    """A request to deploy `repo_url` as `project_id`: the test image, fast timings, and
    `fields` over them. No deployment id unless given: the workflow or the client assigns
    one; pass `deployment_id=new_deployment_id()` to know it before submitting."""
    values: dict[str, Any] = {
        "project_id": project_id,
        "repo_url": repo_url,
        "image": IMAGE,
        "timings": fast_timings(),
    }
    values.update(fields)
    return DeployRequest.model_validate(values)


# A rendered-style fly.toml with one HTTP service and a health check, for activity tests.
FLY_TOML = """
app = "placeholder"
primary_region = "iad"

[http_service]
  internal_port = 3000
  force_https = true
  auto_stop_machines = "stop"
  auto_start_machines = true
  min_machines_running = 0

  [[http_service.checks]]
    grace_period = "1s"
    interval = "15s"
    timeout = "5s"
    method = "GET"
    path = "/api/health"

[[vm]]
  size = "shared-cpu-1x"
  memory = "256mb"
"""

# Waits and polls of the Fly activities run on their own (no workflow around them).
ACTIVITY_TIMINGS = DeployTimings(
    machine_wait_timeout=timedelta(seconds=3),
    machine_poll_interval=timedelta(milliseconds=20),
    app_visible_timeout=timedelta(seconds=2),
    app_visible_poll=timedelta(milliseconds=20),
    lease_ttl=timedelta(seconds=3),
    # A lease held elsewhere fails the attempt quickly (the tests that wait say so).
    lease_wait_timeout=timedelta(milliseconds=500),
)


def rollout_input(app: str, image: str, deployment: str, **overrides: Any) -> RolloutInput:
    """A rollout of `image` to `app` as deployment `deployment`: one machine in iad from
    FLY_TOML, with ACTIVITY_TIMINGS, and `overrides` over them."""
    values: dict[str, Any] = {
        "deployment_id": deployment,
        "app_name": app,
        "image": image,
        "region": "iad",
        "fly_toml": FLY_TOML,
        "machine_count": 1,
        "timings": ACTIVITY_TIMINGS,
    }
    values.update(overrides)
    return RolloutInput(**values)


# ---------------------------------------------------------------------------- settings


def ssm_settings(ssm_endpoint: str, **overrides: Any) -> Settings:
    """Settings that read credentials from moto's SSM at `ssm_endpoint`."""
    return Settings(aws_endpoint_url=ssm_endpoint, aws_region="us-east-1", **overrides)


def worker_settings(
    *,
    database_url: str,
    ssm_endpoint: str,
    sim: Any,
    work_dir: Path,
    name: str = "t",
    **overrides: Any,
) -> Settings:
    """Settings of a worker against the test servers, on a task queue and a database schema
    of its own (both named after `name`), with `overrides` over them."""
    unique = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "task_queue": f"{name}-{unique}",
        "database_url": database_url,
        "db_schema": f"{name}_{unique}",
        "aws_endpoint_url": ssm_endpoint,
        "fly_api_base_url": sim.base_url,
        "app_url_template": sim.app_url_template,
        "work_dir": str(work_dir),
        # The fast timings' 2 s heartbeat timeouts would leave a heartbeat 0.4 s to reach
        # the server (the SDK sends one every 0.8 of the timeout); a loaded test machine
        # needs more. Production's 10 s timeouts leave 2 s.
        "max_heartbeat_throttle_seconds": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_worker(client: Client, settings: Settings) -> AsyncIterator[None]:
    """A worker composed as `python worker.py` composes it, running in this process."""
    async with create_worker(client, settings) as w:
        task = asyncio.create_task(w.run())
        try:
            yield
        finally:
            await w.shutdown()
            await task


# ------------------------------------------------------------------------------ worker


class WorkerProcess:
    """`python worker.py` in its own process group, its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "worker.py")],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the worker and whatever it ran (git), as a lost machine would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.pid} still runs after {timeout:g}s")
            await asyncio.sleep(0.05)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill()
        elif not self._log.closed:
            self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def worker_env(
    *,
    temporal_address: str,
    task_queue: str,
    database_url: str,
    db_schema: str,
    ssm_endpoint: str,
    fly_api_base_url: str,
    app_url_template: str,
    work_dir: Path,
    path_prefix: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment `python worker.py` reads, and nothing inherited that could leak in."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "TURBODEPLOY_TEMPORAL_ADDRESS": temporal_address,
        "TURBODEPLOY_TASK_QUEUE": task_queue,
        "DATABASE_URL": database_url,
        "PG_DB_SCHEMA": db_schema,
        "AWS_ENDPOINT_URL": ssm_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "TURBODEPLOY_FLY_API_BASE_URL": fly_api_base_url,
        "TURBODEPLOY_APP_URL_TEMPLATE": app_url_template,
        "TURBODEPLOY_GRACEFUL_SHUTDOWN_SECONDS": "3",
        "TURBODEPLOY_MAX_HEARTBEAT_THROTTLE_SECONDS": "1",  # as worker_settings, and why
        "TURBODEPLOY_WORK_DIR": str(work_dir),
        "TURBODEPLOY_LOG_LEVEL": "DEBUG",
        "PYTHONUNBUFFERED": "1",
    }
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    env.update(extra or {})
    return env


async def wait_for_pollers(client: Client, task_queue: str, timeout: float = 30.0) -> None:
    """Return once a worker polls `task_queue` for workflow tasks (it has migrated the DB)."""
    deadline = time.monotonic() + timeout
    request = DescribeTaskQueueRequest(
        namespace=client.namespace,
        task_queue=TaskQueue(name=task_queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    )
    while True:
        response = await client.workflow_service.describe_task_queue(request)
        if response.pollers:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no worker polls {task_queue} after {timeout:g}s")
        await asyncio.sleep(0.1)


async def running_activities(handle: Any) -> list[str]:
    """Names of the activities a worker is executing right now."""
    description = await workflow_of(handle).describe()
    return [
        p.activity_type.name
        for p in description.raw_description.pending_activities
        if p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
    ]


async def wait_for_activity(handle: Any, activity_type: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while activity_type not in await running_activities(handle):
        if time.monotonic() > deadline:
            raise TimeoutError(f"activity {activity_type} did not start within {timeout:g}s")
        await asyncio.sleep(0.02)


async def wait_until(
    predicate: Any, what: str, timeout: float = 30.0, interval: float = 0.02
) -> None:
    """Poll a sync or async predicate until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:g}s")
        await asyncio.sleep(interval)


def workflow_of(handle: Any) -> WorkflowHandle[Any, Any]:
    """The Temporal workflow handle behind what `start_deploy` returned."""
    workflow: WorkflowHandle[Any, Any] = getattr(handle, "workflow", handle)
    return workflow


def _deploy_failures() -> tuple[type[BaseException], ...]:
    from temporalio.client import WorkflowFailureError

    from turbodeploy import client

    failed = getattr(client, "DeployFailed", None)
    return (WorkflowFailureError, failed) if failed else (WorkflowFailureError,)


# What `handle.result()` raises when a deploy ends without deploying.
DEPLOY_FAILURES = _deploy_failures()


def failure_message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return str(cause) if cause is not None else str(exc)


async def max_attempt(handle: Any, activity_type: str | None = None) -> int:
    """The highest attempt any (or the named) activity of the deploy reached."""
    history = await workflow_of(handle).fetch_history()
    names = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    }
    return max(
        (
            e.activity_task_started_event_attributes.attempt
            for e in history.events
            if e.HasField("activity_task_started_event_attributes")
            and activity_type
            in (None, names.get(e.activity_task_started_event_attributes.scheduled_event_id))
        ),
        default=0,
    )


async def history_json(handle: Any) -> str:
    """The exported history with every payload decoded (see conftest.readable_history)."""
    from conftest import readable_history

    history = await workflow_of(handle).fetch_history()
    return readable_history(history)


# ------------------------------------------------------------------------------ readers


async def deployment_rows(database_url: str, schema: str, project_id: str) -> list[asyncpg.Record]:
    """The project's deployment rows, oldest first."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            f'SELECT * FROM "{schema}".project_deployments '
            "WHERE project_id = $1 ORDER BY deployed_at",
            project_id,
        )
    finally:
        await conn.close()


# What the `rows_of` fixture gives: `await rows_of(project_id)`.
Rows = Callable[[str], Awaitable[list[asyncpg.Record]]]


def by_deployment(rows: Sequence[asyncpg.Record]) -> dict[str, asyncpg.Record]:
    return {r["deployment_id"]: r for r in rows}


async def row_version(
    pool: asyncpg.Pool[asyncpg.Record], schema: str, table: str, deployment_id: str
) -> int:
    """The version of a row: it changes on every write to the row, even one changing nothing."""
    value = await pool.fetchval(
        f'SELECT xmin::text::bigint FROM "{schema}".{table} WHERE deployment_id = $1',
        deployment_id,
    )
    assert value is not None
    return int(value)


async def dump_schema(database_url: str, schema: str) -> str:
    """Every row of every table of `schema`, as text."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
        out = []
        for t in tables:
            name = t["table_name"]
            for row in await conn.fetch(f'SELECT * FROM "{schema}"."{name}"'):
                out.append(f"{name}: {dict(row)!r}")
        return "\n".join(out)
    finally:
        await conn.close()


def app_machines(sim: Any, app: str) -> list[dict[str, Any]]:
    return [m for m in sim.snapshot()["machines"] if m["app"] == app and m["state"] != "destroyed"]


def held_leases(sim: Any, app: str) -> list[dict[str, Any]]:
    return [lease for lease in sim.snapshot()["leases"] if lease.get("app") == app]


def apps_named(sim: Any, app: str) -> list[dict[str, Any]]:
    return [a for a in sim.snapshot()["apps"] if a["name"] == app]


def fly_toml_commits(repo: str, branch: str = "main") -> list[str]:
    out = subprocess.run(
        ["git", "--git-dir", repo, "log", "--format=%H", branch, "--", "fly.toml"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()


def api_requests_for(sim: Any, app: str) -> int:
    marker = f"/apps/{app}"
    return sum(1 for _, _, path, _ in list(sim.request_log) if marker in path)


def max_requests_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most requests that arrived within any `window` seconds (sliding)."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


@contextlib.contextmanager
def own_flysim(token: str, org: str = "personal") -> Iterator[FlySim]:
    """An emulator of one's own, so its timings can change without touching other tests."""
    sim = FlySim(SimConfig(tokens={token: org}))
    with sim.serve_in_thread():
        yield sim


def reset_faults(sim: Any) -> None:
    """The emulator without faults, delays or unhealthy images (the `calm_emulator` fixture
    does this before and after a test)."""
    sim.config.faults = type(sim.config.faults)()
    sim.config.timing = type(sim.config.timing)()
    sim.config.unhealthy_images.clear()
    sim.config.failing_images.clear()
    sim.config.crashing_images.clear()
    sim.config.full_regions.clear()


def take_app_name(sim: Any, app: str) -> None:
    """Create `app` in another organisation, so that its name is taken for the test's token."""
    token = f"FlyV1 fm2_other-{uuid.uuid4().hex}"
    sim.config.tokens[token] = "someone-else"
    created = httpx.post(
        f"{sim.base_url}/apps",
        json={"name": app, "org_slug": "someone-else"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert created.status_code == 201, created.text


def commit_fly_toml(repo: str, text: str, work: Path) -> None:
    """Push a commit that gives `repo` a fly.toml of its own, from a clone at `work`."""
    subprocess.run(["git", "clone", "-q", repo, str(work)], check=True)
    (work / "fly.toml").write_text(text)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "fly.toml"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "own fly.toml"], cwd=work, check=True)
    subprocess.run(["git", "push", "-q"], cwd=work, check=True)


# ------------------------------------------------------------------------------ network


class StallingProxy:
    """A TCP proxy in this process that can hold every byte while paused.

    Put in front of a dependency (SSM, an app's public URL) to make a step last as long as
    a test needs, without the dependency knowing.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()


@contextlib.asynccontextmanager
async def stalling_proxy(url: str) -> AsyncIterator[StallingProxy]:
    """A `StallingProxy` in front of the host and port of `url`."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    proxy = await StallingProxy(parts.hostname, parts.port).start()
    try:
        yield proxy
    finally:
        await proxy.close()


def via(proxy: StallingProxy, url: str) -> str:
    """`url` with its port replaced by the proxy's."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}"))


# ------------------------------------------------------------------------------ git


_GIT_SHIM = """#!/bin/sh
# Log argv, then run the real git; optionally hold after a successful push.
printf '%s\\n' "$*" >> "{log}"
"{git}" "$@"
status=$?
case " $* " in
  *" push "*)
    if [ $status -eq 0 ] && [ -e "{dir}/hold-after-push" ]; then
      touch "{dir}/pushed"
      sleep 120
    fi;;
esac
exit $status
"""


class GitShim:
    """A `git` first on PATH that logs its argv and can hold a worker right after a push."""

    def __init__(self, directory: Path) -> None:
        real = shutil.which("git")
        assert real, "git is required"
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "argv.log"
        shim = self.dir / "git"
        shim.write_text(_GIT_SHIM.format(log=self.log, git=real, dir=self.dir))
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def hold_after_push(self, hold: bool) -> None:
        marker = self.dir / "hold-after-push"
        if hold:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    @property
    def pushed(self) -> bool:
        return (self.dir / "pushed").exists()

    def argv(self) -> str:
        return self.log.read_text() if self.log.exists() else ""
