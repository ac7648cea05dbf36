"""A worker killed (SIGKILL) in the middle of any step: a fresh worker finishes the deploy,
and nothing is left doubled or dangling.

Each scenario runs `python worker.py` as a process, holds the deploy inside one step (a
table lock, a stalled proxy, a `git` that pauses after pushing, emulator delays), kills
the worker there, and starts another. The scenarios run concurrently, once per module,
because each waits for Temporal to notice the dead worker (the step's heartbeat or
start-to-close timeout); the tests then check one scenario each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from harness import (
    IMAGE,
    GitShim,
    WorkerProcess,
    app_machines,
    apps_named,
    deploy_request,
    deployment_rows,
    fast_timings,
    fly_toml_commits,
    held_leases,
    new_project_id,
    own_flysim,
    stalling_proxy,
    via,
    wait_for_activity,
    wait_for_pollers,
    wait_until,
    worker_env,
    workflow_of,
)
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client

from core.models import DeployRequest, DeployResult, DeployStatus
from turbodeploy.client import start_deploy
from turbodeploy.stack import publish_example

IMAGE_2 = IMAGE.replace("deployment-1", "deployment-2")
MACHINES = 2
# Generous: until the policies derive every timeout from DeployTimings, a killed step is
# only retried after its fixed heartbeat (up to 60 s) or start-to-close timeout.
SCENARIO_TIMEOUT = 200.0

# Step -> the activity that must have been retried because the kill landed inside it.
STEPS: dict[str, str] = {
    "record_start": "record_deploy_started",
    "credentials": "resolve_credentials",
    "fly_config": "prepare_fly_config",
    "app": "ensure_fly_app",
    "rollout_create": "roll_out_release",
    "rollout_update": "roll_out_release",
    "health": "check_app_health",
    "record_result": "record_deploy_result",
}


@dataclass
class Outcome:
    step: str
    project_id: str
    app_name: str
    repo: str
    database_url: str
    schema: str
    result: DeployResult | None = None
    error: BaseException | None = None
    killed_at: float = 0.0
    lease_ttl: float = 0.0
    machines_before: list[str] = field(default_factory=list)
    machines: list[dict[str, Any]] = field(default_factory=list)
    leases: list[dict[str, Any]] = field(default_factory=list)
    apps: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    logs: str = ""


@dataclass
class _Rig:
    """Everything one scenario owns."""

    client: Client
    sim: Any
    shim: GitShim
    ssm_proxy: Any
    app_proxy: Any
    env: dict[str, str]
    tmp: Path
    outcome: Outcome
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.tmp / f"worker-{len(self.workers) + 1}.log")
        self.workers.append(worker)
        return worker


# --------------------------------------------------------------------- kill points
# Each waits until the deploy is held inside its step and returns how to let it go.


async def _in_record_start(rig: _Rig, handle: Any) -> Any:
    await wait_for_activity(handle, "record_deploy_started")
    await asyncio.sleep(0.3)
    return None


async def _in_credentials(rig: _Rig, handle: Any) -> Any:
    await wait_for_activity(handle, "resolve_credentials")
    await asyncio.sleep(0.3)
    rig.ssm_proxy.resume()


async def _in_fly_config(rig: _Rig, handle: Any) -> Any:
    # The commit is pushed; the activity has not reported it yet.
    await wait_until(lambda: rig.shim.pushed, "fly.toml pushed", timeout=60)
    rig.shim.hold_after_push(False)


async def _in_app(rig: _Rig, handle: Any) -> Any:
    # The app exists; its IPs are not allocated yet (every API call takes 0.3 s).
    app = rig.outcome.app_name
    await wait_until(lambda: apps_named(rig.sim, app), "app created", timeout=60)
    rig.sim.config.timing.api_latency = 0.0


async def _in_rollout_create(rig: _Rig, handle: Any) -> Any:
    app = rig.outcome.app_name
    await wait_until(lambda: app_machines(rig.sim, app), "first machine created", timeout=60)
    rig.sim.config.timing.start_delay = 0.0


async def _in_rollout_update(rig: _Rig, handle: Any) -> Any:
    app = rig.outcome.app_name

    def one_updated() -> bool:
        return any(m["config"].get("image") == IMAGE_2 for m in app_machines(rig.sim, app))

    await wait_until(one_updated, "first machine updated", timeout=60)
    rig.sim.config.timing.start_delay = 0.0


async def _in_health(rig: _Rig, handle: Any) -> Any:
    await wait_for_activity(handle, "check_app_health", timeout=60)
    await asyncio.sleep(0.3)
    rig.app_proxy.resume()


ARMS: dict[str, Callable[[_Rig, Any], Awaitable[Any]]] = {
    "record_start": _in_record_start,
    "credentials": _in_credentials,
    "fly_config": _in_fly_config,
    "app": _in_app,
    "rollout_create": _in_rollout_create,
    "rollout_update": _in_rollout_update,
    "health": _in_health,
}


@contextlib.asynccontextmanager
async def _locked(database_url: str, sql: str, *args: Any) -> AsyncIterator[asyncpg.Connection]:
    """Hold a lock taken by `sql` until the block ends (or `release` is awaited)."""
    conn = await asyncpg.connect(database_url)
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(sql, *args)
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await tx.rollback()
        await conn.close()


async def _scenario(
    step: str,
    *,
    client: Client,
    postgres_url: str,
    ssm_endpoint: str,
    fly_token: str,
    tmp: Path,
) -> Outcome:
    project_id = new_project_id("c")
    schema = f"crash_{uuid.uuid4().hex[:8]}"
    task_queue = f"crash-{step}-{uuid.uuid4().hex[:6]}"
    repo = publish_example("nitro-hello", tmp / "repos")
    timings = fast_timings()
    outcome = Outcome(
        step=step,
        project_id=project_id,
        app_name=f"turbobackend-{project_id}",
        repo=repo,
        database_url=postgres_url,
        schema=schema,
        lease_ttl=timings.lease_ttl.total_seconds(),
    )
    with own_flysim(fly_token) as sim:
        async with (
            stalling_proxy(ssm_endpoint) as ssm_proxy,
            stalling_proxy(sim.app_url_template.replace("{app}", "x")) as app_proxy,
        ):
            shim = GitShim(tmp / "git")
            env = worker_env(
                temporal_address=client.service_client.config.target_host,
                task_queue=task_queue,
                database_url=postgres_url,
                db_schema=schema,
                ssm_endpoint=via(ssm_proxy, ssm_endpoint),
                fly_api_base_url=sim.base_url,
                app_url_template=via(app_proxy, sim.app_url_template),
                work_dir=tmp / "work",
                path_prefix=str(shim.dir),
            )
            rig = _Rig(client, sim, shim, ssm_proxy, app_proxy, env, tmp, outcome)
            try:
                await _drive(rig, step, timings)
            except BaseException as exc:  # reported by the test of this step
                outcome.error = exc
            finally:
                for w in rig.workers:
                    w.stop()
                outcome.logs = "\n".join(w.output()[-4000:] for w in rig.workers)
    return outcome


async def _drive(rig: _Rig, step: str, timings: Any) -> None:
    outcome = rig.outcome
    client = rig.client
    task_queue = rig.env["TURBODEPLOY_TASK_QUEUE"]

    def request(image: str) -> DeployRequest:
        return deploy_request(
            outcome.project_id,
            outcome.repo,
            image=image,
            machine_count=MACHINES,
            timings=timings,
        )

    first = rig.start_worker()
    await wait_for_pollers(client, task_queue)
    image = IMAGE
    if step == "rollout_update":
        done = await (await start_deploy(client, request(IMAGE), task_queue=task_queue)).result()
        outcome.machines_before = sorted(done.machine_ids)
        image = IMAGE_2
        rig.sim.config.timing.start_delay = 2.0
    elif step == "rollout_create":
        rig.sim.config.timing.start_delay = 2.0
    elif step == "app":
        rig.sim.config.timing.api_latency = 0.3
    elif step == "credentials":
        rig.ssm_proxy.pause()
    elif step == "fly_config":
        rig.shim.hold_after_push(True)
    elif step in ("health", "record_result"):
        rig.app_proxy.pause()

    table = f'"{outcome.schema}".project_deployments'
    if step == "record_start":
        async with _locked(outcome.database_url, f"LOCK TABLE {table} IN EXCLUSIVE MODE"):
            handle = await start_deploy(client, request(image), task_queue=task_queue)
            await _in_record_start(rig, handle)
            first.kill()
            outcome.killed_at = time.time()
    elif step == "record_result":
        handle = await start_deploy(client, request(image), task_queue=task_queue)
        await wait_for_activity(handle, "check_app_health", timeout=60)
        # Blocks updates of the row, not the foreign-key checks of rows that refer to it.
        async with _locked(
            outcome.database_url,
            f"SELECT 1 FROM {table} WHERE project_id = $1 FOR NO KEY UPDATE",
            outcome.project_id,
        ):
            rig.app_proxy.resume()
            await wait_for_activity(handle, "record_deploy_result", timeout=60)
            await asyncio.sleep(0.3)
            first.kill()
            outcome.killed_at = time.time()
    else:
        handle = await start_deploy(client, request(image), task_queue=task_queue)
        await ARMS[step](rig, handle)
        first.kill()
        outcome.killed_at = time.time()

    rig.start_worker()
    outcome.result = await asyncio.wait_for(handle.result(), SCENARIO_TIMEOUT)
    outcome.machines = app_machines(rig.sim, outcome.app_name)
    outcome.leases = held_leases(rig.sim, outcome.app_name)
    outcome.apps = len(apps_named(rig.sim, outcome.app_name))
    history = await workflow_of(handle).fetch_history()
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            outcome.attempts.setdefault(name, 0)
        if event.HasField("activity_task_started_event_attributes"):
            attempt = event.activity_task_started_event_attributes.attempt
            scheduled = event.activity_task_started_event_attributes.scheduled_event_id
            name = next(
                e.activity_task_scheduled_event_attributes.activity_type.name
                for e in history.events
                if e.event_id == scheduled
            )
            outcome.attempts[name] = max(outcome.attempts.get(name, 0), attempt)


def _requested_steps(session: pytest.Session) -> list[str]:
    steps = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        module = getattr(item, "module", None)
        if module is not None and module.__name__ == __name__ and callspec:
            step = callspec.params.get("step")
            if step in STEPS and step not in steps:
                steps.append(step)
    return steps


@pytest_asyncio.fixture(scope="module")
async def outcomes(
    request: pytest.FixtureRequest,
    temporal_client: Client,
    postgres_url: str,
    ssm_endpoint: str,
    fly_token: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Outcome]:
    steps = _requested_steps(request.session)
    results = await asyncio.gather(
        *(
            _scenario(
                step,
                client=temporal_client,
                postgres_url=postgres_url,
                ssm_endpoint=ssm_endpoint,
                fly_token=fly_token,
                tmp=tmp_path_factory.mktemp(f"crash-{step}"),
            )
            for step in steps
        )
    )
    return {o.step: o for o in results}


@pytest.mark.parametrize("step", list(STEPS))
async def test_killed_worker_deploy_completes(step: str, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[step]
    if outcome.error is not None:
        raise AssertionError(
            f"the deploy did not complete after a kill during {step}: {outcome.error!r}\n"
            f"worker logs (tail):\n{outcome.logs[-3000:]}"
        ) from outcome.error
    result = outcome.result
    assert result is not None
    assert result.status is DeployStatus.DEPLOYED

    activity = STEPS[step]
    assert outcome.attempts.get(activity, 0) >= 2, (
        f"the kill did not land inside {activity}: attempts {outcome.attempts}"
    )

    assert outcome.apps == 1, "exactly one Fly app"
    ids = [m["id"] for m in outcome.machines]
    assert len(ids) == MACHINES == len(set(ids)), f"machines doubled or missing: {ids}"
    assert sorted(ids) == sorted(result.machine_ids)
    assert {m["config"].get("image") for m in outcome.machines} == {result.image}
    if outcome.machines_before:
        assert sorted(ids) == outcome.machines_before, "the redeploy updated in place"

    # Leases of the killed attempt lapse on their own; any other is one the retry kept.
    kept = [
        lease
        for lease in outcome.leases
        if lease["expires_at"] > outcome.killed_at + outcome.lease_ttl + 1
    ]
    assert kept == [], f"leases left held: {kept}"

    assert len(fly_toml_commits(outcome.repo)) == 1, "exactly one commit touching fly.toml"

    rows = await deployment_rows(outcome.database_url, outcome.schema, outcome.project_id)
    expected_rows = 2 if outcome.machines_before else 1
    assert len(rows) == expected_rows, [dict(r) for r in rows]
    last = rows[-1]
    assert last["deployment_id"] == result.deployment_id
    assert last["status"] == "deployed"
    assert last["finished_at"] is not None
    assert sorted(last["machine_ids"]) == sorted(result.machine_ids)
    assert last["commit_sha"] == result.commit_sha


async def test_sigterm_stops_the_worker_cleanly(
    temporal_client: Client,
    postgres_url: str,
    ssm_endpoint: str,
    fly_token: str,
    make_request: Callable[..., DeployRequest],
    tmp_path: Path,
) -> None:
    """SIGTERM in the middle of a step: exit 0 within the grace period; the deploy goes on."""
    graceful = 3.0
    task_queue = f"term-{uuid.uuid4().hex[:8]}"
    with own_flysim(fly_token) as sim:
        async with stalling_proxy(sim.app_url_template.replace("{app}", "x")) as app_proxy:
            env = worker_env(
                temporal_address=temporal_client.service_client.config.target_host,
                task_queue=task_queue,
                database_url=postgres_url,
                db_schema=f"term_{uuid.uuid4().hex[:8]}",
                ssm_endpoint=ssm_endpoint,
                fly_api_base_url=sim.base_url,
                app_url_template=via(app_proxy, sim.app_url_template),
                work_dir=tmp_path / "work",
                extra={"TURBODEPLOY_GRACEFUL_SHUTDOWN_SECONDS": str(graceful)},
            )
            first = WorkerProcess(env, tmp_path / "worker-1.log")
            second: WorkerProcess | None = None
            try:
                await wait_for_pollers(temporal_client, task_queue)
                app_proxy.pause()
                request = make_request()
                handle = await start_deploy(temporal_client, request, task_queue=task_queue)
                await wait_for_activity(handle, "check_app_health", timeout=60)
                started = time.monotonic()
                first.terminate()
                code = await first.wait(timeout=graceful + 10)
                took = time.monotonic() - started
                assert code == 0, f"exit code {code}:\n{first.output()[-3000:]}"
                assert took <= graceful + 2.0, f"took {took:.1f}s to stop"
                app_proxy.resume()
                second = WorkerProcess(env, tmp_path / "worker-2.log")
                result = await asyncio.wait_for(handle.result(), SCENARIO_TIMEOUT)
                assert result.status is DeployStatus.DEPLOYED
            finally:
                first.stop()
                if second is not None:
                    second.stop()


# ------------------------------------------------------------ three kills, one rollout

KILLS = 3
ROLLING_MACHINES = 5
# Longer than the heartbeat timeout (2 s): a retry that could not take over the dead
# attempt's leases would meet them still held, and fail or wait on them.
KILL_LEASE_TTL = timedelta(seconds=8)


@dataclass
class _RolloutAttempt:
    attempt: int
    leases: dict[str, str]


async def _running_rollout(client: Client, handle: Any) -> _RolloutAttempt | None:
    """The rollout attempt a worker runs now, with the leases its last heartbeat that
    reached the server names."""
    description = await workflow_of(handle).describe()
    for pending in description.raw_description.pending_activities:
        if pending.activity_type.name != "roll_out_release":
            continue
        if pending.state != PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
            return None
        leases: dict[str, str] = {}
        if pending.heartbeat_details.payloads:
            details = await client.data_converter.decode(list(pending.heartbeat_details.payloads))
            if details and isinstance(details[0], dict):
                leases = dict(details[0].get("leases") or {})
        return _RolloutAttempt(pending.attempt, leases)
    return None


async def test_three_kills_in_one_rollout_finish_well_inside_its_attempts(
    temporal_client: Client,
    postgres_url: str,
    ssm_endpoint: str,
    fly_token: str,
    tmp_path: Path,
) -> None:
    """The worker is SIGKILLed three times while one rolling redeploy runs, each time
    with leases held and a new worker started at once (the third time only once the dead
    worker's leases lapsed). Every retry takes over the leases its predecessor held (by
    the nonces in its heartbeat), so the rollout needs one attempt per kill and no more,
    and no request ever meets a lease conflict. The leases a killed worker held lapse
    within the lease TTL of the kill."""
    project_id = new_project_id("k")
    app = f"turbobackend-{project_id}"
    task_queue = f"kills-{uuid.uuid4().hex[:6]}"
    repo = publish_example("nitro-hello", tmp_path / "repos")
    timings = fast_timings(lease_ttl=KILL_LEASE_TTL, machine_wait_timeout=timedelta(seconds=30))
    ttl = KILL_LEASE_TTL.total_seconds()

    def request(image: str) -> DeployRequest:
        return deploy_request(
            project_id,
            repo,
            image=image,
            machine_count=ROLLING_MACHINES,
            max_unavailable=1,
            timings=timings,
        )

    def updated() -> int:
        return sum(m["config"].get("image") == IMAGE_2 for m in app_machines(sim, app))

    with own_flysim(fly_token) as sim:
        env = worker_env(
            temporal_address=temporal_client.service_client.config.target_host,
            task_queue=task_queue,
            database_url=postgres_url,
            db_schema=f"kills_{uuid.uuid4().hex[:8]}",
            ssm_endpoint=ssm_endpoint,
            fly_api_base_url=sim.base_url,
            app_url_template=sim.app_url_template,
            work_dir=tmp_path / "work",
        )
        workers = [WorkerProcess(env, tmp_path / "worker-1.log")]
        try:
            await wait_for_pollers(temporal_client, task_queue)
            first = await start_deploy(temporal_client, request(IMAGE), task_queue=task_queue)
            before = sorted((await first.result()).machine_ids)
            sim.config.timing.start_delay = 2.0  # each machine: an update, then 2 s to start
            conflicts = sim.stats.lease_conflicts
            handle = await start_deploy(temporal_client, request(IMAGE_2), task_queue=task_queue)
            for kill in range(1, KILLS + 1):
                seen: list[_RolloutAttempt] = []

                async def holding(kill: int = kill, seen: list[_RolloutAttempt] = seen) -> bool:
                    # This attempt got on (another machine updated) and the server has
                    # the nonces of what it holds now.
                    running = await _running_rollout(temporal_client, handle)
                    held = {x["machine_id"]: x["nonce"] for x in held_leases(sim, app)}
                    if running is None or running.attempt != kill or updated() < kill:
                        return False
                    seen[:] = [running]
                    return bool(running.leases) and running.leases.items() <= held.items()

                await wait_until(holding, f"rollout attempt {kill} holding leases", timeout=90)
                workers[-1].kill()
                killed_at = time.time()
                left = held_leases(sim, app)
                assert {x["machine_id"] for x in left} == set(seen[0].leases)
                late = [x for x in left if x["expires_at"] > killed_at + ttl + 1]
                assert late == [], f"leases outliving the lease TTL of the kill: {late}"
                if kill == KILLS:
                    await wait_until(
                        lambda: not held_leases(sim, app), "dead leases lapsed", timeout=4 * ttl
                    )
                workers.append(WorkerProcess(env, tmp_path / f"worker-{kill + 1}.log"))
            result = await asyncio.wait_for(handle.result(), SCENARIO_TIMEOUT)

            assert result.status is DeployStatus.DEPLOYED
            assert sorted(result.machine_ids) == before, "updated in place, none doubled"
            assert updated() == ROLLING_MACHINES
            assert held_leases(sim, app) == []
            assert sim.stats.lease_conflicts == conflicts, "a request met a lease conflict"
            history = await workflow_of(handle).fetch_history()
            # The redeploy's rollout: the last one scheduled in the project's history.
            scheduled = max(
                e.event_id
                for e in history.events
                if e.HasField("activity_task_scheduled_event_attributes")
                and e.activity_task_scheduled_event_attributes.activity_type.name
                == "roll_out_release"
            )
            started = [
                e.activity_task_started_event_attributes
                for e in history.events
                if e.HasField("activity_task_started_event_attributes")
                and e.activity_task_started_event_attributes.scheduled_event_id == scheduled
            ]
            assert [s.attempt for s in started] == [KILLS + 1], "one attempt per kill, no more"
            last = started[-1].last_failure
            assert last.HasField("timeout_failure_info"), last
            assert "lease" not in last.message.lower()
        except BaseException:
            logs = "\n".join(w.output()[-3000:] for w in workers)
            print(f"worker logs (tail):\n{logs}")
            raise
        finally:
            for w in workers:
                w.stop()
