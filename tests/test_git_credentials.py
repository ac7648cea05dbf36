"""Private repositories: git credentials by reference (SSM), given to git through its
environment only, against a real authenticating git server on loopback (git's smart HTTP
behind an `Authorization` check), and SSH deploy keys through `GIT_SSH_COMMAND`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gitserver import AuthGitServer
from harness import (
    DEPLOY_FAILURES,
    PROJECT_ROOT,
    GitShim,
    deploy_request,
    failure_message,
    history_json,
    new_project_id,
    running_worker,
)
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities._errors import NON_RETRYABLE
from activities.fly_config import FlyConfigActivities, PrepareConfigInput
from core import gitrepo
from core.models import DeployRequest
from core.settings import Settings, git_remote
from turbodeploy import embedded
from turbodeploy.client import start_deploy
from turbodeploy.stack import publish_example

USER = "x-access-token"
AUTHOR = gitrepo.GitIdentity("turbodeploy", "turbodeploy@example.com")


def _token() -> str:
    return "ghp_" + uuid.uuid4().hex + uuid.uuid4().hex[:4]


@pytest.fixture
def token() -> str:
    return _token()


@pytest.fixture
def server(tmp_path: Path, token: str) -> Iterator[AuthGitServer]:
    with AuthGitServer(tmp_path / "host", USER, token).serving() as s:
        yield s


@pytest.fixture
def private_repo(server: AuthGitServer, tmp_path: Path) -> str:
    return server.add_repository(publish_example("nitro-hello", tmp_path / "seed"))


@pytest.fixture
def shim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GitShim:
    """Every git the worker code runs logs its argv."""
    git = GitShim(tmp_path / "shim")
    monkeypatch.setenv("PATH", f"{git.dir}{os.pathsep}{os.environ['PATH']}")
    return git


def _log(bare: Path, ref: str = "main") -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(bare), "log", "--format=%s", ref], capture_output=True, text=True
    )
    return out.stdout.splitlines()


def _tree_of_disk(root: Path) -> str:
    """Every file's bytes under `root`, to look for the token in."""
    parts = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            parts.append(path.read_bytes().decode("latin-1"))
    return "\n".join(parts)


# --------------------------------------------------------------------- gitrepo, HTTP


async def test_clone_commit_and_push_with_a_token(
    server: AuthGitServer, private_repo: str, token: str, shim: GitShim, tmp_path: Path
) -> None:
    auth = gitrepo.GitAuth(token=token, username=USER)
    work = tmp_path / "work"
    async with gitrepo.cloned(private_repo, "main", work_dir=work, auth=auth) as clone:
        assert gitrepo.read_file(clone, "package.json") is not None
        # The clone's own config names the plain URL: the token is in no file.
        assert token not in _tree_of_disk(clone.path)
        gitrepo.write_file(clone, "fly.toml", 'app = "private"\n')
        assert await gitrepo.commit_if_changed(
            clone, ["fly.toml"], message="private commit", author=AUTHOR
        )
        outcome = await gitrepo.push(clone, author=AUTHOR)
    assert outcome.pushed
    assert _log(server.root / "nitro-hello.git")[0] == "private commit"
    # The remote was reached with the header, and only with it.
    assert server.authorized_requests >= 4  # clone: refs + pack; push: refs + pack
    assert {s.method for s in server.seen if s.status < 400} == {"GET", "POST"}
    assert token not in shim.argv() and "extraHeader" not in shim.argv()
    assert "clone" in shim.argv() and "push" in shim.argv()

    # A checkout of exactly that commit, the way builds fetch it.
    async with gitrepo.cloned_commit(private_repo, outcome.sha, work_dir=work, auth=auth) as co:
        assert (co.path / "fly.toml").read_text() == 'app = "private"\n'
        assert token not in (co.path / ".git" / "config").read_text()
    assert token not in shim.argv()


async def test_a_wrong_token_is_access_denied_not_retried(
    server: AuthGitServer, private_repo: str, tmp_path: Path
) -> None:
    wrong = _token()
    for auth in (gitrepo.GitAuth(token=wrong, username=USER), None):
        with pytest.raises(gitrepo.GitError) as caught:
            async with gitrepo.cloned(private_repo, "main", work_dir=tmp_path, auth=auth):
                pass
        assert caught.value.reason == gitrepo.ACCESS_DENIED
        assert caught.value.retryable is False
        assert wrong not in str(caught.value)
    assert server.authorized_requests == 0
    assert any(s.authorization for s in server.seen), "the wrong token was sent"


async def test_a_commit_fetch_with_a_wrong_token_is_access_denied(
    private_repo: str, tmp_path: Path
) -> None:
    sha = "0" * 40
    with pytest.raises(gitrepo.GitError) as caught:
        async with gitrepo.cloned_commit(
            private_repo, sha, work_dir=tmp_path, auth=gitrepo.GitAuth(token=_token())
        ):
            pass
    assert caught.value.reason == gitrepo.ACCESS_DENIED and not caught.value.retryable


def test_the_header_is_scoped_to_the_repository_origin(token: str) -> None:
    auth = gitrepo.GitAuth(token=token)
    with auth.environment("https://github.com/acme/p.git") as env:
        count = int(env["GIT_CONFIG_COUNT"])
        keys = [env[f"GIT_CONFIG_KEY_{i}"] for i in range(count)]
        values = [env[f"GIT_CONFIG_VALUE_{i}"] for i in range(count)]
    assert keys[-1] == "http.https://github.com/.extraHeader"
    assert values[-1].startswith("Authorization: Basic ")
    assert token not in repr(auth) and token not in str(auth)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(auth)
    # A path or file:// remote gets nothing.
    with auth.environment("/srv/git/p.git") as env:
        assert env == {}


def test_existing_environment_config_is_kept(token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    with gitrepo.GitAuth(token=token).environment("https://h.example/p.git") as env:
        assert env["GIT_CONFIG_COUNT"] == "2"
        assert env["GIT_CONFIG_KEY_1"] == "http.https://h.example/.extraHeader"
        assert "GIT_CONFIG_KEY_0" not in env


# ---------------------------------------------------------------------- gitrepo, SSH

_FAKE_SSH = """#!/bin/sh
# ssh as git runs it: [options] host command. Record the key file, then run the command here.
key=""
while [ $# -gt 1 ]; do
  case "$1" in
    -i) key="$2"; shift 2;;
    -o|-p|-l) printf '%s %s\\n' "$1" "$2" >> "{log}"; shift 2;;
    -*) shift;;
    *) break;;
  esac
done
host="$1"; shift
printf 'host=%s key=%s mode=%s\\n' "$host" "$key" "$(stat -c %a "$key")" >> "{log}"
cat "$key" >> "{log}.keys"
exec sh -c "$*"
"""


async def test_ssh_deploy_key_is_a_0600_file_removed_after_use(tmp_path: Path) -> None:
    bare = Path(publish_example("nitro-hello", tmp_path / "repos"))
    log = tmp_path / "ssh.log"
    fake = tmp_path / "fake-ssh"
    fake.write_text(_FAKE_SSH.format(log=log))
    fake.chmod(0o755)
    key = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE"
        + uuid.uuid4().hex
        + ("\n-----END OPENSSH PRIVATE KEY-----")
    )
    auth = gitrepo.GitAuth(ssh_key=key, ssh_command=str(fake), known_hosts="/dev/null")
    url = f"ssh://git@git.example.com{bare}"
    async with gitrepo.cloned(url, "main", work_dir=tmp_path / "w", auth=auth) as clone:
        gitrepo.write_file(clone, "fly.toml", 'app = "ssh"\n')
        await gitrepo.commit_if_changed(clone, ["fly.toml"], message="over ssh", author=AUTHOR)
        outcome = await gitrepo.push(clone, author=AUTHOR)
    assert outcome.pushed and _log(bare)[0] == "over ssh"
    lines = log.read_text().splitlines()
    uses = [line for line in lines if line.startswith("host=")]
    assert len(uses) >= 2  # the clone and the push
    assert all(" mode=600" in line and "host=git@git.example.com" in line for line in uses)
    assert "-o IdentitiesOnly=yes" in lines and "-o UserKnownHostsFile=/dev/null" in lines
    assert (tmp_path / "ssh.log.keys").read_text().count(key) == len(uses)
    key_files = {line.split(" key=")[1].split(" mode=")[0] for line in uses}
    assert all(not Path(f).exists() and not Path(f).parent.exists() for f in key_files)


# -------------------------------------------------------------------- settings, models


def test_settings_pick_the_parameter_for_a_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBODEPLOY_GIT_TOKEN_PARAMETER", "/platform/github/token")
    monkeypatch.setenv(
        "TURBODEPLOY_GIT_TOKEN_PARAMETERS", '{"GitLab.example.com": "/platform/gitlab/token"}'
    )
    monkeypatch.setenv("TURBODEPLOY_GIT_SSH_KEY_PARAMETER", "/platform/deploy-key")
    s = Settings()
    assert s.git_credential_parameter("https://github.com/acme/p.git") == (
        "token",
        "/platform/github/token",
        "TURBODEPLOY_GIT_TOKEN_PARAMETER",
    )
    assert s.git_credential_parameter("https://gitlab.example.com/acme/p.git") == (
        "token",
        "/platform/gitlab/token",
        "TURBODEPLOY_GIT_TOKEN_PARAMETERS",
    )
    assert s.git_credential_parameter("git@github.com:acme/p.git")[:2] == (  # type: ignore[index]
        "ssh_key",
        "/platform/deploy-key",
    )
    assert s.git_credential_parameter("/srv/git/p.git") is None
    assert s.git_credential_parameter("file:///srv/git/p.git") is None
    assert git_remote("ssh://git@GitHub.com:22/a/b.git") == ("ssh_key", "github.com")
    monkeypatch.setenv("TURBODEPLOY_GIT_TOKEN_PARAMETER", "")
    assert Settings().git_token_parameter is None


@pytest.mark.parametrize(
    "url",
    [
        "https://x-access-token:ghp_abcdefabcdef@github.com/acme/p.git",
        "https://ghp_abcdefabcdef@github.com/acme/p.git",
        "http://user:pass@127.0.0.1:8080/p.git",
        "ssh://git:hunter2@github.com/acme/p.git",
        "git://user@example.com/p.git",
    ],
)
def test_a_repo_url_with_credentials_is_rejected_pointing_at_the_setting(url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DeployRequest(project_id="p1", repo_url=url)
    [error] = caught.value.errors()
    assert error["loc"] == ("repo_url",)
    assert "TURBODEPLOY_GIT_" in error["msg"] and "_PARAMETER" in error["msg"]
    assert "ghp_" not in error["msg"] and "hunter2" not in error["msg"]


@pytest.mark.parametrize(
    "url", ["ssh://git@github.com/acme/p.git", "git@github.com:acme/p.git", "https://h.io/p.git"]
)
def test_urls_without_secrets_are_accepted(url: str) -> None:
    assert DeployRequest(project_id="p1", repo_url=url).repo_url == url


# -------------------------------------------------------------------------- activity


def _config_input(repo_url: str) -> PrepareConfigInput:
    return PrepareConfigInput(
        deployment_id="d-1",
        project_id="p1",
        app_name="turbobackend-p1",
        repo_url=repo_url,
        branch="main",
        region="iad",
    )


@pytest.fixture
def token_parameter(ssm: Any, token: str) -> str:
    name = f"/turbobackend/github/token-{uuid.uuid4().hex[:8]}"
    ssm.put_parameter(Name=name, Value=token, Type="SecureString")
    return name


async def test_the_step_reads_the_token_from_ssm_and_pushes(
    make_settings: Callable[..., Settings],
    server: AuthGitServer,
    private_repo: str,
    token_parameter: str,
) -> None:
    settings = make_settings(git_token_parameter=token_parameter)
    result = await ActivityEnvironment().run(
        FlyConfigActivities(settings).prepare_fly_config, _config_input(private_repo)
    )
    assert result.committed
    assert _log(server.root / "nitro-hello.git")[0].startswith("Deploy config for")


async def test_a_refused_token_fails_the_step_for_good_naming_the_setting(
    make_settings: Callable[..., Settings],
    ssm: Any,
    private_repo: str,
) -> None:
    wrong = _token()
    name = f"/turbobackend/github/wrong-{uuid.uuid4().hex[:8]}"
    ssm.put_parameter(Name=name, Value=wrong, Type="SecureString")
    for settings, expected in (
        (make_settings(git_token_parameter=name), name),
        (make_settings(), "TURBODEPLOY_GIT_TOKEN_PARAMETER"),
    ):
        with pytest.raises(ApplicationError) as caught:
            await ActivityEnvironment().run(
                FlyConfigActivities(settings).prepare_fly_config, _config_input(private_repo)
            )
        assert caught.value.type == "GitAccessDenied" and caught.value.non_retryable
        assert "GitAccessDenied" in NON_RETRYABLE
        assert expected in caught.value.message
        assert wrong not in caught.value.message


async def test_a_missing_parameter_says_which_setting_names_it(
    make_settings: Callable[..., Settings], ssm_endpoint: str, private_repo: str
) -> None:
    missing = f"/turbobackend/github/none-{uuid.uuid4().hex[:8]}"
    settings = make_settings(git_token_parameter=missing)
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            FlyConfigActivities(settings).prepare_fly_config, _config_input(private_repo)
        )
    assert caught.value.type == "CredentialsMissing"
    assert missing in caught.value.message
    assert "TURBODEPLOY_GIT_TOKEN_PARAMETER" in caught.value.message


# ------------------------------------------------------------------------ full deploy


@pytest.mark.usefixtures("calm_emulator")
async def test_a_private_repository_deploys_through_the_workflow(
    temporal_client: Client,
    make_settings: Callable[..., Settings],
    server: AuthGitServer,
    private_repo: str,
    token_parameter: str,
    token: str,
    shim: GitShim,
    ssm: Any,
    tmp_path: Path,
) -> None:
    flyctl = embedded.flyctl_standin(tmp_path / "flyctl-bin")
    # The stand-in runs `python -m flysim.flyctl` in the checkout: this code's flysim.
    flyctl.write_text(flyctl.read_text().replace("exec ", f'PYTHONPATH="{PROJECT_ROOT}" exec ', 1))

    settings = make_settings(
        temporal_address=temporal_client.service_client.config.target_host,
        flyctl_path=str(flyctl),
        fly_api_rate=0,
        git_token_parameter=token_parameter,
    )
    # No image: the build step fetches the prepared commit over HTTP too.
    request = deploy_request(new_project_id("g"), private_repo, image=None)
    async with running_worker(temporal_client, settings):
        handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
        result = await asyncio.wait_for(handle.result(), 120)
        history = await history_json(handle)
    assert result.status == "deployed" and result.commit_sha
    assert _log(server.root / "nitro-hello.git")[0].startswith("Deploy config for")
    served = [s.path.rsplit("/", 1)[-1] for s in server.seen if s.status < 400]
    pushed = served.index("git-receive-pack")
    # The config step cloned and pushed, then the build fetched the commit.
    assert "git-upload-pack" in served[:pushed] and "git-upload-pack" in served[pushed:]
    assert token not in history and token not in shim.argv()

    # The same deploy with a token the host refuses ends at once, saying what to check.
    ssm_value = _token()
    ssm.put_parameter(Name=token_parameter + "-wrong", Value=ssm_value, Type="SecureString")
    settings = make_settings(
        temporal_address=temporal_client.service_client.config.target_host,
        fly_api_rate=0,
        git_token_parameter=token_parameter,
        git_token_parameters={"127.0.0.1": token_parameter + "-wrong"},
    )
    async with running_worker(temporal_client, settings):
        again = deploy_request(new_project_id("g"), private_repo, image=None)
        handle = await start_deploy(temporal_client, again, task_queue=settings.task_queue)
        with pytest.raises(DEPLOY_FAILURES) as caught:
            await asyncio.wait_for(handle.result(), 120)
    message = failure_message(caught.value)
    assert "GitAccessDenied" in message or "refused the git credential" in message, message
    assert "TURBODEPLOY_GIT_TOKEN_PARAMETERS" in message
    assert ssm_value not in message
