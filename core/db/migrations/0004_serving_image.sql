-- What served when a deployment ended, beside what it tried (`image`): the same image when
-- it deployed, the previous release's after an automatic rollback, NULL when nothing
-- served (a failed first deploy whose machines were removed) or it is not known.
-- Runs with search_path set to the service's schema.

ALTER TABLE project_deployments ADD COLUMN serving_image VARCHAR;
ALTER TABLE releases ADD COLUMN serving_image VARCHAR;

-- Rows written before this column: a deployed one serves its own image, and a rolled-back
-- one recorded the image put back in `image` (what it tried was not kept).
UPDATE project_deployments SET serving_image = image
    WHERE status IN ('deployed', 'rolled_back');
UPDATE releases SET serving_image = image WHERE status IN ('deployed', 'rolled_back');
