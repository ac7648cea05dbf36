"""The workflow's contract for callers in any language: one request is one deployment, and a
bad request is answered at once, from a plain-JSON Temporal client, the `temporal` CLI and
the TypeScript execution handler under examples/ts-handler (run with `node`).

Real servers throughout: the Temporal dev server, a worker, PostgreSQL and the Fly
emulator. The JSON clients here use Temporal's default JSON converter, not ours, so what
they send is what `@temporalio/client` sends.

The saved histories `tests/histories/json_client_*.json` come from the runs below;
regenerate them with TURBODEPLOY_UPDATE_HISTORIES=1 (tests/test_replay.py replays them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from harness import IMAGE, Rows, api_requests_for, app_machines
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributeKey, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from core import contract
from core.models import DeployRequest, DeployStatus
from core.settings import Settings
from turbodeploy import embedded
from turbodeploy.client import DeployError, RequestRejected, start_deploy, submit
from workflows.deploy_project import DeployProjectWorkflow

ROOT = Path(__file__).absolute().parent.parent
TS_HANDLER = ROOT / "examples" / "ts-handler"
HISTORIES = Path(__file__).absolute().parent / "histories"
UPDATE_HISTORIES = os.environ.get("TURBODEPLOY_UPDATE_HISTORIES") == "1"
BAD = {"project_id": "BAD ID!", "repo_url": "/srv/git/x.git", "image": IMAGE}

pytestmark = pytest.mark.usefixtures("calm_emulator")


@pytest.fixture
def json_client(temporal_client: Client) -> Client:
    """A client with Temporal's default converter: plain JSON, as any SDK sends it."""
    return Client(temporal_client.service_client, namespace=temporal_client.namespace)


@pytest.fixture
def request_json(make_request: Callable[..., DeployRequest]) -> Callable[..., dict[str, Any]]:
    """The test's request as the plain JSON a caller in any language writes: only the fields
    it sets (no deployment id), and `fields` over them."""

    def make(**fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = make_request().model_dump(
            mode="json", include={"project_id", "repo_url", "image", "timings"}
        )
        body.update(fields)
        return body

    return make


def _start_op(body: dict[str, Any], task_queue: str) -> WithStartWorkflowOperation[Any, Any]:
    return WithStartWorkflowOperation(
        contract.WORKFLOW_TYPE,
        body,
        id=f"deploy-{body['project_id']}",
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


async def _submit(client: Client, body: dict[str, Any], task_queue: str) -> dict[str, Any]:
    accepted: dict[str, Any] = await client.execute_update_with_start_workflow(
        contract.SUBMIT_UPDATE, body, start_workflow_operation=_start_op(body, task_queue)
    )
    return accepted


async def _outcome(client: Client, accepted: dict[str, Any]) -> dict[str, Any]:
    handle = client.get_workflow_handle(accepted["workflow_id"], run_id=accepted["run_id"])
    try:
        result: dict[str, Any] = await handle.execute_update(
            contract.WAIT_OUTCOME_UPDATE, accepted["deployment_id"]
        )
        return result
    except (WorkflowUpdateFailedError, RPCError):
        found: dict[str, Any] = await handle.query(
            contract.OUTCOME_QUERY, accepted["deployment_id"]
        )
        return found


def _releases(flysim: Any, app: str) -> list[tuple[str, str, str]]:
    """Each machine with the release it runs (a machine may stop on its own meanwhile)."""
    return sorted(
        (m["id"], m["instance_id"], m["config"]["image"]) for m in app_machines(flysim, app)
    )


def _save_history(name: str, history: Any) -> None:
    if UPDATE_HISTORIES:
        data = json.dumps(history.to_json_dict(), indent=1) + "\n"
        (HISTORIES / f"{name}.json").write_text(data)


# ----------------------------------------------------------------------------- schemas


def test_committed_schemas_match_the_models() -> None:
    committed = {p.name[: -len(".schema.json")] for p in contract.SCHEMA_DIR.glob("*.json")}
    exported = contract.schemas()
    assert committed == set(exported), "run `python -m core.contract` and commit schemas/"
    for stem, schema in exported.items():
        path = contract.SCHEMA_DIR / f"{stem}.schema.json"
        assert path.read_text() == contract.render(schema), (
            f"{path.name} has drifted from the models: run `python -m core.contract`"
        )


def test_schemas_describe_what_the_workflow_accepts(request_json: Callable[..., Any]) -> None:
    """Checked with jsonschema's own 2020-12 validator, not with the models."""
    schemas = contract.schemas()
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    request = jsonschema.Draft202012Validator(schemas["project-request"])
    assert request.is_valid(request_json())
    assert request.is_valid({"kind": "rollback", "project_id": "p1"})
    assert not request.is_valid(request_json(colour="blue"))  # unknown fields are refused
    assert not request.is_valid({"image": IMAGE})  # project_id and repo_url are required
    assert not request.is_valid(request_json(machine_count=0))


def test_the_names_in_the_contract_are_the_workflows() -> None:
    from temporalio.workflow import _Definition

    defn = _Definition.must_from_class(DeployProjectWorkflow)
    assert defn.name == contract.WORKFLOW_TYPE
    assert {contract.SUBMIT_UPDATE, contract.WAIT_OUTCOME_UPDATE} <= set(defn.updates)
    assert contract.SUBMIT_SIGNAL in defn.signals
    queries = {contract.PROGRESS_QUERY, contract.OUTCOME_QUERY, contract.CURRENT_REQUEST_QUERY}
    assert queries <= set(defn.queries)
    assert set(contract.SEARCH_ATTRIBUTES) == set(embedded.SEARCH_ATTRIBUTES)


# ------------------------------------------------------------------- plain JSON clients


async def test_signal_with_start_from_a_json_client_makes_one_deployment(
    json_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    flysim: Any,
    request_json: Callable[..., dict[str, Any]],
    project_id: str,
) -> None:
    """What a new user tried first: the same JSON as the input and as the `submit`
    signal, without a deployment id. One row, one rollout, one id everywhere."""
    body = request_json()
    handle = await json_client.start_workflow(
        contract.WORKFLOW_TYPE,
        body,
        id=f"deploy-{project_id}",
        task_queue=settings.task_queue,
        start_signal=contract.SUBMIT_SIGNAL,
        start_signal_args=[body],
    )
    result = await handle.result()
    rows = await rows_of(project_id)
    assert [(r["deployment_id"], r["status"]) for r in rows] == [
        (result["deployment_id"], "deployed")
    ]
    assert result["deployment_id"].startswith("d-")
    assert len(app_machines(flysim, f"turbobackend-{project_id}")) == 1
    # Every decoding of the input (queries, replays) names the same deployment.
    for _ in range(2):
        now = await handle.query(contract.PROGRESS_QUERY)
        assert now["deployment_id"] == result["deployment_id"]
    _save_history("json_client_signal_without_id", await handle.fetch_history())


async def test_update_with_start_returns_the_assigned_deployment_at_once(
    json_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    request_json: Callable[..., dict[str, Any]],
    project_id: str,
) -> None:
    began = time.monotonic()
    accepted = await _submit(json_client, request_json(), settings.task_queue)
    assert time.monotonic() - began < 10
    assert accepted["status"] == "deploying" and accepted["project_id"] == project_id
    result = await _outcome(json_client, accepted)
    assert result["status"] == "deployed"
    assert result["deployment_id"] == accepted["deployment_id"]
    rows = await rows_of(project_id)
    assert [r["deployment_id"] for r in rows] == [accepted["deployment_id"]]
    handle = json_client.get_workflow_handle(accepted["workflow_id"], run_id=accepted["run_id"])
    _save_history("json_client_update_without_id", await handle.fetch_history())


async def test_the_same_deployment_id_twice_is_one_deployment(
    json_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    flysim: Any,
    request_json: Callable[..., dict[str, Any]],
    project_id: str,
) -> None:
    """A handler retried after a crash sends its request again: while the deploy runs,
    and after its run has closed. Both times it gets the one deployment back."""
    body = request_json(deployment_id=f"job-{uuid.uuid4().hex[:8]}")
    first = await _submit(json_client, body, settings.task_queue)
    again = await _submit(json_client, body, settings.task_queue)
    assert again["deployment_id"] == first["deployment_id"] == body["deployment_id"]
    assert again["run_id"] == first["run_id"]
    assert (await _outcome(json_client, first))["status"] == "deployed"
    handle = json_client.get_workflow_handle(first["workflow_id"], run_id=first["run_id"])
    _save_history("json_client_update_with_id", await handle.fetch_history())
    app = f"turbobackend-{project_id}"
    machines = _releases(flysim, app)
    requests = api_requests_for(flysim, app)

    # The run has closed: a new one starts, finds the recorded outcome, deploys nothing.
    late = await _submit(json_client, body, settings.task_queue)
    assert late["deployment_id"] == body["deployment_id"] and late["run_id"] != first["run_id"]
    outcome = await _outcome(json_client, late)
    assert outcome["status"] == "deployed" and outcome["url"]
    rows = await rows_of(project_id)
    assert [(r["deployment_id"], r["status"]) for r in rows] == [
        (body["deployment_id"], "deployed")
    ]
    assert api_requests_for(flysim, app) == requests
    assert _releases(flysim, app) == machines


async def test_a_bad_request_is_refused_to_the_caller_and_touches_nothing(
    json_client: Client,
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    flysim: Any,
) -> None:
    project_id = f"bad-{uuid.uuid4().hex[:6]}"
    body = BAD | {"project_id": project_id, "region": "mars"}
    began = time.monotonic()
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await _submit(json_client, body, settings.task_queue)
    assert time.monotonic() - began < 5
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == contract.INVALID_REQUEST
    assert "repo_url" not in cause.message  # the path is fine
    assert "region: unknown Fly region 'mars'" in cause.message

    # The run the start created ended at once, failed, without a single activity.
    handle = json_client.get_workflow_handle(f"deploy-{project_id}")
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.FAILED
    events = [e.WhichOneof("attributes") for e in (await handle.fetch_history()).events]
    assert not any("activity" in e for e in events), events
    assert await rows_of(project_id) == []
    assert api_requests_for(flysim, f"turbobackend-{project_id}") == 0

    # A bad request to a running project is refused the same way, and runs nothing.
    with pytest.raises(RequestRejected, match="project_id: project id 'BAD ID!'"):
        await start_deploy(
            temporal_client,
            DeployRequest.model_construct(**BAD),  # an unvalidated model, as a bug would send
            task_queue=settings.task_queue,
            search_attributes=False,
        )


async def test_a_running_project_refuses_a_bad_update_without_a_trace(
    json_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    request_json: Callable[..., dict[str, Any]],
    project_id: str,
) -> None:
    good = await _submit(json_client, request_json(), settings.task_queue)
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await _submit(json_client, request_json(machine_count=99), settings.task_queue)
    assert isinstance(info.value.cause, ApplicationError)
    assert "machine_count: Input should be less than or equal to 20" in info.value.cause.message
    # Another project's request, sent to this project's workflow by mistake.
    other = request_json() | {"project_id": f"{project_id}x"}
    handle = json_client.get_workflow_handle(good["workflow_id"])
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(contract.SUBMIT_UPDATE, other)
    assert isinstance(info.value.cause, ApplicationError)
    assert f"is deployed by workflow deploy-{project_id}x" in info.value.cause.message
    assert (await _outcome(json_client, good))["status"] == "deployed"
    handle = json_client.get_workflow_handle(good["workflow_id"], run_id=good["run_id"])
    history = json.dumps((await handle.fetch_history()).to_json_dict())
    # Only the good request entered the history; the refused ones left no event.
    assert history.count(f'"name": "{contract.SUBMIT_UPDATE}"') == 1
    assert "machine_count" not in history.replace('"machine_count": 1', "")
    assert [r["deployment_id"] for r in await rows_of(project_id)] == [good["deployment_id"]]


async def test_a_run_started_with_an_invalid_input_fails_at_once(
    json_client: Client,
    settings: Settings,
    worker: None,
    rows_of: Rows,
) -> None:
    """An old client, or `temporal workflow start` by hand: no update to refuse it, so the
    run itself ends, failed and non-retryable, instead of failing its task for ever."""
    project_id = f"bad-{uuid.uuid4().hex[:6]}"
    handle = await json_client.start_workflow(
        contract.WORKFLOW_TYPE,
        BAD | {"project_id": project_id, "deployment_id": "NOT VALID"},
        id=f"deploy-{project_id}",
        task_queue=settings.task_queue,
    )
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), timeout=10)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == contract.INVALID_REQUEST
    assert cause.non_retryable
    assert cause.message == (
        "invalid request: deployment_id: deployment id must be 1 to 63 lower-case letters, "
        "digits and '-', starting with a letter or digit"
    )
    assert await rows_of(project_id) == []


# ------------------------------------------------------------------------- temporal CLI


def _temporal(
    settings: Settings, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [embedded.temporal_cli(), *args, "--address", settings.temporal_address],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def test_temporal_cli_start_by_hand_deploys_once(
    settings: Settings,
    rows_of: Rows,
    worker: None,
    request_json: Callable[..., dict[str, Any]],
    project_id: str,
) -> None:
    """As the README shows it: `temporal workflow start` with the JSON request."""
    started = await asyncio.to_thread(
        _temporal,
        settings,
        "workflow", "start",
        "--type", contract.WORKFLOW_TYPE,
        "--task-queue", settings.task_queue,
        "--workflow-id", f"deploy-{project_id}",
        "--input", json.dumps(request_json()),
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    result = await asyncio.to_thread(
        _temporal, settings, "workflow", "result", "--workflow-id", f"deploy-{project_id}",
        "--output", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = await rows_of(project_id)
    assert [r["status"] for r in rows] == ["deployed"]
    assert rows[0]["deployment_id"] in result.stdout


async def test_temporal_cli_bad_input_fails_at_once_with_the_message(
    settings: Settings,
    worker: None,
    rows_of: Rows,
) -> None:
    project_id = f"bad-{uuid.uuid4().hex[:6]}"
    began = time.monotonic()
    run = await asyncio.to_thread(
        _temporal,
        settings,
        "workflow", "execute",
        "--type", contract.WORKFLOW_TYPE,
        "--task-queue", settings.task_queue,
        "--workflow-id", f"deploy-{project_id}",
        "--input", json.dumps(BAD | {"project_id": project_id, "branch": "-x"}),
    )  # fmt: skip
    assert time.monotonic() - began < 15
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "invalid request: branch: branch '-x' is not a valid git branch name" in output
    assert await rows_of(project_id) == []


# ---------------------------------------------------------------------- TypeScript handler


@pytest.fixture(scope="session")
def ts_handler() -> Path:
    """The example built as its README says: `npm ci && npm run build`."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("node and npm are needed to run the TypeScript execution handler")
    for args in (["ci", "--no-audit", "--no-fund"], ["run", "build"]):
        done = subprocess.run(
            [npm, *args], cwd=TS_HANDLER, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"npm {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return TS_HANDLER / "dist" / "cli.js"


def _node_deploy(
    cli: Path, settings: Settings, body: dict[str, Any], *, command: str = "deploy"
) -> tuple[int, list[dict[str, Any]]]:
    env = dict(os.environ)
    env.update(
        TEMPORAL_ADDRESS=settings.temporal_address, TURBODEPLOY_TASK_QUEUE=settings.task_queue
    )
    arg = json.dumps(body) if command == "deploy" else body["project_id"]
    done = subprocess.run(
        ["node", str(cli), command, arg],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode in (0, 1, 2), done.stdout + done.stderr
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


async def test_typescript_handler_one_request_one_deployment(
    ts_handler: Path,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    flysim: Any,
    request_json: Callable[..., dict[str, Any]],
    project_id: str,
) -> None:
    body = request_json(deployment_id=f"job-{uuid.uuid4().hex[:8]}")
    code, events = await asyncio.to_thread(_node_deploy, ts_handler, settings, body)
    assert code == 0, events
    kinds = [e["event"] for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "deployed" and "progress" in kinds
    assert events[-1]["deployment_id"] == body["deployment_id"]
    assert {e["deployment_id"] for e in events if e["event"] == "progress"} == {
        body["deployment_id"]
    }
    app = f"turbobackend-{project_id}"
    requests = api_requests_for(flysim, app)

    # The handler retried after a crash: the same deployment, not a second one.
    code, events = await asyncio.to_thread(_node_deploy, ts_handler, settings, body)
    assert code == 0, events
    assert events[-1]["event"] == "deployed"
    assert events[-1]["deployment_id"] == body["deployment_id"]
    rows = await rows_of(project_id)
    assert [(r["deployment_id"], r["status"]) for r in rows] == [
        (body["deployment_id"], "deployed")
    ]
    assert api_requests_for(flysim, app) == requests

    # Without an id, the workflow assigns one and the handler is told it.
    code, events = await asyncio.to_thread(_node_deploy, ts_handler, settings, request_json())
    assert code == 0, events
    assigned = events[0]["deployment_id"]
    assert assigned.startswith("d-") and events[-1]["deployment_id"] == assigned
    assert [r["deployment_id"] for r in await rows_of(project_id)] == [
        body["deployment_id"],
        assigned,
    ]


async def test_typescript_handler_destroys_the_app(
    ts_handler: Path,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    flysim: Any,
    request_json: Callable[..., dict[str, Any]],
    project_id: str,
) -> None:
    code, events = await asyncio.to_thread(_node_deploy, ts_handler, settings, request_json())
    assert code == 0, events
    app = f"turbobackend-{project_id}"
    assert [a for a in flysim.snapshot()["apps"] if a["name"] == app]
    code, events = await asyncio.to_thread(
        _node_deploy, ts_handler, settings, {"project_id": project_id}, command="destroy"
    )
    assert code == 0, events
    assert events[0]["event"] == "accepted" and events[-1]["event"] == "destroyed"
    assert events[-1]["status"] == "destroyed" and "1 machine(s)" in events[-1]["detail"]
    state = flysim.snapshot()
    assert not [a for a in state["apps"] if a["name"] == app]
    assert not [m for m in state["machines"] if m["app"] == app]
    assert [r["status"] for r in await rows_of(project_id)] == ["deployed", "destroyed"]


async def test_typescript_handler_gets_a_bad_request_refused(
    ts_handler: Path,
    settings: Settings,
    json_client: Client,
    worker: None,
    rows_of: Rows,
) -> None:
    project_id = f"Bad_{uuid.uuid4().hex[:6]}"  # upper case and '_': no Fly app name
    began = time.monotonic()
    code, events = await asyncio.to_thread(
        _node_deploy, ts_handler, settings, BAD | {"project_id": project_id}
    )
    assert time.monotonic() - began < 15
    assert code == 2
    assert events == [
        {
            "event": "rejected",
            "type": "InvalidRequest",
            "message": events[0]["message"],
        }
    ]
    assert f"project_id: project id '{project_id}' is not usable" in events[0]["message"]
    description = await json_client.get_workflow_handle(f"deploy-{project_id}").describe()
    assert description.status != WorkflowExecutionStatus.RUNNING
    assert await rows_of(project_id) == []
    # The run's search attribute, set to deploying by the handler, says failed.
    status = description.typed_search_attributes.get(SearchAttributeKey.for_keyword("DeployStatus"))
    assert status == DeployStatus.FAILED


async def test_without_a_worker_a_submit_says_whether_its_request_is_safe(
    temporal_client: Client,
    json_client: Client,
    settings: Settings,
    make_request: Callable[..., DeployRequest],
    project_id: str,
) -> None:
    """No worker polls the queue: the update cannot be answered. The request that is the
    run's start input is durable, and its handle comes back; one that would only join the
    running project's queue is not, and the caller is told to send it again."""
    first = make_request(deployment_id=f"first-{uuid.uuid4().hex[:6]}")
    second = make_request(deployment_id=f"second-{uuid.uuid4().hex[:6]}")
    quick = timedelta(seconds=1)
    handle = await submit(
        temporal_client, first, task_queue=settings.task_queue, accept_timeout=quick
    )
    try:
        assert handle.deployment_id == first.deployment_id and handle.run_id
        again = await submit(
            temporal_client, first, task_queue=settings.task_queue, accept_timeout=quick
        )
        assert again.run_id == handle.run_id
        with pytest.raises(DeployError, match="submit the same request again"):
            await submit(
                temporal_client, second, task_queue=settings.task_queue, accept_timeout=quick
            )
    finally:
        await json_client.get_workflow_handle(first.workflow_id).terminate("test over")
