"""prepare_fly_config against real git repositories (local bare remotes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dulwich.objects import Blob
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.fly_config import FlyConfigActivities, PrepareConfigInput, PrepareConfigResult
from core import dockerfile, flytoml, gitrepo
from core.settings import Settings

NITRO_TREE = {
    "package.json": (
        '{\n  "name": "hello",\n  "private": true,\n  "scripts": {"build": "nitro build"},\n'
        '  "dependencies": {"nitropack": "^2.9.0"}\n}\n'
    ),
    "nitro.config.ts": 'export default defineNitroConfig({ srcDir: "server" });\n',
    "server/api/health.get.ts": 'export default defineEventHandler(() => ({ status: "ok" }));\n',
    "server/routes/index.ts": 'export default defineEventHandler(() => "hello");\n',
    "README.md": "# hello\n",
}

USER_FLY_TOML = """\
app = "someone-else"
primary_region = "lhr"
kill_signal = "SIGINT"
swap_size_mb = 512

[build]
  dockerfile = "Dockerfile.custom"

[deploy]
  strategy = "bluegreen"

[env]
  LOG_LEVEL = "debug"

[[mounts]]
  source = "data"
  destination = "/data"

[[statics]]
  guest_path = "/app/public"
  url_prefix = "/static"
"""


SUBJECT = "Deploy config for turbobackend-p1 (d-1)"
# NITRO_TREE has no Dockerfile: the first deploy adds one.
FIRST_SUBJECT = f"{SUBJECT}: fly.toml, Dockerfile, .dockerignore"


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=Upstream", "-c", "user.email=up@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def show_bytes(remote: Remote, path: str, branch: str = "main") -> bytes:
    """A file of the remote branch exactly as committed (no decoding, no stripping)."""
    return subprocess.run(
        ["git", "show", f"{branch}:{path}"], cwd=remote.bare, capture_output=True, check=True
    ).stdout


@dataclass
class Remote:
    bare: Path
    seed: Path  # a working clone, for changes made "upstream"

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def tip(self, branch: str = "main") -> str:
        return git(self.bare, "rev-parse", branch)

    def show(self, path: str, branch: str = "main") -> str:
        return git(self.bare, "show", f"{branch}:{path}") + "\n"

    def subjects(self, *paths: str, branch: str = "main") -> list[str]:
        return git(self.bare, "log", "--format=%s", branch, "--", *paths).splitlines()

    def commit_upstream(self, files: dict[str, str], message: str) -> str:
        git(self.seed, "pull", "--quiet", "--rebase", "origin", "main")
        for name, content in files.items():
            path = self.seed / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        git(self.seed, "add", "--", *files)
        git(self.seed, "commit", "--quiet", "-m", message)
        git(self.seed, "push", "--quiet", "origin", "HEAD:refs/heads/main")
        return git(self.seed, "rev-parse", "HEAD")


def make_remote(root: Path, files: dict[str, str]) -> Remote:
    bare, seed = root / "remote.git", root / "seed"
    git(root, "init", "--quiet", "--bare", str(bare))
    git(bare, "symbolic-ref", "HEAD", "refs/heads/main")
    git(root, "init", "--quiet", str(seed))
    git(seed, "checkout", "--quiet", "-b", "main")
    remote = Remote(bare, seed)
    for name, content in files.items():
        path = seed / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    git(seed, "add", "--all")
    git(seed, "commit", "--quiet", "-m", "Initial Nitro project")
    git(seed, "remote", "add", "origin", str(bare))
    git(seed, "push", "--quiet", "origin", "HEAD:refs/heads/main")
    return remote


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    return make_remote(tmp_path, NITRO_TREE)


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    return tmp_path / "work"


@pytest.fixture
def activities(work_dir: Path) -> FlyConfigActivities:
    settings = Settings(
        work_dir=str(work_dir), git_author_name="Deploy Bot", git_author_email="bot@example.com"
    )
    return FlyConfigActivities(settings)


def config_input(remote: Remote, **overrides: Any) -> PrepareConfigInput:
    values: dict[str, Any] = {
        "deployment_id": "d-1",
        "project_id": "p1",
        "app_name": "turbobackend-p1",
        "repo_url": remote.url,
        "branch": "main",
        "region": "iad",
        "env": {"GREETING": "hi"},
    }
    values.update(overrides)
    return PrepareConfigInput(**values)


async def run(
    activities: FlyConfigActivities,
    input: PrepareConfigInput,
    on_heartbeat: Callable[..., None] | None = None,
) -> PrepareConfigResult:
    env = ActivityEnvironment()
    if on_heartbeat is not None:
        env.on_heartbeat = on_heartbeat
    return await env.run(activities.prepare_fly_config, input)


@pytest.mark.parametrize("url_kind", ["file-url", "plain-path"])
async def test_first_run_commits_and_pushes(
    remote: Remote, activities: FlyConfigActivities, work_dir: Path, url_kind: str
) -> None:
    before = remote.tip()
    url = remote.url if url_kind == "file-url" else str(remote.bare)

    result = await run(activities, config_input(remote, repo_url=url))

    assert result.committed is True
    assert result.merged_existing is False
    assert result.dockerfile_generated is True
    assert result.commit_sha == remote.tip() != before
    assert remote.subjects()[0] == FIRST_SUBJECT
    assert git(remote.bare, "log", "-1", "--format=%an <%ae>", "main") == (
        "Deploy Bot <bot@example.com>"
    )
    assert git(remote.bare, "rev-parse", "main~1") == before
    assert remote.show("fly.toml") == result.fly_toml
    doc = tomllib.loads(result.fly_toml)
    assert doc["app"] == "turbobackend-p1"
    assert doc["env"]["GREETING"] == "hi"
    # fly.toml and the generated build files, in one commit; the project is untouched.
    assert git(remote.bare, "diff", "--name-only", before, "main").splitlines() == [
        ".dockerignore",
        "Dockerfile",
        "fly.toml",
    ]
    assert show_bytes(remote, "Dockerfile") == dockerfile.render_dockerfile().encode()
    assert show_bytes(remote, ".dockerignore") == dockerfile.render_dockerignore().encode()
    assert list(work_dir.iterdir()) == []  # the checkout was removed


async def test_second_run_is_a_no_op(remote: Remote, activities: FlyConfigActivities) -> None:
    first = await run(activities, config_input(remote))
    second = await run(activities, config_input(remote))

    assert second.committed is False
    assert second.commit_sha == first.commit_sha == remote.tip()
    assert second.fly_toml == first.fly_toml
    assert second.merged_existing is True
    assert (first.dockerfile_generated, second.dockerfile_generated) == (True, False)
    assert remote.subjects("fly.toml") == [FIRST_SUBJECT]
    assert remote.subjects("Dockerfile") == [FIRST_SUBJECT]


async def test_changed_env_makes_a_new_commit(
    remote: Remote, activities: FlyConfigActivities
) -> None:
    await run(activities, config_input(remote))
    result = await run(
        activities, config_input(remote, deployment_id="d-2", env={"GREETING": "hello"})
    )

    assert result.committed is True
    assert result.dockerfile_generated is False  # the first deploy's is kept
    assert tomllib.loads(remote.show("fly.toml"))["env"]["GREETING"] == "hello"
    assert remote.subjects("fly.toml") == ["Deploy config for turbobackend-p1 (d-2)", FIRST_SUBJECT]
    assert remote.subjects("Dockerfile") == [FIRST_SUBJECT]


async def test_the_repository_fly_toml_keeps_user_keys(
    tmp_path: Path, activities: FlyConfigActivities
) -> None:
    remote = make_remote(tmp_path, {**NITRO_TREE, "fly.toml": USER_FLY_TOML})

    result = await run(activities, config_input(remote))

    assert result.committed is True and result.merged_existing is True
    # [build] names the user's own Dockerfile: no other is generated.
    assert result.dockerfile_generated is False
    assert "Dockerfile" not in git(remote.bare, "ls-tree", "--name-only", "main").split()
    doc = tomllib.loads(remote.show("fly.toml"))
    assert doc["app"] == "turbobackend-p1" and doc["primary_region"] == "iad"
    assert doc["build"] == {"dockerfile": "Dockerfile.custom"}
    assert doc["deploy"] == {"strategy": "bluegreen"}
    assert doc["mounts"] == [{"source": "data", "destination": "/data"}]
    assert doc["statics"] == [{"guest_path": "/app/public", "url_prefix": "/static"}]
    assert doc["kill_signal"] == "SIGINT" and doc["swap_size_mb"] == 512
    assert doc["env"]["LOG_LEVEL"] == "debug" and doc["env"]["GREETING"] == "hi"
    assert doc["http_service"]["auto_stop_machines"] == "stop"


async def test_an_upstream_commit_during_the_deploy_is_rebased_on(
    remote: Remote, activities: FlyConfigActivities
) -> None:
    steps: list[str] = []
    upstream: list[str] = []

    def on_heartbeat(*details: Any) -> None:
        steps.append(details[0])
        # Someone pushes to the branch between our commit and our push.
        if details[0] == "pushing" and not upstream:
            upstream.append(remote.commit_upstream({"README.md": "# changed\n"}, "Edit README"))

    result = await run(activities, config_input(remote), on_heartbeat)

    assert [s for s in steps if s != "starting"][:3] == ["cloning", "committing", "pushing"]
    assert result.committed is True
    assert result.commit_sha == remote.tip()
    assert remote.subjects()[:2] == [FIRST_SUBJECT, "Edit README"]
    assert git(remote.bare, "rev-parse", "main~1") == upstream[0]
    assert remote.show("README.md") == "# changed\n"
    assert remote.show("fly.toml") == result.fly_toml


async def test_an_upstream_fly_toml_edit_is_retryable_and_then_merged(
    remote: Remote, activities: FlyConfigActivities
) -> None:
    def on_heartbeat(*details: Any) -> None:
        if details[0] == "pushing":
            remote.commit_upstream({"fly.toml": 'app = "x"\n[env]\nADDED = "upstream"\n'}, "Own")

    with pytest.raises(ApplicationError) as caught:
        await run(activities, config_input(remote), on_heartbeat)
    assert caught.value.type == "GitError"
    assert caught.value.non_retryable is False
    assert "fly.toml" in caught.value.message
    assert remote.subjects()[0] == "Own"  # nothing of ours was pushed

    retried = await run(activities, config_input(remote))

    doc = tomllib.loads(remote.show("fly.toml"))
    assert retried.committed is True
    assert doc["app"] == "turbobackend-p1" and doc["env"]["ADDED"] == "upstream"


async def test_missing_branch_is_not_retryable(
    remote: Remote, activities: FlyConfigActivities, work_dir: Path
) -> None:
    with pytest.raises(ApplicationError) as caught:
        await run(activities, config_input(remote, branch="no-such-branch"))

    assert caught.value.type == "GitError"
    assert caught.value.non_retryable is True
    assert "no-such-branch" in caught.value.message
    assert list(work_dir.iterdir()) == []


async def test_missing_repository_is_not_retryable(
    tmp_path: Path, activities: FlyConfigActivities
) -> None:
    missing = Remote(tmp_path / "nothing.git", tmp_path)
    with pytest.raises(ApplicationError) as caught:
        await run(activities, config_input(missing))

    assert caught.value.type == "GitError"
    assert caught.value.non_retryable is True
    assert "repository not found" in caught.value.message


async def test_invalid_fly_toml_in_the_repository(
    tmp_path: Path, activities: FlyConfigActivities
) -> None:
    remote = make_remote(tmp_path, {**NITRO_TREE, "fly.toml": 'app = "x"\n[env\n'})

    with pytest.raises(ApplicationError) as caught:
        await run(activities, config_input(remote))

    assert caught.value.type == "FlyTomlError"
    assert caught.value.non_retryable is True
    assert "line 2" in caught.value.message


async def test_a_fly_toml_that_cannot_become_a_machine_config_is_refused_before_commit(
    tmp_path: Path, activities: FlyConfigActivities
) -> None:
    # Valid TOML, but two volumes for one machine (flyctl refuses it too).
    text = (
        '[[mounts]]\nsource = "a"\ndestination = "/a"\n\n'
        '[[mounts]]\nsource = "b"\ndestination = "/b"\n'
    )
    remote = make_remote(tmp_path, {**NITRO_TREE, "fly.toml": text})
    before = remote.tip()

    with pytest.raises(ApplicationError) as caught:
        await run(activities, config_input(remote))

    assert caught.value.type == "FlyTomlError"
    assert caught.value.non_retryable is True
    assert "more than one [[mounts]]" in caught.value.message
    assert remote.tip() == before


@pytest.mark.parametrize(
    ("strategy", "error_type"),
    [("canary", "UnsupportedStrategy"), ("bluegreen", "BlueGreenWithVolumes")],
)
async def test_a_strategy_that_cannot_carry_a_volume_is_refused_before_commit(
    tmp_path: Path, activities: FlyConfigActivities, strategy: str, error_type: str
) -> None:
    # One volume per machine: a canary or green machine beside it would start without it.
    text = '[[mounts]]\nsource = "data"\ndestination = "/data"\n'
    remote = make_remote(tmp_path, {**NITRO_TREE, "fly.toml": text})
    before = remote.tip()

    with pytest.raises(ApplicationError) as caught:
        await run(activities, config_input(remote, strategy=strategy))

    assert caught.value.type == error_type
    assert caught.value.non_retryable is True
    assert "[mounts]" in caught.value.message
    assert remote.tip() == before
    # The same file deploys with the rolling strategy.
    result = await run(activities, config_input(remote, strategy="rolling"))
    assert result.committed


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_cancellation_kills_git_and_cleans_up(
    tmp_path: Path,
    activities: FlyConfigActivities,
    work_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An ssh "server" that never answers: the clone hangs until it is killed.
    pid_file = tmp_path / "ssh.pid"
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text(f'#!/bin/sh\necho $$ > "{pid_file}"\nexec sleep 60\n')
    fake_ssh.chmod(0o755)
    monkeypatch.setenv("GIT_SSH_COMMAND", str(fake_ssh))
    input = PrepareConfigInput(
        deployment_id="d-1",
        project_id="p1",
        app_name="turbobackend-p1",
        repo_url="ssh://git@example.invalid/project.git",
        branch="main",
        region="iad",
    )
    env = ActivityEnvironment()
    task = asyncio.ensure_future(env.run(activities.prepare_fly_config, input))
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.02)
    pid = int(pid_file.read_text())
    assert _alive(pid)

    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)

    for _ in range(100):
        if not _alive(pid):
            break
        await asyncio.sleep(0.02)
    assert not _alive(pid)
    assert list(work_dir.iterdir()) == []


async def test_push_gives_up_after_bounded_attempts(remote: Remote, tmp_path: Path) -> None:
    author = gitrepo.GitIdentity("Deploy Bot", "bot@example.com")
    async with gitrepo.cloned(remote.url, "main", work_dir=tmp_path / "w") as checkout:
        gitrepo.write_file(checkout, "fly.toml", 'app = "a"\n')
        assert await gitrepo.commit_if_changed(checkout, ["fly.toml"], message="m", author=author)
        remote.commit_upstream({"README.md": "# moved\n"}, "Move")

        with pytest.raises(gitrepo.GitError) as caught:
            await gitrepo.push(checkout, author=author, attempts=1)
        assert caught.value.retryable is True
        assert "kept moving" in str(caught.value)

        outcome = await gitrepo.push(checkout, author=author, attempts=2)
        assert outcome.pushed and outcome.rebased
        assert outcome.sha == remote.tip()


# ------------------------------------------------------------------------ Dockerfile


# Odd on purpose: CRLF line ends, a non-ASCII comment, no final newline.
USER_DOCKERFILE = b'FROM node:18-alpine\r\n# caf\xc3\xa9 \xe2\x80\x94 mine\r\nCMD ["node", "x.js"]'


def commit_raw(remote: Remote, files: dict[str, bytes], message: str) -> None:
    git(remote.seed, "pull", "--quiet", "--rebase", "origin", "main")
    for name, content in files.items():
        (remote.seed / name).write_bytes(content)
    git(remote.seed, "add", "--", *files)
    git(remote.seed, "commit", "--quiet", "-m", message)
    git(remote.seed, "push", "--quiet", "origin", "HEAD:refs/heads/main")


async def test_the_user_dockerfile_is_kept_byte_for_byte(
    remote: Remote, activities: FlyConfigActivities
) -> None:
    commit_raw(remote, {"Dockerfile": USER_DOCKERFILE}, "Own Dockerfile")
    before = remote.tip()

    result = await run(activities, config_input(remote))

    assert result.committed is True and result.dockerfile_generated is False
    assert git(remote.bare, "diff", "--name-only", before, "main") == "fly.toml"
    assert remote.subjects()[0] == SUBJECT
    assert show_bytes(remote, "Dockerfile") == USER_DOCKERFILE
    # Without a generated Dockerfile there is no reason to add a .dockerignore either.
    assert ".dockerignore" not in git(remote.bare, "ls-tree", "--name-only", "main").split()


async def test_the_user_dockerignore_is_kept_when_a_dockerfile_is_generated(
    remote: Remote, activities: FlyConfigActivities
) -> None:
    own_ignore = b"node_modules\n!keep-me\n"
    commit_raw(remote, {".dockerignore": own_ignore}, "Own .dockerignore")
    before = remote.tip()

    result = await run(activities, config_input(remote))

    assert result.dockerfile_generated is True
    assert git(remote.bare, "diff", "--name-only", before, "main").splitlines() == [
        "Dockerfile",
        "fly.toml",
    ]
    assert remote.subjects()[0] == f"{SUBJECT}: fly.toml, Dockerfile"
    body = git(remote.bare, "log", "-1", "--format=%b", "main")
    assert "no Dockerfile" in body
    assert show_bytes(remote, ".dockerignore") == own_ignore
    assert show_bytes(remote, "Dockerfile") == dockerfile.render_dockerfile().encode()


async def test_a_fly_toml_up_to_date_still_gets_the_missing_dockerfile(
    remote: Remote, activities: FlyConfigActivities
) -> None:
    first = await run(activities, config_input(remote))
    git(remote.seed, "pull", "--quiet", "--rebase", "origin", "main")
    git(remote.seed, "rm", "--quiet", "Dockerfile")
    git(remote.seed, "commit", "--quiet", "-m", "Drop Dockerfile")
    git(remote.seed, "push", "--quiet", "origin", "HEAD:refs/heads/main")

    again = await run(activities, config_input(remote, deployment_id="d-2"))

    assert again.committed is True and again.dockerfile_generated is True
    assert again.fly_toml == first.fly_toml
    assert remote.subjects()[0] == "Deploy config for turbobackend-p1 (d-2): Dockerfile"
    assert show_bytes(remote, "Dockerfile") == dockerfile.render_dockerfile().encode()


async def test_no_dockerfile_is_generated_without_package_json(
    tmp_path: Path, activities: FlyConfigActivities
) -> None:
    tree = {k: v for k, v in NITRO_TREE.items() if k != "package.json"}
    remote = make_remote(tmp_path, tree)
    before = remote.tip()

    result = await run(activities, config_input(remote))

    assert result.dockerfile_generated is False
    assert git(remote.bare, "diff", "--name-only", before, "main") == "fly.toml"


async def test_no_dockerfile_is_generated_for_a_prebuilt_image_in_fly_toml(
    tmp_path: Path, activities: FlyConfigActivities
) -> None:
    own = 'app = "x"\n\n[build]\n  image = "registry.example.com/team/api:1.2"\n'
    remote = make_remote(tmp_path, {**NITRO_TREE, "fly.toml": own})

    result = await run(activities, config_input(remote))

    assert result.dockerfile_generated is False
    assert tomllib.loads(result.fly_toml)["build"]["image"] == "registry.example.com/team/api:1.2"
    assert "Dockerfile" not in git(remote.bare, "ls-tree", "--name-only", "main").split()


# ------------------------------------------------- the commit, built without a work tree

AUTHOR = gitrepo.GitIdentity("Deploy Bot", "bot@example.com")


async def commit_files(
    clone: gitrepo.BranchClone,
    files: dict[str, str],
    *,
    message: str = "m",
    author: gitrepo.GitIdentity = AUTHOR,
) -> None:
    """Write `files` into the clone and commit them, which must make a commit."""
    for path, text in files.items():
        gitrepo.write_file(clone, path, text)
    assert await gitrepo.commit_if_changed(clone, list(files), message=message, author=author)


def rendered_fly_toml(**overrides: Any) -> str:
    """What the activity renders for `config_input` of a repository without fly.toml."""
    values: dict[str, Any] = {"app_name": "turbobackend-p1", "region": "iad"}
    values["env"] = {"GREETING": "hi"}
    values.update(overrides)
    return flytoml.render_fly_toml(existing=None, **values)


def ls_tree(remote: Remote, rev: str = "main") -> dict[str, str]:
    """Every entry of a commit's tree, recursively: path -> "mode type id"."""
    out = git(remote.bare, "ls-tree", "-r", "-t", "--full-tree", rev)
    return {line.split("\t")[1]: line.split("\t")[0] for line in out.splitlines()}


def raw_commit(remote: Remote, rev: str = "main") -> str:
    return git(remote.bare, "cat-file", "commit", rev)


async def test_the_commit_is_the_one_git_commit_would_make(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A zone with a half-hour offset, and an identity with the decorations git strips.
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        odd = gitrepo.GitIdentity(' "Deploy Bot", ', "<bot@example.com>")
        message = "Subject line  \n\n\n\nBody first line\t\nsecond line\n\n"
        before = remote.tip()
        async with gitrepo.cloned(remote.url, "main", work_dir=tmp_path / "w") as clone:
            await commit_files(clone, {"fly.toml": 'app = "a"\n'}, message=message, author=odd)
            outcome = await gitrepo.push(clone, author=odd)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()

    assert outcome == gitrepo.PushOutcome(sha=remote.tip(), pushed=True, rebased=False)
    fields = git(remote.bare, "log", "-1", "--format=%an|%ae|%cn|%ce|%ai|%ci|%P", "main")
    an, ae, cn, ce, adate, cdate, parent = fields.split("|")
    assert (an, ae, cn, ce, parent) == (
        "Deploy Bot",
        "bot@example.com",
        "Deploy Bot",
        "bot@example.com",
        before,
    )
    assert adate == cdate and adate.endswith("+0530")
    assert git(remote.bare, "log", "-1", "--format=%B", "main") == (
        "Subject line\n\nBody first line\nsecond line"
    )
    # git itself, given the same tree, parent, identity, date and message, writes an
    # object with the same id: ours is byte for byte what `git commit` would store.
    epoch = git(remote.bare, "log", "-1", "--format=%at", "main")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": odd.name,
        "GIT_AUTHOR_EMAIL": odd.email,
        "GIT_COMMITTER_NAME": odd.name,
        "GIT_COMMITTER_EMAIL": odd.email,
        "GIT_AUTHOR_DATE": f"@{epoch} +0530",
        "GIT_COMMITTER_DATE": f"@{epoch} +0530",
    }
    tree = git(remote.bare, "rev-parse", "main^{tree}")
    again = subprocess.run(
        ["git", "commit-tree", tree, "-p", before, "-F", "-"],
        cwd=remote.bare,
        env=env,
        input="Subject line\n\nBody first line\nsecond line\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert again == remote.tip()
    git(remote.bare, "fsck", "--strict", "--no-dangling")


def make_odd_remote(root: Path) -> Remote:
    """A project whose tree has an executable fly.toml, an executable script, a symlink,
    nested directories and a submodule."""
    remote = make_remote(
        root, {**NITRO_TREE, "fly.toml": 'app = "x"\n', "bin/run.sh": "#!/bin/sh\n"}
    )
    seed = remote.seed
    (seed / "fly.toml").chmod(0o755)
    (seed / "bin" / "run.sh").chmod(0o755)
    os.symlink("server/routes/index.ts", seed / "entry.ts")
    git(seed, "add", "--all")
    git(seed, "update-index", "--add", "--cacheinfo", f"160000,{remote.tip()},vendor/lib")
    git(seed, "commit", "--quiet", "-m", "Odd entries")
    git(seed, "push", "--quiet", "origin", "HEAD:refs/heads/main")
    return remote


async def test_other_tree_entries_and_the_executable_bit_are_kept(
    tmp_path: Path, activities: FlyConfigActivities
) -> None:
    remote = make_odd_remote(tmp_path)
    before = ls_tree(remote)
    assert before["fly.toml"].startswith("100755 blob")
    assert before["entry.ts"].startswith("120000 blob")
    assert before["vendor/lib"].startswith("160000 commit")

    result = await run(activities, config_input(remote))

    assert result.committed is True and result.dockerfile_generated is True
    after = ls_tree(remote)
    added = {"Dockerfile", ".dockerignore"}
    assert set(after) == set(before) | added
    # Only fly.toml changed (its content, not its mode); every other entry is the same
    # object with the same mode, and the directories holding nothing new too.
    assert {p for p in before if after[p] != before[p]} == {"fly.toml"}
    assert after["fly.toml"].startswith("100755 blob")
    assert after["Dockerfile"].startswith("100644 blob")
    assert after[".dockerignore"].startswith("100644 blob")
    assert remote.show("fly.toml") == result.fly_toml
    git(remote.bare, "fsck", "--strict", "--no-dangling")


async def test_a_symlinked_fly_toml_is_refused(
    tmp_path: Path, activities: FlyConfigActivities, work_dir: Path
) -> None:
    remote = make_remote(tmp_path, {**NITRO_TREE, "deploy/fly.toml": 'app = "x"\n'})
    os.symlink("deploy/fly.toml", remote.seed / "fly.toml")
    git(remote.seed, "add", "--all")
    git(remote.seed, "commit", "--quiet", "-m", "Link")
    git(remote.seed, "push", "--quiet", "origin", "HEAD:refs/heads/main")
    before = remote.tip()

    with pytest.raises(ApplicationError) as caught:
        await run(activities, config_input(remote))

    assert caught.value.type == "GitError" and caught.value.non_retryable is True
    assert "fly.toml is not a regular file" in caught.value.message
    assert remote.tip() == before
    assert list(work_dir.iterdir()) == []


async def test_a_crlf_fly_toml_is_merged(tmp_path: Path, activities: FlyConfigActivities) -> None:
    own = USER_FLY_TOML.replace("\n", "\r\n")
    remote = make_remote(tmp_path, {**NITRO_TREE})
    commit_raw(remote, {"fly.toml": own.encode()}, "Own fly.toml, CRLF")

    result = await run(activities, config_input(remote))

    assert result.merged_existing is True
    assert "\r" not in remote.show("fly.toml")
    assert tomllib.loads(remote.show("fly.toml"))["deploy"] == {"strategy": "bluegreen"}


async def test_a_branch_moved_by_another_file_gets_our_commit_on_top(
    remote: Remote, tmp_path: Path
) -> None:
    async with gitrepo.cloned(remote.url, "main", work_dir=tmp_path / "w") as clone:
        await commit_files(clone, {"fly.toml": 'app = "a"\n'}, message="Deploy config")
        upstream = remote.commit_upstream({"server/routes/index.ts": "// moved\n"}, "Move")
        upstream_tree = ls_tree(remote)

        outcome = await gitrepo.push(clone, author=AUTHOR)

    assert outcome == gitrepo.PushOutcome(sha=remote.tip(), pushed=True, rebased=True)
    assert git(remote.bare, "rev-list", "--parents", "-n1", "main").split() == [
        remote.tip(),
        upstream,
    ]
    assert git(remote.bare, "diff", "--name-only", upstream, "main") == "fly.toml"
    after = ls_tree(remote)
    assert {p: e for p, e in after.items() if p != "fly.toml"} == upstream_tree
    assert remote.show("fly.toml") == 'app = "a"\n'
    assert remote.show("server/routes/index.ts") == "// moved\n"
    assert git(remote.bare, "log", "-1", "--format=%s|%an <%ae>|%cn <%ce>", "main") == (
        "Deploy config|Deploy Bot <bot@example.com>|Deploy Bot <bot@example.com>"
    )
    git(remote.bare, "fsck", "--strict", "--no-dangling")


async def test_a_branch_that_changed_our_file_meanwhile_is_a_retryable_error(
    remote: Remote, tmp_path: Path
) -> None:
    async with gitrepo.cloned(remote.url, "main", work_dir=tmp_path / "w") as clone:
        await commit_files(clone, {"fly.toml": 'app = "a"\n', "Dockerfile": "FROM node:20\n"})
        upstream = remote.commit_upstream({"fly.toml": 'app = "theirs"\n'}, "Theirs")

        with pytest.raises(gitrepo.GitError) as caught:
            await gitrepo.push(clone, author=AUTHOR)

    assert caught.value.retryable is True
    assert str(caught.value) == (
        "branch 'main' changed fly.toml while we were committing; "
        "the change must be made again on the new content"
    )
    assert remote.tip() == upstream
    assert remote.show("fly.toml") == 'app = "theirs"\n'


async def test_a_branch_already_holding_our_change_needs_no_push(
    remote: Remote, tmp_path: Path
) -> None:
    async with gitrepo.cloned(remote.url, "main", work_dir=tmp_path / "w") as clone:
        await commit_files(clone, {"fly.toml": 'app = "a"\n'})
        upstream = remote.commit_upstream({"fly.toml": 'app = "a"\n'}, "Same, by someone else")

        outcome = await gitrepo.push(clone, author=AUTHOR)

    assert outcome == gitrepo.PushOutcome(sha=upstream, pushed=False, rebased=True)
    assert remote.tip() == upstream
    assert remote.subjects()[0] == "Same, by someone else"


async def test_a_branch_holding_part_of_our_change_gets_the_rest(
    remote: Remote, tmp_path: Path
) -> None:
    async with gitrepo.cloned(remote.url, "main", work_dir=tmp_path / "w") as clone:
        await commit_files(clone, {"fly.toml": 'app = "a"\n', "Dockerfile": "FROM node:20\n"})
        upstream = remote.commit_upstream({"fly.toml": 'app = "a"\n'}, "Same fly.toml")

        outcome = await gitrepo.push(clone, author=AUTHOR)

    assert outcome.pushed and outcome.rebased and outcome.sha == remote.tip()
    assert git(remote.bare, "rev-parse", "main~1") == upstream
    assert git(remote.bare, "diff", "--name-only", upstream, "main") == "Dockerfile"
    assert remote.show("Dockerfile") == "FROM node:20\n"


async def test_the_activity_finds_its_content_already_pushed_by_someone_else(
    remote: Remote, activities: FlyConfigActivities
) -> None:
    commit_raw(remote, {"Dockerfile": USER_DOCKERFILE}, "Own Dockerfile")
    upstream: list[str] = []

    def on_heartbeat(*details: Any) -> None:
        if details[0] == "pushing" and not upstream:
            upstream.append(
                remote.commit_upstream({"fly.toml": rendered_fly_toml()}, "Same fly.toml")
            )

    result = await run(activities, config_input(remote), on_heartbeat)

    assert upstream and result.committed is False
    assert result.commit_sha == upstream[0] == remote.tip()
    assert remote.subjects()[0] == "Same fly.toml"
    assert remote.show("fly.toml") == result.fly_toml


async def test_git_runs_once_when_up_to_date_and_twice_when_pushing(
    remote: Remote, activities: FlyConfigActivities, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: list[str] = []
    real = asyncio.create_subprocess_exec

    async def counting(program: str, *args: Any, **kwargs: Any) -> Any:
        at = 0
        while args[at] == "-c":  # the safety settings before git's command
            at += 2
        commands.append(f"{program} {args[at]}")
        return await real(program, *args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", counting)
    await run(activities, config_input(remote))
    first = list(commands)
    commands.clear()
    await run(activities, config_input(remote))
    second = list(commands)

    assert first == ["git clone", "git push"]
    assert second == ["git clone"]


def _git_children() -> list[str]:
    """This process's git children, other than zombies: "pid (command)". Other children
    (the test session's Temporal server, say) are not counted."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            stat = stat_file.read_text()
            command = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z" and command.startswith("git"):
                found.append(f"{stat_file.parent.name} ({command})")
    return found


async def test_cancellation_during_the_push_kills_git_and_cleans_up(
    remote: Remote,
    tmp_path: Path,
    activities: FlyConfigActivities,
    work_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An ssh "server" that serves the clone from the local remote and never answers a push.
    pid_file = tmp_path / "receive.pid"
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *receive-pack*) echo $$ > "{pid_file}"; exec sleep 60 ;;\n'
        f'  *) exec git upload-pack "{remote.bare}" ;;\n'
        "esac\n"
    )
    fake_ssh.chmod(0o755)
    monkeypatch.setenv("GIT_SSH_COMMAND", str(fake_ssh))
    monkeypatch.setenv("GIT_SSH_VARIANT", "simple")
    before = remote.tip()
    input = config_input(remote, repo_url="ssh://git@example.invalid/project.git")
    env = ActivityEnvironment()
    task = asyncio.ensure_future(env.run(activities.prepare_fly_config, input))
    for _ in range(250):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.02)
    pid = int(pid_file.read_text())
    assert _alive(pid)
    assert _git_children()  # git push, waiting on the "server"

    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)

    for _ in range(100):
        if not _alive(pid):
            break
        await asyncio.sleep(0.02)
    assert not _alive(pid)
    assert _git_children() == []
    assert list(work_dir.iterdir()) == []
    assert remote.tip() == before


async def test_a_sha256_repository_is_refused(
    tmp_path: Path, activities: FlyConfigActivities, work_dir: Path
) -> None:
    seed, bare = tmp_path / "seed", tmp_path / "remote.git"
    git(tmp_path, "init", "--quiet", "--object-format=sha256", "-b", "main", str(seed))
    (seed / "package.json").write_text(NITRO_TREE["package.json"])
    git(seed, "add", "--all")
    git(seed, "commit", "--quiet", "-m", "Initial")
    git(tmp_path, "clone", "--quiet", "--bare", str(seed), str(bare))

    with pytest.raises(ApplicationError) as caught:
        await run(activities, config_input(Remote(bare, seed)))

    assert caught.value.type == "GitError" and caught.value.non_retryable is True
    assert "SHA-1" in caught.value.message
    assert list(work_dir.iterdir()) == []


async def test_cancelled_push_to_a_local_repository_leaves_no_lock_behind(
    remote: Remote, activities: FlyConfigActivities, tmp_path: Path
) -> None:
    """The remote's receive-pack runs in our git's process group when the repository is on
    this machine. Cancelled while it holds the branch's lock, it must get the chance to
    remove the lock, or every later push to the branch fails."""
    holding = tmp_path / "holding-the-lock"
    hook = remote.bare / "hooks" / "reference-transaction"
    hook.parent.mkdir(exist_ok=True)
    # Runs with every ref of the push locked ("prepared"); stays there until killed.
    hook.write_text(
        f'#!/bin/sh\nif [ "$1" = prepared ]; then touch "{holding}"; exec sleep 60; fi\n'
    )
    hook.chmod(0o755)
    env = ActivityEnvironment()
    task = asyncio.ensure_future(env.run(activities.prepare_fly_config, config_input(remote)))
    for _ in range(250):
        if holding.exists():
            break
        await asyncio.sleep(0.02)
    assert holding.exists(), "the push never reached the locked state"
    assert (remote.bare / "refs" / "heads" / "main.lock").exists()

    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)

    assert not (remote.bare / "refs" / "heads" / "main.lock").exists()
    hook.unlink()
    result = await ActivityEnvironment().run(activities.prepare_fly_config, config_input(remote))
    assert result.committed and remote.tip() == result.commit_sha


def _filtering_remote(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """A work tree with `files` committed, pushed to a bare remote that serves partial
    clones as GitHub does."""
    seed, bare = tmp_path / "seed", tmp_path / "remote.git"
    for rel, data in files.items():
        (seed / rel).parent.mkdir(parents=True, exist_ok=True)
        (seed / rel).write_bytes(data)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=seed, check=True)
    subprocess.run([*git, "add", "-A"], cwd=seed, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "seed"], cwd=seed, check=True)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    for key in ("uploadpack.allowFilter", "uploadpack.allowAnySHA1InWant"):
        subprocess.run(["git", "-C", str(bare), "config", key, "true"], check=True)
    subprocess.run(["git", "push", "-q", str(bare), "main"], cwd=seed, check=True)
    return seed, bare


async def test_partial_clone_reads_only_the_blobs_it_needs(tmp_path: Path) -> None:
    """With `read`, the clone holds commits and trees only, plus the blobs named: a large
    file of the repository never reaches the worker, and the commit pushed on top of such
    a clone leaves it intact on the remote. The remote allows it as GitHub does."""
    large = os.urandom(4 << 20)
    _, bare = _filtering_remote(
        tmp_path,
        {"fly.toml": b'app = "x"\nprimary_region = "iad"\n', "assets/video.bin": large},
    )
    video = subprocess.run(
        ["git", "-C", str(bare), "rev-parse", "main:assets/video.bin"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip

    async with gitrepo.cloned(f"file://{bare}", "main", work_dir=tmp_path, read=["fly.toml"]) as c:
        assert gitrepo.read_file(c, "fly.toml") == 'app = "x"\nprimary_region = "iad"\n'
        assert gitrepo.has_file(c, "assets/video.bin")
        store = c._repo.object_store
        assert video.encode() not in store, "the large blob was fetched"
        size = sum(f.stat().st_size for f in c.path.rglob("*") if f.is_file())
        assert size < len(large) / 4
        gitrepo.write_file(c, "fly.toml", 'app = "y"\n')
        author = gitrepo.GitIdentity("turbodeploy", "turbodeploy@localhost")
        assert await gitrepo.commit_if_changed(c, ["fly.toml"], message="m", author=author)
        outcome = await gitrepo.push(c, author=author)
    assert outcome.pushed
    shown = subprocess.run(
        ["git", "-C", str(bare), "show", "main:assets/video.bin"], capture_output=True, check=True
    ).stdout
    assert shown == large
    fly = subprocess.run(
        ["git", "-C", str(bare), "show", "main:fly.toml"], capture_output=True, check=True
    ).stdout
    assert fly == b'app = "y"\n'


async def test_a_blob_already_read_or_committed_is_not_fetched_again(tmp_path: Path) -> None:
    """The content of a blob is named by its hash: once this process has read or committed
    it, a later partial clone reads it without fetching. Content that changed on the remote
    has another id, so it is fetched and read as it is now."""
    gitrepo._blobs.clear()
    seed, bare = _filtering_remote(tmp_path, {"fly.toml": b'app = "x"\n'})
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    url, author = f"file://{bare}", gitrepo.GitIdentity("turbodeploy", "turbodeploy@localhost")

    def blob_id(text: str) -> bytes:
        return Blob.from_string(text.encode()).id

    async with gitrepo.cloned(url, "main", work_dir=tmp_path, read=["fly.toml"]) as c:
        assert blob_id('app = "x"\n') in c._repo.object_store, "the first read fetches it"
        assert gitrepo.read_file(c, "fly.toml") == 'app = "x"\n'
    async with gitrepo.cloned(url, "main", work_dir=tmp_path, read=["fly.toml"]) as c:
        assert blob_id('app = "x"\n') not in c._repo.object_store, "fetched a second time"
        assert gitrepo.read_file(c, "fly.toml") == 'app = "x"\n'
        gitrepo.write_file(c, "fly.toml", 'app = "y"\n')
        assert await gitrepo.commit_if_changed(c, ["fly.toml"], message="m", author=author)
        assert (await gitrepo.push(c, author=author)).pushed
    async with gitrepo.cloned(url, "main", work_dir=tmp_path, read=["fly.toml"]) as c:
        assert blob_id('app = "y"\n') not in c._repo.object_store, "what it pushed, fetched"
        assert gitrepo.read_file(c, "fly.toml") == 'app = "y"\n'

    # Someone else changes the file: new content, a new id, fetched.
    subprocess.run(["git", "pull", "-q", str(bare), "main"], cwd=seed, check=True)
    (seed / "fly.toml").write_text('app = "z"\n')
    subprocess.run([*git, "commit", "-q", "-am", "edit"], cwd=seed, check=True)
    subprocess.run(["git", "push", "-q", str(bare), "main"], cwd=seed, check=True)
    async with gitrepo.cloned(url, "main", work_dir=tmp_path, read=["fly.toml"]) as c:
        assert blob_id('app = "z"\n') in c._repo.object_store
        assert gitrepo.read_file(c, "fly.toml") == 'app = "z"\n'
