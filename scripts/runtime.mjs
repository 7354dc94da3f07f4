// The gateway in workerd through Miniflare's API, with the bindings wrangler.toml declares (derived by wrangler
// itself, so there is no second list to drift). Requests go straight to workerd's socket — unlike `wrangler dev`,
// whose Node-side proxy caps throughput and fails requests under large bursts. Used by the integration tests
// (via scripts/serve.mjs) and by the benchmark (bench/run.mjs).
//
// State lives under `<persistTo>/v3`, the layout `wrangler --persist-to` uses, so `wrangler d1 migrations apply
// --local --persist-to <dir>` and `wrangler d1 execute ... --persist-to <dir>` work on the same databases.

import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Miniflare, Log, LogLevel } from 'miniflare';
import { unstable_getMiniflareWorkerOptions, unstable_readConfig } from 'wrangler';
import { POSTGRES_MAIN, guardHyperdriveProxy } from './postgres.mjs';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const WRANGLER_TOML = join(ROOT, 'wrangler.toml');

/** The gateway's Worker name inside Miniflare: other Workers in the same instance refer to its classes by it. */
export const GATEWAY_NAME = 'gateway';

/** wrangler.toml as wrangler reads it (main, compatibility settings, vars, D1 migrations directories, …). */
export function readGatewayConfig() {
  return unstable_readConfig({ config: WRANGLER_TOML });
}

/** Where Miniflare keeps the state of a run persisted to `persistTo` (D1 in `d1/`, Durable Objects in `do/`, …). */
export function stateRoot(persistTo) {
  return join(persistTo, 'v3');
}

/**
 * The gateway's Miniflare worker options; `vars` override wrangler.toml's [vars] (and provide secrets). With
 * `postgresUrl`, the Postgres build serves with DB_PROVIDER=neon and a `HYPERDRIVE` binding whose local
 * connection string is that URL (as `localConnectionString` gives a deployed config's binding under wrangler dev).
 */
export function gatewayWorkerOptions({ vars = {}, postgresUrl = null } = {}) {
  const { workerOptions, main } = unstable_getMiniflareWorkerOptions(WRANGLER_TOML);
  const gateway = { ...workerOptions, name: GATEWAY_NAME, modules: true };
  if (!postgresUrl) return { ...gateway, scriptPath: main, bindings: { ...workerOptions.bindings, ...vars } };
  return {
    ...gateway,
    scriptPath: POSTGRES_MAIN,
    hyperdrives: { HYPERDRIVE: postgresUrl },
    bindings: { ...workerOptions.bindings, DB_PROVIDER: 'neon', ...vars },
  };
}

/**
 * Starts the gateway. `vars` override wrangler.toml's [vars] (and provide secrets); `persistTo` null keeps the
 * state in a temporary directory that Miniflare removes at `dispose()` (still files on disk: Miniflare's local D1
 * and Durable Objects are SQLite files either way; a `persistTo` on a tmpfs keeps them in memory). `onStdio(stdout, stderr)` receives workerd's output (the Worker's console lines).
 * `postgresUrl`: keep keys and the ledger in that PostgreSQL database (see `gatewayWorkerOptions`).
 * `extraWorkers`: Miniflare worker options of more Workers to run in the same workerd, next to the gateway (which
 * stays the one serving `port`); they can bind the gateway's Durable Object classes with `scriptName: GATEWAY_NAME`.
 * Returns the instance, its URL, and when it was created and ready (`performance.now()` values).
 */
export async function startGateway({
  port = 0,
  host = '127.0.0.1',
  persistTo = null,
  vars = {},
  postgresUrl = null,
  onStdio,
  extraWorkers = [],
} = {}) {
  const gateway = gatewayWorkerOptions({ vars, postgresUrl });
  if (postgresUrl) guardHyperdriveProxy(postgresUrl);
  const createdAt = performance.now();
  const mf = new Miniflare({
    workers: [gateway, ...extraWorkers],
    host,
    port,
    // The Request.cf object would be fetched from the internet; the gateway does not use it.
    cf: false,
    log: new Log(LogLevel.WARN),
    ...(persistTo ? { defaultPersistRoot: stateRoot(persistTo) } : {}),
    ...(onStdio ? { handleRuntimeStdio: onStdio } : {}),
  });
  // A failed start leaves no workerd behind.
  const url = await mf.ready.catch(async (error) => {
    await mf.dispose().catch(() => {});
    throw error;
  });
  return { mf, url: url.href.replace(/\/$/, ''), createdAt, readyAt: performance.now() };
}
