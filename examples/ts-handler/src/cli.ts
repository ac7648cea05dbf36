/**
 * `node dist/cli.js deploy '<request JSON>'` (or the JSON on stdin): start a deploy, print
 * what happens as JSON lines, and exit 0 when it deployed, 1 when it ended otherwise, 2
 * when the request was refused. `node dist/cli.js destroy PROJECT_ID` removes the
 * project's app from Fly the same way (exit 0 once it is destroyed). Connects as the
 * `temporal` CLI does by default:
 * TEMPORAL_ADDRESS (localhost:7233), TEMPORAL_NAMESPACE (default); the task queue is
 * TURBODEPLOY_TASK_QUEUE (turbodeploy).
 */
import { readFileSync } from 'node:fs';
import { Client, Connection } from '@temporalio/client';
import {
  AppRequest,
  DEFAULT_TASK_QUEUE,
  DeployFailed,
  DeployRejected,
  DeployRequest,
  progress,
  startDeploy,
  successStatus,
  waitForResult,
} from './handler';

function emit(event: string, body: object): void {
  process.stdout.write(JSON.stringify({ event, ...body }) + '\n');
}

async function follow(client: Client, projectId: string, done: () => boolean): Promise<void> {
  let last = '';
  while (!done()) {
    try {
      const now = await progress(client, projectId);
      const key = `${now.deployment_id}/${now.step}/${now.status}`;
      if (key !== last) {
        emit('progress', now);
        last = key;
      }
    } catch {
      // A run that just closed answers no query; the result below says how it ended.
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

async function main(): Promise<number> {
  const [command, arg] = process.argv.slice(2);
  let request: DeployRequest | AppRequest;
  if (command === 'deploy') {
    request = JSON.parse(arg ?? readFileSync(0, 'utf8')) as DeployRequest;
  } else if (command === 'destroy' && arg) {
    request = { kind: 'destroy', project_id: arg };
  } else {
    process.stderr.write("usage: cli.js deploy '<request JSON>' | cli.js destroy PROJECT_ID\n");
    return 64;
  }
  const connection = await Connection.connect({
    address: process.env.TEMPORAL_ADDRESS ?? 'localhost:7233',
  });
  const client = new Client({
    connection,
    namespace: process.env.TEMPORAL_NAMESPACE ?? 'default',
  });
  try {
    const accepted = await startDeploy(
      client,
      request,
      process.env.TURBODEPLOY_TASK_QUEUE ?? DEFAULT_TASK_QUEUE,
    );
    emit('accepted', accepted);
    let finished = false;
    const following = follow(client, request.project_id, () => finished);
    let result;
    try {
      result = await waitForResult(client, accepted, successStatus(request));
    } finally {
      // The last progress line comes before the outcome.
      finished = true;
      await following;
    }
    emit(result.status === 'deployed' ? 'deployed' : result.status, result);
    return 0;
  } catch (err) {
    if (err instanceof DeployRejected) {
      emit('rejected', { type: err.type, message: err.message });
      return 2;
    }
    if (err instanceof DeployFailed) {
      emit('failed', err.result);
      return 1;
    }
    throw err;
  } finally {
    await connection.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
    process.exit(70);
  },
);
