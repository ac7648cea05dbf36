"""`turbodeploy`: start, follow, retry, roll back, cancel and inspect deploys; run the local
stack, the demo and the emulator.

Every command that reports takes `--json`: then stdout holds one JSON document and nothing
else (on failure `{"error": ...}`), and messages go to stderr.

Exit codes: 0 success, 1 the deploy or the command failed, 2 invalid input (nothing was
started), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import click
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.models import (
    DeploymentRow,
    DeployRequest,
    DeployStatus,
    Strategy,
)
from core.settings import Settings

if TYPE_CHECKING:
    from temporalio.client import Client

    from core.db import DeploymentStore
    from core.models import ReleaseRecord
    from turbodeploy.client import DeployHandle

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130

err = Console(stderr=True)
# Set by each command: with --json, failures are reported on stdout as JSON too.
_json_output = False


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)


def _fail(message: str, code: int = EXIT_FAILED, **fields: Any) -> NoReturn:
    if _json_output:
        _print_json({"error": message, **fields})
    err.print(f"[red]error:[/red] {message}", highlight=False)
    sys.exit(code)


def _invalid(exc: ValidationError) -> NoReturn:
    problems = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "request"
        problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    if _json_output:
        _print_json({"error": "invalid request", "problems": problems})
    err.print("[red]invalid request[/red] (nothing was started):", highlight=False)
    err.print("\n".join(f"  {p}" for p in problems), highlight=False, markup=False)
    sys.exit(EXIT_INVALID)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        _invalid(exc)


def _project(project_id: str) -> str:
    from core.models import validate_project_id

    try:
        return validate_project_id(project_id)
    except ValueError as exc:
        _fail(str(exc), EXIT_INVALID)


async def _client(settings: Settings) -> Client:
    # The Temporal client is imported by the commands that connect: it is most of the
    # start-up, and `--help` or an invalid request does not need it.
    from core import tracing
    from core.temporal import TemporalConfigError, temporal_connection

    tracing.configure()
    try:
        connection = temporal_connection(settings)
    except TemporalConfigError as exc:
        _fail(str(exc), EXIT_INVALID)
    try:
        return await connection.connect()
    except RuntimeError as exc:
        _fail(f"cannot reach Temporal at {connection.describe()}: {exc}")


def _json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    def enable(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        global _json_output
        _json_output = value
        return value

    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        is_eager=True,
        callback=enable,
        help="One JSON document on stdout, nothing else.",
    )(f)


class _Commands(click.Group):
    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        """The console entry point: run one command, then exit without interpreter teardown.

        The Temporal client's native threads may outlive the event loop, and CPython aborts
        ("PyGILState_Release ... finalizing", temporalio/sdk-python#300) when they still
        run during finalization. Once a command is done nothing is left to clean up but
        buffered output and log files, so those are flushed and the process exits directly.
        (`CliRunner` calls `main()`, not this, so tests keep their interpreter.)
        """
        try:
            self.main(*args, **kwargs)
            code: int = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                err.print(str(exc.code), markup=False, highlight=False)
                code = EXIT_FAILED
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Durable deploys of generated Nitro.js backends to Fly.io."""


# ----------------------------------------------------------------------------- deploy


def _parse_timings(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        _fail(f"--timings is not JSON: {exc}", EXIT_INVALID)
    if not isinstance(parsed, dict):
        _fail("--timings must be a JSON object of seconds by name", EXIT_INVALID)
    return parsed


def _parse_pairs(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            _fail(f"{option} expects NAME=VALUE, got {pair!r}", EXIT_INVALID)
        parsed[name] = value
    return parsed


@main.command()
@click.argument("project_id")
@click.option("--repo", "repo_url", required=True, help="Git URL or path of the project.")
@click.option("--branch", default="main", show_default=True)
@click.option("--image", default=None, help="Prebuilt image to roll out (default: build it).")
@click.option("--region", default="iad", show_default=True)
@click.option("--machines", "machine_count", default=1, show_default=True, type=int)
@click.option(
    "--strategy",
    type=click.Choice([s.value for s in Strategy]),
    default=Strategy.ROLLING.value,
    show_default=True,
)
@click.option("--max-unavailable", type=float, default=None, help="Rolling batch size.")
@click.option("--env", "env_pairs", multiple=True, metavar="NAME=VALUE", help="App env var.")
@click.option(
    "--secret", "secret_pairs", multiple=True, metavar="NAME=SSM_PARAMETER", help="App secret."
)
@click.option("--callback-url", default=None, help="POSTed a signed notice when it ends.")
@click.option("--health-deadline", type=float, default=None, help="Seconds to wait for health.")
@click.option(
    "--timings",
    "timings_json",
    default=None,
    metavar="JSON",
    help="Waits and polls in seconds, e.g. '{\"machine_wait_timeout\": 600}'.",
)
@click.option("--wait/--no-wait", default=False, help="Follow the deploy until it ends.")
@click.option("--poll-interval", type=float, default=0.5, hidden=True)
@_json_option
def deploy(
    project_id: str,
    repo_url: str,
    branch: str,
    image: str | None,
    region: str,
    machine_count: int,
    strategy: str,
    max_unavailable: float | None,
    env_pairs: tuple[str, ...],
    secret_pairs: tuple[str, ...],
    callback_url: str | None,
    health_deadline: float | None,
    timings_json: str | None,
    wait: bool,
    poll_interval: float,
    as_json: bool,
) -> None:
    """Deploy PROJECT_ID from its repository."""
    timings = _parse_timings(timings_json)
    fields: dict[str, Any] = {
        "project_id": project_id,
        "repo_url": repo_url,
        "branch": branch,
        "image": image,
        "region": region,
        "machine_count": machine_count,
        "strategy": strategy,
        "env": _parse_pairs(env_pairs, "--env"),
        "secrets": _parse_pairs(secret_pairs, "--secret"),
        "callback_url": callback_url,
    }
    if max_unavailable is not None:
        fields["max_unavailable"] = max_unavailable
    if health_deadline is not None:
        timings["health_deadline"] = health_deadline
    if timings:
        fields["timings"] = timings
    try:
        request = DeployRequest.model_validate(fields)
    except ValidationError as exc:
        _invalid(exc)
    settings = _settings()

    async def start(client: Client) -> DeployHandle:
        from turbodeploy.client import start_deploy

        return await start_deploy(client, request, task_queue=settings.task_queue)

    _run(_submit(settings, start, "deploying", wait=wait, poll_interval=poll_interval))


@main.command()
@click.argument("project_id")
@click.option("--wait/--no-wait", default=False, help="Follow the deploy until it ends.")
@click.option("--poll-interval", type=float, default=0.5, hidden=True)
@_json_option
def retry(project_id: str, wait: bool, poll_interval: float, as_json: bool) -> None:
    """Deploy PROJECT_ID again with its last request, as a new deployment."""
    _project(project_id)
    settings = _settings()

    async def start(client: Client) -> DeployHandle:
        from turbodeploy.client import retry_deploy

        return await retry_deploy(client, project_id, task_queue=settings.task_queue)

    _run(_submit(settings, start, "retrying", wait=wait, poll_interval=poll_interval))


@main.command()
@click.argument("project_id")
@click.option("--to", "to_deployment_id", default=None, help="Deployment id of the release.")
@click.option("--timings", "timings_json", default=None, metavar="JSON", help="As for deploy.")
@click.option("--wait/--no-wait", default=False, help="Follow the rollback until it ends.")
@click.option("--poll-interval", type=float, default=0.5, hidden=True)
@_json_option
def rollback(
    project_id: str,
    to_deployment_id: str | None,
    timings_json: str | None,
    wait: bool,
    poll_interval: float,
    as_json: bool,
) -> None:
    """Put PROJECT_ID back on a recorded release (default: the one before the current)."""
    from core.models import RollbackRequest

    extra: dict[str, Any] = {}
    if timings := _parse_timings(timings_json):
        extra["timings"] = timings
    try:
        request = RollbackRequest.model_validate(
            {"project_id": project_id, "to_deployment_id": to_deployment_id, **extra}
        )
    except ValidationError as exc:
        _invalid(exc)
    settings = _settings()

    async def start(client: Client) -> DeployHandle:
        from turbodeploy.client import start_rollback

        return await start_rollback(
            client,
            project_id,
            to_deployment_id,
            task_queue=settings.task_queue,
            timings=request.timings,
        )

    _run(_submit(settings, start, "rolling back", wait=wait, poll_interval=poll_interval))


async def _submit(
    settings: Settings,
    start: Callable[[Client], Coroutine[Any, Any, DeployHandle]],
    verb: str,
    *,
    wait: bool,
    poll_interval: float,
) -> None:
    from temporalio.service import RPCError

    from turbodeploy.client import DeployError
    from turbodeploy.progress import follow

    client = await _client(settings)
    try:
        handle = await start(client)
    except DeployError as exc:
        _fail(str(exc))
    except RPCError as exc:
        _fail(f"Temporal refused the request: {exc.message}")
    link = settings.workflow_ui_link(handle.workflow_id, handle.run_id)
    started = {
        "project_id": handle.project_id,
        "deployment_id": handle.deployment_id,
        "workflow_id": handle.workflow_id,
        "run_id": handle.run_id,
        "ui": link,
    }
    if not wait:
        if _json_output:
            _print_json(started)
        else:
            click.echo(f"{verb} {handle.project_id}: deployment {handle.deployment_id}")
            click.echo(f"follow: turbodeploy status {handle.project_id}    watch: {link}")
        return
    if not _json_output:
        click.echo(f"{verb} {handle.project_id} (deployment {handle.deployment_id})  {link}")
    outcome = await follow(handle, quiet=_json_output, poll_interval=poll_interval)
    if _json_output:
        _print_json({**started, **outcome})
    elif outcome.get("detail"):
        click.echo(f"  {outcome['detail']}")
    if outcome.get("status") != str(handle.expected):
        sys.exit(EXIT_FAILED)


# ------------------------------------------------------------------ the app's life


def _app_request_command(kind: str, verb: str, doc: str) -> None:
    """`turbodeploy stop|start|destroy PROJECT_ID`: a request of the project's workflow."""

    @main.command(name=kind, help=doc)
    @click.argument("project_id")
    @click.option("--timings", "timings_json", default=None, metavar="JSON", help="As for deploy.")
    @click.option("--wait/--no-wait", default=False, help="Follow it until it ends.")
    @click.option("--poll-interval", type=float, default=0.5, hidden=True)
    @click.option(
        "--yes", "-y", is_flag=True, hidden=kind != "destroy", help="Do not ask for confirmation."
    )
    @_json_option
    def command(
        project_id: str,
        timings_json: str | None,
        wait: bool,
        poll_interval: float,
        yes: bool,
        as_json: bool,
    ) -> None:
        from core.models import PROJECT_REQUEST

        extra: dict[str, Any] = {}
        if timings := _parse_timings(timings_json):
            extra["timings"] = timings
        try:
            request = PROJECT_REQUEST.validate_python(
                {"kind": kind, "project_id": project_id, **extra}
            )
        except ValidationError as exc:
            _invalid(exc)
        from core.models import app_name_for

        if kind == "destroy" and not yes:
            if as_json or not sys.stdin.isatty():
                _fail("destroy removes the app from Fly: confirm with --yes", EXIT_INVALID)
            click.confirm(
                f"Destroy Fly app {app_name_for(project_id)} of project {project_id} "
                "(machines, volumes, IPs, secrets)?",
                abort=True,
            )
        settings = _settings()

        async def start(client: Client) -> DeployHandle:
            from turbodeploy.client import submit

            return await submit(client, request, task_queue=settings.task_queue)

        _run(_submit(settings, start, verb, wait=wait, poll_interval=poll_interval))


_app_request_command(
    "stop",
    "stopping",
    "Stop every machine of PROJECT_ID's app (its release, IPs and volumes stay).",
)
_app_request_command(
    "start",
    "starting",
    "Start the machines of PROJECT_ID's stopped app again and verify /api/health.",
)
_app_request_command(
    "destroy",
    "destroying",
    "Remove PROJECT_ID's app from Fly: machines, volumes, IPs, secrets and the app. A "
    "running deploy is cancelled first; the records stay.",
)


@main.command(name="app")
@click.argument("project_id")
@_json_option
def app_command(project_id: str, as_json: bool) -> None:
    """PROJECT_ID's app as Fly sees it now: machines, IPs, volumes, URL and health."""
    from core.models import app_name_for

    _project(project_id)
    settings = _settings()
    app = app_name_for(project_id)

    async def show() -> None:
        from temporalio.exceptions import ApplicationError

        from flyapi import FlyError
        from turbodeploy.flyview import app_status, fly_client

        try:
            async with fly_client(settings) as fly:
                view = await app_status(fly, app, settings.app_url(app))
        except FlyError as exc:
            _fail(f"cannot read Fly app {app}: {exc}")
        except ApplicationError as exc:  # the token could not be read from SSM
            _fail(f"cannot read Fly app {app}: {exc.message}")
        if _json_output:
            _print_json({**view.model_dump(mode="json"), "healthy": view.healthy})
            return
        _print_app(view)
        if not view.exists:
            sys.exit(EXIT_FAILED)

    _run(show())


def _print_app(view: Any) -> None:
    out = Console(highlight=False)
    if not view.exists:
        out.print(f"[yellow]no Fly app {view.app_name}[/yellow] (never deployed, or destroyed)")
        return
    health = (
        "[green]200[/green]"
        if view.healthy
        else f"[red]{view.health_status or view.health_error or 'no answer'}[/red]"
    )
    out.print(f"[bold]{view.app_name}[/bold]  status {view.status}  org {view.organization}")
    out.print(f"url     {view.url}   /api/health {health}")
    table = Table(box=None, pad_edge=False)
    for column in ("machine", "region", "state", "image", "version", "checks", "last event"):
        table.add_column(column)
    for m in view.machines:
        checks = ", ".join(f"{c.status}" for c in m.checks) or "-"
        when = f" {_age(m.last_event_at.isoformat())}" if m.last_event_at else ""
        table.add_row(
            m.id, m.region or "", m.state or "", m.image or "", m.version or "", checks,
            f"{m.last_event or '-'}{when}",
        )  # fmt: skip
    out.print(table if view.machines else "machines: none")
    ips = ", ".join(str(ip.get("ip")) for ip in view.ips) or "none"
    volumes = ", ".join(f"{v.get('id')} ({v.get('size_gb')} GB)" for v in view.volumes) or "none"
    out.print(f"ips     {ips}")
    out.print(f"volumes {volumes}")


@main.command()
@click.argument("project_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("--machine", "-m", default=None, help="Only this machine's lines.")
@click.option("--region", "-r", default=None, help="Only this region's lines.")
@click.option("--since", default=None, metavar="DURATION", help="Only lines newer: 30s, 10m, 2h.")
@_json_option
def logs(
    project_id: str,
    follow: bool,
    machine: str | None,
    region: str | None,
    since: str | None,
    as_json: bool,
) -> None:
    """PROJECT_ID's app logs, as `fly logs` reads them (JSON lines with --json)."""
    from core.models import app_name_for
    from turbodeploy.flyview import parse_since

    _project(project_id)
    try:
        window = parse_since(since) if since is not None else None
    except ValueError as exc:
        _fail(str(exc), EXIT_INVALID)
    settings = _settings()
    app = app_name_for(project_id)

    async def read() -> None:
        from temporalio.exceptions import ApplicationError

        from flyapi import FlyError
        from turbodeploy.flyview import fly_client, read_logs

        try:
            async with fly_client(settings) as fly:
                async for entry in read_logs(
                    fly, app, machine=machine, region=region, since=window, follow=follow
                ):
                    if as_json:
                        click.echo(json.dumps(entry.model_dump(mode="json")))
                    else:
                        provider = (entry.meta.get("event") or {}).get("provider", "")
                        click.echo(
                            f"{entry.timestamp} {provider}[{entry.instance or '-'}] "
                            f"{entry.region or '-'} [{entry.level or 'info'}] {entry.message}"
                        )
        except FlyError as exc:
            _fail(f"cannot read the logs of Fly app {app}: {exc}")
        except ApplicationError as exc:  # the token could not be read from SSM
            _fail(f"cannot read the logs of Fly app {app}: {exc.message}")

    async def until_interrupted() -> None:
        # Ctrl-C is how --follow ends: stop polling and exit 0, mid-wait or mid-request.
        task = asyncio.ensure_future(read())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    _run(until_interrupted())


# ------------------------------------------------------------------------ status etc.


@main.command()
@click.argument("project_id")
@click.option(
    "--workers-seen-within",
    "recent_seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    hidden=True,
    help="Seconds since a worker's last poll within which it counts (default 120).",
)
@_json_option
def status(project_id: str, recent_seconds: float | None, as_json: bool) -> None:
    """Show the latest deploy of PROJECT_ID: workflow state, current step and record."""
    _project(project_id)
    settings = _settings()
    _run(_status(settings, project_id, recent_seconds=recent_seconds))


_FAILED_RECORDS = frozenset({"failed", "rolled_back", "stopped"})
_FAILED_RUNS = frozenset({"FAILED", "TERMINATED", "TIMED_OUT"})  # WorkflowExecutionStatus


async def _status(settings: Settings, project_id: str, *, recent_seconds: float | None) -> None:
    from temporalio.client import WorkflowExecutionStatus
    from temporalio.service import RPCError, RPCStatusCode

    from turbodeploy import client as api
    from turbodeploy import diagnostics

    client = await _client(settings)
    try:
        desc = await api.describe(client, project_id)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            _fail(f"no deploy of project {project_id} found")
        _fail(f"cannot describe the deploy of {project_id}: {exc.message}")
    info: dict[str, Any] = {
        "project_id": project_id,
        "workflow_id": desc.id,
        "run_id": desc.run_id,
        "workflow_status": desc.status.name if desc.status else None,
        "started": desc.start_time.isoformat(),
        "closed": desc.close_time.isoformat() if desc.close_time else None,
        "ui": settings.workflow_ui_link(desc.id, desc.run_id),
        "progress": None,
        "record": None,
    }
    with contextlib.suppress(RPCError, TimeoutError):
        progress = await asyncio.wait_for(api.progress(client, project_id), timeout=5)
        info["progress"] = progress.model_dump(mode="json")
    if desc.status == WorkflowExecutionStatus.RUNNING:
        # What a stuck deploy waits for: the server's view, which needs no worker.
        pending = await diagnostics.pending_steps(client, desc)
        info["pending"] = [step.model_dump(mode="json") for step in pending]
        failing = await diagnostics.failing_workflow_task(client, desc)
        info["workflow_task"] = failing.model_dump(mode="json") if failing else None
        with contextlib.suppress(RPCError):
            workers = await diagnostics.pollers(
                client,
                desc.task_queue,
                recent_seconds=recent_seconds or diagnostics.RECENT_POLL_SECONDS,
            )
            info["workers"] = workers.model_dump(mode="json")
    if settings.database_url:
        # Before any worker created the schema, the run itself still says what it waits
        # for, and that is what matters here.
        rows: list[DeploymentRow] = await _with_store(
            settings, lambda s: s.history(project_id, 1), unrecorded=list
        )
        info["record"] = rows[0].as_json() if rows else None
    failed = info["workflow_status"] in _FAILED_RUNS or (
        info["record"] is not None and info["record"]["status"] in _FAILED_RECORDS
    )
    if _json_output:
        _print_json(info)
    else:
        _print_status(info)
    if failed:
        sys.exit(EXIT_FAILED)


def _print_status(info: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key in ("workflow_id", "run_id", "workflow_status", "started", "closed", "ui"):
        table.add_row(key, str(info[key] or "-"))
    if p := info["progress"]:
        table.add_row("deployment", p["deployment_id"])
        position = f" ({p['step_index'] + 1}/{p['step_count']})" if p["step"] != "done" else ""
        table.add_row("step", f"{p['step']}{position}")
        seconds = p.get("step_seconds") or {}
        done = [
            f"{step} {seconds[step]:.1f}s" if step in seconds else step
            for step in p["completed_steps"]
        ]
        table.add_row("done", ", ".join(done) or "-")
        table.add_row("detail", p["detail"] or "-")
        if p.get("queued"):
            table.add_row("queued", ", ".join(p["queued"]))
        if p.get("error"):
            table.add_row("error", p["error"])
    if r := info["record"]:
        table.add_row("deploy status", r["status"])
        table.add_row("url", r["url"])
        if r.get("error") and r["error"] != (p or {}).get("error"):
            table.add_row("error", r["error"])
    if task := info.get("workflow_task"):
        table.add_row(
            "[red]workflow task[/red]",
            f"[red]failing, attempt {task['attempt']}[/red] ({task['cause'] or 'unknown cause'})",
        )
        if task["last_failure"]:
            table.add_row("  last failure", task["last_failure"])
        table.add_row(
            "  next",
            "no step (and no cleanup) runs until a worker can run this code: deploy a fixed "
            f"worker, or `turbodeploy terminate {info['project_id']} --reason ...`",
        )
    for step in info.get("pending") or []:
        table.add_row("waiting on", _pending_line(step))
        if step["last_failure"]:
            table.add_row("  last failure", step["last_failure"])
        if step["last_heartbeat"] not in (None, "", [], {}):
            age = _age(step["last_heartbeat_at"])
            table.add_row(
                "  heartbeat",
                _heartbeat_text(step["last_heartbeat"]) + (f" ({age} ago)" if age else ""),
            )
    if (workers := info.get("workers")) is not None:
        table.add_row("workers", _workers_line(workers))
    _table_console().print(table)


def _workers_line(workers: dict[str, Any]) -> str:
    """How many workers poll the queue now, and which the server saw only earlier: a
    stopped worker stays in its list for minutes, and is not counted."""
    queue = escape(workers["task_queue"])
    window = _duration(workers["recent_seconds"])
    recent = set(workers["workflow"]) | set(workers["activity"])
    gone: dict[str, str] = {}
    for poller in workers["earlier"]:
        if poller["identity"] not in recent:
            seen = poller["last_seen"]
            gone[poller["identity"]] = max(gone.get(poller["identity"], ""), seen or "")
    earlier = ", ".join(
        f"{escape(identity)} {_age(seen) or '?'} ago" for identity, seen in sorted(gone.items())
    )
    if workers["workflow"] and workers["activity"]:
        line = f"{len(workers['activity'])} polling {queue} (seen within {window})"
        if gone:
            line += f"; {len(gone)} more last seen earlier, likely stopped: {earlier}"
        return line
    missing = " and ".join(k for k in ("workflow", "activity") if not workers[k])
    line = f"[red]no worker polls {queue} for {missing} tasks[/red]"
    if gone:
        line += f" (none seen within {window}; last seen: {earlier})"
    return line + ": the deploy waits until one starts (python worker.py)"


def _heartbeat_text(details: Any, limit: int = 300) -> str:
    """An activity's heartbeat on one line: text as it is, an object as its fields
    (`done: m1, m2; step: waiting for m2`), anything else as compact JSON."""
    if isinstance(details, dict):
        text = "; ".join(
            f"{name}: {_detail_text(value)}" for name, value in details.items() if value is not None
        )
    elif isinstance(details, list):
        text = "; ".join(_heartbeat_text(value, limit) for value in details)
    else:
        text = _detail_text(details)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _detail_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict) and all(isinstance(v, str | int | float) for v in value.values()):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return json.dumps(value, separators=(",", ":"), default=str)


def _pending_line(step: dict[str, Any]) -> str:
    limit = step["maximum_attempts"] or "∞"
    line = f"{step['activity']} ({step['state']}, attempt {step['attempt']} of {limit}"
    if step["state"] == "started" and (running := _age(step["last_started_at"])):
        line += f", running for {running}"
    line += ")"
    if step["next_attempt_at"]:
        wait = _until(step["next_attempt_at"])
        line += f", next attempt in {wait}" if wait else ", next attempt due"
    return line


def _age(iso: str | None) -> str | None:
    if not iso:
        return None
    seconds = (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    return _duration(max(seconds, 0))


def _until(iso: str) -> str | None:
    seconds = (datetime.fromisoformat(iso) - datetime.now(UTC)).total_seconds()
    return _duration(seconds) if seconds >= 0.5 else None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@main.command()
@click.argument("project_id")
@_json_option
def cancel(project_id: str, as_json: bool) -> None:
    """Cancel the running deploy of PROJECT_ID (the previous release is put back)."""
    _project(project_id)
    settings = _settings()

    async def _cancel() -> None:
        from temporalio.service import RPCError

        from turbodeploy.client import DeployError, cancel_deploy

        client = await _client(settings)
        try:
            await cancel_deploy(client, project_id)
        except DeployError as exc:
            _fail(str(exc))
        except RPCError as exc:
            _fail(f"cannot cancel the deploy of {project_id}: {exc.message}")
        if _json_output:
            _print_json({"project_id": project_id, "cancel_requested": True})
        else:
            click.echo(f"cancellation requested for the deploy of {project_id}")

    _run(_cancel())


@main.command()
@click.argument("project_id")
@click.option("--reason", required=True, help="Why: kept in the history and the records.")
@_json_option
def terminate(project_id: str, reason: str, as_json: bool) -> None:
    """End the running deploy of PROJECT_ID at once, with no cleanup (last resort).

    Use `cancel` whenever a worker can run: it puts the previous release back. Terminate
    leaves machines as the deploy left them (leases expire on their own) and records the
    run's open deployments as failed, so the platform does not wait on them.
    """
    _project(project_id)
    settings = _settings()
    reason = reason.strip()
    if not reason:
        _fail("--reason must say why", EXIT_INVALID)

    async def _terminate() -> None:
        from temporalio.service import RPCError

        from turbodeploy.client import DeployError, terminate_deploy

        client = await _client(settings)
        try:
            run_id = await terminate_deploy(client, project_id, f"{reason} (turbodeploy terminate)")
        except DeployError as exc:
            _fail(str(exc))
        except RPCError as exc:
            _fail(f"cannot terminate the deploy of {project_id}: {exc.message}")
        error = (
            f"terminated by an operator: {reason}; no cleanup ran, so the app's machines are "
            "as the deploy left them: deploy again or roll back to converge"
        )
        closed: list[str] = []
        last_good: str | None = None
        if settings.database_url:

            async def close(store: DeploymentStore) -> tuple[list[str], str | None]:
                rows = await store.close_run(project_id, run_id, error)
                release = await store.last_good_release(project_id)
                return [r.deployment_id for r in rows], release.deployment_id if release else None

            # No worker ever started on the schema: nothing was recorded to close.
            closed, last_good = await _with_store(settings, close, unrecorded=lambda: ([], None))
        if _json_output:
            _print_json(
                {
                    "project_id": project_id,
                    "run_id": run_id,
                    "terminated": True,
                    "closed": closed,
                    "last_good_release": last_good,
                }
            )
            return
        click.echo(f"terminated run {run_id} of deploy-{project_id}")
        for deployment_id in closed:
            click.echo(f"  {deployment_id} recorded as failed")
        click.echo("machines are as the deploy left them; leases expire on their own. Next:")
        click.echo(f"  turbodeploy retry {project_id}      # deploy the last request again")
        if last_good:
            click.echo(
                f"  turbodeploy rollback {project_id} --to {last_good}  # the last good release"
            )

    _run(_terminate())


async def _with_store(
    settings: Settings,
    query: Callable[[DeploymentStore], Coroutine[Any, Any, T]],
    *,
    unrecorded: Callable[[], T] | None = None,
) -> T:
    """Run `query` on a short-lived pool. When no worker has created the schema yet, the
    answer is `unrecorded()` if given, else a clear error."""
    import asyncpg

    from core.db import DeploymentStore, create_pool

    assert settings.database_url
    try:
        pool = await create_pool(settings.database_url, 1, 2)
    # Whatever asyncpg raises before it has a connection: socket, DNS, login, URL errors.
    except (
        OSError,
        RuntimeError,
        ValueError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        where = _database_where(settings.database_url)
        message = _unreachable(exc, where)
        with contextlib.suppress(ValueError):
            if password := urlsplit(settings.database_url).password:
                message = message.replace(password, "***")
        _fail(message, database=where.target)
    try:
        return await query(DeploymentStore(pool, settings.db_schema))
    except asyncpg.UndefinedTableError:
        if unrecorded is not None:
            return unrecorded()
        _fail(
            f"no deployment records in schema {settings.db_schema}: "
            "a worker creates them when it first starts"
        )
    except asyncpg.PostgresError as exc:
        _fail(f"the database refused the query: {type(exc).__name__}: {exc}")
    finally:
        await pool.close()


@dataclass(frozen=True)
class _Database:
    """Where the database URL points, without its password."""

    target: str  # "db.internal:5432", or the Unix socket's path
    database: str | None
    user: str | None
    setting: str  # the variable it came from

    @property
    def socket(self) -> bool:
        return self.target.startswith("/")

    def describe(self) -> str:
        what = ", ".join(
            f"{name} {value}"
            for name, value in (("database", self.database), ("user", self.user))
            if value
        )
        where = f"the Unix socket {self.target}" if self.socket else self.target
        return f"PostgreSQL at {where}" + (f" ({what})" if what else "")


def _database_where(url: str) -> _Database:
    """The host and port (or socket path), database and user of a PostgreSQL URL, as
    asyncpg reads it; the password is never kept."""
    # The settings read TURBODEPLOY_DATABASE_URL first.
    named = "TURBODEPLOY_DATABASE_URL"
    setting = named if os.environ.get(named) else "DATABASE_URL"
    try:
        parts = urlsplit(url)
    except ValueError:
        return _Database("(an unreadable URL)", None, None, setting)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items() if v}
    netloc = parts.netloc.rpartition("@")[2]
    user = unquote(parts.username or "")
    default_port = query.get("port") or os.environ.get("PGPORT") or "5432"
    hosts: list[tuple[str, str]] = []
    for spec in filter(None, netloc.split(",")):
        if spec.startswith("["):  # [::1]:5432
            host, _, rest = spec[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = spec.partition(":")
        hosts.append((unquote(host), port or default_port))
    if not any(host for host, _ in hosts):
        hosts = [
            (host, default_port)
            for host in (query.get("host") or os.environ.get("PGHOST") or "").split(",")
            if host
        ]
    shown = tuple(
        f"{host}/.s.PGSQL.{port}"
        if host.startswith("/")
        else f"[{host}]:{port}"
        if ":" in host
        else f"{host}:{port}"
        for host, port in hosts
    ) or (f"the default socket directory or localhost:{default_port}",)
    return _Database(
        target=", ".join(shown),
        database=unquote(parts.path.lstrip("/")) or query.get("dbname") or None,
        user=user or query.get("user") or os.environ.get("PGUSER") or None,
        setting=setting,
    )


def _unreachable(exc: BaseException, where: _Database) -> str:
    """What went wrong connecting to the database, and what to check."""
    import asyncpg

    db = where.describe()
    check = f"check {where.setting}"
    if isinstance(exc, FileNotFoundError):
        return (
            f"cannot reach the database: {db}: no such socket, so PostgreSQL is not running "
            f"there (or listens elsewhere); start it, or {check} (its socket directory)"
        )
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in str(exc):
        return (
            f"cannot reach the database: {db} refused the connection, so PostgreSQL is not "
            f"running there (or listens elsewhere); start it, or {check} (host and port)"
        )
    if isinstance(exc, socket.gaierror):
        return (
            f"cannot reach the database: the host of {db} does not resolve "
            f"({exc.strerror}); {check}"
        )
    if isinstance(exc, TimeoutError):
        return (
            f"cannot reach the database: no answer from {db} within 10s (down, or a firewall "
            f"in the way); {check}"
        )
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return f"{db} refused the login: {exc}; check the user and password in {where.setting}"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{db} has no such database: {exc}; {check}"
    return f"cannot reach the database: {db}: {type(exc).__name__}: {exc}; {check}"


def _need_database(settings: Settings) -> None:
    if not settings.database_url:
        _fail("DATABASE_URL is not set", EXIT_INVALID)


def _table_console() -> Console:
    # A pipe has no width: print tables whole rather than cut to 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=1000)


def _when(epoch: int | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch).isoformat(sep=" ", timespec="seconds")


@main.command(name="list")
@click.option("--running", is_flag=True, help="Only projects whose latest run is running now.")
@click.option(
    "--status",
    type=click.Choice([s.value for s in DeployStatus]),
    default=None,
    help="Only projects whose latest deployment has this status.",
)
@click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(1, 1000), help="Projects."
)
@_json_option
def list_(running: bool, status: str | None, limit: int, as_json: bool) -> None:
    """List the latest deploy run of every project, from the Temporal server: one line per
    project, the most recently started first."""
    settings = _settings()

    async def _list() -> None:
        from temporalio.service import RPCError

        from turbodeploy.diagnostics import list_deploys

        client = await _client(settings)
        try:
            found = await list_deploys(
                client,
                running=running,
                status=DeployStatus(status) if status else None,
                limit=limit,
            )
        except RPCError as exc:
            _fail(f"cannot list deploys: {exc.message}")
        if _json_output:
            _print_json([d.model_dump(mode="json") for d in found])
            return
        table = Table("project", "deploy status", "workflow", "started", "for", "ui")
        now = datetime.now(UTC)
        for d in found:
            table.add_row(
                d.project_id,
                d.deploy_status or "-",
                d.workflow_status.lower(),
                _when(int(d.started.timestamp())),
                _duration(((d.closed or now) - d.started).total_seconds()),
                settings.workflow_ui_link(d.workflow_id, d.run_id),
            )
        _table_console().print(table)

    _run(_list())


@main.command()
@click.argument("project_id")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@_json_option
def history(project_id: str, limit: int, as_json: bool) -> None:
    """List recorded deployments of PROJECT_ID, newest first."""
    _project(project_id)
    settings = _settings()
    _need_database(settings)
    rows: list[DeploymentRow] = _run(_with_store(settings, lambda s: s.history(project_id, limit)))
    if _json_output:
        _print_json([r.as_json() for r in rows])
        return
    table = Table("deployment", "status", "started", "commit", "image", "serving", "url", "error")
    for r in rows:
        table.add_row(
            r.deployment_id,
            r.status,
            _when(r.deployed_at),
            (r.commit_sha or "")[:10],
            r.image or "",
            r.serving_image or "",
            r.url,
            (r.error or "")[:60],
        )
    _table_console().print(table)


@main.command()
@click.argument("project_id")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@_json_option
def releases(project_id: str, limit: int, as_json: bool) -> None:
    """List the recorded releases of PROJECT_ID (what `rollback --to` accepts), newest first."""
    _project(project_id)
    settings = _settings()
    _need_database(settings)
    records: list[ReleaseRecord] = _run(
        _with_store(settings, lambda s: s.releases(project_id, limit))
    )
    if _json_output:
        _print_json([r.model_dump(mode="json") for r in records])
        return
    table = Table(
        "deployment", "status", "created", "strategy", "image", "serving", "commit", "machines"
    )
    for r in records:
        table.add_row(
            r.deployment_id,
            r.status,
            _when(r.created_at),
            r.strategy,
            r.image,
            r.serving_image or "",
            (r.commit_sha or "")[:10],
            str(len(r.machines)),
        )
    _table_console().print(table)


# ------------------------------------------------------------------------ local stack


@main.command()
@click.option(
    "--state-dir", default=".turbodeploy", show_default=True, type=click.Path(path_type=Path)
)
@click.option("--temporal-port", default=7233, show_default=True, type=int)
@click.option("--ui-port", default=8233, show_default=True, type=int)
@click.option("--flysim-port", default=4280, show_default=True, type=int)
@click.option("--metrics-port", default=None, type=int, help="Serve worker metrics here.")
@click.option("--no-worker", is_flag=True, help="Start no worker: run `python -m worker` yourself.")
def up(
    state_dir: Path,
    temporal_port: int,
    ui_port: int,
    flysim_port: int,
    metrics_port: int | None,
    no_worker: bool,
) -> None:
    """Run the whole stack locally until Ctrl-C: Temporal + UI, PostgreSQL, SSM, the Fly
    emulator and a worker, each a process of its own (a port of 0: any free one).

    The emulator's apps and machines, Temporal's history and the database stay under
    --state-dir across restarts. SIGHUP restarts the worker, as does its own exit.
    Refused while another stack runs on the same --state-dir or a port is taken; after a
    stack that was killed, the next `up` stops what it left running."""
    from turbodeploy.stack import run_stack

    sys.exit(
        run_stack(
            state_dir,
            temporal_port=temporal_port,
            ui_port=ui_port,
            flysim_port=flysim_port,
            metrics_port=metrics_port,
            run_worker=not no_worker,
        )
    )


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Measure deploys against a no-op baseline and the emulator's waits (BENCHMARKS.md)."""
    # The benchmark is a program of its own, `python -m bench`, with its own options.
    sys.exit(_run_module("bench", args))


def _run_module(module: str, args: tuple[str, ...]) -> int:
    """Run `python -m MODULE ARGS` with this interpreter; return its exit code.

    The child imports what this process imports: it gets this process's import path, and
    `-P` keeps its working directory from going first. Ctrl-C reaches it directly (one
    process group), SIGTERM is passed on, and either way this waits for it to stop.
    """
    path = [os.path.abspath(p) for p in sys.path if os.path.exists(p or ".")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    child = subprocess.Popen([sys.executable, "-P", "-m", module, *args], env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:
                continue  # the child has it too, and stops in its own time
    finally:
        signal.signal(signal.SIGTERM, previous)
    # Ended by a signal: the shell's convention, 128 + its number.
    return 128 - code if code < 0 else code


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=4280, show_default=True, type=int)
@click.argument("options", nargs=-1, type=click.UNPROCESSED)
def flysim(host: str, port: int, options: tuple[str, ...]) -> None:
    """Run the local Fly Machines API emulator (tokens from FLYSIM_TOKENS).

    Any other option goes to the emulator as `python -m flysim` reads it: timings, faults
    and unhealthy images (`turbodeploy flysim --unhealthy-image IMAGE --error-rate 0.1`;
    `python -m flysim --help` lists them)."""
    from flysim import main as flysim_main

    sys.exit(flysim_main(["--host", host, "--port", str(port), *options]))


@main.command()
@click.option(
    "--state-dir", default=".turbodeploy", show_default=True, type=click.Path(path_type=Path)
)
@click.option("--project", "project_id", default="nitro-hello", show_default=True)
@click.option(
    "--image",
    default="registry.fly.io/turbobackend-nitro-hello:demo",
    show_default=True,
    help="Image reference to roll out (the emulator runs no containers).",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the stack running (prints every address and the `export` lines).",
)
@click.option("--ui-port", default=None, type=int, help="[default: 8233, or any free port]")
@click.option("--temporal-port", default=None, type=int, help="[default: 7233, or any free port]")
@click.option("--flysim-port", default=None, type=int, help="[default: 4280, or any free port]")
def demo(
    state_dir: Path,
    project_id: str,
    image: str,
    keep: bool,
    ui_port: int | None,
    temporal_port: int | None,
    flysim_port: int | None,
) -> None:
    """Deploy the example project on the local stack and print its URL.

    Without --keep the stack stops when the deploy ends (what it wrote stays under
    --state-dir, and `turbodeploy up` serves it again)."""
    from turbodeploy.demo import run_demo

    outcome = _run(
        run_demo(
            state_dir,
            project_id=project_id,
            image=image,
            keep=keep,
            ui_port=ui_port,
            temporal_port=temporal_port,
            flysim_port=flysim_port,
        )
    )
    if outcome.get("status") != "deployed":
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
