-- Deployments may wait in a queue and be superseded by a newer request; each deployment
-- that reached its rollout keeps a release bundle, enough to put that release back later.
-- Runs with search_path set to the service's schema.

ALTER TABLE project_deployments
    DROP CONSTRAINT project_deployments_status_check,
    DROP CONSTRAINT project_deployments_finished_check;

ALTER TABLE project_deployments
    ADD CONSTRAINT project_deployments_status_check CHECK (
        status IN ('queued', 'deploying', 'deployed', 'failed', 'stopped', 'cancelled',
                   'rolled_back', 'superseded')
    ),
    ADD CONSTRAINT project_deployments_finished_check CHECK (
        (status IN ('queued', 'deploying')) = (finished_at IS NULL)
    ),
    -- The target of the releases' foreign key: a release names its deployment's project.
    ADD CONSTRAINT project_deployments_project_key UNIQUE (deployment_id, project_id);

CREATE TABLE releases (
    deployment_id VARCHAR PRIMARY KEY,
    project_id    VARCHAR NOT NULL,
    app_name      VARCHAR NOT NULL,
    status        VARCHAR NOT NULL,
    strategy      VARCHAR NOT NULL,
    image         VARCHAR NOT NULL,
    image_digest  VARCHAR,
    commit_sha    VARCHAR,
    fly_toml      TEXT    NOT NULL,
    -- The request's plain environment. Secrets appear by name, SSM parameter and version
    -- only: their values never reach the database.
    env           JSONB   NOT NULL DEFAULT '{}',
    secrets       JSONB   NOT NULL DEFAULT '[]',
    machines      JSONB   NOT NULL DEFAULT '[]',
    snapshot      JSONB,
    -- Epoch seconds: when the release was first recorded.
    created_at    BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL,
    -- Insertion order: breaks ties between releases recorded within the same second.
    seq           BIGINT  GENERATED ALWAYS AS IDENTITY,
    CONSTRAINT releases_deployment_fkey FOREIGN KEY (deployment_id, project_id)
        REFERENCES project_deployments (deployment_id, project_id) ON DELETE CASCADE,
    CONSTRAINT releases_status_check CHECK (
        status IN ('queued', 'deploying', 'deployed', 'failed', 'stopped', 'cancelled',
                   'rolled_back', 'superseded')
    ),
    CONSTRAINT releases_ids_check CHECK (
        deployment_id <> '' AND project_id <> '' AND app_name <> '' AND image <> ''
    ),
    CONSTRAINT releases_json_check CHECK (
        jsonb_typeof(env) = 'object' AND jsonb_typeof(secrets) = 'array'
        AND jsonb_typeof(machines) = 'array'
        AND (snapshot IS NULL OR jsonb_typeof(snapshot) = 'object')
    )
);

CREATE INDEX releases_project_created_at_idx ON releases (project_id, created_at DESC, seq DESC);
