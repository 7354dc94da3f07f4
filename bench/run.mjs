#!/usr/bin/env node
// `npm run bench`: the gateway against two baselines in one run, on this machine.
//
//   (a) the OpenRouter stand-in directly (standins/openrouter.mjs): the upstream's own ceiling;
//   (b) a pass-through Worker (bench/passthrough.mjs) in workerd: the cost of any Worker in front of it;
//   (g) the gateway (worker/build) in workerd with the bindings wrangler.toml declares, started by
//       scripts/runtime.mjs (as the integration tests start it), next to bench/limiter-driver.mjs.
//
// The Workers run under Miniflare's Node API, so clients talk to workerd's own socket (no `wrangler dev` proxy).
// The load comes from bench/load (Rust, closed loop, keep-alive). The limiter, storage and usage-consumer figures
// come from the driver Worker, which calls the gateway's Durable Object and queue from inside workerd. Prints a
// Markdown report and writes bench/results/latest.{json,md}. See bench/README.md for the knobs and each figure.

import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

import { GatewayLog } from './lib/gateway-log.mjs';
import { billPerMillion, DO_BILLED_GB, QUEUE_OPERATIONS_PER_EVENT } from './lib/prices.mjs';
import { consumerThroughput, DRIVER_NAME, driverWorker, limiterObjectFiles, limiterRuns, storageRows, waitForQueueDrain } from './lib/driver.mjs';
import { cpuMeter, freePort, isTmpfs, listenerPids, memory, processInfo, round, sampleRss, Watchdog } from './lib/procs.mjs';
import { renderMarkdown } from './lib/report.mjs';
import { applyMigrations } from './lib/sql.mjs';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const BENCH = join(ROOT, 'bench');
const LOAD_MANIFEST = join(BENCH, 'load', 'Cargo.toml');
const LOAD_BIN = join(BENCH, 'load', 'target', 'release', 'bench-load');
const BENCH_KEY_ID = 'bench';
const BENCH_KEY = `sk-gw-bench-${createHash('sha256').update(String(process.pid) + Date.now()).digest('hex').slice(0, 32)}`;
const TARGETS = ['a', 'b', 'g'];
const TARGET_NAMES = { a: '(a) upstream', b: '(b) pass-through', g: '(g) gateway', m: "(g') gateway, storage on tmpfs", n: '(g0) gateway, leases off' };

function envNumber(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < 0) throw new Error(`${name}=${raw} is not a non-negative number`);
  return n;
}
function envList(name, fallback) {
  const raw = process.env[name];
  if (!raw) return fallback;
  const list = raw.split(',').map((s) => Number(s.trim()));
  if (list.some((n) => !Number.isInteger(n) || n < 1)) throw new Error(`${name}=${raw} is not a list of positive integers`);
  return list;
}

const knobs = {
  seconds: envNumber('BENCH_SECONDS', 10),
  warmup: envNumber('BENCH_WARMUP_SECONDS', 2),
  concurrency: envList('BENCH_CONCURRENCY', [1, 32, 256]),
  streamConcurrency: envList('BENCH_STREAM_CONCURRENCY', [1, 32]),
  streamChunks: envNumber('BENCH_STREAM_CHUNKS', 200),
  chunkBytes: envNumber('BENCH_CHUNK_BYTES', 64),
  longChunks: envNumber('BENCH_LONG_STREAM_CHUNKS', 20000),
  // Bytes per delta of the memory streams. The stand-in counts a word as a token and the gateway caps max_tokens
  // (MAX_TOKENS_LIMIT), so these streams echo a prompt of words this long: one word (one token) per delta.
  memoryChunkBytes: envNumber('BENCH_MEMORY_CHUNK_BYTES', 1000),
  // So high that the limiter never denies: the figures are admissions, not 429s.
  rateLimit: process.env.BENCH_RATE_LIMIT_PER_MINUTE || '100000000',
  threads: envNumber('BENCH_LOAD_THREADS', 1),
  // (g′): the same gateway with its storage on a tmpfs (the same SQLite files, in memory: syncing them to disk
  // costs nothing), to separate waiting for durable storage from compute.
  inMemoryVariant: process.env.BENCH_IN_MEMORY_VARIANT !== '0',
  inMemoryDir: process.env.BENCH_IN_MEMORY_DIR || '/dev/shm',
  limiterSeconds: envNumber('BENCH_LIMITER_SECONDS', 3),
  limiterConcurrency: envList('BENCH_LIMITER_CONCURRENCY', [1, 32, 256]),
  consumerEvents: envNumber('BENCH_CONSUMER_EVENTS', 5000),
  outDir: process.env.BENCH_OUT_DIR || join(BENCH, 'results'),
};

const log = (msg) => process.stderr.write(`[bench] ${msg}\n`);

// ---------------------------------------------------------------------------
// Cleanup: everything started is stopped, on success, error, Ctrl-C or SIGTERM.
// ---------------------------------------------------------------------------

const cleanups = [];
const exitCleanups = [];
const children = new Set();
// Every long-lived process the bench started (stand-in, workerd instances), for the CPU accounting.
const ownPids = new Set();
let watchdog = null;
let cleaning = null;

/** `fn` runs on the orderly path (awaited); `atExit`, if given, also runs synchronously when the process exits. */
function onCleanup(fn, atExit) {
  cleanups.push(fn);
  if (atExit) exitCleanups.push(atExit);
}

function cleanup() {
  cleaning ??= (async () => {
    for (const child of children) child.kill('SIGKILL');
    for (const fn of cleanups.reverse()) {
      try {
        await Promise.race([fn(), sleep(5000)]);
      } catch {
        // Best effort: the exit handler and the watchdog deal with what is left.
      }
    }
    ownPids.clear();
  })();
  return cleaning;
}

// Miniflare's own SIGINT/SIGTERM handler exits the process synchronously, so the async cleanup may never finish:
// what must not be left behind is also done here, synchronously, by pid.
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
  for (const pid of ownPids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
  for (const fn of exitCleanups.reverse()) {
    try {
      fn();
    } catch {
      // Best effort.
    }
  }
});

for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143]]) {
  process.on(signal, () => {
    log(`${signal}: stopping everything`);
    cleanup().finally(() => process.exit(code));
  });
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

function sh(cmd, args, options = {}) {
  const r = spawnSync(cmd, args, { cwd: ROOT, encoding: 'utf8', ...options });
  return r.status === 0 ? r.stdout.trim() : null;
}

function machineInfo() {
  const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  const meminfo = readFileSync('/proc/meminfo', 'utf8');
  return {
    nproc: Number(sh('nproc', [])) || os.availableParallelism(),
    cpu_model: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ?? 'unknown',
    memory_bytes: Number(/^MemTotal:\s+(\d+) kB/m.exec(meminfo)?.[1] ?? 0) * 1024,
    kernel: os.release(),
  };
}

function versions(wasmPath) {
  const pkg = (p) => JSON.parse(readFileSync(join(ROOT, 'node_modules', p, 'package.json'), 'utf8')).version;
  const lock = readFileSync(join(ROOT, 'Cargo.lock'), 'utf8');
  return {
    node: process.version,
    miniflare: pkg('miniflare'),
    workerd: pkg('@cloudflare/workerd-linux-64'),
    wrangler: pkg('wrangler'),
    rustc: sh('rustc', ['-V']) ?? 'unknown',
    worker_crate: /name = "worker"\nversion = "([^"]+)"/.exec(lock)?.[1] ?? 'unknown',
    git: sh('git', ['rev-parse', '--short', 'HEAD']) ?? 'unknown',
    // Read-only: --no-optional-locks keeps `status` from refreshing the index.
    git_dirty: (sh('git', ['--no-optional-locks', 'status', '--porcelain', '--untracked-files=no']) ?? '') !== '',
    wasm_sha256: createHash('sha256').update(readFileSync(wasmPath)).digest('hex').slice(0, 12),
  };
}

function buildLoadGenerator() {
  log('building the load generator (cargo build --release, bench/load)');
  const r = spawnSync('cargo', ['build', '--release', '--quiet', '--manifest-path', LOAD_MANIFEST], {
    cwd: ROOT,
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  if (r.status !== 0 || !existsSync(LOAD_BIN)) throw new Error('building bench/load failed (see cargo output above)');
}

/** Starts a stand-in from standins/ (`name`: openrouter or posthog); it prints {"listening": url} when ready. */
async function startStandin(rawDir, name = 'openrouter') {
  const child = spawn(process.execPath, [join(ROOT, 'standins', `${name}.mjs`), '--port', '0', '--exit-with-stdin'], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  children.add(child);
  onCleanup(async () => {
    child.kill('SIGTERM');
    child.stdin.end();
  });
  const errors = [];
  child.stderr.on('data', (d) => errors.push(d.toString()));
  const line = await new Promise((resolve, reject) => {
    createInterface({ input: child.stdout }).once('line', resolve);
    child.once('exit', (code) => reject(new Error(`the ${name} stand-in exited (${code}): ${errors.join('')}`)));
  });
  child.on('exit', () => writeFileSync(join(rawDir, `${name}-standin.stderr.log`), errors.join('')));
  const base = JSON.parse(line).listening;
  return { child, pid: child.pid, base, origin: base.replace(/\/api\/v1$/, '') };
}

/** The one process listening on `port`; it must be workerd, not Node. */
function servedBy(port) {
  const pids = listenerPids(port);
  if (pids.length !== 1) throw new Error(`expected one process listening on port ${port}, found [${pids.join(', ')}]`);
  const info = processInfo(pids[0]);
  if (info.comm !== 'workerd') {
    throw new Error(`port ${port} is served by ${info.comm} (pid ${info.pid}), not workerd: requests would not go straight to workerd`);
  }
  return { port, pid: info.pid, comm: info.comm, exe: relative(ROOT, info.exe ?? ''), parent_is_runner: info.ppid === process.pid };
}

async function waitForHealth(url, timeoutMs) {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    try {
      const r = await fetch(url, { signal: AbortSignal.timeout(2000) });
      await r.arrayBuffer();
      if (r.status === 200) return;
    } catch {
      // Not listening yet.
    }
    if (performance.now() > deadline) throw new Error(`${url} did not answer 200 within ${timeoutMs} ms`);
    await sleep(5);
  }
}

function bodyFile(dir, name, body) {
  const path = join(dir, `${name}.json`);
  writeFileSync(path, JSON.stringify(body));
  return path;
}

// A ~450-character prompt: the stand-in echoes it, so the non-streamed answer is about 1 KB of JSON.
const PROMPT = Array.from({ length: 64 }, (_, i) => ['bench', 'gateway', 'latency', 'token', 'stream'][i % 5]).join(' ');

// max_tokens is explicit so every target gets the same answer: the gateway would otherwise add its default, and
// the stand-in stops after that many words.
function chatBody({ stream, chunks, chunkBytes, maxTokens, prompt = PROMPT, includeUsage = true }) {
  const body = { model: 'openai/gpt-4o-mini', messages: [{ role: 'user', content: prompt }], max_tokens: maxTokens };
  if (!stream) return { ...body, standin: {} };
  // include_usage: the usage chunk reaches the client through every target, so (a), (b), (g) send the same bytes,
  // and the gateway relays natively. Without it the gateway edits the stream (it asks OpenRouter for usage and
  // removes the usage chunk), while (a) and (b) simply send none.
  return { ...body, stream: true, stream_options: { include_usage: includeUsage }, standin: { chunks, chunk_bytes: chunkBytes } };
}

/** Runs bench/load once and returns its JSON plus the CPU use of the processes involved. */
async function load({ url, bodyPath, method = 'POST', concurrency, stream = false, requests, phase, pids = {}, timeout = 60 }) {
  const args = ['--url', url, '--method', method, '--concurrency', String(concurrency), '--threads', String(knobs.threads)];
  args.push('--timeout', String(timeout), '--header', `authorization: Bearer ${BENCH_KEY}`);
  if (bodyPath) args.push('--header', 'content-type: application/json', '--body-file', bodyPath);
  if (requests) args.push('--requests', String(requests));
  else args.push('--duration', String(knobs.seconds), '--warmup', String(knobs.warmup));
  if (stream) args.push('--stream', '--expect', 'data: [DONE]');
  else if (method === 'POST') args.push('--expect', '"usage"');
  if (phase) args.push('--request-id-prefix', phase);

  const meter = cpuMeter({ ...Object.fromEntries([...ownPids].map((pid) => [`pid${pid}`, pid])), ...pids });
  const runnerBefore = process.cpuUsage();
  const started = performance.now();
  const child = spawn(LOAD_BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  watchdog?.track(child.pid);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const code = await new Promise((resolve) => child.on('close', resolve));
  children.delete(child);
  const wall = (performance.now() - started) / 1000;
  const cpu = meter.stop();
  const runner = process.cpuUsage(runnerBefore);
  if (code !== 0) throw new Error(`bench-load exited with ${code}: ${stderr.trim()}`);
  const result = JSON.parse(stdout);
  result.cpu = {
    ...cpu,
    client: result.client_cpu_s !== null ? round(result.client_cpu_s / Math.max(result.wall_s, 0.001), 2) : null,
    runner: round((runner.user + runner.system) / 1e6 / wall, 2),
  };
  // What the rest of the machine used meanwhile (other users of these cores disturb the figures).
  const perPid = new Map();
  for (const [k, v] of Object.entries(cpu)) {
    if (k.startsWith('pid')) perPid.set(Number(k.slice(3)), v ?? 0);
  }
  for (const [k, pid] of Object.entries(pids)) perPid.set(pid, cpu[k] ?? 0);
  const mine = [...perPid.values()].reduce((a, b) => a + b, 0) + (result.cpu.client ?? 0) + result.cpu.runner;
  result.cpu.other = cpu.machine === null ? null : round(Math.max(0, cpu.machine - mine), 2);
  for (const k of Object.keys(result.cpu)) if (k.startsWith('pid')) delete result.cpu[k];
  result.server_rss_after = pids.server ? memory(pids.server).rss : null;
  return result;
}

function brief(run) {
  const l = run.latency_ms ?? {};
  const f = run.ttfb_ms ? ` ttfb p50 ${run.ttfb_ms.p50}` : '';
  const e = run.errors ? ` ERRORS ${run.errors}` : '';
  return `${run.rps} req/s p50 ${l.p50} p99 ${l.p99}${f}${e}`;
}


// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/**
 * Starts one gateway through scripts/runtime.mjs (the bindings wrangler.toml declares, as wrangler derives them)
 * with the limiter driver next to it, checks that workerd itself serves its port, migrates its D1 and inserts the
 * bench key. `persistTo` null = Miniflare's temporary directory. Returns timings of its start as well.
 */
async function startGateway(runtime, { config, vars, persistTo, gatewayLog }) {
  const { mf, url, createdAt, readyAt } = await runtime.startGateway({
    persistTo,
    vars,
    onStdio: (stdout, stderr) => gatewayLog.attach(stdout, stderr),
    extraWorkers: [driverWorker(runtime.gatewayWorkerOptions(), runtime.GATEWAY_NAME)],
  });
  onCleanup(() => mf.dispose());
  const timings = { to_ready_ms: round(readyAt - createdAt, 1) };
  await waitForHealth(`${url}/health`, 60_000);
  timings.to_first_health_ms = round(performance.now() - createdAt, 1);
  const served = servedBy(Number(new URL(url).port));
  watchdog.track(served.pid);
  ownPids.add(served.pid);

  const bindings = Object.keys(await mf.getBindings()).sort();
  const migrations = [];
  for (const d of config.d1_databases ?? []) {
    if (!d.migrations_dir) continue;
    const dir = resolve(ROOT, d.migrations_dir);
    await applyMigrations(await mf.getD1Database(d.binding), dir);
    migrations.push(relative(ROOT, dir));
  }
  const db = await mf.getD1Database('DB');
  const keyHash = createHash('sha256').update(BENCH_KEY).digest('hex');
  await db
    .prepare('INSERT INTO api_keys (id, key_hash, user_id, name) VALUES (?1, ?2, ?3, ?4)')
    .bind(BENCH_KEY_ID, keyHash, 'bench-user', 'benchmark key')
    .run();
  const driver = await mf.getWorker(DRIVER_NAME);
  return { mf, url, served, db, driver, bindings, timings, migrations };
}

async function main() {
  // Imported here so that a missing node_modules (miniflare, wrangler) gets the same advice as a missing build.
  const runtime = await import('../scripts/runtime.mjs').catch((e) => {
    throw new Error(`scripts/runtime.mjs could not be loaded (${e.message}): run \`npm run build\` first (it runs npm ci)`);
  });
  const { Miniflare, Log, LogLevel } = await import('miniflare');
  const config = runtime.readGatewayConfig();
  const mainModule = resolve(ROOT, config.main ?? 'worker/build/index.js');
  const wasmPath = join(dirname(mainModule), 'index_bg.wasm');
  for (const p of [mainModule, wasmPath]) {
    if (!existsSync(p)) throw new Error(`${relative(ROOT, p)} is missing: run \`npm run build\` first`);
  }
  buildLoadGenerator();

  const rawDir = join(knobs.outDir, 'raw');
  mkdirSync(rawDir, { recursive: true });
  const tmp = mkdtempSync(join(os.tmpdir(), 'gateway-bench-'));
  // (g′)'s state, on a tmpfs when there is one.
  const memDir = knobs.inMemoryVariant ? mkdtempSync(join(isTmpfs(knobs.inMemoryDir) ? knobs.inMemoryDir : tmp, 'gateway-bench-mem-')) : null;
  const removeTmp = () => {
    rmSync(tmp, { recursive: true, force: true });
    if (memDir) rmSync(memDir, { recursive: true, force: true });
  };
  onCleanup(async () => removeTmp(), removeTmp);
  watchdog = new Watchdog(join(tmp, 'pids'), [tmp, ...(memDir ? [memDir] : [])]);
  onCleanup(async () => watchdog.release(), () => watchdog.release());

  const results = {
    date: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
    machine: { ...machineInfo(), loadavg_at_start: os.loadavg().map((x) => round(x, 2)) },
    versions: versions(wasmPath),
    settings: {
      seconds: knobs.seconds,
      warmup_seconds: knobs.warmup,
      concurrency: knobs.concurrency,
      stream_concurrency: knobs.streamConcurrency,
      stream_chunks: knobs.streamChunks,
      chunk_bytes: knobs.chunkBytes,
      long_stream_chunks: knobs.longChunks,
      memory_chunk_bytes: knobs.memoryChunkBytes,
      rate_limit_per_minute: knobs.rateLimit,
      load_threads: knobs.threads,
      in_memory_variant: knobs.inMemoryVariant,
      in_memory_dir: memDir,
      in_memory_on_tmpfs: memDir ? isTmpfs(dirname(memDir)) : null,
      limiter_seconds: knobs.limiterSeconds,
      limiter_concurrency: knobs.limiterConcurrency,
      consumer_events: knobs.consumerEvents,
    },
    problems: [],
  };
  const problem = (p) => {
    results.problems.push(p);
    log(`problem: ${p}`);
  };

  // Upstream stand-in ------------------------------------------------------
  const standin = await startStandin(rawDir);
  watchdog.track(standin.pid);
  ownPids.add(standin.pid);
  log(`OpenRouter stand-in at ${standin.base} (pid ${standin.pid})`);

  const vars = config.vars ?? {};
  const maxTokens = Number(vars.MAX_TOKENS_DEFAULT ?? 4096);
  const maxTokensLimit = Number(vars.MAX_TOKENS_LIMIT ?? 65536);
  const memoryPrompt = Array.from({ length: 16 }, (_, i) => String.fromCharCode(97 + i).repeat(knobs.memoryChunkBytes)).join(' ');
  if (knobs.longChunks > maxTokensLimit) {
    throw new Error(`BENCH_LONG_STREAM_CHUNKS=${knobs.longChunks} exceeds MAX_TOKENS_LIMIT (${maxTokensLimit}): the gateway would cut the stream short`);
  }
  const bodies = {
    chat: bodyFile(tmp, 'chat', chatBody({ stream: false, maxTokens })),
    stream: bodyFile(tmp, 'stream', chatBody({ stream: true, chunks: knobs.streamChunks, chunkBytes: knobs.chunkBytes, maxTokens })),
    streamEdited: bodyFile(tmp, 'stream-edited', chatBody({ stream: true, chunks: knobs.streamChunks, chunkBytes: knobs.chunkBytes, maxTokens, includeUsage: false })),
    memShort: bodyFile(tmp, 'mem-short', chatBody({ stream: true, chunks: knobs.streamChunks, chunkBytes: knobs.memoryChunkBytes, maxTokens: maxTokensLimit, prompt: memoryPrompt })),
    memLong: bodyFile(tmp, 'mem-long', chatBody({ stream: true, chunks: knobs.longChunks, chunkBytes: knobs.memoryChunkBytes, maxTokens: maxTokensLimit, prompt: memoryPrompt })),
    memShortEdited: bodyFile(tmp, 'mem-short-edited', chatBody({ stream: true, chunks: knobs.streamChunks, chunkBytes: knobs.memoryChunkBytes, maxTokens: maxTokensLimit, prompt: memoryPrompt, includeUsage: false })),
    memLongEdited: bodyFile(tmp, 'mem-long-edited', chatBody({ stream: true, chunks: knobs.longChunks, chunkBytes: knobs.memoryChunkBytes, maxTokens: maxTokensLimit, prompt: memoryPrompt, includeUsage: false })),
  };

  // (g) the gateway, storage on disk as `wrangler dev` keeps it: cold start first --------------------------
  const gatewayVars = {
    OPENROUTER_BASE_URL: standin.base,
    OPENROUTER_API_KEY: 'sk-or-bench-standin',
    RATE_LIMIT_PER_MINUTE: knobs.rateLimit,
  };
  const gatewayLog = new GatewayLog(join(rawDir, 'gateway.log'));
  onCleanup(() => gatewayLog.close());
  const mfLog = new Log(LogLevel.WARN);
  const gwState = join(tmp, 'state');
  log('starting the gateway in workerd (scripts/runtime.mjs, storage on disk)');
  const gw = await startGateway(runtime, { config, vars: gatewayVars, persistTo: gwState, gatewayLog });
  results.bindings = gw.bindings;
  const gwStartRss = memory(gw.served.pid).rss;
  let gmStartRss = null;
  log(`gateway at ${gw.url}: workerd pid ${gw.served.pid}; /health after ${gw.timings.to_first_health_ms} ms; D1 migrated from ${gw.migrations.join(', ')}`);

  const chatUrl = (base) => `${base}/v1/chat/completions`;
  const gwPids = { server: gw.served.pid, upstream: standin.pid };
  const first = await load({ url: chatUrl(gw.url), bodyPath: bodies.chat, concurrency: 1, requests: 1, phase: 'g-first', pids: gwPids });
  const warm = await load({ url: chatUrl(gw.url), bodyPath: bodies.chat, concurrency: 1, requests: 200, phase: 'g-warm', pids: gwPids });
  for (const [name, run] of [['first chat request', first], ['warm chat requests', warm]]) {
    if (run.errors) throw new Error(`gateway ${name} failed: ${run.error_samples.join(' | ')}\n${gatewayLog.recentProblems.join('\n')}`);
  }
  results.cold_start = {
    ...gw.timings,
    first_chat_ms: first.latency_ms.max,
    warm_requests: warm.latency_ms.count,
    warm_chat_p50_ms: warm.latency_ms.p50,
    warm_chat_p99_ms: warm.latency_ms.p99,
  };
  log(`first chat ${results.cold_start.first_chat_ms} ms, warm p50 ${results.cold_start.warm_chat_p50_ms} ms`);

  // Whether the limiter is in the request path: its rate-limit headers on an answer.
  const probeChat = await fetch(chatUrl(gw.url), {
    method: 'POST',
    headers: { authorization: `Bearer ${BENCH_KEY}`, 'content-type': 'application/json' },
    body: readFileSync(bodies.chat),
  });
  await probeChat.arrayBuffer();
  const limiterHeaders = [...probeChat.headers.keys()].filter((h) => h.startsWith('x-ratelimit-') || h.startsWith('ratelimit'));

  // (b) the pass-through Worker ---------------------------------------------
  const ptPort = await freePort();
  const passthrough = new Miniflare({
    name: 'passthrough',
    modules: true,
    scriptPath: join(BENCH, 'passthrough.mjs'),
    compatibilityDate: config.compatibility_date,
    compatibilityFlags: config.compatibility_flags ?? [],
    bindings: { UPSTREAM_ORIGIN: standin.origin },
    host: '127.0.0.1',
    port: ptPort,
    cf: false,
    log: mfLog,
    handleRuntimeStdio: (stdout, stderr) => {
      stdout.resume();
      stderr.resume();
    },
  });
  onCleanup(() => passthrough.dispose());
  const ptUrl = (await passthrough.ready).href.replace(/\/$/, '');
  const ptServed = servedBy(ptPort);
  watchdog.track(ptServed.pid);
  ownPids.add(ptServed.pid);
  log(`pass-through at ${ptUrl}: workerd pid ${ptServed.pid}`);

  const targets = {
    a: { url: `${standin.base}/chat/completions`, pids: { server: standin.pid, upstream: standin.pid } },
    b: { url: chatUrl(ptUrl), pids: { server: ptServed.pid, upstream: standin.pid } },
    g: { url: chatUrl(gw.url), pids: gwPids },
  };
  results.served_by = { g: gw.served, b: ptServed, runner_pid: process.pid };

  // Memory under short and long streams (the gateway soon after its start, then the pass-through) ----------
  // First many short streams (sizes the heap for this traffic), then one long stream. Relaying without holding
  // the stream keeps RSS level through the long stream; holding it would add at least the bytes streamed, so
  // the verdict compares RSS at the middle of the long stream with its end.
  results.memory = {};
  // The gateway twice: a stream that needs no edit (native relay), then one it edits.
  const memoryRows = [
    ['g', 'g', bodies.memShort, bodies.memLong],
    ['g_edited', 'g', bodies.memShortEdited, bodies.memLongEdited],
    ['b', 'b', bodies.memShort, bodies.memLong],
  ];
  for (const [row, t, shortBody, longBody] of memoryRows) {
    const pid = targets[t].pids.server;
    const label = `${TARGET_NAMES[t]}${row === t ? '' : ', edited stream'}`;
    await sleep(300);
    const idle = memory(pid).rss;
    const run = async (bodyPath, chunks, requests, name) => {
      const sampler = sampleRss(pid, 100);
      const r = await load({ url: targets[t].url, bodyPath, concurrency: 1, stream: true, requests, phase: `${t}-mem-${row === t ? '' : 'edited-'}${name}`, pids: targets[t].pids, timeout: 600 });
      const mem = sampler.stop();
      if (r.errors) problem(`${label} memory run (${chunks} chunks): ${r.errors} errors: ${r.error_samples.join(' | ')}`);
      return { chunks, requests, client_bytes: r.bytes_per_request, total_ms_p50: r.latency_ms?.p50 ?? null, errors: r.errors, ...mem };
    };
    const short = await run(shortBody, knobs.streamChunks, 100, 'short');
    const long = await run(longBody, knobs.longChunks, 1, 'long');
    // The sample nearest the middle of the long stream, and the highest over its last fifth (short streams
    // have few samples: the final one is always there).
    const duration = long.series.at(-1)[0];
    const mid = long.series.reduce((best, x) => (Math.abs(x[0] - duration / 2) < Math.abs(best[0] - duration / 2) ? x : best))[1];
    const end = Math.max(...long.series.filter(([ms]) => ms >= 0.8 * duration).map(([, v]) => v));
    const secondHalfGrowth = end - mid;
    const allowed = Math.max(2 * 2 ** 20, 0.5 * (long.client_bytes / 2));
    const verdict = secondHalfGrowth <= allowed ? 'flat: does not grow with stream length' : 'GROWS with stream length';
    for (const m of [short, long]) delete m.series;
    results.memory[row] = {
      pid,
      idle_rss: idle,
      short,
      long,
      long_minus_short_peak: long.peak_rss - short.peak_rss,
      long_mid_rss: mid,
      long_end_rss: end,
      second_half_growth: secondHalfGrowth,
      allowed_growth: Math.round(allowed),
      verdict,
    };
    const mib = (b) => (b / 2 ** 20).toFixed(1);
    log(`${label} RSS MiB: idle ${mib(idle)}, short peak ${mib(short.peak_rss)}, long peak ${mib(long.peak_rss)}, long mid→end ${mib(mid)}→${mib(end)}`);
    if (!verdict.startsWith('flat')) {
      problem(`${label}: workerd RSS grew by ${mib(secondHalfGrowth)} MiB over the second half of a ${knobs.longChunks}-chunk stream (${mib(long.client_bytes / 2)} MiB streamed in it)`);
    }
    const expectedRatio = knobs.longChunks / knobs.streamChunks;
    if (long.client_bytes < (short.client_bytes * expectedRatio) / 2) {
      problem(`${label}: the ${knobs.longChunks}-chunk stream delivered only ${long.client_bytes} B (vs ${short.client_bytes} B for ${knobs.streamChunks} chunks): cut short, so the memory comparison is weak`);
    }
  }

  // (g′) the same gateway with its storage on a tmpfs (non-streaming rows only) -----------------------------
  const nonstreamTargets = [...TARGETS];
  let gm = null;
  if (knobs.inMemoryVariant) {
    if (!results.settings.in_memory_on_tmpfs) {
      problem(`(g'): ${knobs.inMemoryDir} is not a tmpfs, so its storage is on disk like (g)'s: the (g') rows do not separate storage sync from compute`);
    }
    log(`starting (g') the gateway with its storage in ${memDir}`);
    gm = await startGateway(runtime, { config, vars: gatewayVars, persistTo: memDir, gatewayLog });
    targets.m = { url: chatUrl(gm.url), pids: { server: gm.served.pid, upstream: standin.pid } };
    gmStartRss = memory(gm.served.pid).rss;
    results.served_by.m = gm.served;
    nonstreamTargets.push('m');
  }

  // (g0) the same gateway with admission leases off (ADMISSION_LEASE_MS=0): every request asks its key's object,
  // as before leases (concurrent ones combined). Non-streaming rows only: the "before" of the platform bill.
  log('starting (g0) the gateway with admission leases off');
  const g0 = await startGateway(runtime, { config, vars: { ...gatewayVars, ADMISSION_LEASE_MS: '0' }, persistTo: join(tmp, 'state-leases-off'), gatewayLog });
  targets.n = { url: chatUrl(g0.url), pids: { server: g0.served.pid, upstream: standin.pid } };
  results.served_by.n = g0.served;
  nonstreamTargets.push('n');

  // Throughput and latency: the same load against every target -------------------------------------------
  results.nonstream = {};
  for (const c of knobs.concurrency) {
    results.nonstream[c] = {};
    for (const t of nonstreamTargets) {
      const phase = `${t}-chat-c${c}`;
      const r = await load({ url: targets[t].url, bodyPath: bodies.chat, concurrency: c, phase, pids: targets[t].pids });
      results.nonstream[c][t] = { target: t, phase, ...r };
      log(`${TARGET_NAMES[t]} chat c=${c}: ${brief(r)}`);
    }
  }
  // Both kinds of stream: `stream` needs no edit (include_usage; the gateway's native relay), `stream_edited`
  // does (the gateway's edited relay).
  for (const [kind, bodyPath, tag] of [['stream', bodies.stream, 'stream'], ['stream_edited', bodies.streamEdited, 'stream-edited']]) {
    results[kind] = {};
    for (const c of knobs.streamConcurrency) {
      results[kind][c] = {};
      for (const t of TARGETS) {
        const phase = `${t}-${tag}-c${c}`;
        const r = await load({ url: targets[t].url, bodyPath, concurrency: c, stream: true, phase, pids: targets[t].pids });
        results[kind][c][t] = { target: t, phase, ...r };
        log(`${TARGET_NAMES[t]} ${tag} c=${c}: ${brief(r)}`);
      }
    }
  }

  // Optional cheaper limiter probe, only if the route exists.
  const probe = await fetch(`${gw.url}/v1/usage`, { headers: { authorization: `Bearer ${BENCH_KEY}` } });
  await probe.arrayBuffer();
  results.usage_probe = { available: probe.status === 200, status: probe.status };
  if (probe.status === 200) {
    const c = Math.max(...knobs.concurrency);
    results.usage_probe.run = await load({ url: `${gw.url}/v1/usage`, method: 'GET', concurrency: c, phase: `g-usage-c${c}`, pids: gwPids });
    log(`(g) GET /v1/usage c=${c}: ${brief(results.usage_probe.run)}`);
  }

  results.memory.g.after_load_rss = memory(gw.served.pid).rss;
  // How much each gateway instance grew over the run, against how many requests it served.
  results.rss_growth = [];
  for (const [t, start] of [['g', gwStartRss], ['m', gmStartRss]]) {
    if (!targets[t]) continue;
    // Every request the instance logged (all bench requests carry a phase in their request id).
    const requests = [...gatewayLog.phases].filter(([phase]) => phase.startsWith(`${t}-`)).reduce((n, [, p]) => n + p.lines, 0);
    const end = memory(targets[t].pids.server).rss;
    results.rss_growth.push({ target: t, label: TARGET_NAMES[t], start, end, requests, bytes_per_request: requests ? Math.round((end - start) / requests) : null });
  }
  // Stream log lines are written when a stream ends; give the last ones a moment to arrive.
  await sleep(500);
  const doDir = join(runtime.stateRoot(gwState), 'do', `${runtime.GATEWAY_NAME}-KeyLimiter`);
  const limiterObjects = limiterObjectFiles(doDir);

  // The rows' usage events still in the queue are delivered first, so they neither slow the consumer figure
  // down nor go uncounted in usage_rows.
  // A figure from the driver that fails is reported as a problem; the figures above are kept.
  const figure = async (name, fn) => {
    try {
      await fn();
    } catch (error) {
      problem(`${name}: not measured: ${error.message}`);
    }
  };

  results.usage_rows = null;
  await figure('usage queue drain', async () => {
    log('waiting for the usage queue to drain (the consumer batch timeout is 5 s)');
    results.queue_drain = await waitForQueueDrain(gw.driver, { quietMs: 6000, timeoutMs: 120_000 });
    results.usage_rows = results.queue_drain.rows;
    if (!results.queue_drain.drained) problem(`the usage queue was still delivering after ${results.queue_drain.waited_ms} ms; the consumer figures share it with those events`);
  });

  // Limiter decisions through one hot key's Durable Object, from the driver (no HTTP, no gateway request path) ---
  results.limiter = [];
  await figure('limiter decisions', async () => {
    for (const [t, instance] of [['g', gw], ['m', gm]]) {
      if (!instance) continue;
      const runs = await limiterRuns(instance.driver, {
        target: t,
        pid: instance.served.pid,
        seconds: knobs.limiterSeconds,
        concurrency: knobs.limiterConcurrency,
        churn: t === 'g',
        baseline: t === 'g',
      });
      for (const r of runs) {
        log(`${TARGET_NAMES[t]} limiter ${r.name}: ${r.decisions_per_s} decisions/s (${r.admitted} admitted, ${r.denied} denied), p50 ${r.latency_ms.p50} ms, p99 ${r.latency_ms.p99} ms`);
      }
      results.limiter.push(...runs);
    }
  });

  // Storage rows per key at steady state: the driver's keys on (g), and the key every gateway request used ------
  const storageKeys = [
    ...results.limiter.filter((r) => r.target === 'g' && r.object === 'limiter').map((r) => ({ key: r.key, limit: r.requests_per_window, window_ms: r.window_ms, admitted: r.admitted_with_warmup })),
    // Every admitted gateway request sent one usage event, so the ledger's rows are this key's admissions.
    { key: BENCH_KEY_ID, limit: null, window_ms: 60_000, admitted: results.usage_rows },
  ];
  await figure('storage rows per key', async () => {
    results.storage_rows = await storageRows(gw.driver, doDir, storageKeys);
    for (const k of results.storage_rows) {
      if (k.error) problem(`storage rows of ${k.key}: ${k.error}`);
      else if (k.within_bound === false) problem(`storage rows of ${k.key}: ${k.total} rows, above the design bound of ${k.bound}`);
    }
  });

  // Usage-consumer throughput into D1 (PostHog off, as (g) runs) --------------------------------------------
  await figure('usage consumer', async () => {
    log(`usage consumer: ${knobs.consumerEvents} events through the queue into D1`);
    results.consumer = await consumerThroughput(gw.driver, { prefix: 'bench-consumer-', count: knobs.consumerEvents, posthog: false, pid: gw.served.pid });
    results.consumer.ledger_rows_before = results.usage_rows;
    log(`usage consumer: ${results.consumer.events_per_s} events/s`);
    if (!results.consumer.complete) problem(`usage consumer: only ${results.consumer.rows} of ${knobs.consumerEvents} events reached D1 in time`);
  });

  // The same with PostHog on: a third gateway (same storage mode as (g)) whose consumer posts to the stand-in --
  await figure('usage consumer with PostHog', async () => {
    const posthogStandin = await startStandin(rawDir, 'posthog');
    watchdog.track(posthogStandin.pid);
    ownPids.add(posthogStandin.pid);
    log(`PostHog stand-in at ${posthogStandin.base}; starting a gateway with POSTHOG_HOST set`);
    const gp = await startGateway(runtime, {
      config,
      vars: { ...gatewayVars, POSTHOG_API_KEY: 'phc_bench', POSTHOG_HOST: posthogStandin.base },
      persistTo: join(tmp, 'state-posthog'),
      gatewayLog,
    });
    results.consumer_posthog = await consumerThroughput(gp.driver, { prefix: 'bench-posthog-', count: knobs.consumerEvents, posthog: true, pid: gp.served.pid, standinPid: posthogStandin.pid });
    const received = await (await fetch(`${posthogStandin.base}/__standin/events`)).json();
    const accepted = received.events.length;
    results.consumer_posthog.posthog_standin = {
      events_accepted: accepted,
      batches_accepted: received.batches_accepted,
      batches_failed: received.batches_failed,
      bytes_received: received.bytes_received,
      bytes_per_event: accepted ? Math.round(received.bytes_received / accepted) : null,
      events_per_request: received.batches_accepted ? round(accepted / received.batches_accepted, 1) : null,
    };
    log(`usage consumer with PostHog: ${results.consumer_posthog.events_per_s} events/s, ${results.consumer_posthog.posthog_standin.bytes_per_event} B per event to PostHog`);
    if (!results.consumer_posthog.complete) problem(`usage consumer with PostHog: only ${results.consumer_posthog.posthog_accepted_rows} of ${knobs.consumerEvents} events marked as sent in time`);
    if (accepted !== knobs.consumerEvents) problem(`PostHog stand-in accepted ${accepted} events, ${knobs.consumerEvents} were sent`);
  });

  // The driver's figures have no load generator or stand-in beside them: anything else using a core disturbed them.
  const disturbed = [
    ...(results.limiter ?? []).map((r) => [`${TARGET_NAMES[r.target]} limiter ${r.name}`, r.cpu.other]),
    ...[['usage consumer', results.consumer], ['usage consumer with PostHog', results.consumer_posthog]].map(([name, r]) => [name, r?.cpu.other]),
  ].filter(([, other]) => other >= 0.25);
  if (disturbed.length) {
    problem(`other processes on this machine used ≥ 0.25 cores during: ${disturbed.map(([name, other]) => `${name} (${other})`).join(', ')}: those figures are disturbed.`);
  }

  results.machine.loadavg_at_end = os.loadavg().map((x) => round(x, 2));
  summarize(results, gatewayLog, { limiterObjects, limiterHeaders, wasmPath, mainModule, problem });
  return results;
}

function summarize(results, gatewayLog, { limiterObjects, limiterHeaders, wasmPath, mainModule, problem }) {
  const s = results.settings;
  for (const group of [results.nonstream, results.stream, results.stream_edited]) {
    for (const byTarget of Object.values(group)) {
      for (const run of Object.values(byTarget)) {
        if (['g', 'm', 'n'].includes(run.target)) run.gateway_log = gatewayLog.summary(run.phase);
      }
    }
  }
  // The limiter hop per request: how long each gateway request waited for its admission (its log line's limiter_ms).
  results.limiter_hop = [];
  for (const c of s.concurrency) {
    for (const t of ['g', 'm', 'n']) {
      const run = results.nonstream[c]?.[t];
      if (run?.gateway_log?.limiter_ms) results.limiter_hop.push({ target: t, concurrency: c, phase: run.phase, ...run.gateway_log.limiter_ms });
    }
  }
  if (results.limiter_hop.length === 0) problem('limiter hop per request: not reported (no limiter_ms in the gateway\'s request log lines)');

  const sub = (x, y) => (x === null || x === undefined || y === null || y === undefined ? null : round(x - y, 3));
  const div = (x, y) => (x && y ? round(x / y, 3) : null);

  results.overhead = {};
  for (const c of s.concurrency) {
    const { a, b, g, m, n } = results.nonstream[c];
    results.overhead[c] = {
      added_p50_vs_a: sub(g.latency_ms?.p50, a.latency_ms?.p50),
      added_p99_vs_a: sub(g.latency_ms?.p99, a.latency_ms?.p99),
      added_p50_vs_b: sub(g.latency_ms?.p50, b.latency_ms?.p50),
      added_p99_vs_b: sub(g.latency_ms?.p99, b.latency_ms?.p99),
      rps_ratio_g_b: div(g.rps, b.rps),
      rps_ratio_g_a: div(g.rps, a.rps),
      ...(n
        ? {
            leases_off_added_p50_vs_b: sub(n.latency_ms?.p50, b.latency_ms?.p50),
            leases_off_rps_ratio_b: div(n.rps, b.rps),
            object_calls_per_request: g.gateway_log?.limiter_calls_per_request ?? null,
            leases_off_object_calls_per_request: n.gateway_log?.limiter_calls_per_request ?? null,
          }
        : {}),
      ...(m
        ? {
            in_memory_added_p50_vs_b: sub(m.latency_ms?.p50, b.latency_ms?.p50),
            in_memory_added_p99_vs_b: sub(m.latency_ms?.p99, b.latency_ms?.p99),
            in_memory_rps_ratio_b: div(m.rps, b.rps),
          }
        : {}),
    };
  }
  // Per kind of stream: the gateway against the pass-through, and the CPU each target's workerd spent per
  // streamed event (its cores in use over the run / events relayed per second).
  const cpuPerEventMs = (run) =>
    run?.cpu?.server != null && run.rps > 0 ? round((run.cpu.server * 1000) / (run.rps * s.stream_chunks), 4) : null;
  for (const kind of ['stream', 'stream_edited']) {
    results[`${kind}_overhead`] = {};
    for (const c of s.stream_concurrency) {
      const { a, b, g } = results[kind][c];
      results[`${kind}_overhead`][c] = {
        ttfb_p50_delta: sub(g.ttfb_ms?.p50, b.ttfb_ms?.p50),
        ttfb_p99_delta: sub(g.ttfb_ms?.p99, b.ttfb_ms?.p99),
        total_p50_delta: sub(g.latency_ms?.p50, b.latency_ms?.p50),
        total_p99_delta: sub(g.latency_ms?.p99, b.latency_ms?.p99),
        rps_ratio_g_b: div(g.rps, b.rps),
        rps_ratio_b_a: div(b.rps, a.rps),
        cpu_ms_per_event_b: cpuPerEventMs(b),
        cpu_ms_per_event_g: cpuPerEventMs(g),
      };
    }
  }

  // The platform bill per million non-streamed requests at c=32 (or the nearest concurrency measured), with
  // leases (g) and without (g0): each kind of operation counted per request, priced from bench/lib/prices.mjs.
  const billC = s.concurrency.includes(32) ? 32 : s.concurrency.at(-1);
  results.platform_bill = { concurrency: billC, ledger: gatewayLog.ledger };
  for (const t of ['n', 'g']) {
    const run = results.nonstream[billC]?.[t];
    const gl = run?.gateway_log;
    if (!run || !gl) continue;
    const perRequest = {
      worker_requests: 1,
      // workerd's cores over the row ÷ requests per second: the Worker, its Durable Object and its queue
      // consumer together (all in one process locally; production bills the object by duration instead).
      worker_cpu_ms: run.cpu?.server != null && run.rps > 0 ? round((run.cpu.server * 1000) / run.rps, 4) : null,
      do_requests: gl.limiter_calls_per_request,
      do_rows_written: gl.limiter_rows_per_request,
      // The object is billed while it answers: the request's wait for admission, at 128 MB.
      do_gb_s: gl.limiter_ms ? (gl.limiter_ms.mean / 1000) * DO_BILLED_GB : null,
      d1_rows_written: gatewayLog.ledger.events > 0 ? round(gatewayLog.ledger.d1_rows_written / gatewayLog.ledger.events, 3) : null,
      queue_operations: QUEUE_OPERATIONS_PER_EVENT,
      // A chat request reads no KV: keys come from D1 through the isolate's cache; KV holds only /v1/models.
      kv_reads: 0,
    };
    results.platform_bill[t] = { phase: run.phase, admission: gl.admission, ...billPerMillion(perRequest) };
  }
  if (!results.platform_bill.g) problem('platform bill: no gateway log summary for the non-streaming row');

  const firstStream = results.stream[s.stream_concurrency[0]];
  results.payloads = {
    nonstream_response_bytes: results.nonstream[s.concurrency[0]].a.bytes_per_request,
    stream_response_bytes: firstStream.a.bytes_per_request,
  };

  const wasmPhase = firstStream.g.gateway_log?.wasm;
  results.wasm_bytes = wasmPhase
    ? { reported: true, concurrency: s.stream_concurrency[0], ...wasmPhase, client_bytes_per_stream: firstStream.g.bytes_per_request }
    : { reported: false };
  if (!wasmPhase) problem('bytes through wasm: not reported (no wasm_bytes_in / wasm_bytes_out in the gateway\'s stream log lines)');

  const wasm = readFileSync(wasmPath);
  results.wasm_size = { raw: wasm.length, gzip: gzipSync(wasm, { level: 9 }).length, js_raw: readFileSync(mainModule).length };

  const cMax = Math.max(...s.concurrency);
  const hot = results.nonstream[cMax].g;
  const inPath = limiterObjects.length > 0 || limiterHeaders.length > 0;
  results.hot_key = {
    concurrency: cMax,
    rps: hot.rps,
    p50_ms: hot.latency_ms?.p50 ?? null,
    p99_ms: hot.latency_ms?.p99 ?? null,
    errors: hot.errors,
    limiter_objects_stored: limiterObjects.length,
    limiter_headers: limiterHeaders,
    limiter_in_path: inPath,
    limiter_note: inPath
      ? `The limiter is in the request path (KEY_LIMITER storage written: ${limiterObjects.length > 0 ? 'yes' : 'no'}; ` +
        `rate-limit headers on answers: ${limiterHeaders.length > 0 ? 'yes' : 'no'}), so each of these requests took one admission decision (and one settlement) on the key's Durable Object.`
      : 'No sign of the limiter in the request path (no KEY_LIMITER storage, no rate-limit headers): this is the gateway\'s one-key ceiling without it.',
  };

  const ceiling = Object.values(results.nonstream).map((r) => r.a).reduce((best, r) => (r.rps > best.rps ? r : best));
  results.upstream_ceiling = { rps: ceiling.rps, concurrency: ceiling.concurrency, cpu: ceiling.cpu.server };

  // Problems: invalid rows, and what bounded each figure.
  const nproc = results.machine.nproc;
  const saturated = [];
  for (const [kind, group] of [['chat', results.nonstream], ['stream', results.stream], ['stream-edited', results.stream_edited]]) {
    for (const [c, byTarget] of Object.entries(group)) {
      for (const t of [...TARGETS, 'm']) {
        const run = byTarget[t];
        if (!run) continue;
        const label = `${TARGET_NAMES[t]} ${kind} c=${c}`;
        if (run.errors) {
          const log = run.gateway_log ? ` gateway log: statuses ${JSON.stringify(run.gateway_log.statuses)}, errors ${JSON.stringify(run.gateway_log.errors)}` : '';
          problem(`${label}: ${run.errors} errors — row INVALID. Samples: ${run.error_samples.join(' | ')}.${log}`);
        }
        if (run.warmup_errors) problem(`${label}: ${run.warmup_errors} errors during warm-up (not in the figures).`);
        if (t !== 'a' && run.cpu.upstream >= 0.9) {
          problem(`${label}: the stand-in used ${run.cpu.upstream} cores (it is single-threaded): this row is bounded by the upstream stand-in.`);
        }
        if (run.cpu.other >= 0.25) {
          problem(`${label}: other processes on this machine used ${run.cpu.other} cores meanwhile: figures disturbed.`);
        }
        if (run.cpu.machine >= 0.85 * nproc) {
          saturated.push(`${t} ${kind} c=${c}`);
        }
      }
    }
  }
  if (saturated.length) {
    problem(
      `all ${nproc} cores were busy (≥85%) during: ${saturated.join(', ')}. The load generator, the stand-in and workerd ` +
        'share these cores, so those rows are bounded by the machine (see the CPU columns for who used it).',
    );
  }
}

async function finish(results) {
  mkdirSync(knobs.outDir, { recursive: true });
  const markdown = renderMarkdown(results);
  writeFileSync(join(knobs.outDir, 'latest.json'), `${JSON.stringify(results, null, 2)}\n`);
  writeFileSync(join(knobs.outDir, 'latest.md'), markdown);
  process.stdout.write(`${markdown}\n`);
  log(`wrote ${relative(ROOT, join(knobs.outDir, 'latest.json'))} and latest.md`);
}

main()
  .then(async (results) => {
    await cleanup();
    await finish(results);
    process.exit(0);
  })
  .catch(async (error) => {
    log(`failed: ${error.message}`);
    await cleanup();
    process.exit(1);
  });
