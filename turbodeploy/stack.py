"""The local stack: every service a deploy needs, each a process of its own, on loopback.

`turbodeploy up` and `turbodeploy demo` run it. The services, in the order they start:

- `temporal`: the Temporal dev server with its Web UI (`temporal server start-dev`),
  its history in `<state>/temporal/temporal.db`;
- `postgres`: the embedded PostgreSQL (pgserver) in `<state>/postgres`, or `DATABASE_URL`;
- `ssm`: moto's AWS server, seeded with a generated Fly token and the org slug;
- `flysim`: the Fly Machines API emulator (`python -m flysim`), its apps, machines and
  app secrets kept in `<state>/flysim/state.json` across restarts, as Fly keeps them;
- `worker`: `python -m worker`, as in production; restarted on its own when it exits.

The supervisor records every pid in `<state>/run/stack.json` as soon as it has one and
holds a lock on `<state>/run/lock` while it runs: a second stack on the same folder is
refused, and a stack whose supervisor was killed (SIGKILL, a crash) is cleaned up by the
next start, which stops what it left running. The generated Fly token is held in memory,
in moto, and in the emulator's environment: never in argv or a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from core.processes import ProcessRecord, StopPolicy, stop_process
from core.settings import Settings
from turbodeploy import embedded

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
ORG = "personal"
# The worker's log says this once it polls its task queue.
_WORKER_READY = b"worker polling task queue"

_STOP = {
    "worker": StopPolicy(signal.SIGTERM, 40.0),  # its graceful shutdown is 30 s
    "flysim": StopPolicy(signal.SIGTERM, 10.0),  # writes its state file on the way out
    "ssm": StopPolicy(signal.SIGTERM, 5.0),
    "postgres": embedded.POSTGRES_STOP,
    "temporal": StopPolicy(signal.SIGTERM, 15.0),
}


class StackRefused(RuntimeError):
    """The stack cannot start here: another one runs, or a port is taken."""


class StackStopped(RuntimeError):
    """A service other than the worker exited while the stack ran."""


@dataclass
class Component:
    name: str
    record: ProcessRecord
    address: str
    log: Path | None
    process: subprocess.Popen[bytes] | None = None  # None for a server that daemonizes

    def exit_code(self) -> int | None:
        """The exit code once it has exited (-N: killed by signal N), else None."""
        if self.process is not None:
            return self.process.poll()
        return None if self.record.alive() else -1


@dataclass
class Ports:
    temporal: int = 0
    ui: int = 0
    flysim: int = 0
    metrics: int | None = None

    def wanted(self) -> list[tuple[str, str, int]]:
        """(service, option, port) for every port given (0: any free one)."""
        ports = [
            ("Temporal", "--temporal-port", self.temporal),
            ("the Temporal UI", "--ui-port", self.ui),
            ("the Fly emulator", "--flysim-port", self.flysim),
            ("the worker's metrics", "--metrics-port", self.metrics or 0),
        ]
        return [p for p in ports if p[2]]


@dataclass
class LocalStack:
    """Starts, watches and stops the stack's services under `state_dir`."""

    state_dir: Path
    ports: Ports = field(default_factory=Ports)
    run_worker: bool = True
    say: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    # Polled while it waits for a service: True aborts the start (KeyboardInterrupt).
    interrupted: Callable[[], bool] = field(default=lambda: False)
    token: str | None = field(default=None, repr=False)

    components: dict[str, Component] = field(default_factory=dict)
    settings: Settings | None = None
    _lock: IO[str] | None = field(default=None, repr=False)
    _worker_env: dict[str, str] = field(default_factory=dict, repr=False)
    _postgres: embedded.Postgres | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.state_dir = self.state_dir.resolve()
        self.run_dir = self.state_dir / "run"
        self.logs = self.state_dir / "logs"
        self.flysim_state = self.state_dir / "flysim" / "state.json"

    # ------------------------------------------------------------------- start

    def start(self) -> Settings:
        """Start every service; on any failure stop those started and raise.

        Raises StackRefused (nothing was started) or ComponentFailed.
        """
        self._take_over()
        try:
            self._check_ports()
            self._write_record()
            self._start_all()
        except BaseException:
            self.stop()
            raise
        assert self.settings is not None
        return self.settings

    def _take_over(self) -> None:
        """Lock the state folder; clean up after a stack whose supervisor is gone."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.run_dir / "lock", "a+")  # noqa: SIM115 - held while the stack runs
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            owner = _read_json(self.run_dir / "stack.json").get("supervisor", {})
            pid = owner.get("pid", "?")
            raise StackRefused(
                f"a stack already runs under {self.state_dir} (its supervisor is pid {pid}): "
                f"stop it first (Ctrl-C where it runs, or kill {pid}), or use another "
                "--state-dir"
            ) from None
        self._lock = lock
        left = _read_json(self.run_dir / "stack.json")
        if left:
            self._clean_up_after(left)

    def _clean_up_after(self, left: dict[str, Any]) -> None:
        pid = left.get("supervisor", {}).get("pid", "?")
        stopped = []
        # The reverse of the start order, as a clean stop goes.
        for name, data in reversed(list(left.get("components", {}).items())):
            record = ProcessRecord.from_json(data)
            if stop_process(record, _STOP.get(name, StopPolicy(signal.SIGTERM, 10.0))):
                stopped.append(f"{name} (pid {record.pid})")
        (self.run_dir / "stack.json").unlink(missing_ok=True)
        if stopped:
            self.say(
                f"the previous stack under {self.state_dir} did not stop (its supervisor, "
                f"pid {pid}, is gone); stopped what it left running: {', '.join(stopped)}"
            )

    def _check_ports(self) -> None:
        taken = [
            f"port {port} ({what}, {option})"
            for what, option, port in self.ports.wanted()
            if embedded.port_in_use("127.0.0.1", port)
        ]
        if taken:
            raise StackRefused(
                f"{'; '.join(taken)} already in use on 127.0.0.1: stop the program that "
                "listens there, or choose another port with the option named (0: any free "
                "port)"
            )

    def _start_all(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        wait = self.interrupted
        temporal = embedded.start_temporal(
            self.state_dir / "temporal",
            port=self.ports.temporal or None,
            ui_port=self.ports.ui or None,
            log=self.logs / "temporal.log",
            interrupted=wait,
        )
        self._add(
            Component(
                "temporal",
                ProcessRecord.of(temporal.process.pid, group=True),
                f"{temporal.address}  (UI {temporal.ui_url})",
                self.logs / "temporal.log",
                temporal.process,
            )
        )

        pg = embedded.start_postgres(self.state_dir / "postgres")
        self._postgres = pg
        if pg.record is not None:
            self._add(Component("postgres", pg.record, pg.url, self.state_dir / "postgres" / "log"))
        else:
            self.say(f"{'postgres':<10} external  {_redact(pg.url)}  (DATABASE_URL)")
        if wait():
            raise KeyboardInterrupt

        moto, moto_url = embedded.start_moto_process(self.logs / "ssm.log", interrupted=wait)
        self._add(
            Component(
                "ssm", ProcessRecord.of(moto.pid, group=True), moto_url, self.logs / "ssm.log", moto
            )
        )
        token = self.token or embedded.generate_fly_token()
        self.token = None
        embedded.seed_ssm(moto_url, token=token, org_slug=ORG)

        flysim_port = self.ports.flysim or embedded.free_port()
        flysim_log = self.logs / "flysim.log"
        argv = [sys.executable, "-m", "flysim", "--host", "127.0.0.1", "--port", str(flysim_port)]
        argv += ["--state-file", str(self.flysim_state)]
        sim = embedded.spawn(
            argv, log=flysim_log, env=embedded.child_env({"FLYSIM_TOKENS": f"{token}={ORG}"})
        )
        del token  # from here on only moto and the emulator hold it
        self._add(
            Component(
                "flysim",
                ProcessRecord.of(sim.pid, group=True),
                f"http://127.0.0.1:{flysim_port}/v1  (state {self.flysim_state})",
                flysim_log,
                sim,
            )
        )
        embedded.wait_until_listening(
            "the Fly emulator", sim, "127.0.0.1", flysim_port, log=flysim_log, interrupted=wait
        )

        fly_base = f"http://127.0.0.1:{flysim_port}"
        metrics = self.ports.metrics
        self.settings = Settings(
            temporal_address=temporal.address,
            temporal_ui_url=temporal.ui_url,
            database_url=pg.url,
            aws_endpoint_url=moto_url,
            aws_region="us-east-1",
            fly_api_base_url=f"{fly_base}/v1",
            app_url_template=f"{fly_base}/_apps/{{app}}",
            work_dir=str(self.state_dir / "work"),
            # The emulator has no builders: flyctl here is the stand-in that drives it.
            flyctl_path=str(embedded.flyctl_standin(self.state_dir / "bin")),
            metrics_bind_address=f"127.0.0.1:{metrics}" if metrics else None,
        )
        self._worker_env = embedded.child_env(
            {
                **environment(self.settings),
                "AWS_ACCESS_KEY_ID": "testing",  # moto's; never real credentials
                "AWS_SECRET_ACCESS_KEY": "testing",  # moto accepts any
                "TURBODEPLOY_WORK_DIR": self.settings.work_dir,
                "TURBODEPLOY_FLYCTL_PATH": self.settings.flyctl_path,
                **(
                    {"TURBODEPLOY_METRICS_BIND_ADDRESS": self.settings.metrics_bind_address}
                    if self.settings.metrics_bind_address
                    else {}
                ),
            }
        )
        if self.run_worker:
            self.start_worker()

    def start_worker(self) -> Component:
        """Start `python -m worker`; return once it polls its task queue."""
        worker_log = self.logs / "worker.log"
        offset = worker_log.stat().st_size if worker_log.exists() else 0
        proc = embedded.spawn(
            [sys.executable, "-m", "worker"], log=worker_log, env=self._worker_env
        )
        assert self.settings is not None
        component = Component(
            "worker",
            ProcessRecord.of(proc.pid, group=True),
            f"polling {self.settings.task_queue}",
            worker_log,
            proc,
        )
        self._add(component, show=False)
        deadline = time.monotonic() + 60
        while True:
            code = proc.poll()
            if code is not None:
                raise embedded.ComponentFailed(
                    f"the worker exited with code {code} before it polled its task queue; "
                    f"the end of {worker_log}:\n{embedded.log_tail(worker_log)}"
                )
            with open(worker_log, "rb") as f:
                f.seek(offset)
                if _WORKER_READY in f.read():
                    break
            if self.interrupted():
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise embedded.ComponentFailed(
                    f"the worker did not poll its task queue within 60s; see {worker_log}"
                )
            time.sleep(0.1)
        self._show(component)
        return component

    def restart_worker(self, why: str) -> None:
        old = self.components.pop("worker", None)
        if old is not None:
            stop_process(old.record, _STOP["worker"])
            if old.process is not None:
                old.process.wait()
        self.say(f"worker     {why}; starting it again")
        self.start_worker()

    def _add(self, component: Component, *, show: bool = True) -> None:
        self.components[component.name] = component
        self._write_record()
        if show:
            self._show(component)

    def _show(self, c: Component) -> None:
        self.say(f"{c.name:<10} pid {c.record.pid:<8} {c.address}")

    def _write_record(self) -> None:
        data = {
            "state_dir": str(self.state_dir),
            "supervisor": ProcessRecord.of(os.getpid()).to_json(),
            "components": {n: c.record.to_json() for n, c in self.components.items()},
        }
        tmp = self.run_dir / "stack.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.run_dir / "stack.json")

    # ----------------------------------------------------------------- running

    def check(self) -> None:
        """Restart an exited worker; raise StackStopped when another service exited."""
        for name, c in list(self.components.items()):
            code = c.exit_code()
            if code is None:
                continue
            if name == "worker":
                self.restart_worker(f"(pid {c.record.pid}) exited with code {code}")
                continue
            tail = f"; the end of {c.log}:\n{embedded.log_tail(c.log)}" if c.log else ""
            raise StackStopped(f"{name} (pid {c.record.pid}) exited with code {code}{tail}")

    # -------------------------------------------------------------------- stop

    def stop(self) -> list[str]:
        """Stop every service, the reverse of the start order; return their names."""
        stopped = []
        with _deferred_signals():
            for name in reversed(list(self.components)):
                c = self.components[name]
                if name == "postgres" and self._postgres is not None:
                    self._postgres.stop()
                else:
                    stop_process(c.record, _STOP[name])
                if c.process is not None:
                    c.process.wait()
                del self.components[name]
                self._write_record()
                stopped.append(name)
            (self.run_dir / "stack.json").unlink(missing_ok=True)
            if self._lock is not None:
                self._lock.close()
                self._lock = None
        return stopped


def environment(settings: Settings) -> dict[str, str]:
    """The variables that point the CLI, a worker or the `temporal` CLI at the stack."""
    env = {
        "TURBODEPLOY_TEMPORAL_ADDRESS": settings.temporal_address,
        "TURBODEPLOY_TEMPORAL_UI_URL": settings.temporal_ui_url,
        "TURBODEPLOY_TASK_QUEUE": settings.task_queue,
        "DATABASE_URL": settings.database_url or "",
        "TURBODEPLOY_DB_SCHEMA": settings.db_schema,
        "AWS_ENDPOINT_URL": settings.aws_endpoint_url or "",
        "AWS_REGION": settings.aws_region,
        # moto's placeholders (it accepts any): boto3 refuses to sign without credentials.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "TURBODEPLOY_FLY_API_BASE_URL": settings.fly_api_base_url,
        "TURBODEPLOY_APP_URL_TEMPLATE": settings.app_url_template,
        "TEMPORAL_ADDRESS": settings.temporal_address,  # read by the `temporal` CLI
    }
    return {k: v for k, v in env.items() if v}


def export_lines(settings: Settings) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in environment(settings).items()]


def print_addresses(stack: LocalStack, say: Callable[[str], None]) -> None:
    s = stack.settings
    assert s is not None
    say(f"Temporal:     {s.temporal_address}")
    say(f"Temporal UI:  {s.temporal_ui_url}")
    say(f"PostgreSQL:   {s.database_url}")
    say(f"SSM (moto):   {s.aws_endpoint_url}")
    say(f"Fly API:      {s.fly_api_base_url}  (apps at {s.app_url('<app>')})")
    say(f"flyctl:       {s.flyctl_path}  (the stand-in: builds are simulated)")
    if s.metrics_bind_address:
        say(f"Metrics:      http://{s.metrics_bind_address}/metrics")
    say(f"Logs:         {stack.logs}")
    say("\nPoint the CLI (and the `temporal` CLI) at this stack:")
    for line in export_lines(s):
        say(f"  {line}")
    env_file = stack.run_dir / "env.sh"
    env_file.write_text("".join(f"{line}\n" for line in export_lines(s)))
    say(f"  (also in {env_file}: . {shlex.quote(str(env_file))})")


# ------------------------------------------------------------------------- `up`


def run_stack(
    state_dir: Path,
    *,
    temporal_port: int = 7233,
    ui_port: int = 8233,
    flysim_port: int = 4280,
    metrics_port: int | None = None,
    run_worker: bool = True,
) -> int:
    """`turbodeploy up`: run the stack in the foreground until SIGINT or SIGTERM.

    Prints a line per service as it starts, the addresses and the environment that points
    the CLI at the stack, then `ready`. SIGHUP restarts the worker; so does the worker's
    own exit. Returns the exit code: 0 after a clean stop, 1 when the stack could not
    start or a service other than the worker stopped.
    """
    from core.logs import configure_logging

    configure_logging("WARNING")
    stack = LocalStack(
        state_dir,
        Ports(temporal_port, ui_port, flysim_port, metrics_port),
        run_worker=run_worker,
        say=_say,
    )
    with _signal_flags() as flags:
        stack.interrupted = lambda: flags.stop is not None
        _say(f"starting the stack under {stack.state_dir} …")
        try:
            stack.start()
        except StackRefused as exc:
            _say(f"not started: {exc}", err=True)
            return 1
        except embedded.ComponentFailed as exc:
            _say(f"not started: {exc}\n(everything it had started is stopped)", err=True)
            return 1
        except KeyboardInterrupt:
            _say("interrupted while starting; everything it had started is stopped")
            return 130
        _say("")
        print_addresses(stack, _say)
        if not run_worker:
            _say("\nno worker started (--no-worker): run one with the variables above:")
            _say("  python -m worker")
        _say(
            f"\nready (Ctrl-C to stop; `kill -HUP {os.getpid()}` restarts the worker)"
            if run_worker
            else "\nready (Ctrl-C to stop)"
        )
        code = 0
        try:
            while flags.stop is None:
                if flags.hup:
                    flags.hup = False
                    if run_worker:
                        stack.restart_worker("restart asked (SIGHUP)")
                stack.check()
                time.sleep(0.2)
        except StackStopped as exc:
            _say(f"{exc}\nstopping the stack", err=True)
            code = 1
        except embedded.ComponentFailed as exc:
            _say(f"{exc}\nstopping the stack", err=True)
            code = 1
        _say("stopping …")
        stopped = stack.stop()
        _say(f"stopped: {', '.join(stopped)} (state kept under {stack.state_dir})")
        return code


def _say(line: str, err: bool = False) -> None:
    # Flushed at once: a supervisor reading a pipe waits for the `ready` line.
    print(line, flush=True, file=sys.stderr if err else sys.stdout)


@dataclass
class _Flags:
    stop: int | None = None
    hup: bool = False


@contextlib.contextmanager
def _signal_flags() -> Iterator[_Flags]:
    """SIGINT and SIGTERM ask the stack to stop, SIGHUP to restart the worker."""
    flags = _Flags()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        flags.stop = signum

    def on_hup(signum: int, frame: FrameType | None) -> None:
        flags.hup = True

    previous = {
        sig: signal.signal(sig, handler)
        for sig, handler in (
            (signal.SIGINT, on_stop),
            (signal.SIGTERM, on_stop),
            (signal.SIGHUP, on_hup),
        )
    }
    try:
        yield flags
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """Let a second Ctrl-C or SIGTERM not cut a stop in half: they wait until it ends."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def later(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    previous = {sig: signal.signal(sig, later) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if got and previous.get(signal.Signals(got[0])) is signal.default_int_handler:
            raise KeyboardInterrupt


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
    return url


def supervisor_alive(state_dir: Path) -> bool:
    """Whether a stack's supervisor holds `state_dir` now (for tests and tools)."""
    record = _read_json(state_dir.resolve() / "run" / "stack.json").get("supervisor")
    if not isinstance(record, dict):
        return False
    return ProcessRecord.from_json(record).alive()


def publish_example(name: str, repos_dir: Path, source: Path | None = None) -> str:
    """Turn an example project into a local bare git repository; return its path.

    Idempotent: an existing repository is reused as it is, so repeated demo runs deploy
    on top of the earlier commits, as a real project's repository would grow.
    """
    source = source or EXAMPLES_DIR / name
    if not source.is_dir():
        raise FileNotFoundError(f"example project not found: {source}")
    repos_dir = repos_dir.resolve()
    bare = repos_dir / f"{name}.git"
    if bare.exists():
        return str(bare)
    repos_dir.mkdir(parents=True, exist_ok=True)
    seed = repos_dir / f"{name}-seed"
    shutil.rmtree(seed, ignore_errors=True)
    shutil.copytree(source, seed, ignore=shutil.ignore_patterns("node_modules", ".output"))
    git = ["git", "-c", "user.name=turbodeploy", "-c", "user.email=turbodeploy@localhost"]
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    # As GitHub serves repositories: partial clones, and objects asked for by id.
    for key in ("uploadpack.allowFilter", "uploadpack.allowAnySHA1InWant"):
        subprocess.run(["git", "-C", str(bare), "config", key, "true"], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=seed, check=True)
    subprocess.run([*git, "add", "-A"], cwd=seed, check=True)
    subprocess.run([*git, "commit", "-q", "-m", f"{name}: generated backend"], cwd=seed, check=True)
    subprocess.run(["git", "push", "-q", str(bare), "main"], cwd=seed, check=True)
    shutil.rmtree(seed)
    return str(bare)
