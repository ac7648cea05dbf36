/**
 * Starting and following turbodeploy deploys from Node.js, as the platform's execution
 * handler does, with nothing but `@temporalio/client` and the workflow's published contract
 * (README: "Starting deploys from any language"; JSON Schemas in `schemas/`).
 *
 *   const client = new Client({ connection: await Connection.connect({ address }) });
 *   const accepted = await startDeploy(client, { project_id: 'p1', repo_url, image });
 *   const result = await waitForResult(client, accepted); // throws DeployFailed
 *
 * One request is one deployment: send your own `deployment_id` (a job id, say) and a
 * handler retried after a crash gets the same deployment back instead of a second one.
 */
import {
  ApplicationFailure,
  Client,
  WithStartWorkflowOperation,
  WorkflowUpdateFailedError,
} from '@temporalio/client';
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';

export const WORKFLOW_TYPE = 'DeployProjectWorkflow';
export const DEFAULT_TASK_QUEUE = 'turbodeploy';
export const APP_NAME_PREFIX = 'turbobackend-';

const PROJECT_ID = defineSearchAttributeKey('ProjectId', SearchAttributeType.KEYWORD);
const FLY_APP = defineSearchAttributeKey('FlyApp', SearchAttributeType.KEYWORD);
const DEPLOY_STATUS = defineSearchAttributeKey('DeployStatus', SearchAttributeType.KEYWORD);

/** schemas/deploy-request.schema.json; only `project_id` and `repo_url` are required. */
export interface DeployRequest {
  kind?: 'deploy';
  project_id: string;
  repo_url: string;
  branch?: string;
  image?: string | null;
  region?: string;
  env?: Record<string, string>;
  machine_count?: number;
  strategy?: 'immediate' | 'rolling' | 'canary' | 'bluegreen' | 'flyctl';
  max_unavailable?: number;
  secrets?: Record<string, string>;
  callback_url?: string | null;
  deployment_id?: string;
  /** Durations as ISO 8601 strings ("PT5M"), e.g. `{ health_deadline: "PT10M" }`. */
  timings?: Record<string, string>;
}

/**
 * schemas/stop-request.schema.json, start-request, destroy-request: a request about the
 * project's app. A destroy cancels a running deploy first and removes the app from Fly.
 */
export interface AppRequest {
  kind: 'stop' | 'start' | 'destroy';
  project_id: string;
  deployment_id?: string;
  timings?: Record<string, string>;
}

/** What each kind of request ends as when it succeeds. */
export function successStatus(request: DeployRequest | AppRequest): string {
  if (request.kind === 'stop') return 'stopped';
  if (request.kind === 'destroy') return 'destroyed';
  return 'deployed';
}

/** schemas/accepted.schema.json: the answer of the `submit_request` update. */
export interface Accepted {
  deployment_id: string;
  project_id: string;
  workflow_id: string;
  run_id: string;
  status: string;
}

/** schemas/deploy-progress.schema.json: the `progress` query. */
export interface DeployProgress {
  deployment_id: string;
  project_id: string;
  step: string;
  step_index: number;
  step_count: number;
  detail: string;
  status: string;
  completed_steps: string[];
  error: string | null;
  queued: string[];
}

/** schemas/deploy-result.schema.json: what a deployment ended as. */
export interface DeployResult {
  deployment_id: string;
  project_id: string;
  app_name: string;
  url: string;
  status: string;
  commit_sha: string | null;
  image: string | null;
  machine_ids: string[];
  error: string | null;
  /** What a stop, start or destroy did, in one line. */
  detail?: string | null;
}

/** The workflow refused the request (error type `InvalidRequest`): nothing was started. */
export class DeployRejected extends Error {
  readonly type = 'InvalidRequest';
}

/** The deployment ended, but not deployed: `result.status` says how, `result.error` why. */
export class DeployFailed extends Error {
  constructor(readonly result: DeployResult) {
    super(`deployment ${result.deployment_id} ended ${result.status}: ${result.error ?? ''}`);
  }
}

export function workflowIdFor(projectId: string): string {
  return `deploy-${projectId}`;
}

/**
 * Hand `request` to its project's workflow with Update-with-Start: the workflow is started
 * when none runs, and the request is queued behind a running deploy otherwise. Resolves as
 * soon as the workflow has accepted it; a bad request rejects with `DeployRejected`.
 */
export async function startDeploy(
  client: Client,
  request: DeployRequest | AppRequest,
  taskQueue: string = DEFAULT_TASK_QUEUE,
): Promise<Accepted> {
  const startWorkflowOperation = new WithStartWorkflowOperation(WORKFLOW_TYPE, {
    workflowId: workflowIdFor(request.project_id),
    taskQueue,
    args: [request],
    workflowIdConflictPolicy: 'USE_EXISTING',
    typedSearchAttributes: [
      { key: PROJECT_ID, value: request.project_id },
      { key: FLY_APP, value: `${APP_NAME_PREFIX}${request.project_id}` },
      { key: DEPLOY_STATUS, value: 'deploying' },
    ],
  });
  try {
    return (await client.workflow.executeUpdateWithStart('submit_request', {
      args: [request],
      startWorkflowOperation,
      // The server answers a repeat of the same update id with its first answer.
      updateId: request.deployment_id ? `submit-${request.deployment_id}` : undefined,
    })) as Accepted;
  } catch (err) {
    if (
      err instanceof WorkflowUpdateFailedError &&
      err.cause instanceof ApplicationFailure &&
      err.cause.type === 'InvalidRequest'
    ) {
      throw new DeployRejected(err.cause.message);
    }
    throw err;
  }
}

/**
 * Remove the project's app from Fly (machines, volumes, IPs, secrets, the app), through
 * the same queue as its deploys: a running deploy is cancelled first, with its cleanup.
 * Wait for it with `waitForResult(client, accepted, 'destroyed')`.
 */
export async function startDestroy(
  client: Client,
  projectId: string,
  taskQueue: string = DEFAULT_TASK_QUEUE,
  deploymentId?: string,
): Promise<Accepted> {
  const request: AppRequest = { kind: 'destroy', project_id: projectId };
  if (deploymentId) request.deployment_id = deploymentId;
  return await startDeploy(client, request, taskQueue);
}

/** Where the project's deploy is now: step, status, what waits behind it. */
export async function progress(client: Client, projectId: string): Promise<DeployProgress> {
  return await client.workflow.getHandle(workflowIdFor(projectId)).query<DeployProgress>('progress');
}

/**
 * Wait for the accepted deployment to end; throws `DeployFailed` unless it ended as
 * `expected` (`deployed`; `stopped` for a stop, `destroyed` for a destroy).
 */
export async function waitForResult(
  client: Client,
  accepted: Accepted,
  expected: string = 'deployed',
): Promise<DeployResult> {
  const result =
    (await outcome(client, accepted, accepted.run_id)) ??
    // Carried over to a newer run (continue-as-new): the latest run knows it.
    (await outcome(client, accepted, undefined));
  if (result === null) {
    throw new Error(`deployment ${accepted.deployment_id} is not known to ${accepted.workflow_id}`);
  }
  if (result.status !== expected) {
    throw new DeployFailed(result);
  }
  return result;
}

async function outcome(
  client: Client,
  accepted: Accepted,
  runId: string | undefined,
): Promise<DeployResult | null> {
  const handle = client.workflow.getHandle(accepted.workflow_id, runId);
  try {
    return await handle.executeUpdate<DeployResult, [string]>('wait_outcome', {
      args: [accepted.deployment_id],
    });
  } catch {
    // The run closed (or moved on) before answering: its query still knows.
    return await handle.query<DeployResult | null, [string]>('outcome', accepted.deployment_id);
  }
}
