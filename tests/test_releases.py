"""Release bundles in PostgreSQL: stored per deployment, listed newest first, and the last
good one found for a rollback."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest
from harness import row_version
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.deployments import (
    DeploymentActivities,
    LoadReleaseInput,
    RecordResultInput,
    RecordStartInput,
)
from core.db import DeploymentConflict, DeploymentNotFound, DeploymentStore
from core.models import (
    CheckWindow,
    DeployStatus,
    MachineOutcome,
    MachineSnapshot,
    ReleaseRecord,
    ReleaseSnapshot,
    SecretVersion,
    Strategy,
)
from core.settings import Settings

FLY_TOML = (
    'app = "turbobackend-x"\nprimary_region = "iad"\n\n[http_service]\n  internal_port = 3000\n'
)


@pytest.fixture
def activities(store: DeploymentStore) -> DeploymentActivities:
    return DeploymentActivities(store, Settings())


def _deployment_id() -> str:
    return f"d-{uuid.uuid4().hex[:16]}"


def _release(
    project_id: str,
    deployment_id: str,
    *,
    status: DeployStatus = DeployStatus.DEPLOYED,
    image: str = "registry.fly.io/app:1",
    created_at: int | None = None,
    snapshot: bool = True,
) -> ReleaseRecord:
    app = f"turbobackend-{project_id}"
    machine = MachineSnapshot(
        machine_id="m1",
        region="iad",
        state="started",
        instance_id="01HX",
        config={"image": image, "env": {"GREETING": "hello"}, "metadata": {"a": "b"}},
    )
    return ReleaseRecord(
        deployment_id=deployment_id,
        project_id=project_id,
        app_name=app,
        status=status,
        strategy=Strategy.CANARY,
        image=image,
        image_digest="sha256:" + "a" * 64,
        commit_sha="c0ffee",
        fly_toml=FLY_TOML,
        env={"GREETING": "hello", "EMPTY": ""},
        secrets=[SecretVersion(name="API_KEY", parameter="/apps/x/api_key", version=3)],
        machines=[MachineOutcome(machine_id="m1", action="updated", instance_id="01HX")],
        snapshot=ReleaseSnapshot(app_name=app, machines=[machine]) if snapshot else None,
        created_at=created_at,
    )


async def _deploy(
    store: DeploymentStore,
    project_id: str,
    *,
    status: DeployStatus = DeployStatus.DEPLOYED,
    created_at: int | None = None,
    image: str = "registry.fly.io/app:1",
) -> ReleaseRecord:
    """A deployment as the workflow records it: started, release, result."""
    deployment_id = _deployment_id()
    await store.record_started(
        deployment_id=deployment_id,
        project_id=project_id,
        app_name=f"turbobackend-{project_id}",
        url=f"https://turbobackend-{project_id}.fly.dev",
    )
    release = _release(project_id, deployment_id, status=status, created_at=created_at, image=image)
    await store.record_release(release)
    await store.record_result(deployment_id, status)
    return release


def _same(stored: ReleaseRecord | None, expected: ReleaseRecord) -> None:
    assert stored is not None
    if expected.created_at is None:
        assert stored.created_at is not None and stored.created_at > 1_600_000_000
        stored = stored.model_copy(update={"created_at": None})
    assert stored == expected


# -------------------------------------------------------------------------------- store


async def test_a_release_round_trips_and_a_repeat_writes_nothing(
    store: DeploymentStore, pool: asyncpg.Pool[asyncpg.Record], schema: str, project_id: str
) -> None:
    release = await _deploy(store, project_id)
    stored = await store.release(release.deployment_id)
    _same(stored, release)
    assert stored is not None and stored.snapshot is not None
    assert stored.snapshot.image == "registry.fly.io/app:1"

    version = await row_version(pool, schema, "releases", release.deployment_id)
    await store.record_release(release)  # a retried attempt
    assert await row_version(pool, schema, "releases", release.deployment_id) == version
    assert await store.release(release.deployment_id) == stored
    assert await store.release("d-none") is None

    # Secrets are stored as names, parameters and versions; nothing else has a place.
    raw = await pool.fetchval(
        f'SELECT secrets::text FROM "{schema}".releases WHERE deployment_id = $1',
        release.deployment_id,
    )
    assert json.loads(raw) == [{"name": "API_KEY", "parameter": "/apps/x/api_key", "version": 3}]


async def test_a_changed_bundle_replaces_the_stored_one_but_keeps_its_date(
    store: DeploymentStore, project_id: str
) -> None:
    release = await _deploy(store, project_id, created_at=1_700_000_000)
    later = release.model_copy(
        update={"status": DeployStatus.ROLLED_BACK, "created_at": 1_800_000_000, "snapshot": None}
    )
    await store.record_release(later)
    stored = await store.release(release.deployment_id)
    assert stored == later.model_copy(update={"created_at": 1_700_000_000})


async def test_a_release_keeps_the_image_it_tried_beside_the_one_serving(
    store: DeploymentStore, pool: asyncpg.Pool[asyncpg.Record], schema: str, project_id: str
) -> None:
    release = await _deploy(store, project_id, image="registry.fly.io/app:1")
    assert (await store.release(release.deployment_id)).serving_image is None  # type: ignore[union-attr]
    rolled_back = _release(
        project_id, release.deployment_id, status=DeployStatus.ROLLED_BACK, image="r.fly.io/app:2"
    ).model_copy(update={"serving_image": "registry.fly.io/app:1", "created_at": None})
    await store.record_release(rolled_back)
    stored = await store.release(release.deployment_id)
    assert stored is not None
    assert (stored.image, stored.serving_image) == ("r.fly.io/app:2", "registry.fly.io/app:1")
    [listed] = await store.releases(project_id)
    assert listed.model_dump(mode="json")["serving_image"] == "registry.fly.io/app:1"

    # Only what serves changes: that is a changed bundle too.
    version = await row_version(pool, schema, "releases", release.deployment_id)
    await store.record_release(rolled_back.model_copy(update={"serving_image": None}))
    assert await row_version(pool, schema, "releases", release.deployment_id) != version
    assert (await store.release(release.deployment_id)).serving_image is None  # type: ignore[union-attr]


async def test_releases_are_listed_newest_first(store: DeploymentStore, project_id: str) -> None:
    old = await _deploy(store, project_id, created_at=1_700_000_100)
    # Two releases within the same second: the later recorded comes first.
    first = await _deploy(store, project_id, created_at=1_700_000_200)
    second = await _deploy(store, project_id, created_at=1_700_000_200, status=DeployStatus.FAILED)
    await _deploy(store, f"{project_id}-other", created_at=1_700_000_300)

    releases = await store.releases(project_id)
    assert [r.deployment_id for r in releases] == [
        second.deployment_id,
        first.deployment_id,
        old.deployment_id,
    ]
    assert releases[1] == first
    assert [r.deployment_id for r in await store.releases(project_id, limit=1)] == [
        second.deployment_id
    ]
    assert await store.releases("nobody") == []
    with pytest.raises(ValueError):
        await store.releases(project_id, limit=0)


async def test_last_good_release_skips_failures_and_newer_releases(
    store: DeploymentStore, project_id: str
) -> None:
    assert await store.last_good_release(project_id) is None
    a = await _deploy(store, project_id, created_at=1_700_000_100)
    b = await _deploy(store, project_id, created_at=1_700_000_200)
    await _deploy(store, project_id, created_at=1_700_000_300, status=DeployStatus.FAILED)
    await _deploy(store, project_id, created_at=1_700_000_400, status=DeployStatus.ROLLED_BACK)
    c = await _deploy(store, project_id, created_at=1_700_000_500)
    await _deploy(store, f"{project_id}-other", created_at=1_700_000_900)

    async def last_good(before: str | None = None) -> str | None:
        found = await store.last_good_release(project_id, before_deployment_id=before)
        return None if found is None else found.deployment_id

    assert await last_good() == c.deployment_id
    assert await last_good(c.deployment_id) == b.deployment_id
    assert await last_good(b.deployment_id) == a.deployment_id
    assert await last_good(a.deployment_id) is None
    # A deployment without a release of this project is only excluded, never a boundary.
    assert await last_good("d-unknown") == c.deployment_id
    # A release marked rolled back after the fact is no longer good.
    await store.record_release(c.model_copy(update={"status": DeployStatus.ROLLED_BACK}))
    assert await last_good() == b.deployment_id


async def test_a_release_needs_its_deployment_and_the_same_project(
    store: DeploymentStore, project_id: str
) -> None:
    with pytest.raises(DeploymentNotFound, match="no record"):
        await store.record_release(_release(project_id, _deployment_id()))
    release = await _deploy(store, project_id)
    with pytest.raises(DeploymentConflict, match=f"belongs to project {project_id}"):
        await store.record_release(release.model_copy(update={"project_id": "someone-else"}))
    assert await store.release(release.deployment_id) == (await store.releases(project_id))[0]


# --------------------------------------------------------------------------- activities


async def test_record_and_load_releases_through_activities(
    store: DeploymentStore, activities: DeploymentActivities, project_id: str
) -> None:
    env = ActivityEnvironment()
    releases = []
    for n in range(3):
        deployment_id = _deployment_id()
        await store.record_started(
            deployment_id=deployment_id,
            project_id=project_id,
            app_name=f"turbobackend-{project_id}",
            url="https://x.fly.dev",
        )
        release = _release(
            project_id, deployment_id, created_at=1_700_000_000 + n, image=f"r.fly.io/app:{n}"
        )
        await store.record_release(release)
        await store.record_release(release)  # a retried attempt
        releases.append(release)

    # By default: the release before the one running now.
    loaded = await env.run(activities.load_release, LoadReleaseInput(project_id=project_id))
    assert loaded == releases[1]
    named = LoadReleaseInput(project_id=project_id, deployment_id=releases[0].deployment_id)
    assert await env.run(activities.load_release, named) == releases[0]


async def test_a_missing_release_is_a_final_failure(
    store: DeploymentStore, activities: DeploymentActivities, project_id: str
) -> None:
    env = ActivityEnvironment()

    async def failure(input: LoadReleaseInput) -> ApplicationError:
        with pytest.raises(ApplicationError) as caught:
            await env.run(activities.load_release, input)
        return caught.value

    none = await failure(LoadReleaseInput(project_id=project_id))
    assert (none.type, none.non_retryable) == ("ReleaseNotFound", True)
    assert f"project {project_id} has no deployed release" in str(none)

    only = await _deploy(store, project_id)
    single = await failure(LoadReleaseInput(project_id=project_id))
    assert (single.type, single.non_retryable) == ("ReleaseNotFound", True)
    assert f"before {only.deployment_id}" in str(single)

    unknown = await failure(LoadReleaseInput(project_id=project_id, deployment_id="d-nope"))
    assert (unknown.type, unknown.non_retryable) == ("ReleaseNotFound", True)
    assert "d-nope" in str(unknown)
    # Another project's release is not this project's.
    foreign = await failure(
        LoadReleaseInput(project_id=f"{project_id}-x", deployment_id=only.deployment_id)
    )
    assert foreign.type == "ReleaseNotFound"

    failed = await _deploy(store, project_id, status=DeployStatus.FAILED)
    not_good = await failure(
        LoadReleaseInput(project_id=project_id, deployment_id=failed.deployment_id)
    )
    assert (not_good.type, not_good.non_retryable) == ("ReleaseNotRestorable", True)
    assert "ended failed" in str(not_good)


async def test_recording_a_release_of_an_unknown_deployment_is_a_final_failure(
    activities: DeploymentActivities, project_id: str
) -> None:
    env = ActivityEnvironment()
    release = _release(project_id, _deployment_id())
    recorded = RecordResultInput(
        deployment_id=release.deployment_id, status=DeployStatus.DEPLOYED, release=release
    )
    with pytest.raises(ApplicationError) as caught:
        await env.run(activities.record_result, recorded)
    assert (caught.value.type, caught.value.non_retryable) == ("DeploymentNotFound", True)


async def test_a_release_without_snapshot_cannot_be_loaded(
    store: DeploymentStore, activities: DeploymentActivities, project_id: str
) -> None:
    deployment_id = _deployment_id()
    await store.record_started(
        deployment_id=deployment_id,
        project_id=project_id,
        app_name=f"turbobackend-{project_id}",
        url="https://x.fly.dev",
    )
    await store.record_release(_release(project_id, deployment_id, snapshot=False))
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            activities.load_release,
            LoadReleaseInput(project_id=project_id, deployment_id=deployment_id),
        )
    assert caught.value.type == "ReleaseNotRestorable"
    assert "no snapshot" in str(caught.value)


async def test_record_started_hands_on_checks_and_secrets_of_the_last_good_release(
    store: DeploymentStore, activities: DeploymentActivities, project_id: str
) -> None:
    env = ActivityEnvironment()

    def start() -> RecordStartInput:
        return RecordStartInput(
            deployment_id=_deployment_id(),
            project_id=project_id,
            app_name=f"turbobackend-{project_id}",
            workflow_id=f"deploy-{project_id}",
            run_id="r",
        )

    first = await env.run(activities.record_started, start())
    assert first.checks_hint is None and first.previous_secrets is None
    assert first.previous_image is None
    good = await _deploy(store, project_id, created_at=1_700_000_000)
    machines = [
        MachineOutcome(
            machine_id=f"m{n}",
            action="updated",
            checks_passed=CheckWindow(failing_until=at - 0.2, passing_at=at),
        )
        for n, at in enumerate([4.0, 2.5, 3.0])
    ]
    await store.record_release(good.model_copy(update={"machines": machines}))
    failed = await _deploy(store, project_id, created_at=1_700_000_100, status=DeployStatus.FAILED)
    slow = [m.model_copy(update={"checks_passed": CheckWindow(failing_until=0, passing_at=60)})
            for m in machines]  # fmt: skip
    await store.record_release(failed.model_copy(update={"machines": slow}))

    await store.record_release(
        failed.model_copy(
            update={"secrets": [SecretVersion(name="API_KEY", parameter="/x", version=9)]}
        )
    )

    started = await env.run(activities.record_started, start())
    assert started.checks_hint == CheckWindow(failing_until=2.8, passing_at=3.0)
    # The secrets to put back are the last good release's, not the failed one's.
    assert started.previous_secrets == good.secrets != []
    assert started.previous_image == good.image  # what serves until the rollout
    stored = await store.release(good.deployment_id)
    assert stored is not None and stored.machines == machines  # kept in the bundle
