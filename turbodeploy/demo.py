"""`turbodeploy demo`: a real deploy of the example project on the embedded stack."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console

from core.logs import configure_logging
from core.models import DeployRequest
from turbodeploy.client import start_deploy
from turbodeploy.progress import follow
from turbodeploy.stack import embedded_stack, publish_example

console = Console(soft_wrap=True)  # links must stay whole to be clickable


async def run_demo(
    state_dir: Path,
    *,
    project_id: str,
    image: str,
    keep: bool,
    ui_port: int,
    token: str | None = None,
) -> dict[str, Any]:
    """Run the demo; return the deploy's outcome. `token` is for tests (default: generated)."""
    state_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before anything runs
    configure_logging("WARNING")
    file_log = logging.FileHandler(state_dir / "demo.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_log.setLevel(logging.INFO)
    logging.getLogger().addHandler(file_log)
    logging.getLogger().setLevel(logging.INFO)

    repo = publish_example("nitro-hello", state_dir / "repos")
    request = DeployRequest(project_id=project_id, repo_url=repo, image=image)
    console.print(
        "[bold]starting the embedded stack[/bold] (Temporal, PostgreSQL, SSM, Fly emulator)"
    )
    async with embedded_stack(state_dir, ui_port=ui_port, token=token) as stack:
        console.print(f"Temporal UI: {stack.ui_url}")
        handle = await start_deploy(stack.client, request, task_queue=stack.settings.task_queue)
        link = stack.settings.workflow_ui_link(handle.workflow_id, handle.run_id)
        console.print(f"deploying {request.project_id} from {repo}")
        outcome = await follow(handle)
        row = None
        if stack.settings.database_url:
            from core.db import DeploymentStore, create_pool

            pool = await create_pool(stack.settings.database_url, 1, 1)
            try:
                row = await DeploymentStore(pool, stack.settings.db_schema).get(
                    request.deployment_id
                )
            finally:
                await pool.close()
        console.print()
        if outcome.get("status") == "deployed":
            console.print(f"[bold green]URL:[/bold green] {outcome['url']}", highlight=False)
        else:
            console.print(
                f"[bold red]deploy {outcome.get('status')}[/bold red]: {outcome.get('error')}"
            )
        console.print(f"[bold]Temporal UI:[/bold] {link}", highlight=False)
        if row is not None:
            console.print("[bold]recorded row:[/bold]")
            console.print_json(json.dumps(row.as_json()))
        project = request.project_id
        console.print("[bold]next[/bold] (with --keep, against this stack):", highlight=False)
        for command in (f"app {project}", f"logs {project} --follow", f"stop {project}",
                        f"start {project}", f"destroy {project} --yes"):  # fmt: skip
            console.print(f"  turbodeploy {command}", highlight=False)
        if keep:
            console.print("\nstack running; press Ctrl-C to stop")
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        return outcome
