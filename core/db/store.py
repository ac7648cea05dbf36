"""The `project_deployments` table: one row per deployment, written by the deploy activities.

Every write is safe to repeat, because Temporal retries activities: a repeated start never
adds a row and never moves a finished deployment back to `deploying`, and a repeated result
is a no-op. Timestamps are epoch seconds from the database clock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NotRequired, TypedDict, Unpack

import asyncpg

from core.db.queries import Queries
from core.models import (
    DeploymentRow,
    DeployStatus,
    MachineOutcome,
    ReleaseRecord,
    SecretVersion,
)

log = logging.getLogger(__name__)

PLATFORM = "flyio"
MAX_ERROR_CHARS = 2000
MAX_HISTORY = 1000

_MIGRATION_NAME_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Fly tokens (macaroons `fm1r_`/`fm2_…`, OAuth `fo1_…`) and bearer credentials: an error
# text quoted from a failed request must not carry them into the table.
_CREDENTIAL_RE = re.compile(
    r"(?:FlyV1\s+)?\b(?:fm\d[a-z]?|fo\d)_[A-Za-z0-9_+/=,.-]+|(?i:bearer)\s+[A-Za-z0-9_+/=,.~-]{16,}"
)


class DeploymentRecordError(Exception):
    """A write the records refuse; repeating it cannot succeed."""


class DeploymentNotFound(DeploymentRecordError, LookupError):
    pass


class DeploymentConflict(DeploymentRecordError):
    pass


class ProjectNotRegistered(DeploymentRecordError, LookupError):
    """The schema has the platform's `projects` table, and the project is not in it."""


async def create_pool(
    url: str,
    min_size: int = 1,
    max_size: int = 10,
    *,
    connect_timeout: float = 10.0,
    command_timeout: float = 30.0,
) -> asyncpg.Pool[asyncpg.Record]:
    """A connection pool; `min_size=0` opens no connection until the first query."""
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout,
        command_timeout=command_timeout,
        server_settings={"application_name": "turbodeploy"},
    )


@dataclass(frozen=True)
class _Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@functools.cache
def _migrations() -> tuple[_Migration, ...]:
    folder = resources.files("core.db").joinpath("migrations")
    found: dict[int, _Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME_RE.match(entry.name)
        if not match:
            raise RuntimeError(f"migration {entry.name!r} is not named NNNN_lower_case.sql")
        version = int(match.group(1))
        if version in found:
            raise RuntimeError(f"migrations {found[version].name} and {entry.name} share a number")
        found[version] = _Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    return tuple(found[v] for v in sorted(found))


def _lock_key(schema: str) -> int:
    # One lock per schema, so services sharing a database do not wait on each other.
    digest = hashlib.blake2b(f"turbodeploy.migrate:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def clean_error(error: str | None) -> str | None:
    """An error text fit for the table: no credentials, no NUL bytes, bounded length."""
    if error is None:
        return None
    text = _CREDENTIAL_RE.sub("[redacted]", error).replace("\x00", "\ufffd")
    if len(text) > MAX_ERROR_CHARS:
        keep = MAX_ERROR_CHARS - 40  # room for the note below
        text = f"{text[:keep]}… [{len(text) - keep} characters cut]"
    return text


class NewDeployment(TypedDict):
    """A deployment's row as it is first written (queued or deploying)."""

    deployment_id: str
    project_id: str
    app_name: str
    url: str
    workflow_id: NotRequired[str | None]
    run_id: NotRequired[str | None]
    repo_url: NotRequired[str | None]
    branch: NotRequired[str | None]
    image: NotRequired[str | None]
    # The first run of the workflow chain writing it (see record_started).
    first_run_id: NotRequired[str | None]


class DeploymentStore:
    def __init__(
        self, pool: asyncpg.Pool[Any], schema: str, *, acquire_timeout: float = 10.0
    ) -> None:
        self._sql = Queries.for_schema(schema)  # rejects an invalid name before any I/O
        self._schema = schema
        self._pool = pool
        self._acquire_timeout = acquire_timeout

    @property
    def schema(self) -> str:
        return self._schema

    async def migrate(self) -> list[str]:
        """Apply the migrations this schema lacks, in order; returns the names applied.

        One transaction under an advisory lock: workers starting together apply each
        migration once, and a failing migration leaves nothing half done.
        """
        q = self._sql
        applied_now: list[str] = []
        async with (
            self._pool.acquire(timeout=self._acquire_timeout) as conn,
            conn.transaction(),
        ):
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(self._schema))
            # CREATE SCHEMA checks the privilege even when the schema exists; a role that
            # may only use an existing schema must still be able to start.
            if not await conn.fetchval(q.schema_exists, self._schema):
                await conn.execute(q.create_schema)
            await conn.execute(q.create_migrations)
            applied = {
                r["version"]: (r["name"], r["checksum"])
                for r in await conn.fetch(q.applied_migrations)
            }
            # Migration files name no schema: they create their objects in this one.
            await conn.execute(q.set_search_path)
            for migration in _migrations():
                if migration.version in applied:
                    name, checksum = applied[migration.version]
                    if checksum != migration.checksum:
                        log.warning(
                            "migration %s was changed after it was applied to schema %s "
                            "(as %s); the change is not applied",
                            migration.name,
                            self._schema,
                            name,
                        )
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    q.insert_migration, migration.version, migration.name, migration.checksum
                )
                applied_now.append(migration.name)
        if applied_now:
            log.info("schema %s: applied migrations %s", self._schema, ", ".join(applied_now))
        return applied_now

    async def record_started(self, **row: Unpack[NewDeployment]) -> DeploymentRow:
        """Insert the row as `deploying` (or move a `queued` one there), or return it.

        A repeat while still deploying points the row at the current run; a repeat after the
        deployment finished changes nothing, so a late retry cannot undo a result, unless it
        comes from another run of the chain that wrote the row (`first_run_id`: a reset
        run), which starts the deployment again.
        """
        return await self._insert(self._sql.record_started, row)

    async def record_queued(self, **row: Unpack[NewDeployment]) -> DeploymentRow:
        """Insert the row as `queued`, or return the existing one unchanged."""
        return await self._insert(self._sql.record_queued, row)

    async def _insert(self, sql: str, row: NewDeployment) -> DeploymentRow:
        deployment_id, project_id = row["deployment_id"], row["project_id"]
        try:
            inserted = await self._insert_row(sql, row)
        except asyncpg.ForeignKeyViolationError:
            raise ProjectNotRegistered(
                f"project {project_id} is not in {self._schema}.projects: the platform must "
                "create the project before it is deployed"
            ) from None
        if inserted is not None:
            return inserted
        existing = await self.get(deployment_id)
        if existing is None:  # deleted between the two statements
            raise DeploymentNotFound(f"deployment {deployment_id} vanished while recording it")
        if existing.project_id != project_id:
            raise DeploymentConflict(
                f"deployment id {deployment_id} already belongs to project {existing.project_id}"
            )
        return existing

    async def _insert_row(self, sql: str, row: NewDeployment) -> DeploymentRow | None:
        deployment_id, project_id = row["deployment_id"], row["project_id"]
        return await self._fetchrow(
            sql,
            deployment_id,
            project_id,
            PLATFORM,
            row["app_name"],
            row["url"],
            row.get("workflow_id"),
            row.get("run_id"),
            row.get("repo_url"),
            row.get("branch"),
            row.get("image"),
            row.get("first_run_id"),
        )

    async def record_result(
        self,
        deployment_id: str,
        status: DeployStatus,
        commit_sha: str | None = None,
        image: str | None = None,
        machine_ids: Sequence[str] = (),
        error: str | None = None,
        serving_image: str | None = None,
    ) -> DeploymentRow:
        """Move a `deploying` (or `queued`) row to `status`, any final status included;
        repeating a recorded result is a no-op.

        `image` is what the deployment tried (None keeps the one recorded at its start);
        `serving_image` what served when it ended (None: nothing, or not known).

        Raises DeploymentNotFound for an unknown id and DeploymentConflict when the row
        already holds a different final status.
        """
        status = DeployStatus(status)
        row = await self._fetchrow(
            self._sql.record_result,
            deployment_id,
            status.value,
            commit_sha,
            image,
            list(machine_ids),
            clean_error(error),
            serving_image,
        )
        if row is not None:
            return row
        existing = await self.get(deployment_id)
        if existing is None:
            raise DeploymentNotFound(f"deployment {deployment_id} has no record")
        if existing.status is not status:
            raise DeploymentConflict(
                f"deployment {deployment_id} is already {existing.status}; "
                f"it cannot become {status}"
            )
        return existing

    async def close_run(self, project_id: str, run_id: str, error: str) -> list[DeploymentRow]:
        """Record as `failed`, with `error`, every deployment the run left `deploying` or
        `queued`: for a run that was terminated, whose own cleanup never ran."""
        return await self._fetch(self._sql.close_run, project_id, run_id, clean_error(error))

    async def close_orphans(self, project_id: str, run_id: str) -> list[DeploymentRow]:
        """Record as `failed` the open deployments of the project's runs other than `run_id`.

        Called by a run when it starts a deployment: one run of a project exists at a time,
        so an open row of another run was left by a run that ended without recording it.
        """
        return await self._fetch(self._sql.close_orphans, project_id, run_id)

    async def get(self, deployment_id: str) -> DeploymentRow | None:
        return await self._fetchrow(self._sql.get, deployment_id)

    async def latest(self, project_id: str) -> DeploymentRow | None:
        rows = await self.history(project_id, limit=1)
        return rows[0] if rows else None

    async def history(self, project_id: str, limit: int = 20) -> list[DeploymentRow]:
        """The project's deployments, newest first."""
        if not 1 <= limit <= MAX_HISTORY:
            raise ValueError(f"limit must be between 1 and {MAX_HISTORY}")
        return await self._fetch(self._sql.history, project_id, limit)

    # ------------------------------------------------------------------------ releases

    async def record_release(self, record: ReleaseRecord) -> None:
        """Store the release bundle of a recorded deployment; repeating it is a no-op.

        A changed bundle for the same deployment replaces the stored one (its `created_at`
        stays the first one). Raises DeploymentNotFound when the deployment has no row, and
        DeploymentConflict when the row belongs to another project.
        """
        data = record.model_dump(mode="json")
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                await conn.execute(
                    self._sql.record_release,
                    record.deployment_id,
                    record.project_id,
                    record.app_name,
                    data["status"],
                    data["strategy"],
                    record.image,
                    record.image_digest,
                    record.commit_sha,
                    record.fly_toml,
                    json.dumps(data["env"]),
                    json.dumps(data["secrets"]),
                    json.dumps(data["machines"]),
                    None if record.snapshot is None else json.dumps(data["snapshot"]),
                    record.created_at,
                    record.serving_image,
                )
        except asyncpg.ForeignKeyViolationError:
            existing = await self.get(record.deployment_id)
            if existing is None:
                raise DeploymentNotFound(
                    f"deployment {record.deployment_id} has no record; its start must be "
                    "recorded before its release"
                ) from None
            raise DeploymentConflict(
                f"deployment {record.deployment_id} belongs to project {existing.project_id}, "
                f"not {record.project_id}"
            ) from None

    async def release(self, deployment_id: str) -> ReleaseRecord | None:
        async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
            record = await conn.fetchrow(self._sql.release, deployment_id)
        return None if record is None else _to_release(record)

    async def releases(self, project_id: str, limit: int = 20) -> list[ReleaseRecord]:
        """The project's releases, newest first."""
        if not 1 <= limit <= MAX_HISTORY:
            raise ValueError(f"limit must be between 1 and {MAX_HISTORY}")
        async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
            records = await conn.fetch(self._sql.releases, project_id, limit)
        return [_to_release(r) for r in records]

    async def last_good_release(
        self, project_id: str, *, before_deployment_id: str | None = None
    ) -> ReleaseRecord | None:
        """The newest `deployed` release of the project, or None.

        With `before_deployment_id`, that release is skipped, and so is everything newer
        when it has a release of this project.
        """
        async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
            record = await conn.fetchrow(
                self._sql.last_good_release, project_id, before_deployment_id
            )
        return None if record is None else _to_release(record)

    async def last_good_outline(self, project_id: str) -> ReleaseOutline | None:
        """The machines' outcomes, the secrets and the image of the newest `deployed` release,
        or None."""
        async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
            record = await conn.fetchrow(self._sql.last_good_outline, project_id)
        if record is None:
            return None
        return ReleaseOutline(
            machines=[MachineOutcome.model_validate(m) for m in _json(record["machines"])],
            secrets=[SecretVersion.model_validate(s) for s in _json(record["secrets"])],
            image=record["image"],
        )

    async def _fetch(self, sql: str, *args: Any) -> list[DeploymentRow]:
        async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
            records = await conn.fetch(sql, *args)
        return [_to_row(r) for r in records]

    async def _fetchrow(self, sql: str, *args: Any) -> DeploymentRow | None:
        async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
            record = await conn.fetchrow(sql, *args)
        return None if record is None else _to_row(record)


def _to_row(record: asyncpg.Record) -> DeploymentRow:
    return DeploymentRow.model_validate(dict(record))


@dataclass(frozen=True)
class ReleaseOutline:
    """The parts of a release bundle the next deploy reads."""

    machines: list[MachineOutcome]
    secrets: list[SecretVersion]
    image: str | None = None  # what the release serves


_JSON_COLUMNS = ("env", "secrets", "machines", "snapshot")


def _json(value: Any) -> Any:
    # asyncpg hands JSONB over as text unless a codec is set on every connection.
    return json.loads(value) if isinstance(value, str) else value


def _to_release(record: asyncpg.Record) -> ReleaseRecord:
    data = dict(record)
    for column in _JSON_COLUMNS:
        data[column] = _json(data[column])
    return ReleaseRecord.model_validate(data)
