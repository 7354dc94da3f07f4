#!/usr/bin/env node
// PostgreSQL for the Postgres store (DB_PROVIDER=neon): a local server for `npm run dev -- --db neon`, the tests
// and the bench, and the migrations runner for every database, Neon's included.
//
//   node scripts/postgres.mjs serve --data DIR [--port N] [--exit-with-stdin]
//       Creates a cluster in DIR on first use (initdb), runs it on 127.0.0.1:N (a free port by default), creates
//       the `gateway` database, applies the migrations, then prints {"postgres":"postgres://…"} and keeps the
//       server in the foreground until stopped (SIGTERM/SIGINT, or stdin closing with --exit-with-stdin).
//   node scripts/postgres.mjs migrate URL
//       Applies migrations-postgres/*.sql that URL's database has not had yet (deploy: "$NEON_DATABASE_URL").
//   node scripts/postgres.mjs which [NAME ...]
//       Prints where the binaries are (by default initdb, postgres, pg_isready and psql); fails if one is missing.
//
// The server binaries come from PATH or Debian's /usr/lib/postgresql/<version>/bin (scripts/setup.sh installs
// the `postgresql` package when they are missing). PostgreSQL refuses to run as root: as root, the cluster is
// owned by and run as the `postgres` user the package creates.

import { spawn, spawnSync } from 'node:child_process';
import { chownSync, existsSync, mkdirSync, readdirSync } from 'node:fs';
import net, { createServer } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const MIGRATIONS = join(ROOT, 'migrations-postgres');
export const DATABASE = 'gateway';
/** The Worker built with the Postgres store (scripts/build.sh), which DB_PROVIDER=neon needs. */
export const POSTGRES_MAIN = join(ROOT, 'worker', 'build-postgres', 'index.js');
// Trust authentication on 127.0.0.1 only: the password is ignored, but Hyperdrive's local connection string must
// name one.
const USER = 'gateway';
const PASSWORD = 'local';

/** The path of a PostgreSQL binary: on PATH, or in the newest /usr/lib/postgresql/<version>/bin. */
export function pgBin(name) {
  const onPath = spawnSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' });
  if (onPath.status === 0 && onPath.stdout.trim()) return onPath.stdout.trim();
  const base = '/usr/lib/postgresql';
  const versions = existsSync(base) ? readdirSync(base).filter((v) => /^\d+$/.test(v)).sort((a, b) => b - a) : [];
  for (const version of versions) {
    const path = join(base, version, 'bin', name);
    if (existsSync(path)) return path;
  }
  throw new Error(`${name} not found: install PostgreSQL (scripts/setup.sh installs Debian's postgresql package)`);
}

const asRoot = process.getuid?.() === 0;

/** Runs a server binary as the user that owns the cluster (`postgres` when we are root). */
function serverCommand(binary, args) {
  return asRoot
    ? ['setpriv', ['--reuid=postgres', '--regid=postgres', '--init-groups', '--', pgBin(binary), ...args]]
    : [pgBin(binary), args];
}

function run(command, args, what) {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  if (result.status !== 0) {
    throw new Error(`${what} failed (${result.status}):\n${result.stdout ?? ''}${result.stderr ?? result.error ?? ''}`);
  }
  return result.stdout;
}

/** Runs SQL with psql against `url`; returns its unaligned output. */
export function psql(url, sql) {
  return run(pgBin('psql'), [url, '-X', '-q', '-At', '-v', 'ON_ERROR_STOP=1', '-c', sql], 'psql');
}

/** Applies the migrations `url`'s database has not had, each in one transaction with its record. */
export function migrate(url) {
  psql(url, 'CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)');
  const applied = new Set(psql(url, 'SELECT name FROM schema_migrations').split('\n').filter(Boolean));
  const pending = readdirSync(MIGRATIONS).filter((f) => f.endsWith('.sql') && !applied.has(f)).sort();
  for (const file of pending) {
    run(
      pgBin('psql'),
      [url, '-X', '-q', '-v', 'ON_ERROR_STOP=1', '--single-transaction', '-f', join(MIGRATIONS, file), '-c',
        `INSERT INTO schema_migrations (name, applied_at) VALUES ('${file}', now()::text)`],
      `migration ${file}`,
    );
  }
  return pending;
}

async function freePort() {
  const server = createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

export function connectionString(port) {
  return `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/${DATABASE}`;
}

/**
 * Starts a local cluster in `dataDir` (created on first use) and returns its connection string and server
 * process, once it accepts connections and the migrations are applied.
 */
export async function startServer({ dataDir, port = 0, log = 'inherit' }) {
  dataDir = resolve(dataDir);
  if (!existsSync(join(dataDir, 'PG_VERSION'))) {
    // The parents stay traversable (the `postgres` user must reach the cluster); the cluster itself is private.
    mkdirSync(dirname(dataDir), { recursive: true });
    mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    if (asRoot) chownSync(dataDir, ...ids('postgres'));
    const [command, args] = serverCommand('initdb', ['-D', dataDir, '-U', USER, '--auth=trust', '-E', 'UTF8',
      '--no-locale', '--no-sync']);
    run(command, args, 'initdb');
  }
  port = port || (await freePort());
  // Local development and tests: fsync off (an operating-system crash may lose data; nothing here needs to
  // survive one). Commits still reach the operating system before they are acknowledged (synchronous_commit
  // stays on), so a killed server — the tests' outage — loses nothing it confirmed.
  const [command, args] = serverCommand('postgres', ['-D', dataDir, '-p', String(port), '-c',
    'listen_addresses=127.0.0.1', '-c', 'unix_socket_directories=', '-c', 'fsync=off', '-c',
    'full_page_writes=off']);
  const server = spawn(command, args, { stdio: ['ignore', log, log] });
  const exited = new Promise((resolve) => server.once('exit', resolve));
  const admin = `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/postgres`;
  const deadline = Date.now() + 30_000;
  for (;;) {
    const ready = spawnSync(pgBin('pg_isready'), ['-q', '-h', '127.0.0.1', '-p', String(port)]);
    if (ready.status === 0) break;
    if (server.exitCode !== null || Date.now() > deadline) {
      server.kill('SIGKILL');
      throw new Error(`PostgreSQL did not start on port ${port} (data ${dataDir})`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  if (psql(admin, `SELECT 1 FROM pg_database WHERE datname = '${DATABASE}'`).trim() !== '1') {
    psql(admin, `CREATE DATABASE ${DATABASE}`);
  }
  const url = connectionString(port);
  migrate(url);
  return { url, port, server, exited };
}

/**
 * Makes the local Hyperdrive binding survive its database going away. Miniflare (4.20260426) serves a local
 * Hyperdrive binding through a TCP proxy in this Node process whose database socket has no 'error' listener: a
 * refused connection (the database down) is an uncaught exception that ends the process, and with it every
 * binding of the local runtime (workers-sdk#11556; #13390 later connects workerd to the database directly when
 * no TLS is wanted). Here a socket to `url`'s host and port gets the listener the proxy lacks, which closes the
 * Worker's side too, so the Worker sees a failed connection, as a deployed Hyperdrive reports an unreachable
 * origin. Other sockets are untouched.
 */
export function guardHyperdriveProxy(url) {
  const { hostname, port } = new URL(url);
  const target = (options) => options?.host === hostname && String(options?.port) === port;
  const connect = net.connect;
  net.connect = function guardedConnect(...args) {
    const socket = connect.apply(this, args);
    if (target(args[0])) {
      const sources = new Set();
      socket.setNoDelay(true);
      socket.on('pipe', (source) => {
        sources.add(source);
        source.setNoDelay?.(true);
      });
      socket.on('error', () => {
        for (const source of sources) source.destroy();
      });
    }
    return socket;
  };
}

/** A user's numeric user and group ids. */
function ids(user) {
  return ['-u', '-g'].map((flag) => Number(run('id', [flag, user], `id ${flag} ${user}`).trim()));
}

async function main() {
  const [command, ...rest] = process.argv.slice(2);
  if (command === 'which') {
    // Where the binaries are (scripts/setup.sh: are they here at all; the test harness: its psql).
    const names = rest.length ? rest : ['initdb', 'postgres', 'pg_isready', 'psql'];
    for (const name of names) console.log(pgBin(name));
    return;
  }
  if (command === 'migrate' && rest.length === 1) {
    const applied = migrate(rest[0]);
    console.log(applied.length ? `applied ${applied.join(', ')}` : 'no migrations to apply');
    return;
  }
  if (command !== 'serve') {
    console.error('usage: postgres.mjs serve --data DIR [--port N] [--exit-with-stdin] | postgres.mjs migrate URL');
    process.exit(2);
  }
  const { values } = parseArgs({
    args: rest,
    options: {
      data: { type: 'string' },
      port: { type: 'string', default: '0' },
      'exit-with-stdin': { type: 'boolean', default: false },
    },
  });
  if (!values.data) throw new Error('serve needs --data DIR');
  const { url, server, exited } = await startServer({ dataDir: values.data, port: Number(values.port) });
  console.log(JSON.stringify({ postgres: url }));
  // SIGINT is PostgreSQL's fast shutdown: clients are disconnected, the server stops cleanly.
  const stop = () => server.kill('SIGINT');
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (values['exit-with-stdin']) {
    process.stdin.on('end', stop);
    process.stdin.resume();
  }
  process.exit((await exited) ?? 0);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((error) => {
    console.error(`[postgres] ${error.message}`);
    process.exit(1);
  });
}
