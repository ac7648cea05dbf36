"""The SQL of the deployment records, rendered once per schema.

The schema name is the only text ever put into a statement: it is validated by
`validate_schema_name` and quoted as an identifier. Every value travels as a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import validate_schema_name

# Epoch seconds from the database clock, so workers with skewed clocks still agree.
NOW = "FLOOR(EXTRACT(EPOCH FROM now()))::BIGINT"

COLUMNS = (
    "deployment_id, project_id, platform, app_name, url, status, deployed_at, last_updated, "
    "workflow_id, run_id, repo_url, branch, commit_sha, image, serving_image, machine_ids, error,"
    " finished_at"
)
RELEASE_COLUMNS = (
    "deployment_id, project_id, app_name, status, strategy, image, serving_image, image_digest,"
    " commit_sha, fly_toml, env, secrets, machines, snapshot, created_at"
)
# Statuses of a deployment that has not ended yet.
_OPEN = "('deploying', 'queued')"
# Releases recorded before the project's app was last destroyed belong to an app that is
# gone: a later deploy starts from scratch and a rollback cannot go back to them.
_SINCE_DESTROYED = (
    "COALESCE((SELECT MAX(finished_at) FROM {schema}.project_deployments"
    " WHERE project_id = $1 AND status = 'destroyed'), 0)"
)

_TEMPLATES = {
    "schema_exists": "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
    "create_schema": "CREATE SCHEMA IF NOT EXISTS {schema}",
    "create_migrations": (
        "CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
        " version INTEGER PRIMARY KEY,"
        " name VARCHAR NOT NULL,"
        " checksum VARCHAR NOT NULL,"
        " applied_at BIGINT NOT NULL DEFAULT {now})"
    ),
    "applied_migrations": "SELECT version, name, checksum FROM {schema}.schema_migrations",
    "set_search_path": "SET LOCAL search_path TO {schema}",
    "insert_migration": (
        "INSERT INTO {schema}.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
    ),
    # A queued row starts deploying (deployed_at becomes the start); a repeat while still
    # deploying points the row at the current run; a finished row is left alone (the WHERE
    # makes the conflict a no-op, so RETURNING yields nothing), unless a later run of the
    # chain that wrote it starts it again (a reset): then it is deploying again, its old
    # result cleared.
    "record_started": (
        "INSERT INTO {schema}.project_deployments AS d (deployment_id, project_id, platform,"
        " app_name, url, status, deployed_at, last_updated, workflow_id, run_id, repo_url,"
        " branch, image, first_run_id)"
        " VALUES ($1, $2, $3, $4, $5, 'deploying', {now}, {now}, $6, $7, $8, $9, $10, $11)"
        " ON CONFLICT (deployment_id) DO UPDATE SET status = 'deploying',"
        " deployed_at = CASE WHEN d.status = 'queued' THEN EXCLUDED.deployed_at"
        " ELSE d.deployed_at END,"
        " workflow_id = EXCLUDED.workflow_id, run_id = EXCLUDED.run_id,"
        " image = COALESCE(EXCLUDED.image, d.image), last_updated = EXCLUDED.last_updated,"
        " error = CASE WHEN d.status IN {open} THEN d.error END, finished_at = NULL,"
        " serving_image = NULL,"
        " first_run_id = COALESCE(d.first_run_id, EXCLUDED.first_run_id)"
        " WHERE d.project_id = EXCLUDED.project_id AND (d.status IN {open}"
        " OR (d.first_run_id = EXCLUDED.first_run_id AND d.run_id IS DISTINCT FROM $7))"
        " RETURNING {columns}"
    ),
    # A request waiting behind a running deploy. Never changes an existing row: the queued
    # record may arrive after the deploy started (its activity retried), or after it ended.
    "record_queued": (
        "INSERT INTO {schema}.project_deployments (deployment_id, project_id, platform,"
        " app_name, url, status, deployed_at, last_updated, workflow_id, run_id, repo_url,"
        " branch, image, first_run_id)"
        " VALUES ($1, $2, $3, $4, $5, 'queued', {now}, {now}, $6, $7, $8, $9, $10, $11)"
        " ON CONFLICT (deployment_id) DO NOTHING"
        " RETURNING {columns}"
    ),
    "record_result": (
        "UPDATE {schema}.project_deployments SET status = $2::VARCHAR,"
        " commit_sha = COALESCE($3, commit_sha), image = COALESCE($4, image),"
        " serving_image = $7, machine_ids = $5, error = $6, last_updated = {now},"
        " finished_at = CASE WHEN $2::VARCHAR IN {open} THEN NULL ELSE {now} END"
        " WHERE deployment_id = $1 AND status IN {open}"
        " RETURNING {columns}"
    ),
    # Every deployment a run left open, when the run ended without recording them.
    "close_run": (
        "UPDATE {schema}.project_deployments SET status = 'failed', error = $3,"
        " last_updated = {now}, finished_at = {now}"
        " WHERE project_id = $1 AND run_id = $2 AND status IN {open}"
        " RETURNING {columns}"
    ),
    # Open deployments of the project's earlier runs: a project has one run at a time, so
    # those runs ended without recording them (terminated, or timed out).
    "close_orphans": (
        "UPDATE {schema}.project_deployments SET status = 'failed',"
        " error = 'its workflow run ' || COALESCE(run_id, '?') || ' ended without recording"
        " a result (terminated or timed out); no cleanup ran',"
        " last_updated = {now}, finished_at = {now}"
        " WHERE project_id = $1 AND run_id IS DISTINCT FROM $2 AND status IN {open}"
        " RETURNING {columns}"
    ),
    "get": "SELECT {columns} FROM {schema}.project_deployments WHERE deployment_id = $1",
    "history": (
        "SELECT {columns} FROM {schema}.project_deployments WHERE project_id = $1"
        " ORDER BY deployed_at DESC, seq DESC LIMIT $2"
    ),
    # A repeat of the same bundle writes nothing; a changed one (a status corrected after a
    # rollback) replaces it but keeps when it was first recorded. A bundle naming another
    # project than its deployment breaks the foreign key.
    "record_release": (
        "INSERT INTO {schema}.releases AS r (deployment_id, project_id, app_name, status,"
        " strategy, image, image_digest, commit_sha, fly_toml, env, secrets, machines,"
        " snapshot, created_at, updated_at, serving_image)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::JSONB, $11::JSONB, $12::JSONB,"
        " $13::JSONB, COALESCE($14::BIGINT, {now}), {now}, $15)"
        " ON CONFLICT (deployment_id) DO UPDATE SET"
        " project_id = EXCLUDED.project_id, app_name = EXCLUDED.app_name,"
        " status = EXCLUDED.status, strategy = EXCLUDED.strategy, image = EXCLUDED.image,"
        " image_digest = EXCLUDED.image_digest, commit_sha = EXCLUDED.commit_sha,"
        " fly_toml = EXCLUDED.fly_toml, env = EXCLUDED.env, secrets = EXCLUDED.secrets,"
        " machines = EXCLUDED.machines, snapshot = EXCLUDED.snapshot,"
        " serving_image = EXCLUDED.serving_image, updated_at = EXCLUDED.updated_at"
        " WHERE (r.project_id, r.app_name, r.status, r.strategy, r.image, r.image_digest,"
        " r.commit_sha, r.fly_toml, r.env, r.secrets, r.machines, r.snapshot, r.serving_image)"
        " IS DISTINCT FROM (EXCLUDED.project_id, EXCLUDED.app_name, EXCLUDED.status,"
        " EXCLUDED.strategy, EXCLUDED.image, EXCLUDED.image_digest, EXCLUDED.commit_sha,"
        " EXCLUDED.fly_toml, EXCLUDED.env, EXCLUDED.secrets, EXCLUDED.machines,"
        " EXCLUDED.snapshot, EXCLUDED.serving_image)"
    ),
    "release": "SELECT {release_columns} FROM {schema}.releases WHERE deployment_id = $1",
    "releases": (
        "SELECT {release_columns} FROM {schema}.releases WHERE project_id = $1"
        " ORDER BY created_at DESC, seq DESC LIMIT $2"
    ),
    # The newest deployed release other than $2 and, when $2 has a release of this
    # project, older than it.
    "last_good_release": (
        "WITH pivot AS (SELECT created_at, seq FROM {schema}.releases"
        " WHERE deployment_id = $2 AND project_id = $1)"
        " SELECT {release_columns} FROM {schema}.releases r"
        " WHERE r.project_id = $1 AND r.status = 'deployed'"
        " AND r.created_at >= {since_destroyed}"
        " AND r.deployment_id IS DISTINCT FROM $2"
        " AND NOT EXISTS (SELECT 1 FROM pivot p"
        " WHERE (r.created_at, r.seq) >= (p.created_at, p.seq))"
        " ORDER BY r.created_at DESC, r.seq DESC LIMIT 1"
    ),
    # What a new deploy needs of the release it replaces: three small columns, not the bundle.
    "last_good_outline": (
        "SELECT machines, secrets, image FROM {schema}.releases"
        " WHERE project_id = $1 AND status = 'deployed' AND created_at >= {since_destroyed}"
        " ORDER BY created_at DESC, seq DESC LIMIT 1"
    ),
}


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Queries:
    schema_exists: str
    create_schema: str
    create_migrations: str
    applied_migrations: str
    set_search_path: str
    insert_migration: str
    record_started: str
    record_queued: str
    record_result: str
    close_run: str
    close_orphans: str
    get: str
    history: str
    record_release: str
    release: str
    releases: str
    last_good_release: str
    last_good_outline: str

    @classmethod
    def for_schema(cls, schema: str) -> Queries:
        quoted = quote_identifier(validate_schema_name(schema))
        return cls(
            **{
                name: template.format(
                    schema=quoted,
                    now=NOW,
                    columns=COLUMNS,
                    release_columns=RELEASE_COLUMNS,
                    open=_OPEN,
                    since_destroyed=_SINCE_DESTROYED.format(schema=quoted),
                )
                for name, template in _TEMPLATES.items()
            }
        )
