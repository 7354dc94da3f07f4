#!/usr/bin/env node
// `npm run test:live`: a handful of real calls through the gateway to OpenRouter, every endpoint, streamed and
// not, with the official `openai` SDK — a few tokens each, on cheap models. Opt-in: it needs OPENROUTER_API_KEY
// in the environment and spends a fraction of a cent; without the key it says so and exits 0. Never part of
// `npm test` or CI.
//
//   OPENROUTER_API_KEY=sk-or-... npm run test:live
//   LIVE_MODEL (default meta-llama/llama-3.1-8b-instruct), LIVE_EMBEDDING_MODEL (default
//   openai/text-embedding-3-small) choose the models; OPENROUTER_BASE_URL as for the gateway.
//
// The gateway runs in workerd (Miniflare, as in the tests) with a fresh local state: migrations applied, one key
// created. After the calls it waits for the ledger (GET /v1/usage) to hold one row per admitted call.

import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const apiKey = process.env.OPENROUTER_API_KEY;
if (!apiKey) {
  console.log('[live] skipped: set OPENROUTER_API_KEY to run a few real calls through the gateway to OpenRouter.');
  process.exit(0);
}
// The same setup as `npm test` (tools, dependencies, the Worker build), then what it installed.
const setup = spawnSync('bash', [join(dirname(fileURLToPath(import.meta.url)), 'setup.sh')], { stdio: 'inherit' });
if (setup.status !== 0) process.exit(setup.status ?? 1);
const { default: OpenAI } = await import('openai');
const { ROOT, startGateway } = await import('./runtime.mjs');
const MODEL = process.env.LIVE_MODEL || 'meta-llama/llama-3.1-8b-instruct';
const EMBEDDING_MODEL = process.env.LIVE_EMBEDDING_MODEL || 'openai/text-embedding-3-small';
const WRANGLER = join(ROOT, 'node_modules', '.bin', 'wrangler');

function wrangler(args) {
  const result = spawnSync(WRANGLER, args, { cwd: ROOT, env: { ...process.env, WRANGLER_SEND_METRICS: 'false' }, encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`wrangler ${args.join(' ')} failed:\n${result.stdout}${result.stderr}`);
}

const state = mkdtempSync(join(tmpdir(), 'gateway-live-'));
const key = `sk-gw-live-${randomBytes(12).toString('hex')}`;
const hash = createHash('sha256').update(key).digest('hex');
wrangler(['d1', 'migrations', 'apply', 'DB', '--local', '--persist-to', state]);
wrangler(['d1', 'execute', 'DB', '--local', '--persist-to', state, '--command',
  `INSERT INTO api_keys (id, key_hash, user_id, name) VALUES ('live', '${hash}', 'live-test', 'npm run test:live')`]);

const vars = { OPENROUTER_API_KEY: apiKey };
if (process.env.OPENROUTER_BASE_URL) vars.OPENROUTER_BASE_URL = process.env.OPENROUTER_BASE_URL;
const { mf, url } = await startGateway({ persistTo: state, vars });
const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: key, maxRetries: 1, timeout: 60_000 });

const calls = [
  ['chat', async () => {
    const r = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Say hi.' }], max_tokens: 5 });
    return { text: r.choices[0].message.content, usage: r.usage };
  }],
  ['chat stream', async () => {
    const s = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Say hi.' }], max_tokens: 5,
      stream: true, stream_options: { include_usage: true } });
    let text = '';
    let usage = null;
    for await (const c of s) {
      text += c.choices[0]?.delta?.content ?? '';
      usage = c.usage ?? usage;
    }
    return { text, usage };
  }],
  ['responses', async () => {
    const r = await client.responses.create({ model: MODEL, input: 'Say hi.', max_output_tokens: 16 });
    return { text: r.output_text, usage: r.usage, status: r.status };
  }],
  ['responses stream', async () => {
    const final = await client.responses.stream({ model: MODEL, input: 'Say hi.', max_output_tokens: 16 }).finalResponse();
    return { text: final.output_text, usage: final.usage, status: final.status };
  }],
  ['completions', async () => {
    const r = await client.completions.create({ model: MODEL, prompt: 'Hello,', max_tokens: 5 });
    return { text: r.choices[0].text, usage: r.usage };
  }],
  ['completions stream', async () => {
    const s = await client.completions.create({ model: MODEL, prompt: 'Hello,', max_tokens: 5, stream: true });
    let text = '';
    for await (const c of s) text += c.choices[0]?.text ?? '';
    return { text };
  }],
  ['embeddings', async () => {
    const r = await client.embeddings.create({ model: EMBEDDING_MODEL, input: ['hello', 'world'] });
    return { count: r.data.length, dimensions: r.data[0].embedding.length, usage: r.usage };
  }],
  ['models.retrieve', async () => {
    const m = await client.models.retrieve(MODEL);
    return { id: m.id };
  }],
];

let failed = 0;
let admitted = 0;
try {
  for (const [name, call] of calls) {
    try {
      const result = await call();
      if (name !== 'models.retrieve') admitted++;
      console.log(`[live] ok   ${name}: ${JSON.stringify(result)}`);
    } catch (e) {
      failed++;
      if (e?.status) admitted += name === 'models.retrieve' ? 0 : 1;
      console.log(`[live] FAIL ${name}: ${e?.status ?? ''} ${e?.message ?? e}`);
    }
  }
  // The ledger is written by the queue consumer after each response: wait for every admitted call's row.
  const deadline = Date.now() + 60_000;
  let usage = null;
  while (Date.now() < deadline) {
    const response = await fetch(`${url}/v1/usage`, { headers: { authorization: `Bearer ${key}` } });
    usage = await response.json();
    if ((usage?.usage_this_period?.requests ?? 0) >= admitted) break;
    await new Promise((r) => setTimeout(r, 1000));
  }
  const requests = usage?.usage_this_period?.requests ?? 0;
  console.log(`[live] ledger: ${JSON.stringify(usage?.usage_this_period ?? usage)}`);
  if (requests !== admitted) {
    failed++;
    console.log(`[live] FAIL ledger: ${requests} rows for ${admitted} admitted calls`);
  }
} finally {
  await mf.dispose().catch(() => {});
  rmSync(state, { recursive: true, force: true });
}
console.log(failed === 0 ? '[live] all calls passed' : `[live] ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
