// The figures that come from bench/limiter-driver.mjs, a Worker that runs in the gateway's workerd and calls the
// gateway's Durable Object, usage queue and D1 directly: limiter decisions per second, storage rows per key,
// usage-consumer throughput. See bench/README.md for what each figure means.

import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { cpuMeter, round } from './procs.mjs';

const BENCH = join(dirname(fileURLToPath(import.meta.url)), '..');
export const DRIVER_NAME = 'limiter-driver';
// Admissions before each measured run (not recorded): the object is created and its isolate warm.
const WARMUP_CALLS = 200;
// The limiter's purge batch (durable/src/quota.rs PURGE_BATCH): rows that left the window are deleted this many
// at a time, so storage may hold up to this many beyond the window.
const PURGE_BATCH = 64;
const UNLIMITED = 100_000_000;

/**
 * Miniflare options of the driver Worker. Its bindings are the gateway's own: the KeyLimiter class of the gateway
 * Worker (`scriptName`), the same usage queue and the same D1 database.
 */
export function driverWorker(gateway, gatewayName) {
  return {
    name: DRIVER_NAME,
    modules: true,
    scriptPath: join(BENCH, 'limiter-driver.mjs'),
    compatibilityDate: gateway.compatibilityDate,
    compatibilityFlags: gateway.compatibilityFlags,
    durableObjects: {
      KEY_LIMITER: { className: gateway.durableObjects.KEY_LIMITER.className, scriptName: gatewayName },
      NOOP: { className: 'NoopObject' },
    },
    queueProducers: { USAGE_EVENTS: gateway.queueProducers.USAGE_EVENTS },
    d1Databases: { DB: gateway.d1Databases.DB },
  };
}

export async function driverGet(driver, path) {
  const response = await driver.fetch(`http://${DRIVER_NAME}${path}`);
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = { error: text };
  }
  if (response.status !== 200) throw new Error(`limiter driver ${path}: HTTP ${response.status}: ${body.error}`);
  return body;
}

/**
 * The limiter runs on one gateway instance (`target` g or m; `pid` its workerd): one fresh key per run, so each
 * run is one hot key's Durable Object. Without a binding limit at each concurrency, then with 60 requests per
 * minute (after the warm-up has used them up, every measured call is a denial); with `churn`, 60 per second for a
 * few windows, so the key's storage reaches its steady state (figure "storage rows per key"). With `baseline`,
 * the same calls to an object that decides and stores nothing first (at c=1 and 32).
 */
/** Slots a lease row asks for per call (the object grants at most its MAX_LEASE_SLOTS, 1024). */
const LEASE_SLOTS = 256;

export async function limiterRuns(driver, { target, pid, seconds, concurrency, churn, baseline }) {
  const plan = [
    ...(baseline ? [1, 32].map((c) => ({ name: `noop-c${c}`, object: 'noop', concurrency: c, rpw: UNLIMITED, window_ms: 60_000, seconds })) : []),
    ...concurrency.map((c) => ({ name: `unlimited-c${c}`, concurrency: c, rpw: UNLIMITED, window_ms: 60_000, seconds })),
    ...[1, 32].map((c) => ({ name: `rpw60-c${c}`, concurrency: c, rpw: 60, window_ms: 60_000, seconds })),
    // The lease path of one hot key: each call asks for LEASE_SLOTS slots, as a gateway isolate does when the
    // key is busy, and the slots granted count as admissions made without a call.
    ...[1, 32].map((c) => ({ name: `lease${LEASE_SLOTS}-c${c}`, concurrency: c, rpw: UNLIMITED, window_ms: 60_000, seconds, lease: LEASE_SLOTS })),
    ...(churn ? [{ name: 'rpw60-per-1s-c32', concurrency: 32, rpw: 60, window_ms: 1000, seconds: Math.max(seconds, 5) }] : []),
  ];
  const runs = [];
  for (const p of plan) {
    const key = `bench-limiter-${target}-${p.name}`;
    const query = new URLSearchParams({
      key,
      seconds: String(p.seconds),
      concurrency: String(p.concurrency),
      warmup: String(WARMUP_CALLS),
      rpw: String(p.rpw),
      window_ms: String(p.window_ms),
      object: p.object ?? 'limiter',
      lease: String(p.lease ?? 0),
    });
    const meter = cpuMeter({ server: pid });
    const r = await driverGet(driver, `/limiter?${query}`);
    const cpu = meter.stop();
    const perSecond = (n) => (r.elapsed_ms > 0 ? round((n * 1000) / r.elapsed_ms, 0) : null);
    runs.push({
      target,
      name: p.name,
      object: p.object ?? 'limiter',
      requests_per_window: p.rpw,
      window_ms: p.window_ms,
      ...r,
      decisions_per_s: perSecond(r.calls),
      admissions_per_s: perSecond(r.admissions ?? r.admitted),
      cpu: cpuSplit(cpu),
    });
  }
  return runs;
}

/** Row counts of the tables of one SQLite file, read-only (the sqlite3 CLI, else Python's sqlite3 module). */
async function countRows(file, tables) {
  const run = promisify(execFile);
  const sql = tables.map((t) => `SELECT '${t}', count(*) FROM ${t}`).join(' UNION ALL ');
  let out;
  try {
    out = (await run('sqlite3', ['-readonly', '-separator', ' ', file, sql])).stdout;
  } catch (error) {
    if (error.code !== 'ENOENT') throw error;
    const script = 'import sqlite3,sys\nc=sqlite3.connect("file:"+sys.argv[1]+"?mode=ro",uri=True)\nfor r in c.execute(sys.argv[2]): print(*r)';
    out = (await run('python3', ['-c', script, file, sql])).stdout;
  }
  return Object.fromEntries(
    out
      .trim()
      .split('\n')
      .map((line) => line.split(' '))
      .map(([t, n]) => [t, Number(n)]),
  );
}

/**
 * Rows in the KeyLimiter storage of each key (`<doDir>/<object id>.sqlite`), next to the design bound: the
 * admissions in the window (at most the limit) + one purge batch + a few (the `limits` meta row, a budget row).
 * `keys`: [{ key, limit, admitted }]; `limit` null = no bound to compare with.
 */
export async function storageRows(driver, doDir, keys) {
  const out = [];
  for (const k of keys) {
    const { object_id } = await driverGet(driver, `/object-id?key=${encodeURIComponent(k.key)}`);
    const file = join(doDir, `${object_id}.sqlite`);
    if (!existsSync(file)) {
      out.push({ ...k, object_id, error: 'no storage file' });
      continue;
    }
    try {
      const rows = await countRows(file, ['requests', 'budget', 'meta']);
      const total = Object.values(rows).reduce((a, b) => a + b, 0);
      const bound = k.limit === null ? null : Math.min(k.limit, k.admitted) + PURGE_BATCH + 2;
      out.push({ ...k, object_id, rows, total, bound, within_bound: bound === null ? null : total <= bound });
    } catch (error) {
      out.push({ ...k, object_id, error: error.message.split('\n')[0] });
    }
  }
  return out;
}

/** The .sqlite files of KeyLimiter objects (one per key; Miniflare's own metadata.sqlite excluded). */
export function limiterObjectFiles(doDir) {
  if (!existsSync(doDir)) return [];
  return readdirSync(doDir).filter((f) => f.endsWith('.sqlite') && f !== 'metadata.sqlite');
}

/**
 * Waits until no usage event is left in the queue: the ledger's row count has not moved for longer than the
 * consumer's batch timeout (a last partial batch is delivered after at most that long).
 */
export async function waitForQueueDrain(driver, { quietMs, timeoutMs }) {
  const started = performance.now();
  let last = -1;
  let changedAt = started;
  for (;;) {
    const { rows } = await driverGet(driver, '/usage-rows?prefix=');
    const now = performance.now();
    if (rows !== last) {
      last = rows;
      changedAt = now;
    } else if (now - changedAt >= quietMs) {
      return { rows, drained: true, waited_ms: Math.round(now - started) };
    }
    if (now - started > timeoutMs) return { rows, drained: false, waited_ms: Math.round(now - started) };
    await sleep(1000);
  }
}

/**
 * Sends `count` usage events through the driver (100 per sendBatch) and polls D1 until they are all in
 * usage_logs (and, with PostHog on, all marked as accepted by PostHog: the consumer's last step per batch).
 * Times are workerd's clock (Date.now(), the wall clock), from the first send to the poll that saw the last row.
 */
export async function consumerThroughput(driver, { prefix, count, posthog, pid, standinPid = null, timeoutMs = 180_000 }) {
  const meter = cpuMeter({ server: pid, ...(standinPid ? { standin: standinPid } : {}) });
  const sent = await driverGet(driver, `/usage-events?prefix=${encodeURIComponent(prefix)}&count=${count}`);
  const deadline = performance.now() + timeoutMs;
  let rowsAt = null;
  let last = null;
  let polls = 0;
  for (;;) {
    last = await driverGet(driver, `/usage-rows?prefix=${encodeURIComponent(prefix)}`);
    polls++;
    if (rowsAt === null && last.rows >= count) rowsAt = last.at_ms;
    if (rowsAt !== null && (!posthog || last.posthog >= count)) break;
    if (performance.now() > deadline) break;
    // Short polls: the time of the last row is known to within this interval.
    await sleep(25);
  }
  const cpu = meter.stop();
  const complete = rowsAt !== null && (!posthog || last.posthog >= count);
  const doneMs = complete ? last.at_ms - sent.started_ms : null;
  const rowsMs = rowsAt === null ? null : rowsAt - sent.started_ms;
  return {
    prefix,
    events: count,
    posthog,
    complete,
    rows: last.rows,
    posthog_accepted_rows: last.posthog,
    send_batches: sent.batches,
    event_json_bytes: sent.bytes_per_event,
    send_ms: sent.send_ms,
    to_last_row_ms: rowsMs,
    to_done_ms: doneMs,
    events_per_s: doneMs ? round((count * 1000) / doneMs, 0) : null,
    rows_per_s: rowsMs ? round((count * 1000) / rowsMs, 0) : null,
    polls,
    cpu: cpuSplit(cpu),
  };
}

/** workerd's cores (and the stand-in's), and everything else on the machine's (the bench's Node process idles meanwhile). */
function cpuSplit({ server, standin, machine }) {
  const other = server === null || machine === null ? null : round(Math.max(0, machine - server - (standin ?? 0)), 2);
  return { server, ...(standin === undefined ? {} : { standin }), other };
}
