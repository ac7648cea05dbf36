"""App-scoped deploy tokens: what the emulator mints and refuses, what the Fly client
sends, the worker's cache of them, and that a flyctl child only ever holds its app's."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import ssm_settings
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from test_build import deploy_input, invocations, make_repo

from activities._deploy_tokens import AppTokens
from activities.build import BuildActivities, BuildInput, flaps_base_url
from activities.secrets import CredentialStore
from core.models import app_name_for
from core.settings import Settings
from flyapi import FlyClient, FlyForbidden, FlyUnauthorized
from flysim import FlySim, SimConfig
from flysim import persist as sim_persist
from flysim.tokens import parse_go_duration
from turbodeploy import embedded

MINT_ROUTE = ("POST", "/v1/apps/{app_name}/deploy_token")


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Clock:
    """Unix time that moves only when told, shared by the worker's cache and the emulator."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def minted_for(sim: Any, app: str) -> list[str]:
    return [issued.token for issued in sim.deploy_tokens.issued if issued.app == app]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def settings(ssm_endpoint: str, flysim: Any, tmp_path: Path) -> Settings:
    return ssm_settings(
        ssm_endpoint, fly_api_base_url=flysim.base_url, work_dir=str(tmp_path / "work")
    )


@pytest.fixture
def credentials(settings: Settings) -> CredentialStore:
    return CredentialStore(settings)


@pytest.fixture
async def org_fly(settings: Settings, fly_token: str) -> AsyncIterator[FlyClient]:
    async with FlyClient(settings.fly_api_base_url, fly_token) as client:
        yield client


@pytest.fixture
async def make_app(org_fly: FlyClient) -> Callable[[], Any]:
    async def make() -> str:
        name = app_name_for(f"tok-{uuid.uuid4().hex[:8]}")
        await org_fly.create_app(name, "personal")
        return name

    return make


@pytest.fixture
def clock(flysim: Any) -> Iterator[Clock]:
    """A clock for the worker's cache and the emulator's expiry alike."""
    import time

    moved = Clock(time.time())
    original = flysim.deploy_tokens.clock
    flysim.deploy_tokens.clock = moved
    yield moved
    flysim.deploy_tokens.clock = original


# ------------------------------------------------------------------ the emulator's side


async def test_a_deploy_token_manages_its_app_and_nothing_else(
    org_fly: FlyClient, make_app: Callable[[], Any], settings: Settings, flysim: Any
) -> None:
    app, other = await make_app(), await make_app()
    minted = await org_fly.create_deploy_token(app, expiry=3600)
    assert minted.token.startswith("FlyV1 fm2_")
    assert minted.token not in repr(minted)
    assert minted_for(flysim, app) == [minted.token]

    async with FlyClient(settings.fly_api_base_url, minted.token) as scoped:
        # Its own app: read it, make a machine, lease it, set a secret.
        assert (await scoped.get_app(app)) is not None
        machine = await scoped.create_machine(app, {"image": "registry.fly.io/x:1"}, "iad")
        lease = await scoped.acquire_lease(app, machine.id, 30)
        await scoped.release_lease(app, machine.id, lease.nonce)
        await scoped.set_secrets(app, {"A": "b"})

        # Another app of the same organisation, the org's app list, a new app, a token:
        # refused as the Machines API refuses them (fly-go: 403 {"error": "unauthorized"}).
        with pytest.raises(FlyForbidden) as caught:
            await scoped.get_app(other)
        assert "unauthorized" in str(caught.value)
        with pytest.raises(FlyForbidden):
            await scoped.list_machines(other)
        with pytest.raises(FlyForbidden):
            await scoped.create_machine(other, {"image": "registry.fly.io/x:1"}, "iad")
        with pytest.raises(FlyForbidden):
            await scoped.create_app(app_name_for(f"tok-{uuid.uuid4().hex[:8]}"), "personal")
        with pytest.raises(FlyForbidden):
            await scoped.create_deploy_token(app, expiry=3600)
    # Nothing was made in the other app.
    assert await org_fly.list_machines(other) == []
    # The logs beside the Machines API follow the same rule.
    async with httpx.AsyncClient() as http:
        root = flysim.base_url.removesuffix("/v1")
        headers = {"Authorization": minted.token}
        own = await http.get(f"{root}/api/v1/apps/{app}/logs", headers=headers)
        theirs = await http.get(f"{root}/api/v1/apps/{other}/logs", headers=headers)
    assert (own.status_code, theirs.status_code) == (200, 403)


async def test_deploy_tokens_expire_and_die_with_their_app(
    org_fly: FlyClient, make_app: Callable[[], Any], settings: Settings, clock: Clock
) -> None:
    app = await make_app()
    minted = await org_fly.create_deploy_token(app, expiry=600)
    async with FlyClient(settings.fly_api_base_url, minted.token) as scoped:
        clock.now += 599
        assert (await scoped.get_app(app)) is not None
        clock.now += 1
        with pytest.raises(FlyUnauthorized) as caught:
            await scoped.get_app(app)
        assert "expired" in str(caught.value)

    # A token of a deleted app does not work on a new app of the same name.
    second = await org_fly.create_deploy_token(app, expiry=600)
    await org_fly.delete_app(app)
    await org_fly.create_app(app, "personal")
    async with FlyClient(settings.fly_api_base_url, second.token) as scoped:
        with pytest.raises(FlyUnauthorized):
            await scoped.get_app(app)


async def test_the_expiry_is_a_go_duration(
    org_fly: FlyClient, make_app: Callable[[], Any], settings: Settings, fly_token: str
) -> None:
    app = await make_app()
    assert parse_go_duration("2h0m0s") == parse_go_duration("7200s") == 7200
    assert parse_go_duration("1.5h") == 5400
    with pytest.raises(ValueError):
        parse_go_duration("2 hours")

    async with httpx.AsyncClient(
        base_url=settings.fly_api_base_url, headers={"Authorization": f"Bearer {fly_token}"}
    ) as http:
        # flyctl's form of `--expiry` (time.Duration.String()), and none: 20 years.
        for body in ({"expiry": "1h0m0s"}, {}):
            answer = await http.post(f"/apps/{app}/deploy_token", json=body)
            assert answer.status_code == 200 and set(answer.json()) == {"token"}
        bad = await http.post(f"/apps/{app}/deploy_token", json={"expiry": "soon"})
        assert bad.status_code == 400 and "duration" in bad.json()["error"]
        missing = await http.post("/apps/no-such-app-here/deploy_token", json={})
        assert missing.status_code == 404


async def test_the_client_asks_for_whole_seconds_and_counts_from_before_sending() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"token": "FlyV1 fm2_abc"})

    import time

    before = time.time()
    async with FlyClient(
        "https://api.machines.dev/v1", "org", transport=httpx.MockTransport(answer)
    ) as fly:
        minted = await fly.create_deploy_token("turbobackend-p1", expiry=3599.2)
    [request] = seen
    assert request.url.path == "/v1/apps/turbobackend-p1/deploy_token"
    assert json.loads(request.content) == {"expiry": "3600s"}
    assert request.headers["authorization"] == "Bearer org"
    assert before + 3600 <= minted.expires_at <= time.time() + 3600
    assert minted.app == "turbobackend-p1" and minted.token == "FlyV1 fm2_abc"


async def test_a_restarted_emulator_still_accepts_the_tokens_it_minted(fly_token: str) -> None:
    first = FlySim(SimConfig(tokens={fly_token: "personal"}))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=first.app), base_url="http://sim/v1"
    ) as http:
        headers = {"Authorization": f"Bearer {fly_token}"}
        await http.post("/apps", json={"name": "kept-app", "org_slug": "personal"}, headers=headers)
        token = (await http.post("/apps/kept-app/deploy_token", json={}, headers=headers)).json()[
            "token"
        ]
    saved = json.dumps(sim_persist.dump(first))
    assert token not in saved and token.split("fm2_")[1][:24] not in saved

    second = FlySim(SimConfig(tokens={fly_token: "personal"}))
    sim_persist.restore(second, json.loads(saved))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=second.app), base_url="http://sim/v1"
    ) as http:
        answer = await http.get("/apps/kept-app", headers={"Authorization": token})
    assert answer.status_code == 200


# --------------------------------------------------------------------- the worker's cache


async def test_a_token_is_reused_until_shortly_before_it_expires(
    credentials: CredentialStore,
    settings: Settings,
    make_app: Callable[[], Any],
    flysim: Any,
    clock: Clock,
) -> None:
    settings = settings.model_copy(
        update={"fly_deploy_token_seconds": 3600, "fly_deploy_token_margin_seconds": 300}
    )
    tokens = AppTokens(credentials, settings, clock=clock)
    app, other = await make_app(), await make_app()
    mints = flysim.stats.by_route[MINT_ROUTE]

    first = await tokens.token_for(app, valid_for=600)
    assert minted_for(flysim, app) == [first]
    # Concurrent children of one app share one mint; another app gets its own token.
    again = await asyncio.gather(*(tokens.token_for(app, valid_for=600) for _ in range(5)))
    assert set(again) == {first}
    assert await tokens.token_for(other, valid_for=600) == minted_for(flysim, other)[0] != first
    assert flysim.stats.by_route[MINT_ROUTE] - mints == 2 and tokens.minted == 2

    # Reused while it outlives a 10-minute child by the 5-minute margin: 45 minutes on,
    # 15 minutes are left, exactly enough.
    clock.now += 2700
    assert await tokens.token_for(app, valid_for=600) == first
    # One second later it is not: a new token, minted before the old one expired.
    clock.now += 1
    fresh = await tokens.token_for(app, valid_for=600)
    assert fresh != first and minted_for(flysim, app) == [first, fresh]
    async with FlyClient(settings.fly_api_base_url, first) as old:
        assert await old.get_app(app) is not None  # the old one still worked when replaced
    # A child that may run longer than the configured lifetime gets a longer token.
    long_run = await tokens.token_for(app, valid_for=5 * 3600)
    assert long_run != fresh
    [issued] = [i for i in flysim.deploy_tokens.issued if i.token == long_run]
    assert issued.expires_at - clock.now >= 5 * 3600 + 300
    # Forgotten after flyctl was refused: the next child gets a new one.
    tokens.invalidate(app)
    assert await tokens.token_for(app, valid_for=600) not in {first, fresh, long_run}


async def test_a_worker_whose_fly_token_cannot_mint_says_what_to_fix(
    ssm: Any,
    settings: Settings,
    org_fly: FlyClient,
    make_app: Callable[[], Any],
) -> None:
    app = await make_app()
    # The worker was given a deploy token (of another app) instead of an org token.
    deploy_token = (await org_fly.create_deploy_token(await make_app(), expiry=3600)).token
    parameter = f"/turbobackend/flyio/deploy-{uuid.uuid4().hex[:8]}"
    ssm.put_parameter(Name=parameter, Value=deploy_token, Type="SecureString")
    settings = settings.model_copy(update={"fly_token_parameter": parameter})
    tokens = AppTokens(CredentialStore(settings), settings)

    with pytest.raises(ApplicationError) as caught:
        await tokens.token_for(app, valid_for=60)
    error = caught.value
    assert error.type == "FlyForbidden" and error.non_retryable
    assert parameter in error.message and "fly tokens create org" in error.message
    assert deploy_token not in error.message


# ------------------------------------------------------------------------- the children


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = embedded.flyctl_standin(tmp_path / "bin").parent
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}{os.environ['PATH']}")
    return path


@pytest.fixture
def argv_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "flyctl-argv.jsonl"
    monkeypatch.setenv("FLYCTL_STANDIN_ARGV_LOG", str(path))
    return path


@pytest.fixture
def run_env() -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, start_to_close_timeout=timedelta(minutes=30))
    return env


async def test_flyctl_children_hold_their_apps_deploy_token_never_the_org_token(
    bin_dir: Path,
    argv_log: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    credentials: CredentialStore,
    settings: Settings,
    org_fly: FlyClient,
    make_app: Callable[[], Any],
    run_env: ActivityEnvironment,
    fly_token: str,
    flysim: Any,
) -> None:
    app, neighbour = await make_app(), await make_app()
    remote, sha = make_repo(tmp_path, app)
    # Each child first tries to read the neighbouring app with the token it was given.
    monkeypatch.setenv("FLYCTL_STANDIN_PROBE_APP", neighbour)
    builds = BuildActivities(credentials, settings, fly=org_fly, kill_grace_seconds=2.0)

    built = await run_env.run(
        builds.build_image,
        BuildInput(deployment_id="d-1", app_name=app, repo_url=remote.url, commit_sha=sha),
    )
    # A build, a deploy, and `scale count` (three machines where flyctl's first deploy
    # makes two): every flyctl the worker starts.
    deployed = await run_env.run(
        builds.flyctl_deploy,
        deploy_input(app, remote.url, sha, "d-2", image=built.image, machine_count=3),
    )
    assert len(deployed.machine_ids) == 3

    runs = [i for i in invocations(argv_log) if "argv" in i]
    probes = [i for i in invocations(argv_log) if "probe" in i]
    assert [r["argv"][:2] for r in runs] == [
        ["deploy", "--build-only"],
        ["deploy", "--remote-only"],
        ["scale", "count"],
    ]
    [app_token] = minted_for(flysim, app)  # one token, reused by all three children
    assert {r["token_sha256"] for r in runs} == {fingerprint(app_token)}
    assert fingerprint(fly_token) not in {r["token_sha256"] for r in runs}
    assert all("FLY_API_TOKEN" in r["env"] for r in runs)
    # The neighbour was out of reach of every child.
    assert [(p["probe"], p["status"]) for p in probes] == [(neighbour, 403)] * 3
    for text in (json.dumps(invocations(argv_log)), built.output_excerpt, deployed.output_excerpt):
        assert app_token not in text and fly_token not in text


def test_the_standin_refuses_to_act_on_another_app_with_a_deploy_token(
    flysim: Any, fly_token: str, tmp_path: Path
) -> None:
    import httpx as sync_http

    headers = {"Authorization": f"Bearer {fly_token}"}
    names = [app_name_for(f"tok-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    for name in names:
        sync_http.post(
            f"{flysim.base_url}/apps", json={"name": name, "org_slug": "personal"}, headers=headers
        ).raise_for_status()
    token = sync_http.post(
        f"{flysim.base_url}/apps/{names[0]}/deploy_token", json={}, headers=headers
    ).json()["token"]
    flyctl = embedded.flyctl_standin(tmp_path / "bin")
    env = {
        "PATH": os.environ["PATH"],
        "FLY_API_TOKEN": token,
        "FLY_FLAPS_BASE_URL": flaps_base_url(flysim.base_url),
    }

    def scale(app: str) -> subprocess.CompletedProcess[str]:
        argv = [str(flyctl), "scale", "count", "0", f"--app={app}"]
        return subprocess.run(
            [*argv, "--yes"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    own = scale(names[0])
    assert own.returncode == 0, own.stderr
    other = scale(names[1])
    assert other.returncode == 1
    assert f"failed to retrieve app {names[1]}: unauthorized" in other.stderr
    assert token not in other.stdout + other.stderr
