-- One row per deployment of a project. Runs with search_path set to the service's schema.

CREATE TABLE project_deployments (
    deployment_id VARCHAR PRIMARY KEY,
    project_id    VARCHAR NOT NULL,
    platform      VARCHAR NOT NULL DEFAULT 'flyio',
    app_name      VARCHAR NOT NULL,
    url           VARCHAR NOT NULL,
    status        VARCHAR NOT NULL,
    -- Epoch seconds, from the database clock.
    deployed_at   BIGINT  NOT NULL,
    last_updated  BIGINT  NOT NULL,
    finished_at   BIGINT,
    workflow_id   VARCHAR,
    run_id        VARCHAR,
    repo_url      VARCHAR,
    branch        VARCHAR,
    commit_sha    VARCHAR,
    image         VARCHAR,
    machine_ids   TEXT[]  NOT NULL DEFAULT '{}',
    error         TEXT,
    -- Insertion order: breaks ties between deployments started within the same second.
    seq           BIGINT  GENERATED ALWAYS AS IDENTITY,
    CONSTRAINT project_deployments_status_check CHECK (
        status IN ('deploying', 'deployed', 'failed', 'stopped', 'cancelled', 'rolled_back')
    ),
    CONSTRAINT project_deployments_ids_check CHECK (
        deployment_id <> '' AND project_id <> '' AND app_name <> '' AND url <> ''
    ),
    CONSTRAINT project_deployments_finished_check CHECK (
        (status = 'deploying') = (finished_at IS NULL)
    )
);

CREATE INDEX project_deployments_project_deployed_at_idx
    ON project_deployments (project_id, deployed_at DESC, seq DESC);
