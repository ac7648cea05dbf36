"""Following a deploy: its steps as they finish, then its outcome.

On a terminal a live bar shows the current step under the finished ones; in logs and
pipes each finished step is one line. `turbodeploy deploy --wait` and the demo use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from temporalio.service import RPCError

from core.models import DeployProgress
from turbodeploy.client import DeployError, DeployFailed, DeployHandle, progress

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class _Lines:
    """Progress as plain lines, for logs and pipes: one line per finished step."""

    def __init__(self) -> None:
        self._detail = ""
        self._waiting = ""

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def waiting(self, message: str) -> None:
        if message != self._waiting:
            click.echo(f"  … {message}")
            self._waiting = message

    def step_done(self, step: str, elapsed: float) -> None:
        click.echo(f"  ✓ {step}  ({elapsed:.1f}s)")

    def current(self, p: DeployProgress, elapsed: float) -> None:
        if p.detail and p.detail != self._detail:
            click.echo(f"    {p.step}: {p.detail}")
            self._detail = p.detail


class _Live:
    """Progress on a terminal: ticked steps above a live bar with the current step."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.table import Column

        self._progress: Progress = Progress(
            SpinnerColumn(),
            TextColumn(
                "[bold]{task.fields[step]}[/bold]",
                table_column=Column(no_wrap=True, min_width=13),
            ),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn(
                "{task.fields[detail]}",
                style="dim",
                table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"),
            ),
            expand=True,
            console=Console(),
            transient=True,
        )
        self._task: TaskID = self._progress.add_task("deploy", total=None, step="", detail="")

    def __enter__(self) -> _Live:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def waiting(self, message: str) -> None:
        self._progress.update(self._task, step="queued", detail=message)

    def step_done(self, step: str, elapsed: float) -> None:
        self._progress.console.print(f"  [green]✓[/green] {step}  [dim]({elapsed:.1f}s)[/dim]")

    def current(self, p: DeployProgress, elapsed: float) -> None:
        self._progress.update(
            self._task,
            step=str(p.step),
            detail=p.detail[:100],
            total=p.step_count,
            completed=len(p.completed_steps),
        )


async def follow(
    handle: DeployHandle,
    *,
    quiet: bool = False,
    live: bool | None = None,
    poll_interval: float = 0.5,
) -> dict[str, Any]:
    """Show the deployment's steps as they finish until it ends; return its outcome.

    `live` chooses the terminal display (default: when stdout is a terminal); otherwise
    plain lines. The outcome is the `DeployResult` as JSON plus `elapsed_s`.
    """
    started = time.monotonic()
    outcome_task = asyncio.ensure_future(handle.result())
    display: _Lines | _Live | None = None
    if not quiet:
        display = _Live() if (sys.stdout.isatty() if live is None else live) else _Lines()
    seen: set[str] = set()
    with display or contextlib.nullcontext():
        while True:
            finished = outcome_task.done()
            # One more poll after the end, so a fast deploy still lists all its steps.
            p = await _poll(handle) if display is not None else None
            if p is not None and display is not None:
                elapsed = time.monotonic() - started
                if p.deployment_id != handle.deployment_id:
                    if handle.deployment_id in p.queued:
                        display.waiting(f"queued behind deployment {p.deployment_id}")
                else:
                    for step in p.completed_steps:
                        if step not in seen:
                            # The step's own duration, as the workflow timed it.
                            display.step_done(step, p.step_seconds.get(step, elapsed))
                            seen.add(step)
                    display.current(p, elapsed)
            if finished:
                break
            await asyncio.wait({outcome_task}, timeout=poll_interval)
    elapsed = round(time.monotonic() - started, 3)
    try:
        result = outcome_task.result()
    except DeployFailed as exc:
        failed = exc.result.model_dump(mode="json")
        if not quiet:
            click.echo(f"✗ {failed['status']}: {exc.result.error or 'no error recorded'}")
        return {**failed, "elapsed_s": elapsed}
    except DeployError as exc:
        if not quiet:
            click.echo(f"✗ {exc}")
        return {"status": "unknown", "error": str(exc), "elapsed_s": elapsed}
    if not quiet:
        click.echo(f"✓ {result.status} {result.url}  ({elapsed:.1f}s)")
    return {**result.model_dump(mode="json"), "elapsed_s": elapsed}


async def _poll(handle: DeployHandle) -> DeployProgress | None:
    try:
        return await asyncio.wait_for(progress(handle.client, handle.project_id), timeout=5)
    except (RPCError, TimeoutError):
        # Between runs, or the run closed: the outcome says how it ended.
        return None
