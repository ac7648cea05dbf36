"""`turbodeploy up`: each service a process of its own, the emulator's apps kept across a
restart, a killed stack cleaned up by the next start, a clean stop that leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from core.processes import ProcessRecord, process_start_time
from turbodeploy.stack import publish_example

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "registry.fly.io/turbobackend-stackp:v1"
APP = "turbobackend-stackp"


class Up:
    """One `turbodeploy up` in a child process, its output in a file."""

    def __init__(self, state_dir: Path, out: Path, *args: str) -> None:
        self.state_dir = state_dir
        self.out_path = out
        self._out: IO[bytes] = open(out, "wb")  # noqa: SIM115
        argv = [sys.executable, "-m", "turbodeploy.cli", "up", "--state-dir", str(state_dir)]
        argv += ["--temporal-port", "0", "--ui-port", "0", "--flysim-port", "0", *args]
        self.proc = subprocess.Popen(
            argv,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    @property
    def output(self) -> str:
        return self.out_path.read_text()

    def wait_for(self, text: str, count: int = 1, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while self.output.count(text) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"`up` exited ({self.proc.returncode}):\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout}s:\n{self.output}")
            time.sleep(0.1)
        return self.output

    def record(self) -> dict[str, ProcessRecord]:
        data = json.loads((self.state_dir / "run" / "stack.json").read_text())
        return {n: ProcessRecord.from_json(c) for n, c in data["components"].items()}

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for line in (self.state_dir / "run" / "env.sh").read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value.strip("'")
        return env

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self._out.close()


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.close()
    # Whatever a killed `up` left is stopped by the next one; a last one cleans up here.
    state = tmp_path / "state"
    if (state / "run" / "stack.json").exists():
        final = Up(state, tmp_path / "final.txt", "--no-worker")
        try:
            final.wait_for("ready")
        finally:
            final.close()


def _flysim_state(env: dict[str, str]) -> dict[str, object]:
    base = env["TURBODEPLOY_FLY_API_BASE_URL"].removesuffix("/v1")
    state: dict[str, object] = httpx.get(f"{base}/_sim/state", timeout=10).json()
    return state


def _machines_of(state: dict[str, object], app: str) -> set[str]:
    machines = state["machines"]
    assert isinstance(machines, list)
    return {m["id"] for m in machines if m["app"] == app and m["state"] != "destroyed"}


def _gone(records: dict[str, ProcessRecord]) -> dict[str, int]:
    """The recorded processes still running (none, when all is well)."""
    deadline = time.monotonic() + 30
    while True:
        alive = {n: r.pid for n, r in records.items() if r.alive()}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_up_killed_then_started_again_cleans_up_and_keeps_the_emulators_apps(
    tmp_path: Path, ups: list[Up]
) -> None:
    state = tmp_path / "state"
    first = Up(state, tmp_path / "first.txt")
    ups.append(first)
    out = first.wait_for("\nready")
    records = first.record()
    assert set(records) == {"temporal", "postgres", "ssm", "flysim", "worker"}
    for name in records:
        assert f"{name:<10} pid {records[name].pid}" in out  # a status line for each
    assert len({r.pid for r in records.values()} | {first.proc.pid}) == 6  # own processes

    # A deploy through the CLI, pointed at the stack by the printed `export` lines.
    env = first.env()
    repo = publish_example("nitro-hello", tmp_path / "repos")
    deploy = subprocess.run(
        [sys.executable, "-m", "turbodeploy.cli", "deploy", "stackp", "--repo", repo,
         "--image", IMAGE, "--wait"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    machines = _machines_of(_flysim_state(env), APP)
    assert machines

    # The worker restarts on its own: when asked (SIGHUP), and when it dies.
    old_worker = records["worker"]
    first.proc.send_signal(signal.SIGHUP)
    first.wait_for("polling turbodeploy", count=2)
    assert not old_worker.alive()
    second_worker = first.record()["worker"]
    assert second_worker.alive() and second_worker.pid != old_worker.pid
    os.kill(second_worker.pid, signal.SIGKILL)
    out = first.wait_for("polling turbodeploy", count=3)
    assert f"worker     (pid {second_worker.pid}) exited with code -9" in out
    assert first.record()["worker"].alive()

    # The supervisor dies without a chance to stop anything.
    records = first.record()
    first.proc.kill()
    first.proc.wait()
    assert all(r.alive() for r in records.values())  # left behind, for now

    second = Up(state, tmp_path / "second.txt")
    ups.append(second)
    out = second.wait_for("\nready")
    assert "the previous stack under" in out and "did not stop" in out
    for name, record in records.items():
        assert f"{name} (pid {record.pid})" in out
    assert _gone(records) == {}
    # Fly does not forget apps when a client restarts; neither does the emulator.
    env = second.env()
    assert _machines_of(_flysim_state(env), APP) == machines
    health = httpx.get(env["TURBODEPLOY_APP_URL_TEMPLATE"].replace("{app}", APP) + "/api/health")
    assert health.status_code == 200
    status = subprocess.run(
        [sys.executable, "-m", "turbodeploy.cli", "status", "stackp", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr

    # A clean stop (SIGTERM) stops everything it started, PostgreSQL included.
    records = second.record()
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(timeout=120) == 0
    assert _gone(records) == {}
    assert "stopped: worker, flysim, ssm, postgres, temporal" in second.output
    assert not (state / "run" / "stack.json").exists()


def test_up_refuses_a_taken_port_and_a_second_stack(tmp_path: Path, ups: list[Up]) -> None:
    state = tmp_path / "state"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        taken = Up(state, tmp_path / "taken.txt", "--temporal-port", str(port))
        assert taken.proc.wait(timeout=120) == 1
    out = taken.output
    assert f"port {port} (Temporal, --temporal-port) already in use" in out
    assert "\nready" not in out and " pid " not in out  # nothing started
    assert not (state / "run" / "stack.json").exists()

    running = Up(state, tmp_path / "running.txt", "--no-worker")
    ups.append(running)
    running.wait_for("\nready")
    again = Up(state, tmp_path / "again.txt", "--no-worker")
    assert again.proc.wait(timeout=60) == 1
    assert f"a stack already runs under {state.resolve()}" in again.output
    assert f"supervisor is pid {running.proc.pid}" in again.output
    assert "\nready" not in again.output
    assert all(r.alive() for r in running.record().values())  # the running one untouched


def test_a_component_that_exits_before_it_listens_is_reported_and_nothing_stays(
    tmp_path: Path, ups: list[Up]
) -> None:
    # A `temporal` that fails the way a taken port makes it fail: it exits at once.
    fake = tmp_path / "temporal"
    fake.write_text("#!/bin/sh\necho 'listen tcp: address already in use' >&2\nexit 1\n")
    fake.chmod(0o755)
    state = tmp_path / "state"
    os.environ["TURBODEPLOY_TEMPORAL_CLI"] = str(fake)
    try:
        up = Up(state, tmp_path / "out.txt")
    finally:
        del os.environ["TURBODEPLOY_TEMPORAL_CLI"]
    assert up.proc.wait(timeout=120) == 1
    out = up.output
    assert "Temporal exited with code 1 before it listened" in out
    assert "address already in use" in out
    assert "\nready" not in out
    assert not (state / "run" / "stack.json").exists()


def test_process_record_tells_a_reused_pid_apart() -> None:
    me = ProcessRecord.of(os.getpid())
    assert me.alive()
    assert not ProcessRecord(os.getpid(), (process_start_time(os.getpid()) or 0) + 100).alive()
    child = subprocess.Popen(["true"])
    child.wait()
    assert not ProcessRecord.of(child.pid).alive()
