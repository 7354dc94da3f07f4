#!/usr/bin/env node
// Local stand-in for OpenRouter's API (base URL http://<host>:<port>/api/v1).
//
// Speaks OpenRouter's chat-completions protocol, streaming and not, including
// its failure modes, so the gateway can be developed, tested and benchmarked
// without a paid upstream. Behaviour per request is steered by an optional
// `standin` object in the request body (real OpenRouter ignores unknown fields):
//   scenario     ok | error | midstream_error | garbage | disconnect | hang
//   chunks       number of content deltas (default: one per word)
//   chunk_bytes  approximate size of each content delta
//   delay_ms     pause before each content delta (default 0; 25 without `standin`)
//   status, retry_after   HTTP status (default 429) and Retry-After for `error`
//   after_chunks good deltas before a mid-stream failure (default 2)
//   pause_after, pause_ms  after this many deltas, pause this long once (proves a client sees
//                the first events while the upstream is still generating)
// Control endpoints live under /__standin/ (requests log, stats).
//
//   node standins/openrouter.mjs [--port N] [--host H] [--verbose] [--exit-with-stdin]
//
// Prints {"listening":"http://127.0.0.1:<port>/api/v1"} on stdout once ready.

import http from 'node:http';
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';

const BASE = '/api/v1';
const MAX_BODY_BYTES = 64 * 1024 * 1024;
const MAX_RECORDED = 10_000;
const PROVIDER = 'StandIn';
// Without a `standin` object, stream slowly enough that `npm run dev` looks real.
const DEV_DELAY_MS = 25;
const SCENARIOS = new Set(['ok', 'error', 'midstream_error', 'garbage', 'disconnect', 'hang']);

const ERROR_MESSAGES = {
  400: 'Invalid request parameters',
  401: 'User not found.',
  402: 'Insufficient credits',
  403: 'Your chosen model requires moderation and your input was flagged',
  404: 'No endpoints found for this model',
  408: 'Request timed out',
  413: 'Request body too large',
  429: 'Rate limit exceeded: free-models-per-min',
  500: 'Internal Server Error',
  502: 'Provider returned error',
  503: 'No available model provider that meets your routing requirements',
  504: 'Provider timed out',
};

// ---------------------------------------------------------------------------
// Inspection state
// ---------------------------------------------------------------------------

// completion_tokens_streamed: words actually written in stream deltas, i.e. what the "provider" generated and
// would bill, however the stream ended (compare with what a gateway bills for aborted streams).
const stats = { chat_completions: 0, models: 0, aborted_streams: 0, completion_tokens_streamed: 0 };

// Fixed-size ring so a long benchmark cannot grow memory without bound.
const recorded = {
  items: new Array(MAX_RECORDED),
  start: 0,
  size: 0,
  push(entry) {
    this.items[(this.start + this.size) % MAX_RECORDED] = entry;
    if (this.size < MAX_RECORDED) this.size++;
    else this.start = (this.start + 1) % MAX_RECORDED;
  },
  list() {
    const out = new Array(this.size);
    for (let i = 0; i < this.size; i++) out[i] = this.items[(this.start + i) % MAX_RECORDED];
    return out;
  },
  clear() {
    this.items = new Array(MAX_RECORDED);
    this.start = 0;
    this.size = 0;
  },
};

// A per-process random prefix plus a counter: unique, and far cheaper than
// drawing random bytes on every request of a benchmark.
const ID_PREFIX = randomBytes(6).toString('hex');
let idCounter = 0;

function newGenerationId() {
  return `gen-${Math.floor(Date.now() / 1000)}-${ID_PREFIX}${(idCounter++).toString(36).padStart(6, '0')}`;
}

function record(req, path, rawBody, body) {
  recorded.push({
    method: req.method,
    path,
    headers: { ...req.headers },
    body,
    raw_body: rawBody,
    received_at: Date.now(),
  });
}

// ---------------------------------------------------------------------------
// Small HTTP helpers
// ---------------------------------------------------------------------------

function sendJson(res, status, value, headers = {}) {
  const body = typeof value === 'string' ? value : JSON.stringify(value);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(body),
    ...headers,
  });
  res.end(body);
}

function errorBody(status, message = ERROR_MESSAGES[status] ?? http.STATUS_CODES[status] ?? 'Error') {
  return { error: { code: status, message } };
}

// Reads the whole body; oversized bodies are drained (not reset) so the client
// still receives the 413 instead of a connection error.
function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    });
    req.on('end', () => resolve(size > MAX_BODY_BYTES ? null : Buffer.concat(chunks).toString('utf8')));
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

// Resolves once buffered output drained or the peer went away, whichever first.
function drainedOrClosed(res) {
  return new Promise((resolve) => {
    const done = () => {
      res.off('drain', done);
      res.off('close', done);
      resolve();
    };
    res.on('drain', done);
    res.on('close', done);
  });
}

// ---------------------------------------------------------------------------
// Completion content
// ---------------------------------------------------------------------------

function textOf(content) {
  if (typeof content === 'string') return content;
  if (!Array.isArray(content)) return '';
  return content
    .filter((part) => part && part.type === 'text' && typeof part.text === 'string')
    .map((part) => part.text)
    .join(' ');
}

// Counts code points, not UTF-16 units, so Rust tests can reproduce the number.
function charCount(text) {
  let surrogatePairs = 0;
  for (const _ of text.matchAll(/[\uD800-\uDBFF][\uDC00-\uDFFF]/g)) surrogatePairs++;
  return text.length - surrogatePairs;
}

// Text only: image/audio parts and the separators `textOf` adds do not count.
function promptChars(messages) {
  let total = 0;
  for (const message of messages) {
    const content = message?.content;
    if (typeof content === 'string') total += charCount(content);
    else if (Array.isArray(content)) {
      for (const part of content) {
        if (part && part.type === 'text' && typeof part.text === 'string') total += charCount(part.text);
      }
    }
  }
  return total;
}

function answerFor(messages) {
  const lastUser = messages.findLast((m) => m?.role === 'user');
  return `Hello from the OpenRouter stand-in. You said: ${textOf(lastUser?.content)}`;
}

function intOption(value, fallback, min = 0) {
  return Number.isInteger(value) && value >= min ? value : fallback;
}

// Groups the answer's words into content deltas. Words are cycled when more
// output is asked for than the answer has (benchmarks: many/large chunks).
function planPieces(words, { chunks, chunkBytes }) {
  const count = chunks ?? words.length;
  const wordAt = (i) => words[i % words.length];
  const pieces = [];
  let next = 0;
  for (let p = 0; p < count; p++) {
    const piece = [];
    if (chunkBytes) {
      let bytes = 0;
      while (piece.length === 0 || bytes < chunkBytes) {
        const word = wordAt(next++);
        piece.push(word);
        bytes += word.length + 1;
      }
    } else if (count <= words.length) {
      const end = Math.floor(((p + 1) * words.length) / count);
      while (next < end) piece.push(words[next++]);
    } else {
      piece.push(wordAt(next++));
    }
    pieces.push(piece);
  }
  return pieces;
}

// Applies max_tokens (one word = one token) to the planned pieces.
function truncatePieces(pieces, maxTokens) {
  const total = pieces.reduce((n, piece) => n + piece.length, 0);
  if (!(Number.isInteger(maxTokens) && maxTokens >= 0 && maxTokens < total)) {
    return { pieces, words: total, finishReason: 'stop' };
  }
  const kept = [];
  let left = maxTokens;
  for (const piece of pieces) {
    if (left === 0) break;
    kept.push(piece.slice(0, left));
    left -= kept.at(-1).length;
  }
  return { pieces: kept, words: maxTokens, finishReason: 'length' };
}

// Joining deltas yields exactly the non-stream content: words separated by one space.
function pieceTexts(pieces) {
  return pieces.map((piece, i) => piece.join(' ') + (i < pieces.length - 1 ? ' ' : ''));
}

function usageFor(promptTokens, completionTokens) {
  return {
    prompt_tokens: promptTokens,
    completion_tokens: completionTokens,
    total_tokens: promptTokens + completionTokens,
    cost: promptTokens * 0.000001 + completionTokens * 0.000002,
    is_byok: false,
    prompt_tokens_details: { cached_tokens: 0, cache_write_tokens: 0 },
    completion_tokens_details: { reasoning_tokens: 0 },
  };
}

// Everything a completion response needs, derived once from the request body.
function planCompletion(body, id) {
  const standin = body.standin !== null && typeof body.standin === 'object' ? body.standin : undefined;
  const opts = standin ?? {};
  const messages = body.messages;
  const words = answerFor(messages).split(/\s+/).filter(Boolean);
  const planned = planPieces(words, {
    chunks: intOption(opts.chunks, undefined),
    chunkBytes: intOption(opts.chunk_bytes, undefined, 1),
  });
  const { pieces, words: emitted, finishReason } = truncatePieces(
    planned,
    body.max_tokens ?? body.max_completion_tokens,
  );
  const model =
    body.model ?? (Array.isArray(body.models) && body.models.length > 0 ? body.models[0] : 'openrouter/auto');
  return {
    id,
    created: Math.floor(Date.now() / 1000),
    model,
    stream: Boolean(body.stream),
    scenario: SCENARIOS.has(opts.scenario) ? opts.scenario : 'ok',
    delayMs: intOption(opts.delay_ms, standin ? 0 : DEV_DELAY_MS),
    status: Number.isInteger(opts.status) && opts.status >= 400 && opts.status <= 599 ? opts.status : 429,
    retryAfter: opts.retry_after,
    afterChunks: intOption(opts.after_chunks, 2),
    pauseAfter: intOption(opts.pause_after, -1),
    pauseMs: intOption(opts.pause_ms, 0),
    texts: pieceTexts(pieces),
    finishReason,
    usage: usageFor(Math.max(1, Math.ceil(promptChars(messages) / 4)), emitted),
  };
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

function sendError(res, status, retryAfter) {
  const body = errorBody(status);
  body.error.metadata = { provider_name: PROVIDER };
  const headers = retryAfter === undefined || retryAfter === null ? {} : { 'Retry-After': String(retryAfter) };
  sendJson(res, status, body, headers);
}

async function sendCompletion(res, plan) {
  if (plan.delayMs > 0) await sleep(plan.delayMs);
  if (res.destroyed) return;
  sendJson(res, 200, {
    id: plan.id,
    object: 'chat.completion',
    created: plan.created,
    model: plan.model,
    provider: PROVIDER,
    choices: [
      {
        index: 0,
        message: { role: 'assistant', content: plan.texts.join('') },
        finish_reason: plan.finishReason,
        native_finish_reason: plan.finishReason,
      },
    ],
    usage: plan.usage,
  });
}

// Builds the SSE frames of one stream; the shared JSON prefix is built once.
function frameBuilder(plan) {
  const head =
    `{"id":${JSON.stringify(plan.id)},"provider":"${PROVIDER}","model":${JSON.stringify(plan.model)},` +
    `"object":"chat.completion.chunk","created":${plan.created},`;
  const delta = (content, first, finish) =>
    `data: ${head}"choices":[{"index":0,"delta":{${first ? '"role":"assistant",' : ''}"content":` +
    `${JSON.stringify(content)}},"finish_reason":${finish},"native_finish_reason":${finish},"logprobs":null}]}\n\n`;
  return {
    content: (text, first) => delta(text, first, 'null'),
    finish: (first) => delta('', first, JSON.stringify(plan.finishReason)),
    usage: () => `data: ${head}"choices":[],"usage":${JSON.stringify(plan.usage)}}\n\n`,
    midstreamError: () =>
      `data: {"id":${JSON.stringify(plan.id)},"object":"chat.completion.chunk","created":${plan.created},` +
      `"model":${JSON.stringify(plan.model)},"provider":"${PROVIDER}",` +
      `"error":{"code":"server_error","message":"Provider disconnected unexpectedly"},` +
      `"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error","native_finish_reason":"error"}]}\n\n`,
  };
}

function wordCount(text) {
  return text.split(/\s+/).filter(Boolean).length;
}

// Writes one frame; waits only when the socket pushes back, so the common
// zero-delay case stays a synchronous loop.
async function writeFrame(res, frame) {
  if (!res.write(frame)) await drainedOrClosed(res);
  return !res.destroyed;
}

async function sendStream(res, plan) {
  const frames = frameBuilder(plan);
  const failAt = Math.min(plan.afterChunks, plan.texts.length);
  res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
  res.write(': OPENROUTER PROCESSING\n\n');

  for (let i = 0; i <= plan.texts.length; i++) {
    if (i === failAt) {
      if (plan.scenario === 'midstream_error') return res.end(frames.midstreamError());
      if (plan.scenario === 'disconnect') return abortSocket(res);
      if (plan.scenario === 'garbage' && !(await writeFrame(res, 'data: {not json at all\n\n'))) return;
    }
    if (i === plan.texts.length) break;
    if (plan.delayMs > 0) await sleep(plan.delayMs);
    if (i === plan.pauseAfter && plan.pauseMs > 0) await sleep(plan.pauseMs);
    if (res.destroyed || !(await writeFrame(res, frames.content(plan.texts[i], i === 0)))) return;
    stats.completion_tokens_streamed += wordCount(plan.texts[i]);
  }
  res.write(frames.finish(plan.texts.length === 0));
  res.write(frames.usage());
  res.end('data: [DONE]\n\n');
}

// Server-initiated aborts are not the client's doing, so they are not counted.
// Node corks the socket until the next tick, so destroying right away would
// drop the chunks already written; the empty write's callback fires once they
// are handed to the kernel, then the connection is reset without a clean end.
function abortSocket(res) {
  res.standinAborted = true;
  const socket = res.socket;
  if (socket && !socket.destroyed) socket.write('', () => socket.destroy());
}

function countAbortedStream(res) {
  res.on('close', () => {
    if (!res.writableFinished && !res.standinAborted) stats.aborted_streams++;
  });
}

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

async function handleChatCompletions(req, res, path) {
  stats.chat_completions++;
  const raw = await readBody(req);
  if (raw === null) {
    record(req, path, '', null);
    return sendJson(res, 413, errorBody(413));
  }
  const body = parseJson(raw);
  record(req, path, raw, body ?? null);
  const id = newGenerationId();
  res.setHeader('X-Generation-Id', id);

  const auth = req.headers.authorization ?? '';
  if (!/^Bearer\s+\S/i.test(auth)) return sendJson(res, 401, errorBody(401, 'No auth credentials found'));
  if (body === undefined) return sendJson(res, 400, errorBody(400, 'Invalid JSON'));
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    return sendJson(res, 400, errorBody(400, 'Invalid request body'));
  }
  if (!Array.isArray(body.messages)) {
    return sendJson(res, 400, errorBody(400, 'Input required: specify "prompt" or "messages"'));
  }

  const plan = planCompletion(body, id);
  if (plan.stream) countAbortedStream(res);
  return respond(res, plan);
}

function respond(res, plan) {
  switch (plan.scenario) {
    case 'hang':
      return undefined;
    case 'error':
      return sendError(res, plan.status, plan.retryAfter);
    case 'disconnect':
      if (!plan.stream) return abortSocket(res);
      return sendStream(res, plan);
    case 'garbage':
      if (!plan.stream) return sendJson(res, 200, '<html>upstream exploded</html>');
      return sendStream(res, plan);
    case 'midstream_error':
      if (!plan.stream) return sendError(res, 502, plan.retryAfter);
      return sendStream(res, plan);
    default:
      return plan.stream ? sendStream(res, plan) : sendCompletion(res, plan);
  }
}

function modelEntry(id, name, contextLength, maxCompletion, tokenizer, params) {
  return {
    id,
    canonical_slug: id,
    name,
    created: 1720000000,
    description: `${name}, served by the local OpenRouter stand-in.`,
    context_length: contextLength,
    architecture: {
      modality: 'text->text',
      input_modalities: ['text'],
      output_modalities: ['text'],
      tokenizer,
    },
    pricing: { prompt: '0.000001', completion: '0.000002', request: '0', image: '0', input_cache_read: '0' },
    top_provider: { context_length: contextLength, max_completion_tokens: maxCompletion, is_moderated: false },
    supported_parameters: params,
  };
}

const COMMON_PARAMS = ['max_tokens', 'temperature', 'top_p', 'stop', 'seed', 'tools', 'tool_choice'];
const MODELS_BODY = JSON.stringify({
  data: [
    modelEntry('openai/gpt-4o-mini', 'OpenAI: GPT-4o-mini', 128000, 16384, 'GPT', [
      ...COMMON_PARAMS,
      'response_format',
      'structured_outputs',
    ]),
    modelEntry('anthropic/claude-3.5-sonnet', 'Anthropic: Claude 3.5 Sonnet', 200000, 8192, 'Claude', COMMON_PARAMS),
    modelEntry('meta-llama/llama-3.1-8b-instruct', 'Meta: Llama 3.1 8B Instruct', 131072, 16384, 'Llama3', [
      ...COMMON_PARAMS,
      'frequency_penalty',
      'presence_penalty',
    ]),
  ],
});

async function handleModels(req, res, path) {
  stats.models++;
  const raw = await readBody(req);
  record(req, path, raw ?? '', raw ? (parseJson(raw) ?? null) : null);
  sendJson(res, 200, MODELS_BODY);
}

async function handleControl(req, res, path) {
  await readBody(req);
  const route = `${req.method} ${path}`;
  if (route === 'GET /__standin/requests') return sendJson(res, 200, { requests: recorded.list() });
  if (route === 'DELETE /__standin/requests') {
    recorded.clear();
    res.writeHead(204);
    return res.end();
  }
  if (route === 'GET /__standin/stats') return sendJson(res, 200, stats);
  return sendJson(res, 404, errorBody(404, 'Not Found'));
}

async function route(req, res) {
  const path = req.url.split('?', 1)[0];
  if (path.startsWith('/__standin/')) return handleControl(req, res, path);
  if (path === `${BASE}/chat/completions`) {
    if (req.method === 'POST') return handleChatCompletions(req, res, path);
  } else if (path === `${BASE}/models`) {
    if (req.method === 'GET') return handleModels(req, res, path);
  } else {
    await readBody(req);
    return sendJson(res, 404, errorBody(404, 'Not Found'));
  }
  await readBody(req);
  return sendJson(res, 405, errorBody(405, 'Method Not Allowed'));
}

// ---------------------------------------------------------------------------
// Server lifecycle
// ---------------------------------------------------------------------------

function logRequests(req, res) {
  const started = performance.now();
  res.on('close', () => {
    const ms = (performance.now() - started).toFixed(1);
    const outcome = res.writableFinished ? res.statusCode : 'aborted';
    process.stderr.write(`[openrouter-standin] ${req.method} ${req.url} ${outcome} ${ms}ms\n`);
  });
}

function createServer({ verbose }) {
  const server = http.createServer((req, res) => {
    if (verbose) logRequests(req, res);
    route(req, res).catch((err) => {
      process.stderr.write(`[openrouter-standin] ${err?.stack ?? err}\n`);
      if (!res.headersSent) sendJson(res, 500, errorBody(500));
      else res.destroy();
    });
  });
  // Streams are written chunk by chunk; Nagle would batch them up.
  server.on('connection', (socket) => socket.setNoDelay(true));
  // Long keep-alive for benchmark clients; headersTimeout must stay above it.
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

function main() {
  const { values } = parseArgs({
    options: {
      port: { type: 'string', default: '0' },
      host: { type: 'string', default: '127.0.0.1' },
      verbose: { type: 'boolean', default: false },
      'exit-with-stdin': { type: 'boolean', default: false },
    },
  });
  const server = createServer({ verbose: values.verbose });
  installShutdown(server, values['exit-with-stdin']);
  server.listen(Number(values.port) || 0, values.host, () => {
    const { port } = server.address();
    process.stdout.write(`${JSON.stringify({ listening: `http://${publicHost(values.host)}:${port}${BASE}` })}\n`);
  });
}

main();
