"""build_image and flyctl_deploy: flyctl (the stand-in, or small shims) run in a checkout of
the deployed commit, against the emulator, with the token from moto's SSM."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import ssm_settings
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.build import (
    BuildActivities,
    BuildInput,
    FlyctlDeployInput,
    FlyctlProgress,
    flaps_base_url,
)
from activities.secrets import CredentialStore
from core.dockerfile import render_dockerfile
from core.flytoml import render_fly_toml
from core.models import DeployTimings, app_name_for
from core.settings import Settings
from flyapi import FlyClient, Machine
from turbodeploy import embedded

PACKAGE_JSON = '{"name": "hello", "private": true, "scripts": {"build": "nitro build"}}\n'
TIMINGS = DeployTimings(
    machine_wait_timeout=timedelta(seconds=10),
    machine_poll_interval=timedelta(milliseconds=20),
)


# ----------------------------------------------------------------------------- helpers


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@dataclasses.dataclass
class Repo:
    bare: Path
    seed: Path

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def commit(self, files: dict[str, str | None], message: str) -> str:
        """Commit on main and push; a None content deletes the file. Returns the sha."""
        for name, content in files.items():
            path = self.seed / name
            if content is None:
                git(self.seed, "rm", "--quiet", "--", name)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
                git(self.seed, "add", "--", name)
        git(self.seed, "commit", "--quiet", "-m", message)
        git(self.seed, "push", "--quiet", "origin", "HEAD:refs/heads/main")
        return git(self.seed, "rev-parse", "HEAD")


def make_repo(root: Path, app_name: str) -> tuple[Repo, str]:
    """A Nitro project as prepare_fly_config leaves it: fly.toml and Dockerfile committed."""
    bare, seed = root / "remote.git", root / "seed"
    git(root, "init", "--quiet", "--bare", str(bare))
    git(bare, "symbolic-ref", "HEAD", "refs/heads/main")
    git(root, "init", "--quiet", "-b", "main", str(seed))
    git(seed, "remote", "add", "origin", str(bare))
    repo = Repo(bare, seed)
    fly_toml = render_fly_toml(app_name=app_name, region="iad", env={"GREETING": "hi"})
    sha = repo.commit(
        {
            "package.json": PACKAGE_JSON,
            "server/api/health.get.ts": "export default defineEventHandler(() => ({}));\n",
            "fly.toml": fly_toml,
            "Dockerfile": render_dockerfile(),
        },
        "Nitro project with deploy config",
    )
    return repo, sha


def write_shim(bin_dir: Path, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flyctl"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def invocations(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on PATH whose `flyctl` runs the stand-in."""
    path = embedded.flyctl_standin(tmp_path / "bin").parent
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}{os.environ['PATH']}")
    return path


@pytest.fixture
def argv_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "flyctl-argv.jsonl"
    monkeypatch.setenv("FLYCTL_STANDIN_ARGV_LOG", str(path))
    return path


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    return tmp_path / "work"


@pytest.fixture
def settings(ssm_endpoint: str, flysim: Any, work_dir: Path) -> Settings:
    return ssm_settings(ssm_endpoint, fly_api_base_url=flysim.base_url, work_dir=str(work_dir))


@pytest.fixture
def activities(credentials: CredentialStore, settings: Settings) -> BuildActivities:
    return BuildActivities(credentials, settings, kill_grace_seconds=2.0)


@pytest.fixture
async def fly(settings: Settings, fly_token: str) -> AsyncIterator[FlyClient]:
    async with FlyClient(settings.fly_api_base_url, fly_token) as client:
        yield client


@pytest.fixture
async def app_name(project_id: str, fly: FlyClient) -> str:
    name = app_name_for(project_id)
    await fly.create_app(name, "personal")
    return name


@pytest.fixture
def repo(tmp_path: Path, app_name: str) -> tuple[Repo, str]:
    return make_repo(tmp_path, app_name)


@dataclasses.dataclass
class Run:
    env: ActivityEnvironment
    heartbeats: list[Any]


@pytest.fixture
def run() -> Run:
    env = ActivityEnvironment()
    # Frequent periodic heartbeats, so the output reaches them within a test.
    env.info = dataclasses.replace(env.info, heartbeat_timeout=timedelta(milliseconds=150))
    heartbeats: list[Any] = []
    env.on_heartbeat = lambda *details: heartbeats.extend(details)
    return Run(env, heartbeats)


def build_input(app_name: str, repo_url: str, sha: str, deployment_id: str = "d-1") -> BuildInput:
    return BuildInput(
        deployment_id=deployment_id, app_name=app_name, repo_url=repo_url, commit_sha=sha
    )


def deploy_input(
    app_name: str,
    repo_url: str,
    sha: str,
    deployment_id: str = "d-1",
    image: str | None = None,
    machine_count: int = 2,
) -> FlyctlDeployInput:
    return FlyctlDeployInput(
        deployment_id=deployment_id,
        app_name=app_name,
        repo_url=repo_url,
        commit_sha=sha,
        image=image,
        machine_count=machine_count,
        timings=TIMINGS,
    )


async def app_machines(fly: FlyClient, app: str) -> list[Machine]:
    machines = [m for m in await fly.list_machines(app) if not m.gone]
    return sorted(machines, key=lambda m: (m.created_at or "", m.id))


# ------------------------------------------------------------------------------- build


async def test_build_pushes_the_image_of_the_exact_commit(
    bin_dir: Path,
    argv_log: Path,
    activities: BuildActivities,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    work_dir: Path,
    fly_token: str,
    flysim: Any,
) -> None:
    remote, sha = repo
    # The branch moves on (and loses its Dockerfile): the build must use `sha`, not the tip.
    tip = remote.commit({"Dockerfile": None}, "Drop the Dockerfile")

    result = await run.env.run(
        activities.build_image, build_input(app_name, remote.url, sha, "d-build-1")
    )

    assert result.image == f"registry.fly.io/{app_name}:d-build-1"
    assert "Pushing image done" in result.output_excerpt
    assert "npm run build" in result.output_excerpt  # the Dockerfile of `sha` was read
    [call] = invocations(argv_log)
    assert call["argv"] == [
        "deploy", "--build-only", "--push", "--remote-only", "--image-label=d-build-1",
        f"--app={app_name}", "--config=fly.toml",
    ]  # fmt: skip
    # The token and the Machines API reach flyctl through its environment only; the
    # worker's own secrets (AWS keys) do not reach it at all.
    assert {"FLY_API_TOKEN", "FLY_FLAPS_BASE_URL"} <= set(call["env"])
    assert not [name for name in call["env"] if name.startswith("AWS_")]
    assert fly_token not in json.dumps(call)
    assert list(work_dir.iterdir()) == []  # the checkout is gone

    with pytest.raises(ApplicationError) as caught:
        await run.env.run(activities.build_image, build_input(app_name, remote.url, tip))
    assert caught.value.type == "FlyctlFailed"
    assert caught.value.non_retryable is True
    assert "does not have a Dockerfile" in caught.value.message


async def test_heartbeats_carry_the_output_without_the_token(
    bin_dir: Path,
    activities: BuildActivities,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    fly_token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    remote, sha = repo
    monkeypatch.setenv("FLYCTL_STANDIN_SLEEP", "0.6")

    await run.env.run(activities.build_image, build_input(app_name, remote.url, sha))

    progress = [h for h in run.heartbeats if isinstance(h, FlyctlProgress)]
    steps = list(dict.fromkeys(p.step for p in progress))
    assert steps == ["fetching the commit", "getting a deploy token", "running flyctl"]
    seen = [line for p in progress for line in p.output]
    assert any("[build] RUN" in line for line in seen)
    assert fly_token not in repr(run.heartbeats)


def test_flaps_base_url_is_the_root_flyctl_appends_v1_to() -> None:
    assert flaps_base_url("https://api.machines.dev/v1") == "https://api.machines.dev"
    assert flaps_base_url("http://127.0.0.1:4280/v1/") == "http://127.0.0.1:4280"
    assert flaps_base_url("http://proxy.internal/fly") == "http://proxy.internal/fly"


# ------------------------------------------------------------------------------ deploy


async def test_flyctl_deploy_creates_then_updates_machines(
    bin_dir: Path,
    argv_log: Path,
    activities: BuildActivities,
    credentials: CredentialStore,
    settings: Settings,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    fly: FlyClient,
) -> None:
    remote, sha = repo

    first = await run.env.run(activities.flyctl_deploy, deploy_input(app_name, remote.url, sha))

    machines = await app_machines(fly, app_name)
    image = f"registry.fly.io/{app_name}:d-1"
    assert first.image == image
    # flyctl's first deploy of a service: two machines for availability.
    assert len(machines) == 2
    assert sorted(first.machine_ids) == sorted(m.id for m in machines)
    for machine in machines:
        assert machine.state == "started"
        assert machine.image == image
        assert machine.config["env"]["GREETING"] == "hi"
        assert machine.metadata["fly_platform_version"] == "v2"
        assert machine.metadata["fly_process_group"] == "app"
        assert machine.metadata["fly_release_version"] == "1"
    assert invocations(argv_log)[0]["argv"] == [
        "deploy", "--remote-only", f"--app={app_name}", "--config=fly.toml",
        "--image-label=d-1", "--wait-timeout=10s", "--yes",
    ]  # fmt: skip

    # A prebuilt image, and the machines read from the Machines API.
    with_api = BuildActivities(credentials, settings, fly=fly)
    prebuilt = "registry.fly.io/someone:v2"
    second = await run.env.run(
        with_api.flyctl_deploy, deploy_input(app_name, remote.url, sha, "d-2", image=prebuilt)
    )

    updated = await app_machines(fly, app_name)
    assert second.image == prebuilt
    assert second.machine_ids == [m.id for m in machines] == [m.id for m in updated]
    assert {m.image for m in updated} == {prebuilt}
    assert {m.metadata["fly_release_version"] for m in updated} == {"2"}
    assert "update finished: success" in second.output_excerpt
    assert f"--image={prebuilt}" in invocations(argv_log)[1]["argv"]


async def test_flyctl_deploy_keeps_the_requested_machine_count(
    bin_dir: Path,
    argv_log: Path,
    credentials: CredentialStore,
    settings: Settings,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    fly: FlyClient,
) -> None:
    remote, sha = repo
    activities = BuildActivities(credentials, settings, fly=fly)
    image = "registry.fly.io/someone:v1"

    one = await run.env.run(
        activities.flyctl_deploy,
        deploy_input(app_name, remote.url, sha, image=image, machine_count=1),
    )
    assert len(one.machine_ids) == 1 == len(await app_machines(fly, app_name))
    assert "--ha=false" in invocations(argv_log)[0]["argv"]

    # flyctl deploy updates the one machine; `scale count` adds two copies of it.
    newer = "registry.fly.io/someone:v2"
    three = await run.env.run(
        activities.flyctl_deploy,
        deploy_input(app_name, remote.url, sha, "d-2", image=newer, machine_count=3),
    )
    machines = await app_machines(fly, app_name)
    assert sorted(three.machine_ids) == sorted(m.id for m in machines) and len(machines) == 3
    assert one.machine_ids[0] in three.machine_ids
    assert {m.image for m in machines} == {newer}
    assert {m.state for m in machines} == {"started"}
    assert {m.metadata["fly_process_group"] for m in machines} == {"app"}
    assert invocations(argv_log)[-1]["argv"] == [
        "scale", "count", "3", f"--app={app_name}", "--wait-timeout=10s", "--yes",
    ]  # fmt: skip
    assert "Created" in three.output_excerpt

    # And back down: the oldest machine is the one kept.
    back = await run.env.run(
        activities.flyctl_deploy,
        deploy_input(app_name, remote.url, sha, "d-3", image=image, machine_count=1),
    )
    assert back.machine_ids == one.machine_ids
    [kept] = await app_machines(fly, app_name)
    assert kept.image == image
    calls = [i["argv"][:3] for i in invocations(argv_log)]
    assert calls.count(["scale", "count", "3"]) == 1 and calls[-1] == ["scale", "count", "1"]


# ----------------------------------------------------------------------------- secrecy


async def test_a_token_printed_by_flyctl_is_redacted_everywhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    activities: BuildActivities,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    fly_token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    remote, sha = repo
    bin_dir = tmp_path / "leaky-bin"
    # A flyctl with debug logging that dumps its credentials, then fails.
    write_shim(
        bin_dir,
        'echo "argv: $*"\n'
        'echo "DEBUG request headers: Authorization: $FLY_API_TOKEN"\n'
        'echo "token $FLY_API_TOKEN"\n'
        'echo "macaroon ${FLY_API_TOKEN#FlyV1 }"\n'
        "sleep 0.5\n"
        'echo "Error: something broke" >&2\n'
        "exit 1\n",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    caplog.set_level(logging.DEBUG)

    with pytest.raises(ApplicationError) as caught:
        await run.env.run(activities.build_image, build_input(app_name, remote.url, sha))

    body = fly_token.removeprefix("FlyV1 ")
    error = caught.value
    assert error.type == "FlyctlFailed" and error.non_retryable is True
    assert "something broke" in error.message and "[REDACTED]" in error.message
    assert "argv: deploy --build-only" in error.message  # nothing else was in argv
    for text in (error.message, repr(run.heartbeats), caplog.text):
        assert fly_token not in text
        assert body not in text
        assert body[:24] not in text


# ----------------------------------------------------------------------------- failures


async def test_a_failed_build_is_not_retryable_and_explains_itself(
    bin_dir: Path,
    activities: BuildActivities,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    remote, sha = repo
    monkeypatch.setenv("FLYCTL_STANDIN_FAIL", "1")

    with pytest.raises(ApplicationError) as caught:
        await run.env.run(activities.build_image, build_input(app_name, remote.url, sha))

    assert caught.value.type == "FlyctlFailed"
    assert caught.value.non_retryable is True
    assert "exit code 1" in caught.value.message
    assert "npm run build" in caught.value.message  # the excerpt of flyctl's output
    assert len(caught.value.message) < 2500


async def test_a_network_error_is_retryable(
    bin_dir: Path,
    activities: BuildActivities,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    remote, sha = repo
    monkeypatch.setenv("FLYCTL_STANDIN_FAIL", "1")
    monkeypatch.setenv(
        "FLYCTL_STANDIN_FAIL_MESSAGE",
        "failed to fetch an image or build from source: dial tcp 1.2.3.4:443: i/o timeout",
    )

    with pytest.raises(ApplicationError) as caught:
        await run.env.run(activities.build_image, build_input(app_name, remote.url, sha))

    assert caught.value.type == "FlyctlFailed"
    assert caught.value.non_retryable is False
    assert "i/o timeout" in caught.value.message


async def test_a_failing_health_check_is_not_retried(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    activities: BuildActivities,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
) -> None:
    remote, sha = repo
    bin_dir = tmp_path / "unhealthy-bin"
    write_shim(
        bin_dir,
        'echo "Error: timeout reached waiting for health checks to pass for machine '
        '1234567890abcd: failed to get VM 1234567890abcd: i/o timeout" >&2\nexit 1\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    with pytest.raises(ApplicationError) as caught:
        await run.env.run(activities.flyctl_deploy, deploy_input(app_name, remote.url, sha))

    assert caught.value.type == "FlyctlFailed"
    assert caught.value.non_retryable is True


@pytest.mark.parametrize(
    ("body", "how"),
    [("exit 127\n", "exit code 127"), ("kill -TERM $$\n", "killed by signal SIGTERM")],
)
async def test_an_interrupted_flyctl_is_retryable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    activities: BuildActivities,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    body: str,
    how: str,
) -> None:
    remote, sha = repo
    bin_dir = tmp_path / "interrupted-bin"
    write_shim(bin_dir, "echo '==> Building image'\n" + body)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    with pytest.raises(ApplicationError) as caught:
        await run.env.run(activities.build_image, build_input(app_name, remote.url, sha))

    assert caught.value.type == "FlyctlInterrupted"
    assert caught.value.non_retryable is False
    assert how in caught.value.message


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        # The image line wins, with colours and CRLF line ends.
        (r"\033[1mimage:\033[0m registry.fly.io/other:tag-7\r\n", "registry.fly.io/other:tag-7"),
        # No image line, but flyctl says it pushed: the reference flyctl uses.
        (r"==> Pushing image to fly\n--> Pushing image done\n", "registry.fly.io/{app}:d-1"),
        (r"==> Building image\n", None),
    ],
)  # fmt: skip
async def test_the_pushed_image_is_read_from_the_output(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    activities: BuildActivities,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    output: str,
    expected: str | None,
) -> None:
    remote, sha = repo
    bin_dir = tmp_path / "printing-bin"
    write_shim(bin_dir, f"printf '{output}'\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    if expected is None:
        with pytest.raises(ApplicationError) as caught:
            await run.env.run(activities.build_image, build_input(app_name, remote.url, sha))
        assert caught.value.type == "FlyctlFailed" and caught.value.non_retryable
        assert "no pushed image" in caught.value.message
        return
    result = await run.env.run(activities.build_image, build_input(app_name, remote.url, sha))
    assert result.image == expected.format(app=app_name)


async def test_missing_flyctl_is_not_retryable(
    credentials: CredentialStore,
    settings: Settings,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    work_dir: Path,
) -> None:
    remote, sha = repo
    activities = BuildActivities(credentials, settings, flyctl="flyctl-not-installed")

    with pytest.raises(ApplicationError) as caught:
        await run.env.run(activities.build_image, build_input(app_name, remote.url, sha))

    assert caught.value.type == "FlyctlMissing"
    assert caught.value.non_retryable is True
    assert "flyctl-not-installed" in caught.value.message
    assert "fly.io/install.sh" in caught.value.message
    assert list(work_dir.iterdir()) == []


async def test_a_commit_that_is_not_in_the_repository(
    bin_dir: Path,
    activities: BuildActivities,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
) -> None:
    remote, _ = repo

    with pytest.raises(ApplicationError) as caught:
        await run.env.run(activities.build_image, build_input(app_name, remote.url, "ab" * 20))

    assert caught.value.type == "GitError"
    assert caught.value.non_retryable is True
    assert "ab" * 20 in caught.value.message


# ------------------------------------------------------------------------ cancellation


async def test_cancellation_interrupts_flyctl(
    bin_dir: Path,
    argv_log: Path,
    activities: BuildActivities,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
    work_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    remote, sha = repo
    monkeypatch.setenv("FLYCTL_STANDIN_SLEEP", "60")
    task = asyncio.ensure_future(
        run.env.run(activities.build_image, build_input(app_name, remote.url, sha))
    )
    await wait_for(lambda: bool(invocations(argv_log)))
    pid = invocations(argv_log)[0]["pid"]
    # Wait until it is building (its SIGINT handler is in place).
    await wait_for(
        lambda: any(
            isinstance(h, FlyctlProgress) and any("[build]" in line for line in h.output)
            for h in run.heartbeats
        )
    )
    assert alive(pid)

    run.env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)

    assert not alive(pid)
    assert list(work_dir.iterdir()) == []


async def test_cancellation_kills_a_flyctl_that_ignores_interrupts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    credentials: CredentialStore,
    settings: Settings,
    run: Run,
    repo: tuple[Repo, str],
    app_name: str,
) -> None:
    remote, sha = repo
    pids = tmp_path / "pids"
    bin_dir = tmp_path / "stubborn-bin"
    # Ignores SIGINT/SIGTERM, and so does the child it leaves behind.
    write_shim(
        bin_dir,
        f'trap \'\' INT TERM\nsleep 60 & echo "$$ $!" > "{pids}"\nwhile :; do sleep 1; done\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    activities = BuildActivities(credentials, settings, kill_grace_seconds=0.3)
    task = asyncio.ensure_future(
        run.env.run(activities.build_image, build_input(app_name, remote.url, sha))
    )
    await wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2)
    shell, sleeper = map(int, pids.read_text().split())
    assert alive(shell) and alive(sleeper)

    run.env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)

    await wait_for(lambda: not alive(shell) and not alive(sleeper), timeout=5)


# ------------------------------------------------------------------- the stand-in itself


def standin(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flysim.flyctl", *args],
        env={"PATH": os.environ["PATH"], **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_standin_wants_a_token(flysim: Any, tmp_path: Path) -> None:
    result = standin(
        ["deploy", "--remote-only", "--app=x"],
        {"FLY_FLAPS_BASE_URL": flaps_base_url(flysim.base_url)},
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "No access token available" in result.stderr


def test_the_standin_rejects_a_bad_token_without_printing_it(
    flysim: Any, repo: tuple[Repo, str], app_name: str, tmp_path: Path
) -> None:
    remote, _ = repo
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "--quiet", remote.url, str(checkout))
    bad = "FlyV1 fm2_not-a-valid-token-at-all"
    result = standin(
        ["deploy", "--build-only", "--push", "--remote-only", f"--app={app_name}"],
        {"FLY_API_TOKEN": bad, "FLY_FLAPS_BASE_URL": flaps_base_url(flysim.base_url)},
        cwd=checkout,
    )
    assert result.returncode == 1
    assert "You must be authenticated" in result.stderr
    assert "fm2_not-a-valid" not in result.stdout + result.stderr


def test_the_standin_follows_go_flag_syntax(
    flysim: Any, fly_token: str, repo: tuple[Repo, str], app_name: str, tmp_path: Path
) -> None:
    remote, _ = repo
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "--quiet", remote.url, str(checkout))
    env = {"FLY_API_TOKEN": fly_token, "FLY_FLAPS_BASE_URL": flaps_base_url(flysim.base_url)}

    built = standin(["deploy", "--build-only", "--push=false", "-a", app_name], env, checkout)
    unknown = standin(["deploy", "--frobnicate"], env, checkout)
    bad_bool = standin(["deploy", "--push=maybe"], env, checkout)

    assert built.returncode == 0, built.stderr
    assert f"image: registry.fly.io/{app_name}:deployment-" in built.stdout
    assert "Pushing" not in built.stdout
    assert unknown.returncode == 1 and "Error:" in unknown.stderr
    assert bad_bool.returncode == 1 and "--push" in bad_bool.stderr
