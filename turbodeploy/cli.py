"""`turbodeploy`: start, follow, cancel and inspect deploys; run the demo and the emulator.

Exit codes: 0 success, 1 the deploy or the command failed, 2 invalid input (nothing was
started), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from turbodeploy.models import DeploymentRow, DeployProgress, DeployRequest, DeployResult
from turbodeploy.settings import Settings

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_INVALID = 2

out = Console()
err = Console(stderr=True)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    sys.exit(code)


def _invalid(exc: ValidationError) -> NoReturn:
    lines = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "request"
        lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
    err.print("[red]invalid request[/red] (nothing was started):", highlight=False)
    err.print("\n".join(lines), highlight=False, markup=False)
    sys.exit(EXIT_INVALID)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        _invalid(exc)


async def _client(settings: Settings) -> Client:
    from worker import connect

    try:
        return await connect(settings)
    except RuntimeError as exc:
        _fail(f"cannot reach Temporal at {settings.temporal_address}: {exc}")


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Durable deploys of generated Nitro.js backends to Fly.io."""


# --------------------------------------------------------------------------- deploy


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            _fail(f"--env expects NAME=VALUE, got {pair!r}", EXIT_INVALID)
        env[name] = value
    return env


@main.command()
@click.argument("project_id")
@click.option("--repo", "repo_url", required=True, help="Git URL or path of the project.")
@click.option("--branch", default="main", show_default=True)
@click.option("--image", default=None, help="Prebuilt image reference to roll out.")
@click.option("--region", default="iad", show_default=True)
@click.option("--machines", "machine_count", default=1, show_default=True, type=int)
@click.option("--env", "env_pairs", multiple=True, metavar="NAME=VALUE", help="App env var.")
@click.option("--health-deadline", type=float, default=None, help="Seconds to wait for health.")
@click.option("--wait/--no-wait", default=False, help="Follow the deploy until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def deploy(
    project_id: str,
    repo_url: str,
    branch: str,
    image: str | None,
    region: str,
    machine_count: int,
    env_pairs: tuple[str, ...],
    health_deadline: float | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Deploy PROJECT_ID from its repository."""
    fields: dict[str, Any] = {
        "project_id": project_id,
        "repo_url": repo_url,
        "branch": branch,
        "image": image,
        "region": region,
        "machine_count": machine_count,
        "env": _parse_env(env_pairs),
    }
    if health_deadline is not None:
        fields["timings"] = {"health_deadline": health_deadline}
    try:
        request = DeployRequest.model_validate(fields)
    except ValidationError as exc:
        _invalid(exc)
    if request.image is None:
        _fail("--image is required: this worker rolls out prebuilt images", EXIT_INVALID)
    settings = _settings()
    _run(_deploy(settings, request, wait=wait, as_json=as_json))


async def _deploy(settings: Settings, request: DeployRequest, *, wait: bool, as_json: bool) -> None:
    from turbodeploy.client import DeployError, start_deploy

    client = await _client(settings)
    try:
        handle = await start_deploy(client, request, task_queue=settings.task_queue)
    except DeployError as exc:
        _fail(str(exc))
    link = settings.workflow_ui_link(handle.id, handle.result_run_id)
    if not wait:
        if as_json:
            _print_json(
                {
                    "workflow_id": handle.id,
                    "run_id": handle.result_run_id,
                    "deployment_id": request.deployment_id,
                    "ui": link,
                }
            )
        else:
            out.print(f"started {handle.id} (deployment {request.deployment_id})")
            out.print(f"watch: {link}")
        return
    if not as_json:
        out.print(f"deploying {request.project_id} → {request.app_name}  ({link})")
    result = await follow(client, handle.id, quiet=as_json)
    if as_json:
        _print_json(result)
    if result.get("status") != "deployed":
        sys.exit(EXIT_FAILED)


async def follow(client: Client, workflow_id: str, *, quiet: bool = False) -> dict[str, Any]:
    """Print each step as it completes until the deploy ends; return its outcome."""
    from workflows.deploy_project import DeployProjectWorkflow

    handle = client.get_workflow_handle_for(DeployProjectWorkflow.run, workflow_id)
    started = time.monotonic()
    seen: set[str] = set()
    result_task = asyncio.ensure_future(handle.result())
    last_detail = ""
    while not result_task.done():
        with contextlib.suppress(RPCError, asyncio.TimeoutError):
            p: DeployProgress = await asyncio.wait_for(
                handle.query(DeployProjectWorkflow.progress), timeout=5
            )
            for step in p.completed_steps:
                if step not in seen and not quiet:
                    out.print(f"  [green]✓[/green] {step}  ({time.monotonic() - started:.1f}s)")
                seen.add(step)
            if p.detail != last_detail and not quiet:
                out.print(f"    … {p.detail}", style="dim", highlight=False)
                last_detail = p.detail
        await asyncio.wait({result_task}, timeout=0.5)
    try:
        result: DeployResult = result_task.result()
    except WorkflowFailureError as exc:
        message = str(exc.cause)
        if not quiet:
            out.print(f"[red]✗ deploy failed:[/red] {message}", highlight=False)
        cancelled = (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
        return {"status": "cancelled" if cancelled else "failed", "error": message}
    if not quiet:
        out.print(f"[green]✓ deployed[/green] {result.url}  ({time.monotonic() - started:.1f}s)")
    return result.model_dump(mode="json")


# --------------------------------------------------------------------------- status etc.


@main.command()
@click.argument("project_id")
@click.option("--json", "as_json", is_flag=True)
def status(project_id: str, as_json: bool) -> None:
    """Show the latest deploy of PROJECT_ID: workflow state, current step and record."""
    settings = _settings()
    _run(_status(settings, project_id, as_json))


async def _status(settings: Settings, project_id: str, as_json: bool) -> None:
    from turbodeploy import client as api
    from turbodeploy.models import validate_project_id

    try:
        validate_project_id(project_id)
    except ValueError as exc:
        _fail(str(exc), EXIT_INVALID)
    client = await _client(settings)
    try:
        desc = await api.describe(client, project_id)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            _fail(f"no deploy of project {project_id} found")
        raise
    info: dict[str, Any] = {
        "workflow_id": desc.id,
        "run_id": desc.run_id,
        "workflow_status": desc.status.name if desc.status else None,
        "started": desc.start_time.isoformat(),
        "closed": desc.close_time.isoformat() if desc.close_time else None,
        "ui": settings.workflow_ui_link(desc.id, desc.run_id),
    }
    with contextlib.suppress(RPCError):
        progress = await asyncio.wait_for(api.progress(client, project_id), timeout=5)
        info["progress"] = progress.model_dump(mode="json")
    if settings.database_url:
        rows = await _history_rows(settings, project_id, 1)
        info["record"] = rows[0].as_json() if rows else None
    if as_json:
        _print_json(info)
        return
    table = Table(show_header=False, box=None)
    for key in ("workflow_id", "run_id", "workflow_status", "started", "closed", "ui"):
        table.add_row(key, str(info[key]))
    if "progress" in info:
        p = info["progress"]
        table.add_row("step", f"{p['step']} ({p['step_index'] + 1}/{p['step_count']})")
        table.add_row("detail", p["detail"])
        if p.get("error"):
            table.add_row("error", p["error"])
    if info.get("record"):
        r = info["record"]
        table.add_row("deploy status", r["status"])
        table.add_row("url", r["url"])
    out.print(table)
    if desc.status in (WorkflowExecutionStatus.FAILED, WorkflowExecutionStatus.TERMINATED):
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("project_id")
def cancel(project_id: str) -> None:
    """Cancel the running deploy of PROJECT_ID (cleanup runs; the record says cancelled)."""
    settings = _settings()

    async def _cancel() -> None:
        from turbodeploy.client import cancel_deploy

        client = await _client(settings)
        try:
            await cancel_deploy(client, project_id)
        except RPCError as exc:
            _fail(f"cannot cancel deploy of {project_id}: {exc}")
        out.print(f"cancellation requested for deploy-{project_id}")

    _run(_cancel())


async def _history_rows(settings: Settings, project_id: str, limit: int) -> list[DeploymentRow]:
    from turbodeploy.db import DeploymentStore, create_pool

    assert settings.database_url
    pool = await create_pool(settings.database_url, 1, 2)
    try:
        return await DeploymentStore(pool, settings.db_schema).history(project_id, limit)
    finally:
        await pool.close()


@main.command()
@click.argument("project_id")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def history(project_id: str, limit: int, as_json: bool) -> None:
    """List recorded deployments of PROJECT_ID, newest first."""
    settings = _settings()
    if not settings.database_url:
        _fail("DATABASE_URL is not set", EXIT_INVALID)
    rows = _run(_history_rows(settings, project_id, limit))
    if as_json:
        _print_json([r.as_json() for r in rows])
        return
    table = Table("deployment", "status", "started", "commit", "image", "url", "error")
    for r in rows:
        table.add_row(
            r.deployment_id,
            r.status,
            datetime.fromtimestamp(r.deployed_at).isoformat(sep=" ", timespec="seconds"),
            (r.commit_sha or "")[:10],
            r.image or "",
            r.url,
            (r.error or "")[:60],
        )
    out.print(table)


# --------------------------------------------------------------------------- local stack


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=4280, show_default=True, type=int)
def flysim(host: str, port: int) -> None:
    """Run the local Fly Machines API emulator (tokens from FLYSIM_TOKENS)."""
    from flysim import main as flysim_main

    sys.exit(flysim_main(["--host", host, "--port", str(port)]))


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
@click.option("--keep", is_flag=True, help="Leave the stack running to explore the UI.")
@click.option("--ui-port", default=8233, show_default=True, type=int)
def demo(state_dir: Path, project_id: str, image: str, keep: bool, ui_port: int) -> None:
    """Deploy the example project on an embedded stack and print its URL."""
    from turbodeploy.demo import run_demo

    outcome = _run(
        run_demo(state_dir, project_id=project_id, image=image, keep=keep, ui_port=ui_port)
    )
    if outcome.get("status") != "deployed":
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
