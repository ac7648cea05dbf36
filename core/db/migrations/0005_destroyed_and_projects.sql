-- A project's app can be destroyed: its rows stay (the history) and the destroy's own row
-- ends `destroyed`. Where the platform's own `projects` table lives in this schema (the
-- seed's `turbobackend.projects`), every deployment must name one of its projects.
-- Runs with search_path set to the service's schema.

ALTER TABLE project_deployments DROP CONSTRAINT project_deployments_status_check;
ALTER TABLE project_deployments
    ADD CONSTRAINT project_deployments_status_check CHECK (
        status IN ('queued', 'deploying', 'deployed', 'failed', 'stopped', 'cancelled',
                   'rolled_back', 'superseded', 'destroyed')
    );

-- NOT VALID: rows written before the reference existed are not checked, new ones are.
-- Only when `projects.project_id` is unique (a primary key or a unique constraint alone
-- on it), which a foreign key needs.
DO $$
DECLARE
    projects regclass := to_regclass(quote_ident(current_schema()) || '.projects');
BEGIN
    IF projects IS NULL THEN
        RETURN;
    END IF;
    IF NOT EXISTS (
        SELECT 1
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        WHERE c.conrelid = projects AND c.contype IN ('p', 'u')
          AND array_length(c.conkey, 1) = 1 AND a.attname = 'project_id'
    ) THEN
        RAISE NOTICE 'projects.project_id is not unique: no reference to it added';
        RETURN;
    END IF;
    ALTER TABLE project_deployments
        ADD CONSTRAINT project_deployments_project_fkey FOREIGN KEY (project_id)
        REFERENCES projects (project_id) NOT VALID;
END
$$;
