#!/usr/bin/env node
// `npm run keys -- <command>`: manage API keys and read usage through the gateway's admin API.
//
//   create --user ID [--name N] [--rpm N] [--tpm N] [--budget-tokens N] [--budget-usd X]
//          [--period day|month|lifetime] [--concurrency N] [--models a/b,c/d]
//          [--cache-ttl SECONDS] [--cache-scope key|user] [--cache-sampled true|false]
//   list [--user ID] [--limit N] [--all]
//   show ID
//   update ID [--rpm N|none] [--tpm N|none] [--budget-tokens N|none] [--budget-usd X|none] [--period P]
//          [--concurrency N|none] [--models a,b|none] [--name N] [--active true|false]
//          [--cache-ttl SECONDS|none] [--cache-scope key|user] [--cache-sampled true|false]
//   revoke ID
//   usage [--user ID] [--key ID] [--from DATE] [--to DATE] [--group-by day|model|key|user|endpoint] [--csv]
//
// Options for every command: --url URL (default http://127.0.0.1:8787, the `npm run dev` gateway) and --json
// (machine-readable output). The admin key comes from the ADMIN_API_KEY environment variable; against a local
// gateway it defaults to the development key that `npm run dev` configures.

import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';

export const LOCAL_ADMIN_KEY = 'sk-gw-admin-local-development-only';
const DEFAULT_URL = 'http://127.0.0.1:8787';

const OPTIONS = {
  url: { type: 'string', default: DEFAULT_URL },
  json: { type: 'boolean', default: false },
  csv: { type: 'boolean', default: false },
  all: { type: 'boolean', default: false },
  user: { type: 'string' },
  key: { type: 'string' },
  name: { type: 'string' },
  rpm: { type: 'string' },
  tpm: { type: 'string' },
  'budget-tokens': { type: 'string' },
  'budget-usd': { type: 'string' },
  period: { type: 'string' },
  concurrency: { type: 'string' },
  models: { type: 'string' },
  active: { type: 'string' },
  'cache-ttl': { type: 'string' },
  'cache-scope': { type: 'string' },
  'cache-sampled': { type: 'string' },
  limit: { type: 'string' },
  from: { type: 'string' },
  to: { type: 'string' },
  'group-by': { type: 'string' },
  help: { type: 'boolean', short: 'h', default: false },
};

class UsageError extends Error {}

function adminKey(url) {
  if (process.env.ADMIN_API_KEY) return process.env.ADMIN_API_KEY;
  const host = new URL(url).hostname;
  if (host === '127.0.0.1' || host === 'localhost') return LOCAL_ADMIN_KEY;
  throw new UsageError('set ADMIN_API_KEY to the gateway\'s admin key');
}

async function call(opts, method, path, body) {
  const response = await fetch(new URL(path, opts.url), {
    method,
    headers: { authorization: `Bearer ${adminKey(opts.url)}`, ...(body ? { 'content-type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  }).catch((error) => {
    throw new Error(`cannot reach ${opts.url}: ${error.cause?.code ?? error.message} (is the gateway running?)`);
  });
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try {
      message = JSON.parse(text).error.message;
    } catch {}
    throw new Error(`${response.status}: ${message}`);
  }
  return response.headers.get('content-type')?.startsWith('text/csv') ? text : JSON.parse(text);
}

/** `none` clears a limit; numbers must be numbers. */
function limit(value, option, parse = Number) {
  if (value === undefined) return undefined;
  if (value === 'none') return null;
  const n = parse(value);
  if (!Number.isFinite(n)) throw new UsageError(`--${option} expects a number or "none"`);
  return n;
}

function keyFields(values) {
  const fields = {
    name: values.name,
    rpm: limit(values.rpm, 'rpm'),
    tpm: limit(values.tpm, 'tpm'),
    usage_limit: limit(values['budget-tokens'], 'budget-tokens'),
    usd_limit: limit(values['budget-usd'], 'budget-usd'),
    budget_period: values.period,
    max_concurrency: limit(values.concurrency, 'concurrency'),
    allowed_models:
      values.models === undefined ? undefined : values.models === 'none' ? null : values.models.split(',').map((m) => m.trim()),
  };
  for (const [option, field] of [['active', 'active'], ['cache-sampled', 'cache_sampled']]) {
    if (values[option] === undefined) continue;
    if (!['true', 'false'].includes(values[option])) throw new UsageError(`--${option} expects true or false`);
    fields[field] = values[option] === 'true';
  }
  fields.cache_ttl_seconds = limit(values['cache-ttl'], 'cache-ttl');
  fields.cache_scope = values['cache-scope'];
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined));
}

function table(rows, columns) {
  if (rows.length === 0) return '(none)';
  const cell = (row, c) => {
    const v = row[c];
    if (v === null || v === undefined) return '-';
    return Array.isArray(v) ? v.join(',') : String(v);
  };
  const widths = columns.map((c) => Math.max(c.length, ...rows.map((r) => cell(r, c).length)));
  const line = (values) => values.map((v, i) => v.padEnd(widths[i])).join('  ').trimEnd();
  return [line(columns), line(widths.map((w) => '-'.repeat(w))), ...rows.map((r) => line(columns.map((c) => cell(r, c))))].join('\n');
}

const KEY_COLUMNS = ['id', 'user_id', 'name', 'active', 'rpm', 'tpm', 'usage_limit', 'budget_period', 'usd_limit', 'max_concurrency', 'allowed_models', 'cache_ttl_seconds', 'cache_scope', 'cache_sampled'];

function printKeys(opts, keys) {
  console.log(opts.json ? JSON.stringify(keys, null, 2) : table(keys, KEY_COLUMNS));
}

const commands = {
  async create(opts, values) {
    if (!values.user) throw new UsageError('create needs --user');
    const key = await call(opts, 'POST', '/admin/keys', { user_id: values.user, ...keyFields(values) });
    if (opts.json) return console.log(JSON.stringify(key, null, 2));
    console.log(table([key], KEY_COLUMNS));
    console.log(`\nAPI key (shown once, store it now): ${key.key}`);
  },
  async list(opts, values) {
    const keys = [];
    let cursor;
    do {
      const query = new URLSearchParams({ limit: values.limit ?? '100' });
      if (values.user) query.set('user_id', values.user);
      if (cursor) query.set('cursor', cursor);
      const page = await call(opts, 'GET', `/admin/keys?${query}`);
      keys.push(...page.data);
      cursor = values.all && page.has_more ? page.next_cursor : undefined;
    } while (cursor);
    printKeys(opts, keys);
  },
  async show(opts, values, [id]) {
    if (!id) throw new UsageError('show needs a key id');
    printKeys(opts, [await call(opts, 'GET', `/admin/keys/${encodeURIComponent(id)}`)]);
  },
  async update(opts, values, [id]) {
    if (!id) throw new UsageError('update needs a key id');
    printKeys(opts, [await call(opts, 'PATCH', `/admin/keys/${encodeURIComponent(id)}`, keyFields(values))]);
  },
  async revoke(opts, values, [id]) {
    if (!id) throw new UsageError('revoke needs a key id');
    printKeys(opts, [await call(opts, 'DELETE', `/admin/keys/${encodeURIComponent(id)}`)]);
  },
  async usage(opts, values) {
    const query = new URLSearchParams();
    for (const [option, name] of [['user', 'user_id'], ['key', 'key_id'], ['from', 'from'], ['to', 'to'], ['group-by', 'group_by']]) {
      if (values[option]) query.set(name, values[option]);
    }
    if (values.csv) query.set('format', 'csv');
    const report = await call(opts, 'GET', `/admin/usage?${query}`);
    if (values.csv) return process.stdout.write(report);
    if (opts.json) return console.log(JSON.stringify(report, null, 2));
    console.log(table(report.data, [report.group_by, 'requests', 'input_tokens', 'output_tokens', 'cached_tokens', 'cost_usd', 'cache_hits', 'saved_cost_usd']));
  },
};

async function main() {
  const { values, positionals } = parseArgs({ options: OPTIONS, allowPositionals: true });
  const [command, ...rest] = positionals;
  if (values.help || !command) {
    const lines = (await import('node:fs')).readFileSync(new URL(import.meta.url), 'utf8').split('\n').slice(1);
    const usage = lines.slice(0, lines.findIndex((l) => !l.startsWith('//')));
    console.log(usage.map((l) => l.replace(/^\/\/ ?/, '')).join('\n'));
    return;
  }
  const run = commands[command];
  if (!run) throw new UsageError(`unknown command "${command}" (create, list, show, update, revoke, usage)`);
  await run({ url: values.url, json: values.json }, values, rest);
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((error) => {
    console.error(`keys: ${error.message}`);
    process.exit(error instanceof UsageError ? 2 : 1);
  });
}
