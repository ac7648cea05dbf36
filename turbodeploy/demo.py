"""`turbodeploy demo`: a real deploy of the example project on the local stack.

The stack is the one `turbodeploy up` runs (`turbodeploy/stack.py`), on the same state
folder: without `--keep` it is stopped when the deploy ends, and the demo says what stays
(everything on disk) and what is gone (every server, so every link it printed); with
`--keep` it prints every address, the `export` lines and commands to try, and runs until
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from core.logs import configure_logging
from core.models import DeployRequest
from turbodeploy import embedded
from turbodeploy.client import start_deploy
from turbodeploy.progress import follow
from turbodeploy.stack import (
    LocalStack,
    Ports,
    StackRefused,
    _signal_flags,
    print_addresses,
    publish_example,
)

console = Console(soft_wrap=True, highlight=False)  # links must stay whole to be clickable

# The ports `turbodeploy up` uses by default; the demo takes any free one instead of a
# default that is taken (and says which it took), but refuses a port it was given.
DEFAULT_PORTS = {"temporal": 7233, "ui": 8233, "flysim": 4280}


def _port(given: int | None, name: str) -> int:
    if given is not None:
        return given
    preferred = DEFAULT_PORTS[name]
    return 0 if embedded.port_in_use("127.0.0.1", preferred) else preferred


def _command(name: str, module: str) -> str:
    """How to run `name` from a shell here: its name when PATH finds this install's."""
    exe = shutil.which(name)
    if name == "temporal":
        mine = embedded.temporal_cli()
        return name if exe and Path(exe).resolve() == Path(mine).resolve() else shlex.quote(mine)
    return name if exe else f"{shlex.quote(sys.executable)} -m {module}"


def follow_up_commands(stack: LocalStack, project_id: str) -> list[str]:
    """Commands to try against the running stack, after the `export` lines."""
    s = stack.settings
    assert s is not None
    td, temporal = _command("turbodeploy", "turbodeploy.cli"), _command("temporal", "")
    address = shlex.quote(s.temporal_address)
    query = f'"ProjectId={project_id!r}"'  # a project id: letters, digits, '-'
    return [
        f"{td} status {project_id}",
        f"{td} history {project_id}",
        f"{td} list",
        f"{td} app {project_id}",
        f"{td} logs {project_id}",
        f"{temporal} workflow list --address {address} --query {query}",
        f"{temporal} workflow describe --address {address} -w deploy-{project_id}",
        f"{temporal} workflow query --address {address} -w deploy-{project_id} --name progress",
    ]


async def run_demo(
    state_dir: Path,
    *,
    project_id: str,
    image: str,
    keep: bool,
    ui_port: int | None = None,
    temporal_port: int | None = None,
    flysim_port: int | None = None,
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
    ports = Ports(
        _port(temporal_port, "temporal"), _port(ui_port, "ui"), _port(flysim_port, "flysim")
    )
    stack = LocalStack(
        state_dir, ports, say=lambda line: console.print(line, markup=False), token=token
    )
    console.print(
        "[bold]starting the local stack[/bold] (Temporal, PostgreSQL, SSM, Fly emulator, "
        f"worker) under {stack.state_dir}"
    )
    with _signal_flags() as flags:  # the start is blocking: signals are polled meanwhile
        stack.interrupted = lambda: flags.stop is not None
        try:
            stack.start()
        except (StackRefused, embedded.ComponentFailed) as exc:
            console.print(f"[bold red]the stack did not start[/bold red]: {exc}")
            return {"status": "not_started", "error": str(exc)}
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        outcome = await _deploy(stack, request, repo)
        if keep:
            _print_keep(stack, project_id)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        return outcome
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        console.print("stopping the stack …")
        _print_after_stop(stack, stack.stop(), keep)


async def _deploy(stack: LocalStack, request: DeployRequest, repo: str) -> dict[str, Any]:
    settings = stack.settings
    assert settings is not None
    client = await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
    handle = await start_deploy(client, request, task_queue=settings.task_queue)
    link = settings.workflow_ui_link(handle.workflow_id, handle.run_id)
    console.print(f"deploying {request.project_id} from {repo}")
    outcome = await follow(handle)
    row = None
    if settings.database_url:
        from core.db import DeploymentStore, create_pool

        pool = await create_pool(settings.database_url, 1, 1)
        try:
            row = await DeploymentStore(pool, settings.db_schema).get(handle.deployment_id)
        finally:
            await pool.close()
    console.print()
    if outcome.get("status") == "deployed":
        console.print(f"[bold green]URL:[/bold green] {outcome['url']}")
    else:
        console.print(
            f"[bold red]deploy {outcome.get('status')}[/bold red]: {outcome.get('error')}"
        )
    console.print(f"[bold]Temporal UI:[/bold] {link}")
    if row is not None:
        console.print("[bold]recorded row:[/bold]")
        console.print_json(json.dumps(row.as_json()))
    return outcome


def _print_keep(stack: LocalStack, project_id: str) -> None:
    console.print("\n[bold]the stack keeps running[/bold]:")
    print_addresses(stack, lambda line: console.print(line, markup=False))
    console.print("\nThen try (in a shell that ran the export lines above):")
    for command in follow_up_commands(stack, project_id):
        console.print(f"  {command}", markup=False)
    console.print(
        "\nstack running; press Ctrl-C to stop it (every server stops, PostgreSQL included; "
        f"what is on disk stays under {stack.state_dir})"
    )


def _print_after_stop(stack: LocalStack, names: list[str], keep: bool) -> None:
    d = stack.state_dir
    console.print(f"stopped: {', '.join(names) or 'nothing was running'}")
    if not keep:
        console.print(
            "Gone with it: every server, so the URL and the Temporal UI link above no longer "
            "answer (run `turbodeploy demo --keep` to leave them running)."
        )
    console.print(
        f"Kept under {d}: Temporal's history (temporal/temporal.db), the database "
        "(postgres/), the emulator's apps and machines (flysim/state.json), the example's "
        "repository (repos/) and the logs (logs/, demo.log). "
        f"`turbodeploy up --state-dir {shlex.quote(str(d))}` serves them all again "
        "(at the same addresses when the default ports are free)."
    )
