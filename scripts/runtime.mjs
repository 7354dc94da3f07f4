// The gateway in workerd through Miniflare's API, with the bindings wrangler.toml declares (derived by wrangler
// itself, so there is no second list to drift). Requests go straight to workerd's socket — unlike `wrangler dev`,
// whose Node-side proxy caps throughput and fails requests under large bursts. Used by the integration tests
// (via scripts/serve.mjs) and by the benchmark.
//
// State lives under `<persistTo>/v3`, the layout `wrangler --persist-to` uses, so `wrangler d1 migrations apply
// --local --persist-to <dir>` and `wrangler d1 execute ... --persist-to <dir>` work on the same databases.

import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Miniflare, Log, LogLevel } from 'miniflare';
import { unstable_getMiniflareWorkerOptions } from 'wrangler';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');

/**
 * Starts the gateway. `vars` override wrangler.toml's [vars] (and provide secrets); `persistTo` null keeps all
 * state in memory. `onStdio(stdout, stderr)` receives workerd's output (the Worker's console lines).
 */
export async function startGateway({ port = 0, host = '127.0.0.1', persistTo = null, vars = {}, onStdio } = {}) {
  const { workerOptions, main } = unstable_getMiniflareWorkerOptions(join(ROOT, 'wrangler.toml'));
  const mf = new Miniflare({
    ...workerOptions,
    name: 'gateway',
    modules: true,
    scriptPath: main,
    bindings: { ...workerOptions.bindings, ...vars },
    host,
    port,
    // The Request.cf object would be fetched from the internet; the gateway does not use it.
    cf: false,
    log: new Log(LogLevel.WARN),
    ...(persistTo ? { defaultPersistRoot: join(persistTo, 'v3') } : {}),
    ...(onStdio ? { handleRuntimeStdio: onStdio } : {}),
  });
  const url = await mf.ready;
  return { mf, url: url.href.replace(/\/$/, '') };
}
