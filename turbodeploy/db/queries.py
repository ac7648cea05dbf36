"""The SQL of the deployment records, rendered once per schema.

The schema name is the only text ever put into a statement: it is validated by
`validate_schema_name` and quoted as an identifier. Every value travels as a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from turbodeploy.settings import validate_schema_name

# Epoch seconds from the database clock, so workers with skewed clocks still agree.
NOW = "FLOOR(EXTRACT(EPOCH FROM now()))::BIGINT"

COLUMNS = (
    "deployment_id, project_id, platform, app_name, url, status, deployed_at, last_updated, "
    "workflow_id, run_id, repo_url, branch, commit_sha, image, machine_ids, error, finished_at"
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
    # A repeat while still deploying points the row at the current run; a finished row is
    # left alone (the WHERE makes the conflict a no-op, so RETURNING yields nothing).
    "record_started": (
        "INSERT INTO {schema}.project_deployments AS d (deployment_id, project_id, platform,"
        " app_name, url, status, deployed_at, last_updated, workflow_id, run_id, repo_url,"
        " branch, image)"
        " VALUES ($1, $2, $3, $4, $5, 'deploying', {now}, {now}, $6, $7, $8, $9, $10)"
        " ON CONFLICT (deployment_id) DO UPDATE SET"
        " workflow_id = EXCLUDED.workflow_id, run_id = EXCLUDED.run_id,"
        " image = COALESCE(EXCLUDED.image, d.image), last_updated = EXCLUDED.last_updated"
        " WHERE d.status = 'deploying' AND d.project_id = EXCLUDED.project_id"
        " RETURNING {columns}"
    ),
    "record_result": (
        "UPDATE {schema}.project_deployments SET status = $2::VARCHAR,"
        " commit_sha = COALESCE($3, commit_sha), image = COALESCE($4, image),"
        " machine_ids = $5, error = $6, last_updated = {now},"
        " finished_at = CASE WHEN $2::VARCHAR = 'deploying' THEN NULL ELSE {now} END"
        " WHERE deployment_id = $1 AND status = 'deploying'"
        " RETURNING {columns}"
    ),
    "get": "SELECT {columns} FROM {schema}.project_deployments WHERE deployment_id = $1",
    "history": (
        "SELECT {columns} FROM {schema}.project_deployments WHERE project_id = $1"
        " ORDER BY deployed_at DESC, seq DESC LIMIT $2"
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
    record_result: str
    get: str
    history: str

    @classmethod
    def for_schema(cls, schema: str) -> Queries:
        quoted = quote_identifier(validate_schema_name(schema))
        return cls(
            **{
                name: template.format(schema=quoted, now=NOW, columns=COLUMNS)
                for name, template in _TEMPLATES.items()
            }
        )
