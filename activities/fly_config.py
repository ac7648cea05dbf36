"""The `fly_config` step: render fly.toml into the project's repository and push it.

A Node project without a Dockerfile also gets a generated one (and a .dockerignore), in
the same commit, so the build step finds everything it needs in the deployed commit.
Files the repository already has are never replaced.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from temporalio import activity

from activities._errors import BLUE_GREEN_WITH_VOLUMES, FLY_TOML_ERROR, UNSUPPORTED_STRATEGY
from activities._git_credentials import GitCredentials
from activities._heartbeat import PeriodicHeartbeat
from core import dockerfile, flytoml, gitrepo
from core.models import Model, Strategy
from core.settings import Settings

FLY_TOML = "fly.toml"
_PROBE_IMAGE = "registry.fly.io/probe:latest"


class PrepareConfigInput(Model):
    deployment_id: str
    project_id: str
    app_name: str
    repo_url: str
    branch: str
    region: str
    env: dict[str, str] = Field(default_factory=dict)
    # How the release will be rolled out: some strategies cannot carry a volume.
    strategy: Strategy = Strategy.ROLLING


class PrepareConfigResult(Model):
    commit_sha: str
    committed: bool  # False when fly.toml was already up to date
    fly_toml: str  # the rendered file, as committed
    merged_existing: bool  # True when the repository had its own fly.toml
    dockerfile_generated: bool = False  # True when we wrote a Dockerfile (the repo had none)


class FlyConfigActivities:
    def __init__(self, settings: Settings, *, git: GitCredentials | None = None) -> None:
        """`git`: credentials for private remotes (from the settings when not given)."""
        self._settings = settings
        self._git = git if git is not None else GitCredentials(settings)
        self._author = gitrepo.GitIdentity(settings.git_author_name, settings.git_author_email)

    @activity.defn(name="prepare_fly_config")
    async def prepare_fly_config(self, input: PrepareConfigInput) -> PrepareConfigResult:
        """Commit the rendered fly.toml to `input.branch` unless it is already there.

        Idempotent: a retry after the push (or a second deploy of the same settings) finds
        the file up to date and returns the branch tip with `committed=False`.
        """
        async with _Heartbeat() as beat:
            try:
                return await self._prepare(input, beat)
            except gitrepo.GitError as exc:
                raise self._git.failure(exc, input.repo_url) from None
            except flytoml.FlyTomlError as exc:
                raise FLY_TOML_ERROR(f"branch {input.branch!r}: {exc}") from None

    async def _prepare(self, input: PrepareConfigInput, beat: _Heartbeat) -> PrepareConfigResult:
        auth = await self._git.auth_for(input.repo_url)
        beat.step("cloning")
        async with gitrepo.cloned(
            input.repo_url,
            input.branch,
            work_dir=self._settings.work_dir or None,
            auth=auth,
            # fly.toml is the only file whose content is read: none other is fetched.
            read=[FLY_TOML],
        ) as clone:
            existing = gitrepo.read_file(clone, FLY_TOML)
            rendered = flytoml.render_fly_toml(
                app_name=input.app_name, region=input.region, env=input.env, existing=existing
            )
            # A file the rollout cannot turn into a machine config fails here, before
            # anything is committed or created.
            probe = flytoml.machine_config(rendered, image=_PROBE_IMAGE, metadata={})
            _refuse_strategy_with_mounts(input, probe)
            changed: list[str] = []
            if rendered != existing:
                gitrepo.write_file(clone, FLY_TOML, rendered)
                changed.append(FLY_TOML)
            generate = dockerfile.wants_generated_dockerfile(
                has_dockerfile=gitrepo.has_file(clone, dockerfile.DOCKERFILE),
                has_package_json=gitrepo.has_file(clone, dockerfile.PACKAGE_JSON),
                fly_toml=rendered,
            )
            if generate:
                gitrepo.write_file(clone, dockerfile.DOCKERFILE, dockerfile.render_dockerfile())
                changed.append(dockerfile.DOCKERFILE)
                if not gitrepo.has_file(clone, dockerfile.DOCKERIGNORE):
                    gitrepo.write_file(
                        clone, dockerfile.DOCKERIGNORE, dockerfile.render_dockerignore()
                    )
                    changed.append(dockerfile.DOCKERIGNORE)
            beat.step("committing")
            committed = bool(changed) and await gitrepo.commit_if_changed(
                clone,
                changed,
                message=_commit_message(input, changed),
                author=self._author,
            )
            if committed:
                beat.step("pushing")
                outcome = await gitrepo.push(clone, author=self._author)
                sha, committed = outcome.sha, outcome.pushed
                if outcome.rebased:
                    activity.logger.info(
                        "branch %s moved during the deploy; fly.toml commit replayed on it",
                        input.branch,
                    )
            else:
                sha = clone.base_sha
            activity.logger.info(
                "fly.toml for %s at %s (%s)%s",
                input.app_name,
                sha,
                "committed" if committed else "already up to date",
                ", with a generated Dockerfile" if generate else "",
            )
            return PrepareConfigResult(
                commit_sha=sha,
                committed=committed,
                fly_toml=rendered,
                merged_existing=existing is not None,
                dockerfile_generated=generate,
            )


def _refuse_strategy_with_mounts(input: PrepareConfigInput, config: dict[str, Any]) -> None:
    """A volume is attached to one machine: a canary or a green machine beside the one
    that holds it would start without it (flyctl refuses canary with mounts too)."""
    if not config.get("mounts"):
        return
    if input.strategy is Strategy.CANARY:
        raise UNSUPPORTED_STRATEGY(
            f"Canary deploy of {input.app_name} is not possible: fly.toml has [mounts], and a "
            "canary machine cannot share the volume; use the rolling or immediate strategy"
        )
    if input.strategy is Strategy.BLUEGREEN:
        raise BLUE_GREEN_WITH_VOLUMES(
            f"Blue-green deploy of {input.app_name} is not possible: fly.toml has [mounts], "
            "and a green machine cannot share the blue one's volume; use the rolling strategy"
        )


def _commit_message(input: PrepareConfigInput, paths: list[str]) -> str:
    subject = f"Deploy config for {input.app_name} ({input.deployment_id})"
    if dockerfile.DOCKERFILE not in paths:
        return subject
    return (
        f"{subject}: {', '.join(paths)}\n\n"
        "The repository had no Dockerfile: this one builds the Nitro.js server for "
        "production. It is the project's own from now on; deploys use it as committed."
    )


class _Heartbeat(PeriodicHeartbeat):
    """Heartbeats with the current step, at once on each step and then periodically."""

    def __init__(self) -> None:
        self._step = "starting"
        super().__init__(lambda: self._step)

    def step(self, name: str) -> None:
        self._step = name
        self.beat()
