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
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client

from turbodeploy import embedded
from turbodeploy.settings import Settings

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
) -> AsyncIterator[Stack]:
    from flysim import FlySim, SimConfig
    from worker import connect, create_worker

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
        )
        client = await connect(settings)
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
