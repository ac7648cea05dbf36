"""The services one benchmark run uses: one Temporal dev server, PostgreSQL, SSM (moto), the
Fly emulator in its own process, worker processes, and one git repository per project."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from bench.baseline import BASELINE_QUEUE_ENV
from turbodeploy import embedded
from turbodeploy.stack import publish_example

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ emulator


class Emulator:
    """`python -m flysim` in its own process, so its work never shares a GIL with the
    driver's; steered and read through its `/_sim` control API."""

    def __init__(self, token: str, log_path: Path) -> None:
        self.port = embedded.free_port()
        env = {**_base_env(), "FLYSIM_TOKENS": f"{token}=personal"}
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flysim", "--port", str(self.port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        embedded.wait_for_port("127.0.0.1", self.port)
        self._control = httpx.Client(base_url=f"http://127.0.0.1:{self.port}/_sim", timeout=60)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def app_url_template(self) -> str:
        return f"http://127.0.0.1:{self.port}/_apps/{{app}}"

    def set_timing(self, api_latency: float, start_delay: float, healthy_after: float) -> None:
        timing = {
            "api_latency": api_latency,
            "start_delay": start_delay,
            "healthy_after": healthy_after,
        }
        self._control.post("/config", json={"timing": timing}).raise_for_status()

    def configure(self, patch: dict[str, Any]) -> None:
        """Any setting of `POST /_sim/config` (timing keys merge with the current ones)."""
        self._control.post("/config", json=patch).raise_for_status()

    def counters(self) -> dict[str, Any]:
        state: dict[str, Any] = self._control.get("/state").json()
        return dict(state["counters"])

    async def app_state(self, app: str) -> dict[str, Any]:
        """One app's machines and leases, and the counters (read without blocking the loop)."""
        response = await asyncio.to_thread(self._control.get, "/state", params={"app": app})
        state: dict[str, Any] = response.raise_for_status().json()
        return state

    def stop(self) -> None:
        self._control.close()
        _stop_group(self.process)
        self._log.close()


class GitHost:
    """`git daemon` serving the projects' repositories over git://, in its own process: the
    remote's side of a clone or push (upload-pack, receive-pack) runs there, as it runs on
    GitHub's machines, not among the worker's children."""

    def __init__(self, root: Path, log_path: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = embedded.free_port()
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [
                "git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack",
                "--informative-errors", "--max-connections=0", "--listen=127.0.0.1",
                f"--port={self.port}", f"--base-path={root}", str(root),
            ],
            env=_base_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        embedded.wait_for_port("127.0.0.1", self.port)

    def url(self, repo: Path) -> str:
        return f"git://127.0.0.1:{self.port}/{repo.relative_to(self.root)}"

    def stop(self) -> None:
        _stop_group(self.process)
        self._log.close()


# -------------------------------------------------------------------------------- workers


@dataclass
class WorkerProcess:
    """A worker in its own process group: `python worker.py`, or the baseline worker."""

    process: subprocess.Popen[bytes]
    log: Any

    @property
    def pid(self) -> int:
        return self.process.pid

    def usage(self) -> Usage:
        return Usage.of(self.pid)

    def kill(self) -> None:
        """SIGKILL the worker and what it runs (git), as a lost machine would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _stop_group(self.process)
        self.log.close()


def _cpu_ticks(stat: str) -> tuple[int, int]:
    """Clock ticks of CPU in a stat(5) line: (utime + stime, cutime + cstime), i.e. the
    process's (or thread's) own and that of the children it reaped."""
    fields = stat[stat.rindex(")") + 2 :].split()  # starts at field 3 of stat(5)
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


@dataclass(frozen=True)
class Usage:
    """CPU seconds (the process and the children it reaped, i.e. git) and memory of one
    process, from /proc."""

    cpu: float
    rss_mb: float
    peak_rss_mb: float

    @classmethod
    def of(cls, pid: int) -> Usage:
        own, children = _cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
        cpu = (own + children) / _TICKS
        memory = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                memory[name] = int(value.split()[0]) / 1024
        return cls(cpu, memory.get("VmRSS", 0.0), memory.get("VmHWM", 0.0))


#: Where a worker process's CPU goes, by thread (`cpu_split`).
CPU_PARTS = ("event loop", "Python threads", "Temporal core", "git")


def cpu_split(pid: int) -> dict[str, float]:
    """CPU seconds of a worker process by part: its event loop (the main thread:
    activities, the SDK's dispatch and payload conversion), its other Python threads (the
    SDK runs workflow code in a thread pool; `asyncio.to_thread`; including threads that
    have ended), the SDK's Rust core (its tokio and workflow-processing threads), and the
    children it reaped (git)."""

    proc = Path(f"/proc/{pid}")
    own, children = _cpu_ticks((proc / "stat").read_text())
    loop = core = 0
    for task in (proc / "task").iterdir():
        try:
            # Python names no OS thread: its threads keep the process's name.
            comm = (task / "comm").read_text().strip()
            used, _ = _cpu_ticks((task / "stat").read_text())
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        if int(task.name) == pid:
            loop += used
        elif comm.startswith(("tokio", "temporal", "workflow-proces")):
            core += used
    parts = {
        "event loop": loop,
        "Python threads": max(0, own - loop - core),
        "Temporal core": core,
        "git": children,
    }
    return {name: value / _TICKS for name, value in parts.items()}


def machine_cpu() -> float:
    """CPU seconds every process on the machine has used so far (all cores, /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    # user nice system idle iowait irq softirq steal: all but idle and iowait.
    busy = [int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4)]
    return sum(busy) / _TICKS


# ---------------------------------------------------------------------------------- stack


@dataclass
class Stack:
    client: Client
    temporal_address: str
    database_url: str
    ssm_endpoint: str
    emulator: Emulator
    state_dir: Path
    logs_dir: Path
    worker_env: dict[str, str]
    template_repo: Path
    git_host: GitHost
    workers: list[WorkerProcess] = field(default_factory=list)
    _repo_count: int = 0

    def start_worker(
        self,
        task_queue: str,
        *,
        baseline: bool = False,
        name: str = "worker",
        unset: tuple[str, ...] = (),
    ) -> WorkerProcess:
        """`unset`: settings of the run's worker environment this worker goes without (it
        takes their defaults)."""
        env = {**self.worker_env, "TURBODEPLOY_TASK_QUEUE": task_queue}
        for setting in unset:
            env.pop(setting, None)
        if baseline:
            # The deploy worker it copies its options from is built, never run, and must
            # not claim the baseline's queue.
            env["TURBODEPLOY_TASK_QUEUE"] = f"{task_queue}-unused"
            env[BASELINE_QUEUE_ENV] = task_queue
        module = "bench.baseline" if baseline else "worker"
        log = (self.logs_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = WorkerProcess(process, log)
        self.workers.append(worker)
        return worker

    def stop_worker(self, worker: WorkerProcess) -> None:
        worker.stop()
        self.workers.remove(worker)

    def kill_worker(self, worker: WorkerProcess) -> None:
        worker.kill()
        self.workers.remove(worker)

    async def wait_for_pollers(self, task_queue: str, count: int = 1, within: float = 60) -> None:
        deadline = time.monotonic() + within
        request = DescribeTaskQueueRequest(
            namespace=self.client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        )
        while True:
            response = await self.client.workflow_service.describe_task_queue(request)
            if len({p.identity for p in response.pollers}) >= count:
                return
            for worker in self.workers:
                if worker.process.poll() is not None:
                    raise RuntimeError(
                        f"a worker exited with {worker.process.returncode}: "
                        f"see {self.logs_dir}/*.log"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker polls {task_queue} after {within:g}s")
            await asyncio.sleep(0.1)

    def new_repos(self, count: int, *, served: bool = False) -> list[str]:
        """`count` bare repositories of the example project, one per project (a deploy
        commits fly.toml to its project's repository): local paths, or `served` by the
        git host (the remote's side of git then runs outside the worker's processes)."""
        repos_dir = self.state_dir / "repos"
        paths = []
        for _ in range(count):
            self._repo_count += 1
            dest = repos_dir / f"r{self._repo_count}.git"
            shutil.copytree(self.template_repo, dest)
            paths.append(self.git_host.url(dest) if served else str(dest))
        return paths


def big_repository(template: Path, dest: Path, *, files: int, large: int, large_mb: int) -> int:
    """A bare copy of `template` with one more commit: `files` small files (2 KiB each, in
    directories of 500) and `large` blobs of `large_mb` MiB each, random, so nothing packs
    away. Written with `git fast-import` (no work tree). Returns its size on disk, bytes."""
    shutil.copytree(template, dest)
    proc = subprocess.Popen(
        ["git", "-C", str(dest), "-c", "core.compression=1", "fast-import", "--quiet"],
        stdin=subprocess.PIPE,
    )
    assert proc.stdin is not None
    out = proc.stdin

    def blob(mark: int, data: bytes) -> None:
        out.write(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)))
        out.write(data)
        out.write(b"\n")

    paths: list[tuple[int, str]] = []
    for i in range(files):
        blob(i + 1, os.urandom(1024).hex().encode())
        paths.append((i + 1, f"src/part{i // 500}/module{i}.ts"))
    for j in range(large):
        mark = files + j + 1
        blob(mark, os.urandom(large_mb << 20))
        paths.append((mark, f"assets/blob{j}.bin"))
    message = b"generated: many files and some large blobs"
    out.write(b"commit refs/heads/main\n")
    out.write(b"committer bench <bench@localhost> %d +0000\n" % int(time.time()))
    out.write(b"data %d\n%s\n" % (len(message), message))
    out.write(b"from refs/heads/main^0\n")
    for mark, path in paths:
        out.write(b"M 100644 :%d %s\n" % (mark, path.encode()))
    out.write(b"\n")
    out.close()
    if proc.wait() != 0:
        raise RuntimeError("git fast-import failed")
    return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())


@contextlib.asynccontextmanager
async def running_stack(
    state_dir: Path,
    *,
    temporal_address: str | None = None,
    database_url: str | None = None,
    worker_env: dict[str, str] | None = None,
) -> AsyncIterator[Stack]:
    """Start every service (reusing a given Temporal server or database); stop them all."""
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    token = embedded.generate_fly_token()
    with contextlib.ExitStack() as stop:
        stop.enter_context(embedded.fake_aws_credentials())
        env: WorkflowEnvironment | None = None
        if temporal_address is None:
            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=embedded.temporal_cli(),
                data_converter=pydantic_data_converter,
                search_attributes=[
                    SearchAttributeKey.for_keyword(n) for n in embedded.SEARCH_ATTRIBUTES
                ],
                dev_server_log_level="error",
            )
            client = env.client
            temporal_address = client.service_client.config.target_host
        else:
            client = await Client.connect(temporal_address, data_converter=pydantic_data_converter)
        try:
            if database_url is None:
                pg = await asyncio.to_thread(embedded.start_postgres, state_dir / "postgres")
                stop.callback(pg.stop)
                database_url = pg.url
            # moto's HTTP server logs every request; the table is what a reader wants.
            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            moto = embedded.start_moto()
            stop.callback(moto.stop)
            embedded.seed_ssm(moto.endpoint_url, token=token)
            emulator = Emulator(token, logs / "flysim.log")
            stop.callback(emulator.stop)
            del token  # from here on only moto and the emulator hold it
            template = Path(publish_example("nitro-hello", state_dir / "template"))
            git_host = GitHost(state_dir / "repos", logs / "git-daemon.log")
            stop.callback(git_host.stop)
            stack = Stack(
                client=client,
                temporal_address=temporal_address,
                database_url=database_url,
                ssm_endpoint=moto.endpoint_url,
                emulator=emulator,
                state_dir=state_dir,
                logs_dir=logs,
                worker_env=_worker_env(
                    temporal_address=temporal_address,
                    database_url=database_url,
                    db_schema=f"bench_{os.getpid()}_{int(time.time())}",
                    ssm_endpoint=moto.endpoint_url,
                    emulator=emulator,
                    work_dir=state_dir / "work",
                    extra=worker_env or {},
                ),
                template_repo=template,
                git_host=git_host,
            )
            try:
                yield stack
            finally:
                for worker in stack.workers:
                    worker.stop()
        finally:
            if env is not None:
                await env.shutdown()


def _worker_env(
    *,
    temporal_address: str,
    database_url: str,
    db_schema: str,
    ssm_endpoint: str,
    emulator: Emulator,
    work_dir: Path,
    extra: dict[str, str],
) -> dict[str, str]:
    """What `python worker.py` reads: the services of this run and the worker settings
    under test, nothing inherited."""
    env = {
        **_base_env(),
        "TURBODEPLOY_TEMPORAL_ADDRESS": temporal_address,
        "DATABASE_URL": database_url,
        "PG_DB_SCHEMA": db_schema,
        "AWS_ENDPOINT_URL": ssm_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",  # moto accepts any credentials
        "AWS_REGION": "us-east-1",
        "TURBODEPLOY_FLY_API_BASE_URL": emulator.base_url,
        "TURBODEPLOY_APP_URL_TEMPLATE": emulator.app_url_template,
        "TURBODEPLOY_WORK_DIR": str(work_dir),
        "TURBODEPLOY_LOG_LEVEL": "WARNING",
        # Throughput is measured, not the client-side budget that protects the real API.
        "TURBODEPLOY_FLY_API_RATE": "0",
        "TURBODEPLOY_GRACEFUL_SHUTDOWN_SECONDS": "5",
    }
    env.update(extra)
    return env


def _base_env() -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),  # noqa: S108 - git needs a HOME
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def sampled_peak(pid: int, interval: float = 0.25) -> Iterator[list[float]]:
    """Sample the RSS of `pid` in a thread while inside; the samples land in the list."""
    import threading

    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError, ValueError):
                samples.append(Usage.of(pid).rss_mb)
            done.wait(interval)

    thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def profiled(pid: int, directory: Path | None, name: str) -> Iterator[None]:
    """py-spy samples `pid` while inside; its folded stacks land in `directory/name.txt`."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if directory is None or spy is None:
        if directory is not None:
            print("bench: py-spy not found, not profiling", file=sys.stderr)
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    recorder = subprocess.Popen(
        # --gil: only the thread holding the GIL, i.e. Python's CPU, not threads that wait.
        [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--nonblocking",
         "--gil", "--threads", "--output", str(directory / f"{name}.txt")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()
