#!/usr/bin/env node
// The two key stores side by side (DB_PROVIDER=d1 and =neon), each in workerd through Miniflare with the same
// stand-in, the Postgres one against a local PostgreSQL (scripts/postgres.mjs) through the local Hyperdrive
// binding. Part of `npm run bench`; alone: `node bench/stores.mjs`.
//
//   auth lookup   GET /v1/models, one request at a time, with the isolate's auth cache off
//                 (AUTH_CACHE_TTL_SECONDS=0: every request reads its key from the store) and on (the baseline:
//                 the same request without the read); the lookup costs the difference of the medians.
//   consumer      BENCH_CONSUMER_EVENTS usage events sent to the queue (bench/limiter-driver.mjs), timed until
//                 the last row is in the store's ledger (PostHog off).
//
// Knobs: BENCH_STORE_REQUESTS (default 400 per run), BENCH_CONSUMER_EVENTS (default 5000).
// Writes bench/results/stores.json and stores.md.

import { createHash } from 'node:crypto';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

import { psql, startServer } from '../scripts/postgres.mjs';
import { GATEWAY_NAME, gatewayWorkerOptions, readGatewayConfig, startGateway } from '../scripts/runtime.mjs';
import { DRIVER_NAME, consumerThroughput, driverGet, driverWorker } from './lib/driver.mjs';
import { round } from './lib/procs.mjs';
import { latencySummary, runBenchmark, startStandin, writeResults } from './lib/sequential.mjs';
import { applyMigrations } from './lib/sql.mjs';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const OUT = process.env.BENCH_OUT_DIR || join(ROOT, 'bench', 'results');
const REQUESTS = Number(process.env.BENCH_STORE_REQUESTS || 400);
const EVENTS = Number(process.env.BENCH_CONSUMER_EVENTS || 5000);
const KEY = `sk-gw-bench-stores-${createHash('sha256').update(String(Date.now())).digest('hex').slice(0, 24)}`;
const KEY_ROW = `INSERT INTO api_keys (id, key_hash, user_id, name) VALUES ('bench', ` +
  `'${createHash('sha256').update(KEY).digest('hex')}', 'bench-user', 'benchmark key')`;

const log = (message) => console.error(`[bench:stores] ${message}`);
const cleanups = [];

/** `REQUESTS` sequential GET /v1/models (after a warm-up), as latency percentiles in ms. */
async function latency(url) {
  const one = async () => {
    const started = performance.now();
    const response = await fetch(`${url}/v1/models`, { headers: { authorization: `Bearer ${KEY}` } });
    await response.arrayBuffer();
    if (response.status !== 200) throw new Error(`GET /v1/models answered ${response.status}`);
    return performance.now() - started;
  };
  for (let i = 0; i < 50; i++) await one();
  const times = [];
  for (let i = 0; i < REQUESTS; i++) times.push(await one());
  return latencySummary(times);
}

/** Sends `EVENTS` usage events and waits for the last Postgres row (polled with psql). */
async function postgresConsumer(driver, url, prefix) {
  const sent = await driverGet(driver, `/usage-events?prefix=${encodeURIComponent(prefix)}&count=${EVENTS}`);
  const deadline = Date.now() + 180_000;
  for (;;) {
    const rows = Number(psql(url, `SELECT count(*) FROM usage_logs WHERE request_id LIKE '${prefix}%'`).trim());
    if (rows >= EVENTS) {
      const ms = Date.now() - sent.started_ms;
      return { events: EVENTS, complete: true, to_last_row_ms: ms, events_per_s: Math.round((EVENTS * 1000) / ms) };
    }
    if (Date.now() > deadline) return { events: EVENTS, complete: false, rows };
    // Each poll is a psql process: polled less often than D1's in-workerd count, not to load the cores
    // the consumer runs on (the figure is known to within this interval).
    await sleep(200);
  }
}

async function measure(store, upstream, stateDir) {
  const results = {};
  let postgresUrl = null;
  if (store === 'postgres') {
    const server = await startServer({ dataDir: join(stateDir, 'postgres'), log: 'ignore' });
    cleanups.push(() => server.server.kill('SIGINT'));
    postgresUrl = server.url;
    psql(postgresUrl, KEY_ROW);
  }
  for (const cache of ['off', 'on']) {
    const vars = {
      OPENROUTER_BASE_URL: upstream,
      OPENROUTER_API_KEY: 'sk-or-bench',
      RATE_LIMIT_PER_MINUTE: '100000000',
      AUTH_CACHE_TTL_SECONDS: cache === 'off' ? '0' : '600',
    };
    const { mf, url } = await startGateway({
      persistTo: join(stateDir, `${store}-${cache}`),
      vars,
      postgresUrl,
      // The Worker's request lines are not the figures: drained, not printed.
      onStdio: (stdout, stderr) => {
        stdout.resume();
        stderr.pipe(process.stderr);
      },
      extraWorkers: [driverWorker(gatewayWorkerOptions(), GATEWAY_NAME)],
    });
    cleanups.push(() => mf.dispose());
    if (store === 'd1') {
      const db = await mf.getD1Database('DB');
      await applyMigrations(db, join(ROOT, 'migrations'));
      await db.prepare(KEY_ROW).run();
    }
    log(`${store}, auth cache ${cache}: ${REQUESTS} requests`);
    results[`auth_cache_${cache}`] = await latency(url);
    if (cache === 'off') {
      const driver = await mf.getWorker(DRIVER_NAME);
      const prefix = `bench-stores-${store}-`;
      log(`${store}: ${EVENTS} usage events through the consumer`);
      results.consumer =
        store === 'd1'
          ? await consumerThroughput(driver, { prefix, count: EVENTS, posthog: false, pid: null })
          : await postgresConsumer(driver, postgresUrl, prefix);
    }
    await mf.dispose();
  }
  results.lookup_ms = round(results.auth_cache_off.p50_ms - results.auth_cache_on.p50_ms, 2);
  return results;
}

function markdown(r) {
  const row = (name, f) => `| ${name} | ${f(r.d1)} | ${f(r.postgres)} | ${(f(r.postgres) / f(r.d1)).toFixed(2)} |`;
  return [
    `# Key stores: D1 and PostgreSQL (${r.date})`,
    '',
    `${r.requests} sequential GET /v1/models per run; ${r.events} usage events through the consumer. Command: \`node bench/stores.mjs\`.`,
    '',
    '| figure | D1 | Postgres | Postgres / D1 |',
    '| --- | ---: | ---: | ---: |',
    row('request p50, auth cache off (ms)', (s) => s.auth_cache_off.p50_ms),
    row('request p99, auth cache off (ms)', (s) => s.auth_cache_off.p99_ms),
    row('request p50, auth cache on (ms)', (s) => s.auth_cache_on.p50_ms),
    row('key lookup: p50 off − on (ms)', (s) => s.lookup_ms),
    row('consumer events/s into the ledger', (s) => s.consumer.events_per_s),
    '',
  ].join('\n');
}

async function main() {
  const stateDir = mkdtempSync(join(tmpdir(), 'bench-stores-'));
  chmodSync(stateDir, 0o755); // PostgreSQL's own user must reach its cluster inside
  cleanups.push(() => rmSync(stateDir, { recursive: true, force: true }));
  readGatewayConfig();
  const standin = await startStandin();
  cleanups.push(standin.stop);
  const upstream = standin.base;
  const results = { date: new Date().toISOString(), requests: REQUESTS, events: EVENTS };
  for (const store of ['d1', 'postgres']) results[store] = await measure(store, upstream, stateDir);
  writeResults(OUT, 'stores', results, markdown);
}

runBenchmark(main, cleanups, log);
