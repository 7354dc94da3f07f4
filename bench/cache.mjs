#!/usr/bin/env node
// The response cache: how long a hit takes against a miss, and what the cache adds to a miss, measured on the
// gateway in workerd (Miniflare, local KV) against the OpenRouter stand-in, one request at a time. Part of
// `npm run bench`; alone: `node bench/cache.mjs`.
//
//   off          a key without caching: the same request every time (the gateway as it was before the cache)
//   miss         a caching key, a new request every time: the lookup finds nothing, the upstream answers, the
//                answer is stored (after the response)
//   hit          a caching key, the stored request: answered from KV
//   …_stream     the same, streamed (20 chunks from the upstream; a hit replays the stored answer)
//   …_64k        a prompt of 64 KB, so an answer of 64 KB (the stand-in quotes the prompt)
//   …_slow       an upstream that takes 250 ms to answer, as a model would (a hit never waits for it)
//
// The rows take turns request by request, so drift on a noisy machine touches them alike. The stand-in answers
// at once but for the _slow rows: against a real model a miss also waits for the generation, a hit does not.
//
// Knobs: BENCH_CACHE_REQUESTS (default 300 per row, after 30 of warm-up). Writes bench/results/cache.json and
// cache.md.

import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { readGatewayConfig, startGateway } from '../scripts/runtime.mjs';
import { round } from './lib/procs.mjs';
import { latencySummary, runBenchmark, startStandin, writeResults } from './lib/sequential.mjs';
import { applyMigrations } from './lib/sql.mjs';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const OUT = process.env.BENCH_OUT_DIR || join(ROOT, 'bench', 'results');
const REQUESTS = Number(process.env.BENCH_CACHE_REQUESTS || 300);
const WARMUP = 30;
const secret = (name) => `sk-gw-bench-${name}-${createHash('sha256').update(name + Date.now()).digest('hex').slice(0, 24)}`;
const KEYS = { cache: secret('cache'), off: secret('off') };

const log = (message) => console.error(`[bench:cache] ${message}`);
const cleanups = [];

const LARGE = 'word '.repeat(64 * 1024 / 5);
// A model takes its time; the stand-in, told to, takes this long before its (non-streamed) answer.
const SLOW_MS = 250;

// The same request streamed or not (the stand-in streams its answer in 20 chunks): one cache entry serves both.
function body(prompt, stream, upstreamMs = 0) {
  const request = {
    model: 'openai/gpt-4o-mini',
    temperature: 0,
    max_tokens: 20_000,
    messages: [{ role: 'user', content: prompt }],
    standin: { chunks: 20, ...(upstreamMs ? { delay_ms: upstreamMs } : {}) },
  };
  return stream ? { ...request, stream: true, stream_options: { include_usage: true } } : request;
}

/** One request: its total time, time to the first body byte, and the `x-cache` it got. */
async function request(url, key, payload) {
  const started = performance.now();
  const response = await fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify(payload),
  });
  const reader = response.body.getReader();
  let first = null;
  let bytes = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    first ??= performance.now() - started;
    bytes += value.length;
  }
  if (response.status !== 200) throw new Error(`the gateway answered ${response.status}`);
  return { total: performance.now() - started, first: first ?? 0, bytes, cache: response.headers.get('x-cache') };
}

/** The rows: which key, which request (by iteration), and the `x-cache` every answer must carry. */
function rows(run) {
  const unique = (tag, i, large = '') => `${tag} ${run} ${i} ${large}`;
  return {
    off: { key: KEYS.off, payload: () => body(unique('off', 0), false), expect: null },
    miss: { key: KEYS.cache, payload: (i) => body(unique('miss', i), false), expect: 'MISS' },
    hit: { key: KEYS.cache, payload: () => body(unique('hit', 0), false), expect: 'HIT' },
    off_stream: { key: KEYS.off, payload: () => body(unique('off', 0), true), expect: null },
    miss_stream: { key: KEYS.cache, payload: (i) => body(unique('miss-stream', i), true), expect: 'MISS' },
    hit_stream: { key: KEYS.cache, payload: () => body(unique('hit', 0), true), expect: 'HIT' },
    off_64k: { key: KEYS.off, payload: () => body(unique('off', 0, LARGE), false), expect: null },
    miss_64k: { key: KEYS.cache, payload: (i) => body(unique('miss', i, LARGE), false), expect: 'MISS' },
    hit_64k: { key: KEYS.cache, payload: () => body(unique('hit', 0, LARGE), false), expect: 'HIT' },
    miss_slow: { key: KEYS.cache, payload: (i) => body(unique('miss-slow', i), false, SLOW_MS), expect: 'MISS' },
    hit_slow: { key: KEYS.cache, payload: () => body(unique('hit-slow', 0), false, SLOW_MS), expect: 'HIT' },
  };
}

async function measure(url) {
  const run = createHash('sha256').update(String(Date.now())).digest('hex').slice(0, 8);
  const all = rows(run);
  // The hits' answers are stored first (a miss each), and looked up until they are there.
  for (const name of ['hit', 'hit_64k', 'hit_slow']) {
    const row = all[name];
    const deadline = Date.now() + 30_000;
    while ((await request(url, row.key, row.payload(0))).cache !== 'HIT') {
      if (Date.now() > deadline) throw new Error(`${name}: the answer was never stored`);
    }
  }
  const times = Object.fromEntries(Object.keys(all).map((name) => [name, { total: [], first: [], bytes: 0 }]));
  for (let i = 0; i < WARMUP + REQUESTS; i++) {
    for (const [name, row] of Object.entries(all)) {
      const r = await request(url, row.key, row.payload(i + 1));
      if (r.cache !== row.expect) throw new Error(`${name}: x-cache ${r.cache}, expected ${row.expect}`);
      if (i < WARMUP) continue;
      times[name].total.push(r.total);
      times[name].first.push(r.first);
      times[name].bytes = r.bytes;
    }
  }
  return Object.fromEntries(
    Object.entries(times).map(([name, t]) => [name, { ...latencySummary(t.total), first_byte: latencySummary(t.first), answer_bytes: t.bytes }]),
  );
}

/** Each row, and the row its p50 is compared with. */
const COMPARED = [
  ['off', null],
  ['miss', 'off'],
  ['hit', 'miss'],
  ['off_stream', null],
  ['miss_stream', 'off_stream'],
  ['hit_stream', 'miss_stream'],
  ['off_64k', null],
  ['miss_64k', 'off_64k'],
  ['hit_64k', 'miss_64k'],
  ['miss_slow', 'off'],
  ['hit_slow', 'miss_slow'],
];

function markdown(r) {
  const line = ([name, vs]) => {
    const row = r.rows[name];
    const ratio = vs ? `${round(row.p50_ms / r.rows[vs].p50_ms, 2)} × ${vs}` : '';
    return `| ${name} | ${row.answer_bytes} | ${row.p50_ms} | ${row.p90_ms} | ${row.p99_ms} | ${row.first_byte.p50_ms} | ${ratio} |`;
  };
  return [
    `# Response cache: hits against misses (${r.date})`,
    '',
    `${r.requests} requests per row, one at a time, the rows taking turns; Miniflare's local KV; the stand-in answers at once (the _slow rows: after 250 ms). Command: \`node bench/cache.mjs\`.`,
    '',
    '| row | answer bytes | p50 ms | p90 ms | p99 ms | first byte p50 ms | p50 |',
    '| --- | ---: | ---: | ---: | ---: | ---: | --- |',
    ...COMPARED.map(line),
    '',
  ].join('\n');
}

async function main() {
  const stateDir = mkdtempSync(join(tmpdir(), 'bench-cache-'));
  cleanups.push(() => rmSync(stateDir, { recursive: true, force: true }));
  readGatewayConfig();
  const standin = await startStandin();
  cleanups.push(standin.stop);
  const { mf, url } = await startGateway({
    persistTo: stateDir,
    vars: { OPENROUTER_BASE_URL: standin.base, OPENROUTER_API_KEY: 'sk-or-bench', RATE_LIMIT_PER_MINUTE: '100000000', MAX_TOKENS_LIMIT: '65536' },
    onStdio: (stdout, stderr) => {
      stdout.resume();
      stderr.pipe(process.stderr);
    },
  });
  cleanups.push(() => mf.dispose());
  const db = await mf.getD1Database('DB');
  await applyMigrations(db, join(ROOT, 'migrations'));
  const insert = 'INSERT INTO api_keys (id, key_hash, user_id, cache_ttl_seconds) VALUES (?1, ?2, ?3, ?4)';
  const hash = (key) => createHash('sha256').update(key).digest('hex');
  await db.prepare(insert).bind('bench-cache', hash(KEYS.cache), 'bench-user', 3600).run();
  await db.prepare(insert).bind('bench-off', hash(KEYS.off), 'bench-user', null).run();
  log(`${REQUESTS} requests per row (after ${WARMUP} of warm-up), rows taking turns`);
  const results = { date: new Date().toISOString(), requests: REQUESTS, rows: await measure(url) };
  writeResults(OUT, 'cache', results, markdown);
}

runBenchmark(main, cleanups, log);
