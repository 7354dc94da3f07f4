#!/usr/bin/env node
// `npm run dev`: serves the gateway locally with wrangler's dev server (local mode: real workerd with local
// D1/KV/DO/Queues, wrangler's ProxyWorker, the Miniflare config wrangler derives from wrangler.toml, rebuilds on
// changes), started through wrangler's API rather than its CLI so that the devtools inspector can be left off:
//
// Why not `wrangler dev`: its InspectorProxyWorker enables the runtime inspector's Network domain and, for every
// devtools message from the user runtime, sends a `debug-log` request to wrangler's Node process over a fresh
// loopback connection that is never closed (CLOSE-WAIT). Every chunk of a streamed subrequest body (the gateway
// reading OpenRouter's SSE stream) is a `Network.dataReceived` message, so a few fast streams leave ~20,000 sockets
// in the proxy's workerd: "Too many open files", `fetch failed`, dropped connections (wrangler 4.86.0; a trivial JS
// pass-through Worker does the same). With the inspector off the same load stays at a few dozen descriptors, and
// the Worker's console lines are still printed (workerd's structured logs, not the inspector, carry them).
//
// 1. applies the D1 migrations to the local database (wrangler CLI, as a deployment does);
//    with `--db neon` (or DB_PROVIDER=neon), also starts a local PostgreSQL (scripts/postgres.mjs; its cluster
//    in <state>/postgres) with the Postgres migrations, unless `--postgres URL` names one, and serves the
//    Postgres build against it through a local HYPERDRIVE binding;
// 2. makes sure the demo API key exists (in the local store in use) and prints it;
// 3. without an OPENROUTER_API_KEY (environment, .dev.vars/.env or --var), starts the OpenRouter stand-in and points
//    the gateway at it, so everything works offline;
// 4. enables the admin API with a local development admin key (for `npm run keys`), unless one is configured;
// 5. starts the dev server and, once it is ready, prints {"listening":"http://127.0.0.1:<port>"} (what
//    scripts/serve.mjs prints; the test harness waits for it) and a curl to try.
//
//   node scripts/dev.mjs [--port N] [--ip H] [--persist-to DIR] [--var NAME:VALUE ...] [--db d1|neon]
//                        [--postgres URL] [--inspect] [--exit-with-stdin]
//
// scripts/setup.sh has already installed the toolchain and built the Worker (see package.json).

import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createInterface } from 'node:readline';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { LOCAL_ADMIN_KEY } from './keys.mjs';
import { POSTGRES_MAIN, guardHyperdriveProxy, psql, startServer } from './postgres.mjs';

// Before wrangler is loaded: it reads this when it starts.
process.env.WRANGLER_SEND_METRICS = 'false';
const { unstable_startWorker, unstable_readConfig, unstable_getVarsForDev } = await import('wrangler');

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const WRANGLER = join(ROOT, 'node_modules', '.bin', 'wrangler');
const WRANGLER_TOML = join(ROOT, 'wrangler.toml');
// A fixed, documented key that exists only in the local development database, so the README's curl works as is.
export const DEMO_KEY = 'sk-gw-demo-local-development-only';
const DEMO_KEY_ID = 'demo';
const DEMO_USER = 'demo-user';

// parseArgs ignores `arg` and `about`: they are for the usage text.
const OPTIONS = {
  port: { type: 'string', default: '8787', arg: 'N', about: 'port to serve on (default 8787; 0 picks a free one)' },
  ip: { type: 'string', default: '127.0.0.1', arg: 'H', about: 'address to listen on (default 127.0.0.1)' },
  'persist-to': {
    type: 'string',
    arg: 'DIR',
    about: "local state directory, as wrangler's --persist-to (default .wrangler/state)",
  },
  var: {
    type: 'string',
    multiple: true,
    default: [],
    arg: 'NAME:VALUE',
    about: 'set a var or secret, over wrangler.toml and .dev.vars (repeatable)',
  },
  db: {
    type: 'string',
    arg: 'd1|neon',
    about: 'where keys and the ledger live (default: DB_PROVIDER from --var, the environment, .dev.vars, wrangler.toml)',
  },
  postgres: {
    type: 'string',
    arg: 'URL',
    about: 'with --db neon: use this PostgreSQL (migrated) instead of starting a local one',
  },
  inspect: {
    type: 'boolean',
    default: false,
    about: 'enable the devtools inspector (leaks sockets while streaming: see scripts/dev.mjs)',
  },
  'exit-with-stdin': { type: 'boolean', default: false, about: 'stop when stdin closes (for a supervising process)' },
  help: { type: 'boolean', short: 'h', default: false, about: 'print this help' },
};

function usage() {
  const rows = Object.entries(OPTIONS).map(([name, o]) => [`--${name}${o.arg ? ` ${o.arg}` : ''}`, o.about]);
  const width = Math.max(...rows.map(([left]) => left.length));
  const lines = rows.map(([left, about]) => `  ${left.padEnd(width)}  ${about}`);
  return ['usage: npm run dev -- [options]', 'supported options:', ...lines].join('\n');
}

function fail(message) {
  console.error(`[dev] ${message}`);
  process.exit(2);
}

function parseOptions(argv) {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, strict: true, allowPositionals: false });
  } catch (error) {
    // parseArgs' own message suggests `--` for positionals, which mean nothing here: name what is supported.
    const quoted = error.message.match(/'([^']*)'/)?.[1] ?? '';
    const what =
      error.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION' ? `unknown option ${quoted}`
      : error.code === 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL' ? `unexpected argument ${quoted}`
      : error.message;
    fail(`${what}\n${usage()}`);
  }
  const { values } = parsed;
  if (values.help) {
    console.log(usage());
    process.exit(0);
  }
  const port = Number(values.port);
  if (!/^\d+$/.test(values.port) || port > 65535) fail(`--port expects 0..65535, got ${values.port}`);
  const vars = {};
  for (const pair of values.var) {
    const at = pair.indexOf(':');
    if (at <= 0) fail(`--var expects NAME:VALUE, got ${pair}`);
    vars[pair.slice(0, at)] = pair.slice(at + 1);
  }
  // As the Worker would see it: --db, --var, the environment, then .dev.vars and wrangler.toml's [vars].
  const db = (values.db ?? vars.DB_PROVIDER ?? process.env.DB_PROVIDER ?? localVars().DB_PROVIDER?.value ?? 'd1')
    .toLowerCase();
  if (!['d1', 'neon'].includes(db)) fail(`--db expects d1 or neon, got ${db}`);
  if (values.postgres && db !== 'neon') fail('--postgres needs --db neon');
  return {
    port,
    ip: values.ip,
    db,
    postgresUrl: values.postgres,
    // wrangler resolves a relative --persist-to against the working directory; so do both uses below.
    persistTo: values['persist-to'] === undefined ? undefined : resolve(values['persist-to']),
    vars,
    inspect: values.inspect,
    exitWithStdin: values['exit-with-stdin'],
  };
}

function wrangler(args) {
  const result = spawnSync(WRANGLER, args, { cwd: ROOT, env: process.env, encoding: 'utf8' });
  if (result.status !== 0) {
    process.stderr.write(result.stdout ?? '');
    process.stderr.write(result.stderr ?? '');
    throw new Error(`wrangler ${args.join(' ')} failed`);
  }
  return result.stdout;
}

/** The vars and secrets wrangler itself will give the Worker from wrangler.toml, .dev.vars (or .env). */
function localVars() {
  const config = unstable_readConfig({ config: WRANGLER_TOML }, { hideWarnings: true });
  return unstable_getVarsForDev(config.userConfigPath, undefined, config.vars, undefined, true, config.secrets);
}

/** Whether NAME is set in the environment, with --var, or in wrangler's local vars (.dev.vars, wrangler.toml). */
function configured(name, vars, local) {
  return Boolean(process.env[name] || vars[name] || local[name]?.value);
}

// The same statement for both stores (SQLite and PostgreSQL agree on this upsert).
const DEMO_KEY_SQL =
  `INSERT INTO api_keys (id, key_hash, user_id, name) ` +
  `VALUES ('${DEMO_KEY_ID}', '${createHash('sha256').update(DEMO_KEY).digest('hex')}', '${DEMO_USER}', ` +
  `'local demo key') ON CONFLICT (id) DO UPDATE SET key_hash = excluded.key_hash, active = 1, revoked_at = NULL`;

function prepareDatabase(persistTo) {
  const persist = persistTo ? ['--persist-to', persistTo] : [];
  wrangler(['d1', 'migrations', 'apply', 'DB', '--local', ...persist]);
  wrangler(['d1', 'execute', 'DB', '--local', ...persist, '--command', DEMO_KEY_SQL]);
}

/** `--db neon`: the PostgreSQL to serve against (started here unless --postgres names one), with the demo key. */
async function preparePostgres(options) {
  let server = null;
  let url = options.postgresUrl;
  if (!url) {
    const dataDir = join(options.persistTo ?? join(ROOT, '.wrangler', 'state'), 'postgres');
    server = await startServer({ dataDir, log: 'ignore' });
    url = server.url;
    console.log(`[dev] DB_PROVIDER=neon: keys and the ledger in the local PostgreSQL at ${url} (cluster ${dataDir})`);
  }
  psql(url, DEMO_KEY_SQL);
  guardHyperdriveProxy(url);
  return { url, server };
}

async function startStandin() {
  const script = join(ROOT, 'standins', 'openrouter.mjs');
  const child = spawn(process.execPath, [script, '--port', '0', '--exit-with-stdin'], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const firstLine = await new Promise((resolve, reject) => {
    createInterface({ input: child.stdout }).once('line', resolve);
    child.once('exit', (code) => reject(new Error(`OpenRouter stand-in exited (${code})`)));
  });
  return { child, url: JSON.parse(firstLine).listening };
}

// Set once stop() has begun: it ends the process itself.
let stopping = false;

async function main() {
  const options = parseOptions(process.argv.slice(2));
  prepareDatabase(options.persistTo);
  const postgres = options.db === 'neon' ? await preparePostgres(options) : null;

  // The variables dev.mjs adds; the user's --var always win.
  const vars = {};
  const local = localVars();
  let standin = null;
  if (!configured('OPENROUTER_API_KEY', options.vars, local)) {
    standin = await startStandin();
    vars.OPENROUTER_BASE_URL = standin.url;
    vars.OPENROUTER_API_KEY = 'sk-or-standin-local';
    console.log(`[dev] no OPENROUTER_API_KEY set: answering with the local OpenRouter stand-in at ${standin.url}`);
  } else if (process.env.OPENROUTER_API_KEY) {
    vars.OPENROUTER_API_KEY = process.env.OPENROUTER_API_KEY;
  }
  if (!configured('ADMIN_API_KEY', options.vars, local)) {
    // The admin API, for `npm run keys`, with a development-only key that exists nowhere but here.
    vars.ADMIN_API_KEY = LOCAL_ADMIN_KEY;
  } else if (process.env.ADMIN_API_KEY) {
    vars.ADMIN_API_KEY = process.env.ADMIN_API_KEY;
  }
  Object.assign(vars, options.vars);
  // `hidden`, as `wrangler dev --var` marks them: the bindings table does not print the values (secrets among them).
  const bindings = Object.fromEntries(
    Object.entries(vars).map(([name, value]) => [name, { type: 'plain_text', value, hidden: true }]),
  );
  if (postgres) {
    bindings.DB_PROVIDER = { type: 'plain_text', value: 'neon' };
    bindings.HYPERDRIVE = { type: 'hyperdrive', id: 'local', localConnectionString: postgres.url };
  }

  if (options.inspect) {
    console.warn(
      '[dev] --inspect: the devtools inspector is on. wrangler then leaks a loopback socket per chunk of every ' +
        'streamed upstream response; a few long streams exhaust the proxy\'s file descriptors.',
    );
  }
  const worker = await unstable_startWorker({
    config: WRANGLER_TOML,
    ...(postgres ? { entrypoint: POSTGRES_MAIN } : {}),
    bindings,
    sendMetrics: false,
    dev: {
      remote: false,
      // undefined: wrangler's default inspector (127.0.0.1, port 9229 or the next free one), as `wrangler dev`.
      inspector: options.inspect ? undefined : false,
      server: { hostname: options.ip, port: options.port },
      persist: options.persistTo,
    },
  });

  let ready = false;
  async function stop(code = 0) {
    if (stopping) process.exit(code); // a second Ctrl-C: do not wait for the dispose
    stopping = true;
    standin?.child.kill('SIGTERM');
    postgres?.server?.server.kill('SIGINT');
    // A stuck dispose must not keep the process (and the port) alive.
    setTimeout(() => process.exit(code), 10_000).unref();
    // dispose() first waits for `ready`, which a failed start never reaches: tear down directly then (its error is
    // the one already reported).
    await (ready ? worker.dispose() : worker.raw.teardown()).catch(
      (error) => ready && console.error(`[dev] ${error.message}`),
    );
    process.exit(code);
  }
  if (options.exitWithStdin) {
    process.stdin.on('end', () => stop(0));
    process.stdin.resume();
  }
  // wrangler reports runtime failures (a port in use, workerd dying) as 'error' events, and `worker.ready` then never
  // settles: give up if not started yet, otherwise report and keep serving (a later reload may recover).
  worker.raw.on('error', (event) => {
    if (stopping) return; // the same failure, reported again by another part of the server
    const what = event?.reason ?? event?.message ?? String(event);
    const cause = event?.cause?.message ?? event?.cause ?? '';
    console.error(`[dev] ${what}${cause && cause !== what ? `: ${cause}` : ''}`);
    if (!ready) stop(1);
  });
  standin?.child.once('exit', (code) => {
    if (!stopping) {
      console.error(`[dev] the OpenRouter stand-in exited (${code})`);
      stop(1);
    }
  });

  await worker.ready;
  ready = true;
  // Loading wrangler installs SIGINT/SIGTERM listeners that call process.exit() at once (Miniflare adds its own), so
  // ours would never get to dispose of the server: replace them now. Until now they did the job; Miniflare's 'exit'
  // hooks, which kill workerd however the process ends, remain.
  for (const signal of ['SIGINT', 'SIGTERM']) {
    process.removeAllListeners(signal);
    process.on(signal, () => stop(0));
  }
  const url = new URL((await worker.url).href);
  // Listening on every address: announce one that can be connected to.
  if (['0.0.0.0', '[::]', '*'].includes(url.hostname)) url.hostname = '127.0.0.1';
  const base = url.href.replace(/\/$/, '');
  console.log(JSON.stringify({ listening: base }));
  if (options.inspect) console.log(`[dev] devtools inspector: ${(await worker.inspectorUrl)?.href}`);
  console.log(`[dev] demo API key: ${DEMO_KEY}`);
  console.log(
    `[dev] try: curl -N ${base}/v1/chat/completions -H "Authorization: Bearer ${DEMO_KEY}" ` +
      `-H "Content-Type: application/json" -d '{"messages":[{"role":"user","content":"Hello!"}],"stream":true}'`,
  );
}

main().catch((error) => {
  if (stopping) return; // a failed start: stop() reported it and exits
  console.error(`[dev] ${error.message}`);
  process.exit(1);
});
