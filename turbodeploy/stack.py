"""The embedded stack: every service a deploy needs, on loopback, for the demo and `up`.

Temporal dev server (with its Web UI), PostgreSQL (`DATABASE_URL` or embedded), moto's SSM
seeded with a generated Fly token, the Fly Machines API emulator, and a worker. State lives
under one directory (default `.turbodeploy/`). The generated token is held in memory and in
moto only: it is given to the emulator in-process, never through argv or files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from core.metrics import make_runtime
from core.settings import Settings
from turbodeploy import embedded

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


@dataclass
class Stack:
    settings: Settings
    client: Client
    state_dir: Path
    emulator: object  # flysim.FlySim

    @property
    def ui_url(self) -> str:
        return self.settings.temporal_ui_url


@contextlib.asynccontextmanager
async def embedded_stack(
    state_dir: Path,
    *,
    temporal_port: int | None = None,
    ui_port: int | None = None,
    flysim_port: int | None = None,
    run_worker: bool = True,
    token: str | None = None,
    metrics_bind: str | None = None,
) -> AsyncIterator[Stack]:
    """Start every service under `state_dir`; stop them all on exit, in reverse order.

    `metrics_bind` (`host:port`) serves the worker's Prometheus metrics.
    """
    from flysim import FlySim, SimConfig
    from worker import create_worker

    state_dir = state_dir.resolve()  # noqa: ASYNC240 - before anything runs
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    token = token or embedded.generate_fly_token()
    org = "personal"

    with contextlib.ExitStack() as stop:
        log.info("starting Temporal dev server")
        temporal = embedded.start_temporal(
            state_dir / "temporal", port=temporal_port, ui_port=ui_port, log=logs / "temporal.log"
        )
        stop.callback(temporal.stop)
        log.info("starting PostgreSQL")
        pg = await asyncio.to_thread(embedded.start_postgres, state_dir / "postgres")
        stop.callback(pg.stop)
        stop.enter_context(embedded.fake_aws_credentials())
        moto = embedded.start_moto()
        stop.callback(moto.stop)
        embedded.seed_ssm(moto.endpoint_url, token=token, org_slug=org)
        sim = FlySim(SimConfig(tokens={token: org}))
        stop.enter_context(sim.serve_in_thread(port=flysim_port or 0))
        del token  # from here on only moto and the emulator hold it

        settings = Settings(
            temporal_address=temporal.address,
            temporal_ui_url=temporal.ui_url,
            database_url=pg.url,
            aws_endpoint_url=moto.endpoint_url,
            aws_region="us-east-1",
            fly_api_base_url=sim.base_url,
            app_url_template=sim.app_url_template,
            work_dir=str(state_dir / "work"),
            # The emulator has no builders: flyctl here is the stand-in that drives it.
            flyctl_path=str(embedded.flyctl_standin(state_dir / "bin")),
        )
        client = await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=pydantic_data_converter,
            runtime=make_runtime(metrics_bind),
        )
        stack = Stack(settings=settings, client=client, state_dir=state_dir, emulator=sim)
        if not run_worker:
            yield stack
            return
        async with create_worker(client, settings) as worker:
            task = asyncio.create_task(worker.run())
            try:
                yield stack
            finally:
                await worker.shutdown()
                with contextlib.suppress(Exception):
                    await task


async def run_stack(
    state_dir: Path,
    *,
    temporal_port: int | None = None,
    ui_port: int | None = None,
    flysim_port: int | None = None,
    metrics_port: int | None = None,
) -> int:
    """`turbodeploy up`: run the embedded stack in the foreground until SIGINT or SIGTERM.

    Prints the addresses and the environment that points the CLI at the stack, then a line
    `ready`. Returns the exit code: 0 after a clean stop.
    """
    from core.logs import configure_logging

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    state_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before anything runs
    configure_logging("WARNING")
    file_log = logging.FileHandler(state_dir / "stack.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_log)
    logging.getLogger().setLevel(logging.INFO)
    metrics_bind = f"127.0.0.1:{metrics_port}" if metrics_port else None
    _say(f"starting the stack under {state_dir.resolve()} …")  # noqa: ASYNC240
    async with embedded_stack(
        state_dir,
        temporal_port=temporal_port,
        ui_port=ui_port,
        flysim_port=flysim_port,
        metrics_bind=metrics_bind,
    ) as stack:
        s = stack.settings
        _say(f"Temporal:     {s.temporal_address}")
        _say(f"Temporal UI:  {s.temporal_ui_url}")
        _say(f"PostgreSQL:   {s.database_url}")
        _say(f"SSM (moto):   {s.aws_endpoint_url}")
        _say(f"Fly API:      {s.fly_api_base_url}  (apps at {s.app_url('<app>')})")
        _say(f"flyctl:       {s.flyctl_path}  (the stand-in: builds are simulated)")
        if metrics_bind:
            _say(f"Metrics:      http://{metrics_bind}/metrics")
        _say(f"Logs:         {stack.state_dir / 'logs'}, {stack.state_dir / 'stack.log'}")
        _say("\nPoint the CLI at this stack:")
        for name, value in (
            ("TURBODEPLOY_TEMPORAL_ADDRESS", s.temporal_address),
            ("TURBODEPLOY_TEMPORAL_UI_URL", s.temporal_ui_url),
            ("TURBODEPLOY_TASK_QUEUE", s.task_queue),
            ("DATABASE_URL", s.database_url or ""),
            ("TURBODEPLOY_DB_SCHEMA", s.db_schema),
        ):
            _say(f"  export {name}={shlex.quote(value)}")
        _say("\nready (Ctrl-C to stop)")
        await stop.wait()
        _say("stopping …")
    _say("stopped")
    return 0


def _say(line: str) -> None:
    # Flushed at once: a supervisor reading a pipe waits for the `ready` line.
    print(line, flush=True)


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
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=seed, check=True)
    subprocess.run([*git, "add", "-A"], cwd=seed, check=True)
    subprocess.run([*git, "commit", "-q", "-m", f"{name}: generated backend"], cwd=seed, check=True)
    subprocess.run(["git", "push", "-q", str(bare), "main"], cwd=seed, check=True)
    shutil.rmtree(seed)
    return str(bare)
