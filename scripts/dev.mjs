#!/usr/bin/env node
// `npm run dev`: serves the gateway locally (wrangler dev, local mode: real workerd with local D1/KV/DO/Queues).
//
// 1. applies the D1 migrations to the local database;
// 2. makes sure the demo API key exists (local database only) and prints it;
// 3. without an OPENROUTER_API_KEY (environment, .dev.vars or --var), starts the OpenRouter stand-in and points
//    the gateway at it, so everything works offline;
// 4. enables the admin API with a local development admin key (for `npm run keys`), unless one is configured;
// 5. runs `wrangler dev` with any extra arguments passed through (`npm run dev -- --port 9000 --var NAME:VALUE`).
//
// scripts/setup.sh has already installed the toolchain and built the Worker (see package.json).

import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { LOCAL_ADMIN_KEY } from './keys.mjs';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const WRANGLER = join(ROOT, 'node_modules', '.bin', 'wrangler');
// A fixed, documented key that exists only in the local development database, so the README's curl works as is.
export const DEMO_KEY = 'sk-gw-demo-local-development-only';
const DEMO_KEY_ID = 'demo';
const DEMO_USER = 'demo-user';

const env = { ...process.env, WRANGLER_SEND_METRICS: 'false' };
const passThrough = process.argv.slice(2);

function wrangler(args, options = {}) {
  const result = spawnSync(WRANGLER, args, { cwd: ROOT, env, encoding: 'utf8', ...options });
  if (result.status !== 0) {
    process.stderr.write(result.stdout ?? '');
    process.stderr.write(result.stderr ?? '');
    throw new Error(`wrangler ${args.join(' ')} failed`);
  }
  return result.stdout;
}

function hasOption(name) {
  return passThrough.some((a) => a === name || a.startsWith(`${name}=`));
}

/** Whether NAME is set in the environment, in .dev.vars, or with --var. */
function configured(name) {
  if (process.env[name]) return true;
  if (passThrough.some((a) => a.startsWith(`${name}:`) || a.startsWith(`${name}=`))) return true;
  const devVars = join(ROOT, '.dev.vars');
  return existsSync(devVars) && new RegExp(`^\\s*${name}\\s*=\\s*\\S`, 'm').test(readFileSync(devVars, 'utf8'));
}

function prepareDatabase() {
  const persist = passThrough.includes('--persist-to') ? ['--persist-to', passThrough[passThrough.indexOf('--persist-to') + 1]] : [];
  wrangler(['d1', 'migrations', 'apply', 'DB', '--local', ...persist]);
  const hash = createHash('sha256').update(DEMO_KEY).digest('hex');
  wrangler([
    'd1', 'execute', 'DB', '--local', ...persist, '--command',
    `INSERT INTO api_keys (id, key_hash, user_id, name) VALUES ('${DEMO_KEY_ID}', '${hash}', '${DEMO_USER}', 'local demo key') ` +
      `ON CONFLICT (id) DO UPDATE SET key_hash = excluded.key_hash, active = 1, revoked_at = NULL`,
  ]);
}

async function startStandin() {
  const child = spawn(process.execPath, [join(ROOT, 'standins', 'openrouter.mjs'), '--port', '0', '--exit-with-stdin'], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const firstLine = await new Promise((resolve, reject) => {
    createInterface({ input: child.stdout }).once('line', resolve);
    child.once('exit', (code) => reject(new Error(`OpenRouter stand-in exited (${code})`)));
  });
  return { child, url: JSON.parse(firstLine).listening };
}

async function main() {
  prepareDatabase();
  const args = ['dev', '--local'];
  if (!hasOption('--ip')) args.push('--ip', '127.0.0.1');
  if (!hasOption('--port')) args.push('--port', '8787');

  let standin = null;
  if (!configured('OPENROUTER_API_KEY')) {
    standin = await startStandin();
    args.push('--var', `OPENROUTER_BASE_URL:${standin.url}`, '--var', 'OPENROUTER_API_KEY:sk-or-standin-local');
    console.log(`[dev] no OPENROUTER_API_KEY set: answering with the local OpenRouter stand-in at ${standin.url}`);
  }
  if (process.env.OPENROUTER_API_KEY) args.push('--var', `OPENROUTER_API_KEY:${process.env.OPENROUTER_API_KEY}`);
  if (!configured('ADMIN_API_KEY')) {
    // The admin API, for `npm run keys`, with a development-only key that exists nowhere but here.
    args.push('--var', `ADMIN_API_KEY:${LOCAL_ADMIN_KEY}`);
  } else if (process.env.ADMIN_API_KEY) {
    args.push('--var', `ADMIN_API_KEY:${process.env.ADMIN_API_KEY}`);
  }
  const port = hasOption('--port') ? passThrough[passThrough.indexOf('--port') + 1] : '8787';
  console.log(`[dev] demo API key: ${DEMO_KEY}`);
  console.log(
    `[dev] try: curl -N http://127.0.0.1:${port}/v1/chat/completions -H "Authorization: Bearer ${DEMO_KEY}" ` +
      `-H "Content-Type: application/json" -d '{"messages":[{"role":"user","content":"Hello!"}],"stream":true}'`,
  );

  const dev = spawn(WRANGLER, [...args, ...passThrough], { cwd: ROOT, env, stdio: 'inherit' });
  const stop = () => {
    dev.kill('SIGTERM');
    standin?.child.kill('SIGTERM');
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  dev.on('exit', (code) => {
    standin?.child.kill('SIGTERM');
    process.exit(code ?? 0);
  });
}

main().catch((error) => {
  console.error(`[dev] ${error.message}`);
  process.exit(1);
});
