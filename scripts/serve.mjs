#!/usr/bin/env node
// Serves the built gateway in workerd via Miniflare (see scripts/runtime.mjs) — the runtime the integration tests
// drive. Prints {"listening":"http://127.0.0.1:<port>"} once ready; the Worker's console output goes to stdout.
//
//   node scripts/serve.mjs [--port N] [--persist-to DIR] [--var NAME:VALUE ...] [--postgres URL] [--exit-with-stdin]
//
// --postgres URL: the Postgres build with DB_PROVIDER=neon, its HYPERDRIVE binding pointing at URL (a database
// scripts/postgres.mjs serves and has migrated).

import { parseArgs } from 'node:util';
import { startGateway } from './runtime.mjs';

const { values } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    'persist-to': { type: 'string' },
    var: { type: 'string', multiple: true, default: [] },
    postgres: { type: 'string' },
    'exit-with-stdin': { type: 'boolean', default: false },
  },
});

const vars = {};
for (const pair of values.var) {
  const at = pair.indexOf(':');
  if (at <= 0) {
    console.error(`--var expects NAME:VALUE, got ${pair}`);
    process.exit(2);
  }
  vars[pair.slice(0, at)] = pair.slice(at + 1);
}

const { mf, url } = await startGateway({
  port: Number(values.port),
  persistTo: values['persist-to'] ?? null,
  vars,
  postgresUrl: values.postgres ?? null,
  onStdio: (stdout, stderr) => {
    stdout.pipe(process.stdout);
    stderr.pipe(process.stderr);
  },
});
console.log(JSON.stringify({ listening: url }));

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  await mf.dispose().catch(() => {});
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (values['exit-with-stdin']) {
  process.stdin.on('end', stop);
  process.stdin.resume();
}
