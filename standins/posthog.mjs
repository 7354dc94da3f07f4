#!/usr/bin/env node
// Local stand-in for PostHog's capture API (POST /batch/).
//
// Validates batches like PostHog does and records accepted events, so tests can
// check what the gateway reported. Faults (5xx, timeouts, slow responses) are
// injected from a seeded PRNG so a failing run can be replayed exactly.
//
//   node standins/posthog.mjs [--port N] [--host H] [--fail-rate 0.3] [--timeout-rate 0.1]
//                             [--timeout-ms 15000] [--seed 42] [--exit-with-stdin] [--verbose]
//
// Prints {"listening":"http://127.0.0.1:<port>"} on stdout once ready.
// Control: POST /__standin/faults, GET|DELETE /__standin/events.

import http from 'node:http';
import { gunzipSync } from 'node:zlib';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';

const MAX_BODY_BYTES = 20 * 1024 * 1024;
const MAX_EVENT_BYTES = 1024 * 1024;
const MAX_TIMER_MS = 2 ** 31 - 1;
const FAILURE_STATUSES = [500, 502, 503];
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const INVALID_KEY_DETAIL =
  'Project API key invalid. You can find your project API key in PostHog project settings.';
const MISSING_KEY_DETAIL =
  'API key not provided. You can find your project API key in PostHog project settings.';

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function emptyCounters() {
  return { batches_accepted: 0, batches_failed: 0, batches_timed_out: 0, bytes_received: 0 };
}

const state = {
  events: [],
  counters: emptyCounters(),
  faults: { fail_rate: 0, timeout_rate: 0, status: null, stall_ms: 0, timeout_ms: 15_000 },
  random: mulberry32(42),
  failures: 0, // drives the 500/502/503 rotation
};

// ---------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------

function sendJson(res, status, value, headers = {}) {
  const body = JSON.stringify(value);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(body),
    ...headers,
  });
  res.end(body);
}

function sendNoContent(res) {
  res.writeHead(204);
  res.end();
}

function errorBody(type, code, detail) {
  return { type, code, detail, attr: null };
}

// Resolves to the body size and bytes; bytes are null past the limit (the rest
// is drained so the client still gets a 413 rather than a reset).
function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    });
    req.on('end', () => resolve({ size, buffer: size > MAX_BODY_BYTES ? null : Buffer.concat(chunks) }));
    req.on('error', reject);
  });
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

// PostHog accepts gzip either as Content-Encoding or as ?compression=gzip(-js).
function isGzipped(req, query) {
  const encoding = (req.headers['content-encoding'] ?? '').toLowerCase();
  const compression = query.get('compression');
  return encoding === 'gzip' || compression === 'gzip' || compression === 'gzip-js';
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

// One draw per batch keeps the sequence of outcomes reproducible for a seed.
function drawFault() {
  const roll = state.random();
  if (roll < state.faults.fail_rate) return 'fail';
  if (roll < state.faults.fail_rate + state.faults.timeout_rate) return 'timeout';
  return null;
}

function failureStatus() {
  if (state.faults.status) return state.faults.status;
  return FAILURE_STATUSES[state.failures++ % FAILURE_STATUSES.length];
}

function sendInjectedFailure(res) {
  const status = failureStatus();
  const headers = status === 503 || status === 429 ? { 'Retry-After': '1' } : {};
  const body =
    status === 429
      ? errorBody('throttled', 'rate_limited', 'Rate limit exceeded, please retry later.')
      : status < 500
        ? errorBody('validation_error', 'invalid_payload', 'Injected failure.')
        : errorBody('server_error', 'server_error', http.STATUS_CODES[status] ?? 'Server error');
  state.counters.batches_failed++;
  sendJson(res, status, body, headers);
}

// Holds the request, then resets the connection as a stuck PostHog would.
function holdThenDrop(req, res) {
  state.counters.batches_timed_out++;
  const timer = setTimeout(() => req.socket.destroy(), state.faults.timeout_ms);
  res.on('close', () => clearTimeout(timer));
}

// ---------------------------------------------------------------------------
// Capture
// ---------------------------------------------------------------------------

function hasDistinctId(event) {
  const id = event.distinct_id ?? event.properties?.distinct_id;
  return (typeof id === 'string' && id.length > 0) || typeof id === 'number';
}

function isAcceptable(event) {
  if (event === null || typeof event !== 'object' || Array.isArray(event)) return false;
  if (!hasDistinctId(event)) return false;
  if (event.uuid !== undefined && !(typeof event.uuid === 'string' && UUID_RE.test(event.uuid))) return false;
  return Buffer.byteLength(JSON.stringify(event)) <= MAX_EVENT_BYTES;
}

function tooLarge() {
  return [413, errorBody('validation_error', 'payload_too_large', 'Payload too large')];
}

// Returns [status, body] for a batch payload, recording its events on success.
function ingest(buffer, gzipped) {
  let text;
  try {
    text = (gzipped ? gunzipSync(buffer, { maxOutputLength: MAX_BODY_BYTES }) : buffer).toString('utf8');
  } catch (err) {
    if (err instanceof RangeError) return tooLarge();
    return [400, errorBody('validation_error', 'invalid_payload', 'Malformed request data: invalid gzip body')];
  }
  const payload = parseJson(text);
  if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
    return [400, errorBody('validation_error', 'invalid_payload', 'Malformed request data: invalid JSON')];
  }
  if (typeof payload.api_key !== 'string' || payload.api_key === '') {
    return [400, errorBody('validation_error', 'invalid_payload', MISSING_KEY_DETAIL)];
  }
  if (!payload.api_key.startsWith('phc_')) {
    return [401, errorBody('authentication_error', 'invalid_api_key', INVALID_KEY_DETAIL)];
  }
  if (!Array.isArray(payload.batch)) {
    return [400, errorBody('validation_error', 'invalid_payload', 'Malformed request data: "batch" must be an array')];
  }
  const receivedAt = Date.now();
  for (const event of payload.batch) {
    if (isAcceptable(event)) state.events.push({ ...event, received_at: receivedAt });
  }
  return [200, { status: 1 }];
}

async function handleBatch(req, res, query) {
  const { size, buffer } = await readBody(req);
  state.counters.bytes_received += size;
  const fault = drawFault();
  if (fault === 'timeout') return holdThenDrop(req, res);
  if (state.faults.stall_ms > 0) await sleep(state.faults.stall_ms);
  if (res.destroyed) return undefined;
  if (fault === 'fail') return sendInjectedFailure(res);

  const [status, body] = buffer === null ? tooLarge() : ingest(buffer, isGzipped(req, query));
  if (status === 200) state.counters.batches_accepted++;
  else state.counters.batches_failed++;
  return sendJson(res, status, body);
}

// ---------------------------------------------------------------------------
// Control
// ---------------------------------------------------------------------------

function isRate(value) {
  return typeof value === 'number' && value >= 0 && value <= 1;
}

function isDelayMs(value) {
  return Number.isInteger(value) && value >= 0 && value <= MAX_TIMER_MS;
}

// Applies a partial fault update; returns an error message or null.
function updateFaults(update) {
  if (update === null || typeof update !== 'object' || Array.isArray(update)) return 'expected a JSON object';
  const next = { ...state.faults };
  for (const [key, value] of Object.entries(update)) {
    if ((key === 'fail_rate' || key === 'timeout_rate') && isRate(value)) next[key] = value;
    else if ((key === 'stall_ms' || key === 'timeout_ms') && isDelayMs(value)) next[key] = value;
    else if (key === 'status' && (value === null || (Number.isInteger(value) && value >= 400 && value <= 599))) {
      next.status = value;
    } else return `invalid value for "${key}"`;
  }
  state.faults = next;
  return null;
}

async function handleControl(req, res, path) {
  const { buffer } = await readBody(req);
  const route = `${req.method} ${path}`;
  if (route === 'GET /__standin/events') return sendJson(res, 200, { events: state.events, ...state.counters });
  if (route === 'DELETE /__standin/events') {
    state.events = [];
    state.counters = emptyCounters();
    return sendNoContent(res);
  }
  if (route === 'GET /__standin/faults') return sendJson(res, 200, state.faults);
  if (route === 'POST /__standin/faults') {
    const error = updateFaults(parseJson(buffer?.toString('utf8') ?? ''));
    if (error) return sendJson(res, 400, errorBody('validation_error', 'invalid_payload', error));
    return sendJson(res, 200, state.faults);
  }
  return sendJson(res, 404, errorBody('invalid_request', 'not_found', 'Not found'));
}

async function route(req, res) {
  const url = new URL(req.url, 'http://standin');
  const path = url.pathname;
  if (path.startsWith('/__standin/')) return handleControl(req, res, path);
  if (path === '/batch/' || path === '/batch') {
    if (req.method === 'POST') return handleBatch(req, res, url.searchParams);
    await readBody(req);
    return sendJson(res, 405, errorBody('invalid_request', 'method_not_allowed', 'Method not allowed'));
  }
  await readBody(req);
  return sendJson(res, 404, errorBody('invalid_request', 'not_found', 'Not found'));
}

// ---------------------------------------------------------------------------
// Server lifecycle
// ---------------------------------------------------------------------------

function logRequests(req, res) {
  const started = performance.now();
  res.on('close', () => {
    const ms = (performance.now() - started).toFixed(1);
    const outcome = res.writableFinished ? res.statusCode : 'dropped';
    process.stderr.write(`[posthog-standin] ${req.method} ${req.url} ${outcome} ${ms}ms\n`);
  });
}

function createServer({ verbose }) {
  const server = http.createServer((req, res) => {
    if (verbose) logRequests(req, res);
    route(req, res).catch((err) => {
      process.stderr.write(`[posthog-standin] ${err?.stack ?? err}\n`);
      if (!res.headersSent) sendJson(res, 500, errorBody('server_error', 'server_error', 'Internal error'));
      else res.destroy();
    });
  });
  server.keepAliveTimeout = 65_000;
  server.headersTimeout = 66_000;
  return server;
}

function publicHost(host) {
  if (host === '0.0.0.0' || host === '::') return '127.0.0.1';
  return host.includes(':') ? `[${host}]` : host;
}

function installShutdown(server, exitWithStdin) {
  const stop = () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (exitWithStdin) {
    process.stdin.on('end', stop);
    process.stdin.on('close', stop);
    process.stdin.resume();
  }
}

function numberOption(name, text, { min, max, integer = false }) {
  const value = Number(text);
  if (!Number.isFinite(value) || value < min || value > max || (integer && !Number.isInteger(value))) {
    process.stderr.write(`[posthog-standin] invalid --${name}: ${text}\n`);
    process.exit(2);
  }
  return value;
}

function main() {
  const { values } = parseArgs({
    options: {
      port: { type: 'string', default: '0' },
      host: { type: 'string', default: '127.0.0.1' },
      'fail-rate': { type: 'string', default: '0' },
      'timeout-rate': { type: 'string', default: '0' },
      'timeout-ms': { type: 'string', default: '15000' },
      seed: { type: 'string', default: '42' },
      verbose: { type: 'boolean', default: false },
      'exit-with-stdin': { type: 'boolean', default: false },
    },
  });
  state.faults.fail_rate = numberOption('fail-rate', values['fail-rate'], { min: 0, max: 1 });
  state.faults.timeout_rate = numberOption('timeout-rate', values['timeout-rate'], { min: 0, max: 1 });
  state.faults.timeout_ms = numberOption('timeout-ms', values['timeout-ms'], {
    min: 0,
    max: MAX_TIMER_MS,
    integer: true,
  });
  state.random = mulberry32(numberOption('seed', values.seed, { min: 0, max: 2 ** 32 - 1, integer: true }));

  const server = createServer({ verbose: values.verbose });
  installShutdown(server, values['exit-with-stdin']);
  server.listen(numberOption('port', values.port, { min: 0, max: 65535, integer: true }), values.host, () => {
    const { port } = server.address();
    process.stdout.write(`${JSON.stringify({ listening: `http://${publicHost(values.host)}:${port}` })}\n`);
  });
}

main();
