-- The first run of the workflow chain that wrote a deployment's row. A run of the same
-- chain (after `temporal workflow reset`) may start a finished deployment again; a new
-- chain (the same request sent again after its run closed) finds the outcome instead.
-- Runs with search_path set to the service's schema.

ALTER TABLE project_deployments ADD COLUMN first_run_id VARCHAR;
