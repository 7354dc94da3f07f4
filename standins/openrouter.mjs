#!/usr/bin/env node
// Local stand-in for OpenRouter's API (base URL http://<host>:<port>/api/v1).
//
// Speaks OpenRouter's chat-completions protocol, streaming and not, including
// its failure modes, so the gateway can be developed, tested and benchmarked
// without a paid upstream. Behaviour per request is steered by an optional
// `standin` object in the request body (real OpenRouter ignores unknown fields):
//   scenario     ok | error | midstream_error | garbage | disconnect | hang | stall_body
//                stall_body (non-streamed only; streams answer normally): 200 headers and the first half
//                of the JSON body, then nothing, so the gateway must time out reading the body
//   chunks       number of content deltas (default: one per word)
//   chunk_bytes  approximate size of each content delta
//   delay_ms     pause before each delta (default 0; 25 without `standin`)
//   status, retry_after   HTTP status (default 429) and Retry-After for `error`
//   error_body_bytes      `error`: pad the error JSON (a long `error.metadata.raw`) to exactly N bytes
//   stall_error_body      `error`: true sends the status, headers and first half of the error body, then stalls
//   after_chunks good deltas before a mid-stream failure (default 2)
//   pause_after, pause_ms  after this many deltas, pause this long once (proves a client sees
//                the first events while the upstream is still generating)
//   usage_override        fields merged over the computed `usage` on the wire (the response's and the stream's
//                usage chunk), e.g. {"prompt_tokens":1e30}; the recorded generation keeps the real counts
//   reasoning_chunks      N reasoning deltas before the answer: `delta.reasoning` with `content: null`
//                (non-stream: `message.reasoning`); their words are completion tokens and reasoning_tokens
//   tool_call    {"name","arguments":"<json string>"}: answer with a tool call instead of text, streamed as
//                `delta.tool_calls` (a head chunk with id, type, name and arguments "", then fragments of
//                TOOL_FRAGMENT_CHARS code points), finish_reason "tool_calls"; chunks/chunk_bytes/max_tokens
//                do not apply to it
//   generation_lag_ms     how long this request's generation stays 404 after it ended (default --generation-lag-ms)
// The top-level `n` (as in OpenAI) asks for N identical choices: N `choices` entries, or each delta once per
// choice index, interleaved (delays, pauses and after_chunks count those deltas); usage counts every choice.
//
// Tokens, as `usage` and the generation count them: prompt = ceil(prompt text code points / 4), at least 1;
// completion = one per word of reasoning and content, and ceil(tool-call argument code points / 4) per tool call.
//
// GET /api/v1/generation?id=<X-Generation-Id>: OpenRouter's generation stats. Every served completion is a
// generation (not errors answered before any token; the last MAX_GENERATIONS are kept); it ends when the
// answer is complete, when the stand-in cut it (disconnect, midstream_error) or when the client closed early
// (cancelled). A stream's generation
// counts the tokens of the deltas written before it ended; a non-streamed answer is generated whole before its
// first byte is written (a cancel before that counts 0). Like the real service it answers 404 until the lag
// has passed after the end: 404 {"error":{"code":404,"message":"Generation not found"}}, and 503 at
// --generation-fail-rate (drawn from --seed, so a run replays exactly).
//
// Control endpoints under /__standin/: GET|DELETE requests (log), GET stats (counters, generation lookups
// included), GET|DELETE generations (every recorded one, running ones too, in the `data` shape of GET
// /generation plus `ended`, `queryable` and `lag_ms`).
//
//   node standins/openrouter.mjs [--port N] [--host H] [--generation-lag-ms 1500]
//                                [--generation-fail-rate 0..1] [--seed 42] [--verbose] [--exit-with-stdin]
//
// Prints {"listening":"http://127.0.0.1:<port>/api/v1"} on stdout once ready.

import http from 'node:http';
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';

const BASE = '/api/v1';
const MAX_BODY_BYTES = 64 * 1024 * 1024;
const MAX_RECORDED = 10_000;
const MAX_GENERATIONS = 10_000;
const MAX_CHOICES = 128;
const PROVIDER = 'StandIn';
// Without a `standin` object, stream slowly enough that `npm run dev` looks real.
const DEV_DELAY_MS = 25;
const SCENARIOS = new Set(['ok', 'error', 'midstream_error', 'garbage', 'disconnect', 'hang', 'stall_body']);
// USD per token, as the models list advertises; usage and generations both price with these.
const PROMPT_PRICE = 0.000001;
const COMPLETION_PRICE = 0.000002;
// Four code points per tool-call fragment: every fragment is then exactly one token of ceil(chars / 4),
// so the tokens of the fragments written before a cancel add up the same way as the whole call's.
const TOOL_FRAGMENT_CHARS = 4;

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

// completion_tokens_streamed: completion tokens actually written in stream deltas, i.e. what the "provider"
// generated and would bill, however the stream ended (compare with what a gateway bills for aborted streams).
// generation_lookups: every GET /generation; found (200), not_found (404) and failed (injected 503) split them.
const stats = {
  chat_completions: 0,
  models: 0,
  aborted_streams: 0,
  completion_tokens_streamed: 0,
  generation_lookups: 0,
  generation_found: 0,
  generation_not_found: 0,
  generation_failed: 0,
};

// Set from the command line in main().
const config = { generationLagMs: 1500, generationFailRate: 0, random: mulberry32(42) };

// Small seeded PRNG (same as the PostHog stand-in's) so injected failures replay exactly for a seed.
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

// Fixed-size ring so a long benchmark cannot grow memory without bound;
// `onEvict` lets an index over the entries forget the one pushed out.
function createRing(capacity, onEvict = () => {}) {
  return {
    items: new Array(capacity),
    start: 0,
    size: 0,
    push(entry) {
      if (this.size === capacity) {
        onEvict(this.items[this.start]);
        this.start = (this.start + 1) % capacity;
        this.size--;
      }
      this.items[(this.start + this.size) % capacity] = entry;
      this.size++;
    },
    list() {
      const out = new Array(this.size);
      for (let i = 0; i < this.size; i++) out[i] = this.items[(this.start + i) % capacity];
      return out;
    },
    clear() {
      this.items = new Array(capacity);
      this.start = 0;
      this.size = 0;
    },
  };
}

const recorded = createRing(MAX_RECORDED);

// The last MAX_GENERATIONS generations, in order, with an index by id for GET /generation.
const generations = {
  byId: new Map(),
  ring: createRing(MAX_GENERATIONS, (gen) => generations.byId.delete(gen.id)),
  add(gen) {
    this.ring.push(gen);
    this.byId.set(gen.id, gen);
  },
  get(id) {
    return this.byId.get(id);
  },
  list() {
    return this.ring.list();
  },
  clear() {
    this.ring.clear();
    this.byId.clear();
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
    url: req.url,
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

// Announces the whole body's length but writes only its first half, then
// nothing: the peer waits for bytes that never come (stall_body, stall_error_body).
function sendStalled(res, status, value, headers = {}) {
  const body = Buffer.from(typeof value === 'string' ? value : JSON.stringify(value));
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': body.length, ...headers });
  res.write(body.subarray(0, Math.max(1, Math.floor(body.length / 2))));
}

function authorized(req) {
  return /^Bearer\s+\S/i.test(req.headers.authorization ?? '');
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

function lastUserText(messages) {
  return textOf(messages.findLast((m) => m?.role === 'user')?.content);
}

function answerFor(messages) {
  return `Hello from the OpenRouter stand-in. You said: ${lastUserText(messages)}`;
}

function reasoningFor(messages) {
  return `The user wrote: ${lastUserText(messages)} so a short friendly greeting will do.`;
}

function splitWords(text) {
  return text.split(/\s+/).filter(Boolean);
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

function costOf(promptTokens, completionTokens) {
  return promptTokens * PROMPT_PRICE + completionTokens * COMPLETION_PRICE;
}

function usageFor(promptTokens, completionTokens, reasoningTokens = 0) {
  return {
    prompt_tokens: promptTokens,
    completion_tokens: completionTokens,
    total_tokens: promptTokens + completionTokens,
    cost: costOf(promptTokens, completionTokens),
    is_byok: false,
    prompt_tokens_details: { cached_tokens: 0, cache_write_tokens: 0 },
    completion_tokens_details: { reasoning_tokens: reasoningTokens },
  };
}

function plainObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value) ? value : undefined;
}

// A tool call needs a name; arguments given as an object are sent as its JSON text.
function toolCallOption(value) {
  const call = plainObject(value);
  if (!call || typeof call.name !== 'string') return undefined;
  const args = typeof call.arguments === 'string' ? call.arguments : JSON.stringify(call.arguments ?? {});
  const points = Array.from(args);
  const fragments = [];
  for (let i = 0; i < points.length; i += TOOL_FRAGMENT_CHARS) {
    fragments.push(points.slice(i, i + TOOL_FRAGMENT_CHARS).join(''));
  }
  return { name: call.name, arguments: args, fragments, tokens: Math.ceil(points.length / TOOL_FRAGMENT_CHARS) };
}

// max_tokens caps reasoning and content together (reasoning comes first), as it does for reasoning models.
function planAnswer(messages, opts, maxTokens) {
  const reasoningChunks = intOption(opts.reasoning_chunks, 0);
  const reasoning = truncatePieces(
    reasoningChunks > 0 ? planPieces(splitWords(reasoningFor(messages)), { chunks: reasoningChunks }) : [],
    maxTokens,
  );
  const capped = Number.isInteger(maxTokens) && maxTokens >= 0;
  const content = truncatePieces(
    planPieces(splitWords(answerFor(messages)), {
      chunks: intOption(opts.chunks, undefined),
      chunkBytes: intOption(opts.chunk_bytes, undefined, 1),
    }),
    capped ? maxTokens - reasoning.words : maxTokens,
  );
  const toolCall = toolCallOption(opts.tool_call);
  let finishReason = reasoning.finishReason === 'length' ? 'length' : content.finishReason;
  if (toolCall) finishReason = 'tool_calls';
  return {
    reasoningTexts: pieceTexts(reasoning.pieces),
    texts: pieceTexts(content.pieces),
    toolCall,
    finishReason,
    // Per choice.
    reasoningTokens: reasoning.words,
    completionTokens: reasoning.words + (toolCall ? toolCall.tokens : content.words),
  };
}

// Everything a completion response needs, derived once from the request body.
function planCompletion(body, id) {
  const standin = body.standin !== null && typeof body.standin === 'object' ? body.standin : undefined;
  const opts = standin ?? {};
  const messages = body.messages;
  const answer = planAnswer(messages, opts, body.max_tokens ?? body.max_completion_tokens);
  const n = Math.min(intOption(body.n, 1, 1), MAX_CHOICES);
  const promptTokens = Math.max(1, Math.ceil(promptChars(messages) / 4));
  const completionTokens = n * answer.completionTokens;
  const reasoningTokens = n * answer.reasoningTokens;
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
    errorBodyBytes: intOption(opts.error_body_bytes, 0),
    stallErrorBody: opts.stall_error_body === true,
    generationLagMs: intOption(opts.generation_lag_ms, config.generationLagMs),
    n,
    reasoningTexts: answer.reasoningTexts,
    texts: answer.texts,
    toolCall: answer.toolCall,
    finishReason: answer.finishReason,
    // The real counts (generations) and what goes on the wire (usage_override merged over them).
    promptTokens,
    completionTokens,
    reasoningTokens,
    usage: { ...usageFor(promptTokens, completionTokens, reasoningTokens), ...plainObject(opts.usage_override) },
  };
}

// ---------------------------------------------------------------------------
// Generations (GET /api/v1/generation)
// ---------------------------------------------------------------------------

// Errors answered before any token leave no generation behind, as on OpenRouter.
function makesGeneration(plan) {
  if (plan.scenario === 'error') return false;
  return plan.stream || plan.scenario !== 'midstream_error';
}

function startGeneration(plan, res) {
  const gen = {
    id: plan.id,
    model: plan.model,
    streamed: plan.stream,
    createdAt: Date.now(),
    startedAt: performance.now(),
    firstTokenAt: null,
    endedAt: null,
    lagMs: plan.generationLagMs,
    promptTokens: plan.promptTokens,
    completionTokens: 0,
    reasoningTokens: 0,
    finishReason: null,
    cancelled: false,
  };
  generations.add(gen);
  // The stand-in ends a generation itself before it finishes or cuts a response,
  // so a close that finds it still running is the client giving up: a cancel.
  res.on('close', () => endGeneration(gen, { cancelled: true }));
  return gen;
}

function addGenerated(gen, tokens, reasoningTokens) {
  if (gen.endedAt !== null) return;
  gen.firstTokenAt ??= performance.now();
  gen.completionTokens += tokens;
  gen.reasoningTokens += reasoningTokens;
}

function endGeneration(gen, { finishReason = null, cancelled = false } = {}) {
  if (gen.endedAt !== null) return;
  gen.endedAt = performance.now();
  gen.finishReason = finishReason;
  gen.cancelled = cancelled;
}

// A non-streamed answer exists whole before its first byte is written, so a
// body that stalls or turns to garbage on the way was still fully generated.
function completeGeneration(gen, plan) {
  addGenerated(gen, plan.completionTokens, plan.reasoningTokens);
  endGeneration(gen, { finishReason: plan.finishReason });
}

// Like OpenRouter, a generation becomes visible only some time after it ended.
function queryable(gen) {
  return gen.endedAt !== null && performance.now() >= gen.endedAt + gen.lagMs;
}

// OpenRouter's own timestamp format: microseconds and an explicit offset.
function isoTimestamp(ms) {
  return new Date(ms).toISOString().replace('Z', '000+00:00');
}

// The wire shape of `data`. latency: ms from the request to its first token (to
// the end when none came); generation_time: ms from the request to the end.
function generationView(gen) {
  const end = gen.endedAt ?? performance.now();
  const cost = costOf(gen.promptTokens, gen.completionTokens);
  return {
    id: gen.id,
    upstream_id: `chatcmpl-${gen.id.slice('gen-'.length)}`,
    total_cost: cost,
    cache_discount: null,
    upstream_inference_cost: cost,
    created_at: isoTimestamp(gen.createdAt),
    model: gen.model,
    app_id: null,
    streamed: gen.streamed,
    cancelled: gen.cancelled,
    provider_name: PROVIDER,
    latency: Math.round((gen.firstTokenAt ?? end) - gen.startedAt),
    moderation_latency: null,
    generation_time: Math.round(end - gen.startedAt),
    finish_reason: gen.finishReason,
    native_finish_reason: gen.finishReason,
    tokens_prompt: gen.promptTokens,
    tokens_completion: gen.completionTokens,
    native_tokens_prompt: gen.promptTokens,
    native_tokens_completion: gen.completionTokens,
    native_tokens_reasoning: gen.reasoningTokens,
    native_tokens_cached: 0,
    num_media_prompt: null,
    num_media_completion: null,
    num_search_results: null,
    origin: '',
    usage: cost,
    is_byok: false,
  };
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

// Providers relay their raw error text in metadata.raw, sometimes at great length.
const RAW_FILLER = 'upstream provider error detail; ';

function padError(body, bytes) {
  body.error.metadata.raw = '';
  const missing = Math.max(0, bytes - Buffer.byteLength(JSON.stringify(body)));
  body.error.metadata.raw = RAW_FILLER.repeat(Math.ceil(missing / RAW_FILLER.length)).slice(0, missing);
}

function sendError(res, plan, status) {
  const body = errorBody(status);
  body.error.metadata = { provider_name: PROVIDER };
  if (plan.errorBodyBytes > 0) padError(body, plan.errorBodyBytes);
  const retryAfter = plan.retryAfter;
  const headers = retryAfter === undefined || retryAfter === null ? {} : { 'Retry-After': String(retryAfter) };
  if (plan.stallErrorBody) return sendStalled(res, status, body, headers);
  return sendJson(res, status, body, headers);
}

function toolCallId(plan, index) {
  return `call_${plan.id.slice('gen-'.length)}_${index}`;
}

// Every choice carries the same answer; only its index differs.
function messageFor(plan, index) {
  const message = { role: 'assistant', content: plan.toolCall ? null : plan.texts.join('') };
  if (plan.reasoningTexts.length > 0) message.reasoning = plan.reasoningTexts.join('');
  if (plan.toolCall) {
    const { name, arguments: args } = plan.toolCall;
    message.tool_calls = [{ id: toolCallId(plan, index), type: 'function', function: { name, arguments: args } }];
  }
  return message;
}

function completionBody(plan) {
  const choices = [];
  for (let index = 0; index < plan.n; index++) {
    choices.push({
      index,
      message: messageFor(plan, index),
      finish_reason: plan.finishReason,
      native_finish_reason: plan.finishReason,
    });
  }
  return {
    id: plan.id,
    object: 'chat.completion',
    created: plan.created,
    model: plan.model,
    provider: PROVIDER,
    choices,
    usage: plan.usage,
  };
}

async function sendCompletion(res, plan, gen) {
  if (plan.delayMs > 0) await sleep(plan.delayMs);
  if (res.destroyed) return;
  completeGeneration(gen, plan);
  if (plan.scenario === 'stall_body') return sendStalled(res, 200, completionBody(plan));
  return sendJson(res, 200, completionBody(plan));
}

// Builds the SSE frames of one stream; the shared JSON prefix is built once.
// Delta builders share one signature: (text, first delta of its choice, choice index).
function frameBuilder(plan) {
  const head =
    `{"id":${JSON.stringify(plan.id)},"provider":"${PROVIDER}","model":${JSON.stringify(plan.model)},` +
    `"object":"chat.completion.chunk","created":${plan.created},`;
  const event = (index, delta, finish) =>
    `data: ${head}"choices":[{"index":${index},"delta":{${delta}},"finish_reason":${finish},` +
    `"native_finish_reason":${finish},"logprobs":null}]}\n\n`;
  const role = (first) => (first ? '"role":"assistant",' : '');
  const toolName = JSON.stringify(plan.toolCall?.name ?? '');
  return {
    content: (text, first, index) => event(index, `${role(first)}"content":${JSON.stringify(text)}`, 'null'),
    reasoning: (text, first, index) =>
      event(index, `${role(first)}"content":null,"reasoning":${JSON.stringify(text)}`, 'null'),
    toolHead: (_text, first, index) =>
      event(
        index,
        `${role(first)}"content":null,"tool_calls":[{"index":0,"id":${JSON.stringify(toolCallId(plan, index))},` +
          `"type":"function","function":{"name":${toolName},"arguments":""}}]`,
        'null',
      ),
    toolArguments: (text, _first, index) =>
      event(index, `"tool_calls":[{"index":0,"function":{"arguments":${JSON.stringify(text)}}}]`, 'null'),
    finish: (first, index) => event(index, `${role(first)}"content":""`, JSON.stringify(plan.finishReason)),
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

// One choice's deltas in order, each with the completion tokens it carries.
function streamParts(plan) {
  const parts = plan.reasoningTexts.map((text) => {
    const tokens = wordCount(text);
    return { kind: 'reasoning', text, tokens, reasoning: tokens };
  });
  if (plan.toolCall) {
    parts.push({ kind: 'toolHead', text: '', tokens: 0, reasoning: 0 });
    for (const text of plan.toolCall.fragments) {
      const tokens = Math.ceil(charCount(text) / TOOL_FRAGMENT_CHARS);
      parts.push({ kind: 'toolArguments', text, tokens, reasoning: 0 });
    }
  } else {
    for (const text of plan.texts) parts.push({ kind: 'content', text, tokens: wordCount(text), reasoning: 0 });
  }
  return parts;
}

// Writes one frame; waits only when the socket pushes back, so the common
// zero-delay case stays a synchronous loop.
async function writeFrame(res, frame) {
  if (!res.write(frame)) await drainedOrClosed(res);
  return !res.destroyed;
}

// Delta i is part i / n of choice i % n: the choices take turns.
async function sendStream(res, plan, gen) {
  const frames = frameBuilder(plan);
  const parts = streamParts(plan);
  const total = parts.length * plan.n;
  const failAt = Math.min(plan.afterChunks, total);
  res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
  res.write(': OPENROUTER PROCESSING\n\n');

  for (let i = 0; i <= total; i++) {
    if (i === failAt) {
      if (plan.scenario === 'midstream_error') {
        endGeneration(gen, { finishReason: 'error' });
        return res.end(frames.midstreamError());
      }
      if (plan.scenario === 'disconnect') {
        endGeneration(gen);
        return abortSocket(res);
      }
      if (plan.scenario === 'garbage' && !(await writeFrame(res, 'data: {not json at all\n\n'))) return;
    }
    if (i === total) break;
    if (plan.delayMs > 0) await sleep(plan.delayMs);
    if (i === plan.pauseAfter && plan.pauseMs > 0) await sleep(plan.pauseMs);
    const part = parts[Math.floor(i / plan.n)];
    if (res.destroyed || !(await writeFrame(res, frames[part.kind](part.text, i < plan.n, i % plan.n)))) return;
    stats.completion_tokens_streamed += part.tokens;
    addGenerated(gen, part.tokens, part.reasoning);
  }
  for (let index = 0; index < plan.n; index++) res.write(frames.finish(total === 0, index));
  res.write(frames.usage());
  res.end('data: [DONE]\n\n');
  endGeneration(gen, { finishReason: plan.finishReason });
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

  if (!authorized(req)) return sendJson(res, 401, errorBody(401, 'No auth credentials found'));
  if (body === undefined) return sendJson(res, 400, errorBody(400, 'Invalid JSON'));
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    return sendJson(res, 400, errorBody(400, 'Invalid request body'));
  }
  if (!Array.isArray(body.messages)) {
    return sendJson(res, 400, errorBody(400, 'Input required: specify "prompt" or "messages"'));
  }

  const plan = planCompletion(body, id);
  if (plan.stream) countAbortedStream(res);
  const gen = makesGeneration(plan) ? startGeneration(plan, res) : null;
  return respond(res, plan, gen);
}

function respond(res, plan, gen) {
  switch (plan.scenario) {
    case 'hang':
      return undefined;
    case 'error':
      return sendError(res, plan, plan.status);
    case 'disconnect':
      if (plan.stream) return sendStream(res, plan, gen);
      endGeneration(gen);
      return abortSocket(res);
    case 'garbage':
      if (plan.stream) return sendStream(res, plan, gen);
      completeGeneration(gen, plan);
      return sendJson(res, 200, '<html>upstream exploded</html>');
    case 'midstream_error':
      if (!plan.stream) return sendError(res, plan, 502);
      return sendStream(res, plan, gen);
    default:
      return plan.stream ? sendStream(res, plan, gen) : sendCompletion(res, plan, gen);
  }
}

// Auth, then the query, then the injected outage, then the store: a 503 says
// nothing about whether the generation exists, so the caller must retry.
async function handleGeneration(req, res, path) {
  stats.generation_lookups++;
  const raw = await readBody(req);
  record(req, path, raw ?? '', raw ? (parseJson(raw) ?? null) : null);
  if (!authorized(req)) return sendJson(res, 401, errorBody(401, 'No auth credentials found'));
  const id = new URL(req.url, 'http://standin').searchParams.get('id');
  if (!id) return sendJson(res, 400, errorBody(400, 'Missing required query parameter: id'));
  // One draw per lookup that got this far keeps the outcomes reproducible for a seed.
  if (config.generationFailRate > 0 && config.random() < config.generationFailRate) {
    stats.generation_failed++;
    return sendJson(res, 503, errorBody(503, 'Service temporarily unavailable'));
  }
  const gen = generations.get(id);
  if (!gen || !queryable(gen)) {
    stats.generation_not_found++;
    return sendJson(res, 404, errorBody(404, 'Generation not found'));
  }
  stats.generation_found++;
  return sendJson(res, 200, { data: generationView(gen) });
}

const DEFAULT_PRICING = { prompt: '0.000001', completion: '0.000002', request: '0', image: '0', input_cache_read: '0' };

// pricing null: the entry has no `pricing` at all (some real entries do), so the gateway's unpriced policy applies.
function modelEntry(id, name, contextLength, maxCompletion, tokenizer, params, pricing = DEFAULT_PRICING) {
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
    ...(pricing ? { pricing } : {}),
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
    modelEntry('standin/unpriced', 'StandIn: Unpriced', 32768, 4096, 'Other', COMMON_PARAMS, null),
    modelEntry('standin/per-request', 'StandIn: Per-request fee', 32768, 4096, 'Other', COMMON_PARAMS, {
      ...DEFAULT_PRICING,
      request: '0.0005',
    }),
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
  if (route === 'GET /__standin/generations') {
    const list = generations.list().map((gen) => ({
      ...generationView(gen),
      ended: gen.endedAt !== null,
      queryable: queryable(gen),
      lag_ms: gen.lagMs,
    }));
    return sendJson(res, 200, { generations: list });
  }
  if (route === 'DELETE /__standin/generations') {
    generations.clear();
    res.writeHead(204);
    return res.end();
  }
  return sendJson(res, 404, errorBody(404, 'Not Found'));
}

async function route(req, res) {
  const path = req.url.split('?', 1)[0];
  if (path.startsWith('/__standin/')) return handleControl(req, res, path);
  if (path === `${BASE}/chat/completions`) {
    if (req.method === 'POST') return handleChatCompletions(req, res, path);
  } else if (path === `${BASE}/models`) {
    if (req.method === 'GET') return handleModels(req, res, path);
  } else if (path === `${BASE}/generation`) {
    if (req.method === 'GET') return handleGeneration(req, res, path);
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

function numberOption(name, text, { min, max, integer = false }) {
  const value = Number(text);
  if (!Number.isFinite(value) || value < min || value > max || (integer && !Number.isInteger(value))) {
    process.stderr.write(`[openrouter-standin] invalid --${name}: ${text}\n`);
    process.exit(2);
  }
  return value;
}

function main() {
  const { values } = parseArgs({
    options: {
      port: { type: 'string', default: '0' },
      host: { type: 'string', default: '127.0.0.1' },
      'generation-lag-ms': { type: 'string', default: '1500' },
      'generation-fail-rate': { type: 'string', default: '0' },
      seed: { type: 'string', default: '42' },
      verbose: { type: 'boolean', default: false },
      'exit-with-stdin': { type: 'boolean', default: false },
    },
  });
  config.generationLagMs = numberOption('generation-lag-ms', values['generation-lag-ms'], {
    min: 0,
    max: 2 ** 31 - 1,
    integer: true,
  });
  config.generationFailRate = numberOption('generation-fail-rate', values['generation-fail-rate'], { min: 0, max: 1 });
  config.random = mulberry32(numberOption('seed', values.seed, { min: 0, max: 2 ** 32 - 1, integer: true }));
  const server = createServer({ verbose: values.verbose });
  installShutdown(server, values['exit-with-stdin']);
  server.listen(Number(values.port) || 0, values.host, () => {
    const { port } = server.address();
    process.stdout.write(`${JSON.stringify({ listening: `http://${publicHost(values.host)}:${port}${BASE}` })}\n`);
  });
}

main();
