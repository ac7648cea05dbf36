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
import time
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


# ------------------------------------------------------------- processes left behind


@dataclass(frozen=True)
class ProcessRecord:
    """A process as another process can find it again later: its pid, and the time it
    started, which tells it apart from a later process given the same pid."""

    pid: int
    started: float | None
    group: bool = False  # the leader of its own process group: stopping it stops the group

    @classmethod
    def of(cls, pid: int, *, group: bool = False) -> ProcessRecord:
        return cls(pid, process_start_time(pid), group)

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "started": self.started, "group": self.group}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ProcessRecord:
        pid, started = data["pid"], data.get("started")
        assert isinstance(pid, int)
        return cls(pid, float(started) if isinstance(started, int | float) else None,
                   bool(data.get("group")))  # fmt: skip

    def alive(self) -> bool:
        """Still running, and still the same process (not a zombie, not a reused pid)."""
        started = process_start_time(self.pid)
        if started is None:
            return False
        return self.started is None or abs(started - self.started) < 0.5

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)


def process_start_time(pid: int) -> float | None:
    """When `pid` started, in clock ticks since boot (Linux), or 0.0 where that is not
    known; None when no such process runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        pass
    else:
        # The command name, in parentheses, may hold spaces: fields follow its last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in {"Z", "X"}:
            return None
        return float(fields[19])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0.0


def stop_process(record: ProcessRecord, stop: StopPolicy, *, poll: float = 0.05) -> bool:
    """Stop a process that need not be this one's child; return whether it was running.

    `stop.first` goes to it (to its group when it leads one), then, after `stop.grace`
    seconds, SIGKILL. Returns once it is gone.
    """
    if not record.alive():
        # Not its group either: once the leader is gone, its pid (the group's id) may
        # be another program's.
        return False
    record.signal(stop.first)
    deadline = time.monotonic() + stop.grace
    while record.alive() and time.monotonic() < deadline:
        _reap(record.pid)
        time.sleep(poll)
    if record.group or record.alive():
        record.signal(signal.SIGKILL)  # and whatever it started in its group
    while record.alive():
        _reap(record.pid)
        time.sleep(poll)
    _reap(record.pid)
    return True


def _reap(pid: int) -> None:
    """Collect `pid` if it is this process's child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
