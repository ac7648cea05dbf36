"""The Fly Machines API emulator: behaviour, faults, proxy, control API and spec conformance."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from conftest import MACHINES_SPEC, reference_file

from flysim import Faults, FlySim, SimConfig, SimTiming
from flysim.cli import parse_tokens
from flysim.spec import RECORDED, SpecChecker, SpecViolation, validate_exchange
from flysim.spec import tolerated as spec_tolerated
from turbodeploy import embedded

TOKEN = embedded.generate_fly_token()
OTHER_TOKEN = embedded.generate_fly_token()
IMAGE = "registry.fly.io/demo:deployment-01"


LEASE = "fly-machine-lease-nonce"


def service(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "protocol": "tcp",
        "internal_port": 3000,
        "ports": [{"port": 80, "handlers": ["http"]}, {"port": 443, "handlers": ["tls", "http"]}],
        "checks": [{"type": "http", "path": "/api/health", "interval": "10s", "timeout": "2s"}],
    }
    base.update(overrides)
    return base


def machine_config(image: str = IMAGE, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "image": image,
        "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
        "env": {"PORT": "3000"},
        "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"},
        "services": [service()],
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def served_sim() -> Iterator[FlySim]:
    sim = FlySim(SimConfig(tokens={TOKEN: "personal", OTHER_TOKEN: "acme"}))
    with sim.serve_in_thread():
        yield sim


@pytest.fixture
def sim(served_sim: FlySim) -> FlySim:
    served_sim.reset()
    served_sim.config.tokens = {TOKEN: "personal", OTHER_TOKEN: "acme"}
    served_sim.config.timing = SimTiming()
    served_sim.config.unhealthy_images = set()
    served_sim.config.rate_limit_rps = None
    return served_sim


@pytest_asyncio.fixture
async def api(sim: FlySim) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=sim.base_url, headers=headers, timeout=30) as client:
        yield client


ORG = {"org_slug": "personal"}


async def create_app(api: httpx.AsyncClient, name: str = "demo") -> None:
    r = await api.post("/apps", json={"name": name, "org_slug": "personal"})
    assert r.status_code == 201, r.text


async def create_machine(api: httpx.AsyncClient, app: str = "demo", **body: Any) -> dict[str, Any]:
    body.setdefault("config", machine_config())
    body.setdefault("region", "ams")
    r = await api.post(f"/apps/{app}/machines", json=body)
    assert r.status_code == 200, r.text
    machine: dict[str, Any] = r.json()
    return machine


async def wait_state(
    api: httpx.AsyncClient, machine_id: str, state: str, app: str = "demo", **params: Any
) -> httpx.Response:
    return await api.get(
        f"/apps/{app}/machines/{machine_id}/wait", params={"state": state, "timeout": 5, **params}
    )


# --------------------------------------------------------------------------- auth & apps


async def test_requests_without_a_known_token_are_refused(sim: FlySim) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        missing = await client.get("/apps", params={"org_slug": "personal"})
        wrong = await client.get("/apps/x", headers={"Authorization": "Bearer FlyV1 fm2_nope"})
        raw = await client.get("/apps", params=ORG, headers={"Authorization": TOKEN})
    assert missing.status_code == 401 and "error" in missing.json()
    assert wrong.status_code == 401
    assert raw.status_code == 200  # flyctl sends the macaroon without "Bearer"
    assert missing.headers["fly-request-id"]


async def test_apps_create_show_list_and_errors(sim: FlySim, api: httpx.AsyncClient) -> None:
    await create_app(api, "demo")
    shown = await api.get("/apps/demo")
    assert shown.status_code == 200
    assert shown.json()["organization"]["slug"] == "personal"
    assert shown.json()["name"] == "demo"

    assert (await api.get("/apps/absent")).status_code == 404

    taken = await api.post("/apps", json={"name": "demo", "org_slug": "personal"})
    assert taken.status_code == 422
    assert "already been taken" in taken.json()["error"]

    assert (await api.post("/apps", json={"name": "Bad_Name"})).status_code == 400
    assert (await api.post("/apps", json={"name": "a" * 64})).status_code == 400
    assert (await api.post("/apps", json={"name": "via-name-field"})).status_code == 201

    listed = (await api.get("/apps", params={"org_slug": "personal"})).json()
    assert {a["name"] for a in listed["apps"]} == {"demo", "via-name-field"}
    assert listed["total_apps"] == 2

    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    assert (await api.get("/apps/demo", headers=other)).status_code == 403
    # Names are global: the other organisation cannot take it either.
    r = await api.post("/apps", json={"name": "demo", "org_slug": "acme"}, headers=other)
    assert r.status_code == 422

    assert (await api.delete("/apps/demo")).status_code == 202
    assert (await api.get("/apps/demo")).status_code == 404


async def test_ip_assignments(sim: FlySim, api: httpx.AsyncClient) -> None:
    await create_app(api)
    assert (await api.get("/apps/demo/ip_assignments")).json() == {"ips": []}
    v6 = await api.post("/apps/demo/ip_assignments", json={"type": "v6"})
    v4 = await api.post("/apps/demo/ip_assignments", json={"type": "shared_v4"})
    assert v6.status_code == 200 and ":" in v6.json()["ip"] and v6.json()["shared"] is False
    assert v4.json()["shared"] is True
    ips = (await api.get("/apps/demo/ip_assignments")).json()["ips"]
    assert {ip["ip"] for ip in ips} == {v6.json()["ip"], v4.json()["ip"]}
    assert set(ips[0]) == {"ip", "region", "service_name", "shared", "created_at"}
    assert (await api.post("/apps/demo/ip_assignments", json={"type": "v5"})).status_code == 400


# ------------------------------------------------------------------------------- machines


async def test_machine_lifecycle_through_wait(sim: FlySim, api: httpx.AsyncClient) -> None:
    sim.config.timing.start_delay = 0.2
    await create_app(api)
    created = await create_machine(api)
    mid = created["id"]
    assert created["state"] == "created"
    assert len(mid) == 14 and int(mid, 16) >= 0
    assert created["image_ref"]["repository"] == "demo"
    assert created["image_ref"]["tag"] == "deployment-01"
    assert created["private_ip"].startswith("fdaa:")

    assert (await api.get(f"/apps/demo/machines/{mid}")).json()["state"] == "starting"
    began = time.monotonic()
    r = await wait_state(api, mid, "started")
    assert r.status_code == 200 and r.json()["ok"] is True
    assert time.monotonic() - began >= 0.1

    assert (await api.delete(f"/apps/demo/machines/{mid}")).status_code == 412
    assert (await api.post(f"/apps/demo/machines/{mid}/stop")).status_code == 200
    assert (await wait_state(api, mid, "stopped")).status_code == 200
    assert (await api.post(f"/apps/demo/machines/{mid}/start")).json()["previous_state"] == (
        "stopped"
    )
    assert (await wait_state(api, mid, "started")).status_code == 200
    assert (await api.post(f"/apps/demo/machines/{mid}/restart")).status_code == 200
    assert (await wait_state(api, mid, "started")).status_code == 200

    assert (await api.delete(f"/apps/demo/machines/{mid}", params={"force": "true"})).is_success
    assert (await wait_state(api, mid, "destroyed")).status_code == 200
    assert (await api.get("/apps/demo/machines")).json() == []
    deleted = (await api.get("/apps/demo/machines", params={"include_deleted": "true"})).json()
    assert [m["state"] for m in deleted] == ["destroyed"]

    events = (await api.get(f"/apps/demo/machines/{mid}/events")).json()
    kinds = [e["type"] for e in reversed(events)]
    assert kinds[0] == "launch" and "stop" in kinds and "restart" in kinds
    assert kinds[-1] == "destroy"


async def test_skip_launch_and_list_filters(sim: FlySim, api: httpx.AsyncClient) -> None:
    await create_app(api)
    kept = await create_machine(api, skip_launch=True)
    other = await create_machine(api, region="fra", config=machine_config(metadata={"x": "1"}))
    assert (await api.get(f"/apps/demo/machines/{kept['id']}")).json()["state"] == "created"
    in_ams = (await api.get("/apps/demo/machines", params={"region": "ams"})).json()
    assert [m["id"] for m in in_ams] == [kept["id"]]
    tagged = (await api.get("/apps/demo/machines", params={"metadata.x": "1"})).json()
    assert [m["id"] for m in tagged] == [other["id"]]


async def test_wait_returns_when_the_state_changes_and_408_on_timeout(
    sim: FlySim, api: httpx.AsyncClient
) -> None:
    await create_app(api)
    mid = (await create_machine(api))["id"]
    assert (await wait_state(api, mid, "started")).status_code == 200

    waiter = asyncio.create_task(wait_state(api, mid, "stopped", timeout=10))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    began = time.monotonic()
    await api.post(f"/apps/demo/machines/{mid}/stop")
    r = await asyncio.wait_for(waiter, 5)
    assert r.status_code == 200
    assert time.monotonic() - began < 1.0

    began = time.monotonic()
    timed_out = await wait_state(api, mid, "started", timeout=1)
    assert timed_out.status_code == 408
    assert 0.9 <= time.monotonic() - began < 3
    assert (await wait_state(api, mid, "started", timeout=300)).status_code == 400
    assert (await wait_state(api, mid, "running")).status_code == 400


async def test_update_replaces_config_and_changes_instance_id(
    sim: FlySim, api: httpx.AsyncClient
) -> None:
    await create_app(api)
    machine = await create_machine(api, config=machine_config(env={"OLD": "1"}))
    mid, first_instance = machine["id"], machine["instance_id"]
    await wait_state(api, mid, "started")

    new_config = machine_config(image="registry.fly.io/demo:deployment-02", env={"NEW": "1"})
    r = await api.post(f"/apps/demo/machines/{mid}", json={"config": new_config})
    assert r.status_code == 200, r.text
    updated = r.json()
    assert updated["instance_id"] != first_instance
    assert updated["state"] == "replacing"
    assert updated["config"]["env"] == {"NEW": "1"}  # replaced whole, not merged
    ok = await wait_state(api, mid, "started", instance_id=updated["instance_id"])
    assert ok.status_code == 200
    # The replaced version counts as stopped.
    assert (await wait_state(api, mid, "stopped", instance_id=first_instance)).status_code == 200

    versions = (await api.get(f"/apps/demo/machines/{mid}/versions")).json()
    assert [v["version"] for v in versions] == [updated["instance_id"], first_instance]

    await api.post(f"/apps/demo/machines/{mid}/stop")
    await wait_state(api, mid, "stopped")
    r = await api.post(
        f"/apps/demo/machines/{mid}", json={"config": machine_config(), "skip_launch": True}
    )
    assert r.status_code == 200
    assert (await api.get(f"/apps/demo/machines/{mid}")).json()["state"] == "stopped"


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"guest": {"memory_mb": 256}}, "image"),
        (machine_config(guest={"cpu_kind": "shared", "cpus": 1, "memory_mb": 300}), "memory"),
        (machine_config(services=[service(internal_port=70000)]), "internal_port"),
        (machine_config(services=[service(checks=[{"interval": "10"}])]), "interval"),
        (machine_config(env={"PORT": 3000}), "env"),
    ],
)
async def test_invalid_machine_configs_are_refused(
    sim: FlySim, api: httpx.AsyncClient, config: dict[str, Any], fragment: str
) -> None:
    await create_app(api)
    r = await api.post("/apps/demo/machines", json={"config": config, "region": "ams"})
    assert r.status_code == 422
    assert fragment in r.json()["error"]
    assert (await api.get("/apps/demo/machines")).json() == []


# --------------------------------------------------------------------------------- leases


async def test_lease_conflict_and_nonce_flow(sim: FlySim, api: httpx.AsyncClient) -> None:
    await create_app(api)
    mid = (await create_machine(api))["id"]
    url = f"/apps/demo/machines/{mid}"

    got = await api.post(f"{url}/lease", json={"ttl": 10, "description": "deploy"})
    assert got.status_code == 201 and got.json()["status"] == "success"
    lease = got.json()["data"]
    nonce = lease["nonce"]
    assert isinstance(lease["expires_at"], int) and lease["expires_at"] > time.time()

    conflict = await api.post(f"{url}/lease", json={"ttl": 10})
    assert conflict.status_code == 409
    assert conflict.json()["status"] == "error" and "held" in conflict.json()["message"]
    assert (await api.post(url, json={"config": machine_config()})).status_code == 409
    assert (await api.post(f"{url}/stop")).status_code == 409
    assert sim.stats.lease_conflicts == 3

    held = {"fly-machine-lease-nonce": nonce}
    refreshed = await api.post(f"{url}/lease", json={"ttl": 60}, headers=held)
    assert refreshed.json()["data"]["nonce"] == nonce
    assert refreshed.json()["data"]["expires_at"] > lease["expires_at"]
    assert (await api.post(url, json={"config": machine_config()}, headers=held)).is_success
    assert (await api.get(f"{url}/lease")).json()["data"]["nonce"] == nonce

    wrong = {"fly-machine-lease-nonce": "0123456789ab"}
    assert (await api.delete(f"{url}/lease", headers=wrong)).status_code == 409
    assert (await api.delete(f"{url}/lease", headers=held)).status_code == 200
    assert (await api.delete(f"{url}/lease", headers=held)).status_code == 404
    assert (await api.get(f"{url}/lease")).status_code == 404

    # fly-go puts the ttl in the query string.
    by_query = await api.post(f"{url}/lease", params={"ttl": 5})
    assert by_query.status_code == 201
    assert by_query.json()["data"]["expires_at"] <= time.time() + 6


async def test_a_lease_lapses_after_its_ttl_and_its_nonce_with_it(
    sim: FlySim, api: httpx.AsyncClient
) -> None:
    """What fly-go and flyctl rely on: a refresh with the holder's nonce keeps the nonce;
    a lapsed lease frees the machine; its old nonce then takes a new lease (the header is
    "existing lease nonce to refresh by ttl, empty or non-existent to create a new lease"),
    and is refused once someone else holds the machine."""
    await create_app(api)
    mid = (await create_machine(api))["id"]
    url = f"/apps/demo/machines/{mid}"
    nonce = (await api.post(f"{url}/lease", json={"ttl": 13})).json()["data"]["nonce"]
    held = {"fly-machine-lease-nonce": nonce}
    again = (await api.post(f"{url}/lease", json={"ttl": 13}, headers=held)).json()["data"]
    assert again["nonce"] == nonce

    def lapse() -> None:
        lease = sim.world.apps["demo"].machines[mid].lease
        assert lease is not None
        lease.expires_at = time.time() - 0.01

    lapse()
    assert (await api.get(f"{url}/lease")).status_code == 404
    assert (await api.post(f"{url}/cordon")).status_code == 200, "a lapsed lease still held"
    assert sim.snapshot()["leases"] == []

    renewed = await api.post(f"{url}/lease", json={"ttl": 13}, headers=held)
    assert renewed.status_code == 201
    fresh = renewed.json()["data"]["nonce"]
    assert fresh != nonce
    assert (await api.post(f"{url}/uncordon", headers=held)).status_code == 409
    lapse()
    theirs = (await api.post(f"{url}/lease", json={"ttl": 13})).json()["data"]["nonce"]
    refused = await api.post(f"{url}/lease", json={"ttl": 13}, headers={LEASE: fresh})
    assert refused.status_code == 409
    assert (await api.delete(f"{url}/lease", headers={LEASE: fresh})).status_code == 409
    assert (await api.delete(f"{url}/lease", headers={LEASE: theirs})).status_code == 200


async def test_create_with_lease_ttl_returns_a_nonce(sim: FlySim, api: httpx.AsyncClient) -> None:
    await create_app(api)
    machine = await create_machine(api, lease_ttl=30)
    url = f"/apps/demo/machines/{machine['id']}"
    assert machine["nonce"]
    assert (await api.get(f"{url}/lease")).json()["data"]["nonce"] == machine["nonce"]
    assert (await api.post(f"{url}/cordon")).status_code == 409
    ok = await api.post(f"{url}/cordon", headers={"fly-machine-lease-nonce": machine["nonce"]})
    assert ok.status_code == 200


async def test_metadata(sim: FlySim, api: httpx.AsyncClient) -> None:
    await create_app(api)
    url = f"/apps/demo/machines/{(await create_machine(api))['id']}"
    assert (await api.post(f"{url}/metadata/release", json={"value": "7"})).status_code == 204
    assert (await api.get(f"{url}/metadata")).json()["release"] == "7"
    assert (await api.delete(f"{url}/metadata/release")).status_code == 204
    assert "release" not in (await api.get(f"{url}/metadata")).json()


# --------------------------------------------------------------------------------- faults


async def test_error_rate_fails_every_request_without_side_effects(
    sim: FlySim, api: httpx.AsyncClient
) -> None:
    sim.config.faults = Faults(error_rate=1.0, seed=1)
    codes = set()
    for i in range(12):
        r = await api.post("/apps", json={"name": f"app-{i}", "org_slug": "personal"})
        codes.add(r.status_code)
        assert "error" in r.json()
    assert codes <= {500, 502, 503} and len(codes) > 1
    assert sim.world.apps == {}
    sim.config.faults = Faults()
    await create_app(api, "app-0")
    assert set(sim.world.apps) == {"app-0"}


async def test_rate_limit_fault_sends_retry_after(sim: FlySim, api: httpx.AsyncClient) -> None:
    sim.config.faults = Faults(rate_limit_rate=1.0, retry_after=3)
    r = await api.post("/apps", json={"name": "demo", "org_slug": "personal"})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert sim.world.apps == {}
    assert sim.stats.rate_limited == 1


async def test_dropped_connections_raise_transport_errors_without_side_effects(
    sim: FlySim, api: httpx.AsyncClient
) -> None:
    sim.config.faults.drop_rate = 1.0
    with pytest.raises(httpx.TransportError):
        await api.post("/apps", json={"name": "demo", "org_slug": "personal"})
    assert sim.world.apps == {}
    assert sim.request_log[-1][3] == 0


async def test_seeded_faults_repeat_and_latency_applies(
    sim: FlySim, api: httpx.AsyncClient
) -> None:
    async def run() -> list[int]:
        sim.config.faults = Faults(error_rate=0.5, seed=42)
        return [(await api.get("/apps", params=ORG)).status_code for _ in range(20)]

    first, second = await run(), await run()
    assert first == second
    assert 200 in first and any(code >= 500 for code in first)

    sim.config.faults = Faults(latency_spike_rate=1.0, latency_spike=0.2)
    began = time.monotonic()
    await api.get("/apps", params=ORG)
    assert time.monotonic() - began >= 0.2


async def test_global_rate_limit_and_max_rps(sim: FlySim, api: httpx.AsyncClient) -> None:
    sim.config.rate_limit_rps = 5
    results = await asyncio.gather(*(api.get("/apps", params=ORG) for _ in range(20)))
    codes = [r.status_code for r in results]
    assert codes.count(200) <= 6 and codes.count(429) >= 14
    assert sim.stats.max_rps_observed >= 20
    assert sim.stats.by_route[("GET", "/v1/apps")] == 20


# ---------------------------------------------------------------------------------- proxy


async def test_scale_to_zero_wakes_a_machine_through_the_app_url(
    sim: FlySim, api: httpx.AsyncClient
) -> None:
    sim.config.timing.start_delay = 0.2
    sim.config.timing.healthy_after = 0.1
    await create_app(api)
    config = machine_config(services=[service(autostart=True, autostop="stop")])
    mid = (await create_machine(api, config=config))["id"]
    await wait_state(api, mid, "started")
    await api.post(f"/apps/demo/machines/{mid}/stop")
    await wait_state(api, mid, "stopped")

    began = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as public:
        r = await public.get(sim.app_url_template.format(app="demo") + "/api/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["image"] == IMAGE
    assert time.monotonic() - began >= 0.25
    assert (await api.get(f"/apps/demo/machines/{mid}")).json()["state"] == "started"
    assert sim.stats.proxy_wakeups == 1

    # Idle machines stop themselves once autostop_after has passed.
    sim.config.timing.autostop_after = 0.2
    await asyncio.sleep(0.3)
    assert (await api.get(f"/apps/demo/machines/{mid}")).json()["state"] == "stopped"


async def test_unhealthy_image_fails_checks_and_public_health(
    sim: FlySim, api: httpx.AsyncClient
) -> None:
    bad = "registry.fly.io/demo:broken"
    sim.config.unhealthy_images = {bad}
    await create_app(api)
    mid = (await create_machine(api, config=machine_config(image=bad)))["id"]
    await wait_state(api, mid, "started")
    checks = (await api.get(f"/apps/demo/machines/{mid}")).json()["checks"]
    assert checks and {c["status"] for c in checks} == {"critical"}
    async with httpx.AsyncClient() as public:
        assert (await public.get(sim.app_url("demo") + "/api/health")).status_code == 503
        assert (await public.get(sim.app_url("absent") + "/api/health")).status_code == 404


async def test_checks_pass_after_healthy_after(sim: FlySim, api: httpx.AsyncClient) -> None:
    sim.config.timing.healthy_after = 0.3
    await create_app(api)
    mid = (await create_machine(api))["id"]
    await wait_state(api, mid, "started")
    first = (await api.get(f"/apps/demo/machines/{mid}")).json()["checks"]
    assert [c["status"] for c in first] == ["warning"]
    await asyncio.sleep(0.35)
    later = (await api.get(f"/apps/demo/machines/{mid}")).json()["checks"]
    assert [c["status"] for c in later] == ["passing"]

    bare = await create_machine(api, config=machine_config(services=[]))
    assert bare["checks"] == []
    async with httpx.AsyncClient() as public:
        # The app has a routable, healthy machine now; the one without services is ignored.
        assert (await public.get(sim.app_url("demo") + "/")).status_code == 200


async def test_app_without_machines_answers_503(sim: FlySim, api: httpx.AsyncClient) -> None:
    await create_app(api)
    async with httpx.AsyncClient() as public:
        assert (await public.get(sim.app_url("demo") + "/api/health")).status_code == 503


# ------------------------------------------------------------- control API, logs, ASGI


async def test_control_api(sim: FlySim, api: httpx.AsyncClient) -> None:
    await create_app(api)
    await create_machine(api, lease_ttl=30)
    root = sim.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(base_url=root) as control:
        state = (await control.get("/_sim/state")).json()
        assert [a["name"] for a in state["apps"]] == ["demo"]
        assert len(state["machines"]) == 1 and len(state["leases"]) == 1
        assert state["counters"]["total_requests"] == 2
        assert TOKEN not in json.dumps(state)
        other = (await control.get("/_sim/state", params={"app": "other"})).json()
        assert other["apps"] == other["machines"] == other["leases"] == []
        assert other["counters"]["total_requests"] == 2
        assert len((await control.get("/_sim/state", params={"app": "demo"})).json()["leases"]) == 1

        r = await control.post("/_sim/config", json={"timing": {"start_delay": 0.5}})
        assert r.status_code == 200 and r.json()["timing"]["start_delay"] == 0.5
        assert sim.config.timing.start_delay == 0.5
        assert sim.config.timing.stop_delay == 0.0  # partial update keeps the rest
        bad = await control.post("/_sim/config", json={"faults": {"error_rate": 3}})
        assert bad.status_code == 400 and sim.config.faults.error_rate == 0.0

        await control.post("/_sim/config", json={"tokens": {"FlyV1 fm2_new": "personal"}})
        assert (await api.get("/apps", params=ORG)).status_code == 401
        new = await api.get("/apps", params=ORG, headers={"Authorization": "Bearer FlyV1 fm2_new"})
        assert new.status_code == 200
        await control.post("/_sim/config", json={"tokens": {TOKEN: "personal"}})

        assert (await control.post("/_sim/reset")).json() == {"ok": True}
        assert (await control.get("/_sim/state")).json()["apps"] == []


async def test_logs_and_reprs_never_hold_the_token(sim: FlySim, api: httpx.AsyncClient) -> None:
    await create_app(api)
    assert sim.request_log[-1][1:] == ("POST", "/v1/apps", 201)
    assert TOKEN not in repr(sim.request_log)
    assert TOKEN not in repr(sim) + repr(sim.config) + repr(sim.stats)


async def test_asgi_transport_serves_the_same_api() -> None:
    sim = FlySim(SimConfig(tokens={TOKEN: "personal"}))
    transport = httpx.ASGITransport(app=sim.app)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://flysim/v1", headers=headers
    ) as client:
        await create_app(client)
        mid = (await create_machine(client))["id"]
        assert (await wait_state(client, mid, "started")).status_code == 200


def test_tokens_come_from_the_environment(tmp_path: Path) -> None:
    assert parse_tokens("abc") == {"abc": "personal"}
    assert parse_tokens("FlyV1 fm2_a,fm2_b=acme, other") == {
        "FlyV1 fm2_a,fm2_b": "acme",
        "other": "personal",
    }
    port = embedded.free_port()
    env = {**os.environ, "FLYSIM_TOKENS": f"{TOKEN}=personal"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flysim", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        embedded.wait_for_port("127.0.0.1", port, timeout=20)
        url = f"http://127.0.0.1:{port}/v1/apps?org_slug=personal"
        assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert httpx.get(url).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    without = {k: v for k, v in os.environ.items() if k != "FLYSIM_TOKENS"}
    done = subprocess.run(
        [sys.executable, "-m", "flysim"], env=without, capture_output=True, timeout=20
    )
    assert done.returncode == 2 and b"FLYSIM_TOKENS" in done.stderr


# --------------------------------------------------------------------- spec conformance

COVERED_OPERATIONS = {
    "Apps_list", "Apps_create", "Apps_show", "Apps_delete",
    "App_IPAssignments_list", "App_IPAssignments_create",
    "Machines_list", "Machines_create", "Machines_show", "Machines_update", "Machines_delete",
    "Machines_start", "Machines_stop", "Machines_restart", "Machines_suspend",
    "Machines_cordon", "Machines_uncordon", "Machines_wait", "Machines_create_lease",
    "Machines_show_lease", "Machines_release_lease", "Machines_show_metadata",
    "Machines_upsert_metadata", "Machines_get_metadata_key", "Machines_update_metadata",
    "Machines_delete_metadata", "Machines_list_versions", "Machines_list_events",
    "Machines_list_processes", "Machines_signal",
    "Secrets_list", "Secrets_update", "Secret_get", "Secret_create", "Secret_delete",
}  # fmt: skip


async def test_responses_conform_to_the_current_openapi_spec(sim: FlySim) -> None:
    """The emulator's own check (on for the whole suite, see conftest.py) finds nothing
    wrong in an exchange of every operation it serves, errors and faults included."""
    assert sim.spec_checker is not None, "the suite runs the emulator with FLYSIM_VALIDATE_SPEC"
    checker = sim.spec_checker
    before, checked_before = len(checker.violations), dict(checker.checked)
    statuses: list[int] = []

    async def keep(response: httpx.Response) -> None:
        statuses.append(response.status_code)

    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        base_url=sim.base_url, headers=headers, event_hooks={"response": [keep]}
    ) as api:
        await api.get("/apps", params=ORG)
        await create_app(api)
        await api.get("/apps/demo")
        await api.get("/apps/absent")
        await api.post("/apps", json={"name": "Bad!", "org_slug": "personal"})
        await api.post("/apps", json={"name": "demo", "org_slug": "personal"})
        await api.post("/apps/demo/ip_assignments", json={"type": "v6"})
        await api.get("/apps/demo/ip_assignments")
        await api.post("/apps/demo/secrets", json={"values": {"API_KEY": "k1"}})
        await api.get("/apps/demo/secrets", params={"min_version": "1"})
        await api.post("/apps/demo/secrets/OTHER", json={"value": "v"})
        await api.get("/apps/demo/secrets/OTHER")
        await api.delete("/apps/demo/secrets/OTHER")
        config = machine_config(
            checks={"alive": {"type": "tcp", "port": 3000, "interval": "15s"}},
            restart={"policy": "on-failure", "max_retries": 3},
        )
        machine = await create_machine(
            api, config=config, lease_ttl=30, name="web-1", min_secrets_version=1
        )
        mid, url = machine["id"], f"/apps/demo/machines/{machine['id']}"
        held = {"fly-machine-lease-nonce": machine["nonce"]}
        await api.post("/apps/demo/machines", json={"config": {}, "region": "ams"})
        await api.get("/apps/demo/machines")
        await api.get("/apps/demo/machines", params={"include_deleted": "true", "region": "ams"})
        await wait_state(api, mid, "started", version=machine["version"])
        await api.get(url)
        await api.get(f"{url}/lease")
        await api.post(f"{url}/lease", json={"ttl": 30})
        await api.post(f"{url}/lease", json={"ttl": 30}, headers=held)
        updated = await api.post(
            url, json={"config": config, "region": "ams", "min_secrets_version": 1}, headers=held
        )
        await api.post(url, json={"config": {"image": ""}}, headers=held)
        await api.get(
            f"{url}/wait",
            params=[
                ("timeout", "5"),
                ("state", "started"),
                ("state", "failed"),
                ("version", updated.json()["version"]),
            ],
        )
        await api.get(f"{url}/ps")
        await api.post(f"{url}/signal", json={"signal": "SIGUSR1"}, headers=held)
        await api.post(f"{url}/signal", json={"signal": "SIGNOPE"}, headers=held)
        await api.post(f"{url}/cordon", headers=held)
        await api.post(f"{url}/uncordon", headers=held)
        await api.post(f"{url}/metadata/release", json={"value": "3"}, headers=held)
        await api.get(f"{url}/metadata/release")
        await api.get(f"{url}/metadata/absent")
        await api.get(f"{url}/metadata")
        await api.patch(f"{url}/metadata", json={"metadata": {"a": "b"}}, headers=held)
        await api.delete(f"{url}/metadata/a", headers=held)
        await api.get(f"{url}/versions")
        await api.get(f"{url}/events", params={"limit": 5})
        await api.post(f"{url}/restart", headers=held)
        await wait_state(api, mid, "started")
        await api.post(f"{url}/suspend", headers=held)
        await wait_state(api, mid, "suspended")
        await api.post(f"{url}/start", headers=held)
        await wait_state(api, mid, "started")
        await api.post(f"{url}/stop", json={"signal": "SIGTERM", "timeout": "5s"}, headers=held)
        await wait_state(api, mid, "stopped")
        await wait_state(api, mid, "started", timeout=1)
        await api.post(f"{url}/start", headers=held)
        await api.delete(f"{url}/lease", headers=held)
        await api.delete(url)
        await api.delete(url, params={"force": "true"})
        await wait_state(api, mid, "destroyed")
        sim.config.failing_images = {IMAGE}
        failing = await create_machine(api)
        await wait_state(api, failing["id"], "started")
        sim.config.failing_images = set()
        sim.config.full_regions = {"ams"}
        await api.post("/apps/demo/machines", json={"config": machine_config(), "region": "ams"})
        sim.config.full_regions = set()
        await api.delete("/apps/demo")
        sim.config.faults = Faults(error_rate=1.0)
        await api.get("/apps", params=ORG)
        sim.config.faults = Faults(rate_limit_rate=1.0)
        await api.get("/apps", params=ORG)
        sim.config.faults = Faults()

    assert checker.violations[before:] == []
    checked = {op for op, n in checker.checked.items() if n > checked_before.get(op, 0)}
    assert checked >= COVERED_OPERATIONS, sorted(COVERED_OPERATIONS - checked)
    assert {200, 201, 202, 204, 400, 404, 408, 409, 412, 422, 429, 503} <= set(statuses)


def test_the_emulator_records_what_does_not_conform() -> None:
    """What the check records: a nonconforming response, and a nonconforming request the
    emulator accepted; not a nonconforming request it refused."""
    with spec_tolerated():
        _records_what_does_not_conform()
    # Outside `tolerated()`, a violation reaches the list the suite fails tests on.
    checker = SpecChecker(MACHINES_SPEC)
    show = httpx.Request(
        "GET", "http://x/v1/apps/demo/machines/m1", headers={"Authorization": "Bearer t"}
    )
    before = len(RECORDED)
    checker.check(show, httpx.Response(200, json={"id": 7}))
    assert len(RECORDED) == before + 1
    del RECORDED[before:]  # this test's own violation, not one to fail it on


def _records_what_does_not_conform() -> None:
    checker = SpecChecker(MACHINES_SPEC)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    show = httpx.Request("GET", "http://x/v1/apps/demo/machines/m1", headers=auth)
    assert checker.check(show, httpx.Response(200, json={"id": "m1", "state": 3})) != []
    assert checker.check(show, httpx.Response(200, json={"id": "m1", "state": "started"})) == []
    no_org = httpx.Request("GET", "http://x/v1/apps", headers=auth)
    assert checker.check(no_org, httpx.Response(200, json={"apps": []})) != []
    assert checker.check(no_org, httpx.Response(400, json={"error": "org_slug"})) == []
    states = [("state", "started"), ("state", "nope")]
    wait = "http://x/v1/apps/demo/machines/m1/wait"
    repeated = httpx.Request("GET", wait, params=states, headers=auth)
    assert checker.check(repeated, httpx.Response(200, json={"ok": True})) != []
    values = {"values": {"A": ["s3cr3t-value"]}}  # not a string: the request does not conform
    secret = httpx.Request("POST", "http://x/v1/apps/demo/secrets", headers=auth, json=values)
    recorded = checker.check(secret, httpx.Response(200, json={"version": 1}))
    assert recorded and "s3cr3t" not in " ".join(map(str, recorded))
    assert len(checker.violations) == 4


def test_spec_validation_catches_nonconforming_exchanges() -> None:
    spec = MACHINES_SPEC
    base = "http://127.0.0.1:1/v1/apps/demo/machines"
    auth = {"Authorization": f"Bearer {TOKEN}"}

    bad_body = httpx.Request("POST", f"{base}/m1/lease", json={"ttl": "13s"}, headers=auth)
    with pytest.raises(SpecViolation, match="Machines_create_lease"):
        validate_exchange(spec, bad_body)
    # fly-go's form, which Fly accepts although the spec asks for a body.
    query_ttl = httpx.Request("POST", f"{base}/m1/lease", params={"ttl": 13}, headers=auth)
    assert validate_exchange(spec, query_ttl) == "Machines_create_lease"
    bad_param = httpx.Request("GET", f"{base}/m1/wait", params={"timeout": "soon"}, headers=auth)
    with pytest.raises(SpecViolation, match="timeout"):
        validate_exchange(spec, bad_param)
    unauthenticated = httpx.Request("GET", f"{base}/m1")
    with pytest.raises(SpecViolation, match="Security"):
        validate_exchange(spec, unauthenticated)
    flyctl_style = httpx.Request("GET", f"{base}/m1", headers={"Authorization": TOKEN})
    assert validate_exchange(spec, flyctl_style) == "Machines_show"

    show = httpx.Request("GET", f"{base}/m1", headers=auth)
    wrong_type = httpx.Response(200, json={"id": "m1", "state": 3}, request=show)
    with pytest.raises(SpecViolation, match=r"Machines_show.*at state"):
        validate_exchange(spec, show, wrong_type)
    undeclared = httpx.Response(201, json={"id": "m1"}, request=show)
    with pytest.raises(SpecViolation, match="not declared"):
        validate_exchange(spec, show, undeclared)
    shapeless_error = httpx.Response(404, text="nope", request=show)
    with pytest.raises(SpecViolation, match="error"):
        validate_exchange(spec, show, shapeless_error)

    good = httpx.Response(200, json={"id": "m1", "state": "started"}, request=show)
    assert validate_exchange(spec, show, good) == "Machines_show"
    logs = httpx.Request("GET", "http://127.0.0.1:1/v1/apps/demo/logs", headers=auth)
    assert validate_exchange(spec, logs, httpx.Response(200, json=[])) is None


def test_the_2023_spec_still_reads() -> None:
    """The checker reads the older revision too (OpenAPI 3.0), where `app_name` was the field."""
    spec = reference_file("fly-machines-openapi.yaml")
    create = httpx.Request(
        "POST", "http://x/v1/apps", json={"app_name": "a", "org_slug": "o"},
        headers={"Authorization": "Bearer t"},
    )  # fmt: skip
    assert validate_exchange(spec, create) == "Apps_create"
