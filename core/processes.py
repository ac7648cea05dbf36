"""Child processes that run in a process group of their own and are stopped as a group.

git and flyctl start helpers of their own (ssh, remote helpers, a local repository's
receive-pack, builders). Each runs as the leader of a new process group, so that stopping
it stops everything it started: first with a signal the program handles (it cleans up
lock files and leases), then, after a grace period, with SIGKILL for the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StopPolicy:
    """How a group is stopped: `first` to the group, then SIGKILL after `grace` seconds."""

    first: signal.Signals
    grace: float


async def start_in_group(
    argv: Sequence[str],
    *,
    stop: StopPolicy,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stderr: int = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """Start `argv` as the leader of a new process group, stdin closed, stdout piped.

    Cancelled while the process is being created, it is stopped once it exists. Errors
    starting it (FileNotFoundError, other OSErrors) are the caller's to translate.
    """
    spawn = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    )
    try:
        # Shielded: cancelled half-way, asyncio would kill the leader but not its group.
        return await asyncio.shield(spawn)
    except asyncio.CancelledError:
        await asyncio.shield(_stop_once_started(spawn, stop))
        raise


async def stop_group(proc: asyncio.subprocess.Process, stop: StopPolicy) -> None:
    """Stop the process and its group as `stop` says; shielded, so a second cancellation
    cannot leave a zombie or a half-stopped group behind."""
    await asyncio.shield(_stop(proc, stop))


async def _stop_once_started(
    spawn: asyncio.Future[asyncio.subprocess.Process], stop: StopPolicy
) -> None:
    try:
        proc = await spawn
    except Exception:
        return  # it never started
    await _stop(proc, stop)


async def _stop(proc: asyncio.subprocess.Process, stop: StopPolicy) -> None:
    if proc.returncode is None:
        _signal_group(proc, stop.first)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), stop.grace)
    # Also when the leader is gone: whatever it started in its group goes with it.
    _signal_group(proc, signal.SIGKILL)
    await proc.wait()


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
