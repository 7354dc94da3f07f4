#!/usr/bin/env node
// Local stand-in for OpenRouter's API (base URL http://<host>:<port>/api/v1).
//
// Speaks OpenRouter's chat-completions, Responses, embeddings and legacy completions protocols, streaming and
// not, including their failure modes, so the gateway can be developed, tested and benchmarked without a paid
// upstream. Behaviour per request is steered by an optional `standin` object in the request body (real
// OpenRouter ignores unknown fields):
//   scenario     ok | error | midstream_error | garbage | disconnect | hang | stall_body
//                stall_body (non-streamed only; streams answer normally): 200 headers and the first half
//                of the JSON body, then nothing, so the gateway must time out reading the body
//   chunks       number of content deltas (default: one per word)
//   chunk_bytes  approximate size of each content delta
//   delay_ms     pause before each delta (default 0; 25 without `standin`); non-streamed: once, before the body
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
//   finish_reason         chat and legacy completions: the finish reason the answer reports instead of its own
//                         (e.g. "error": OpenRouter's word for a provider that failed inside a 200 answer, or
//                         "content_filter"); the answer's text is unchanged
//   generation_lag_ms     how long this request's generation stays 404 after it ended (default --generation-lag-ms)
//   error_event  Responses streams, `midstream_error`: response.failed (default) | error
//   event_lines  Responses streams: false leaves out the `event: <type>` lines (data-only, as OpenRouter's samples)
// Non-streamed, `midstream_error` answers 502 and `disconnect` resets the connection before any byte.
// The top-level `n` (as in OpenAI) asks for N identical choices: N `choices` entries, or each delta once per
// choice index, interleaved (delays, pauses and after_chunks count those deltas); usage counts every choice.
//
// Tokens, as `usage` and the generation count them: prompt = ceil(prompt text code points / 4), at least 1;
// completion = one per word of reasoning and content, and ceil(tool-call argument code points / 4) per tool call.
// Prices are PROMPT_PRICE and COMPLETION_PRICE per token. Answers are "Hello from the OpenRouter stand-in. You
// said: <the last user text>".
//
// POST /api/v1/chat/completions: `messages`, `model` or `models`, `max_tokens`/`max_completion_tokens`, `n`,
// `stream`; every option above. A stream ends with one finish chunk per choice, the usage-only chunk
// (`choices: []`, always, whatever `stream_options` say) and `data: [DONE]`; `midstream_error` sends a chunk
// with a top-level `error` and finish_reason "error", then ends.
//
// POST /api/v1/completions (legacy): `prompt` (string | string[] | token array | token arrays), `max_tokens`,
// `n`, `stream`; the chat options except reasoning_chunks and tool_call. The prompt is the last user text (a
// string array joined by spaces); a token array counts its length in prompt tokens. Chunks are
// {"object":"text_completion","choices":[{"text","index","logprobs":null,"finish_reason"}]}, then the same
// finish, usage and [DONE] (and `midstream_error` chunk, with choices[0].text "") as chat.
//
// POST /api/v1/responses: `input` (a string, or items: messages {role, content: string | [{type:"input_text"|
// "output_text", text}]} and {type:"function_call_output", output}), `instructions`, `max_output_tokens` (caps
// the words like max_tokens: status "incomplete", incomplete_details {reason:"max_output_tokens"}), `stream`;
// `tools`, `tool_choice`, `parallel_tool_calls`, `temperature`, `top_p`, `text` are echoed. The prompt text is
// the instructions and every input text; `n` does not apply. `store: true` and a `previous_response_id` are
// refused with 400, as on OpenRouter. Output items: a reasoning item (reasoning_chunks), then a message, or a
// function_call (tool_call). A stream is `event: <type>` + `data: {"type","sequence_number",…}` events:
// response.created, response.in_progress, per item output_item.added [content_part.added] deltas
// (output_text / reasoning_text / function_call_arguments) [*.done content_part.done] output_item.done, then
// response.completed (or response.incomplete) and `data: [DONE]` (OpenRouter's sentinel; OpenAI sends none).
// chunks/chunk_bytes/delay_ms/pause_*/after_chunks count the deltas. `midstream_error` sends response.failed
// (the response with status "failed", error {code:"server_error",…}, error_type "server") or, with
// error_event "error", OpenAI's flat error event; then the stream ends, without [DONE].
//
// POST /api/v1/embeddings: `input` (string | string[] | token array | token arrays; none empty), `dimensions`
// (default 8), `encoding_format` float | base64 (little-endian float32 bytes); never streamed. Vectors are unit
// length, drawn from a hash of the input alone (the same text always gets the same vector). Prompt tokens:
// ceil(code points / 4), at least 1, per string, the length of a token array; no completion tokens. Options:
// scenario (error, garbage, stall_body, hang, disconnect), status, retry_after, error_body_bytes,
// stall_error_body, delay_ms, usage_override, generation_lag_ms.
//
// Every endpoint sends X-Generation-Id (the body's `id` too), records the request and counts it in the stats
// (chat_completions, completions, responses, embeddings).
//
// GET /api/v1/models and GET /api/v1/embeddings/models: the text and the embedding models, with prices (stats
// models and embedding_models count the fetches).
//
// GET /api/v1/generation?id=<X-Generation-Id>: OpenRouter's generation stats. Every served completion, response
// and embedding is a generation (api_type "completions", or "embeddings"; not errors answered before any token;
// the last MAX_GENERATIONS are kept); it ends when the answer is complete, when the stand-in cut it
// (disconnect, midstream_error) or when the client closed early (cancelled). A stream's generation counts the
// tokens of the deltas written before it ended; a non-streamed answer is generated whole before its
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
const MAX_DIMENSIONS = 8192;
const DEFAULT_DIMENSIONS = 8;
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
  completions: 0,
  responses: 0,
  embeddings: 0,
  models: 0,
  embedding_models: 0,
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

function standinOf(body) {
  return body.standin !== null && typeof body.standin === 'object' ? body.standin : undefined;
}

function tokensOfChars(chars) {
  return Math.max(1, Math.ceil(chars / 4));
}

function choicesOption(value) {
  return Math.min(intOption(value, 1, 1), MAX_CHOICES);
}

// The computed usage, with `usage_override` merged over it for the wire.
function wireUsage(usage, opts) {
  return { ...usage, ...plainObject(opts.usage_override) };
}

// What every endpoint takes from a request: its model, and the pacing and failure its `standin` object asks for.
function planRequest(body, id, apiType = 'completions') {
  const standin = standinOf(body);
  const opts = standin ?? {};
  const model =
    body.model ?? (Array.isArray(body.models) && body.models.length > 0 ? body.models[0] : 'openrouter/auto');
  return {
    id,
    apiType,
    opts,
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
  };
}

// Everything a generated answer needs, derived once from the request. `messages` are chat-shaped (the other
// endpoints translate their input into them); they give the answer and, unless `promptTokens` is given, the
// prompt tokens. `answerOpts` (default: the standin object) is what planAnswer reads.
function planCompletion(body, id, { messages, promptTokens, maxTokens, n = 1, answerOpts }) {
  const request = planRequest(body, id);
  const answer = planAnswer(messages, answerOpts ?? request.opts, maxTokens);
  const prompt = promptTokens ?? tokensOfChars(promptChars(messages));
  const completionTokens = n * answer.completionTokens;
  const reasoningTokens = n * answer.reasoningTokens;
  return {
    ...request,
    n,
    reasoningTexts: answer.reasoningTexts,
    texts: answer.texts,
    toolCall: answer.toolCall,
    finishReason: typeof request.opts.finish_reason === 'string' ? request.opts.finish_reason : answer.finishReason,
    // The real counts (generations) and what goes on the wire (usage_override merged over them).
    promptTokens: prompt,
    completionTokens,
    reasoningTokens,
    usage: wireUsage(usageFor(prompt, completionTokens, reasoningTokens), request.opts),
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
    apiType: plan.apiType,
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
    api_type: gen.apiType,
  };
}

// ---------------------------------------------------------------------------
// Answers, shared by every endpoint
// ---------------------------------------------------------------------------

// Providers relay their raw error text in metadata.raw, sometimes at great length.
const RAW_FILLER = 'upstream provider error detail; ';
const SSE_HEADERS = { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' };
const PROCESSING_FRAME = ': OPENROUTER PROCESSING\n\n';
const GARBAGE_FRAME = 'data: {not json at all\n\n';
const DONE_FRAME = 'data: [DONE]\n\n';
// What a mid-stream failure says, on every endpoint.
const MIDSTREAM_ERROR = { code: 'server_error', message: 'Provider disconnected unexpectedly' };
const MIDSTREAM_ERROR_JSON = JSON.stringify(MIDSTREAM_ERROR);

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

// A non-streamed answer: `build(plan)` is its JSON body.
async function sendBody(res, plan, gen, build) {
  if (plan.delayMs > 0) await sleep(plan.delayMs);
  if (res.destroyed) return;
  completeGeneration(gen, plan);
  if (plan.scenario === 'stall_body') return sendStalled(res, 200, build(plan));
  return sendJson(res, 200, build(plan));
}

// Writes one frame; waits only when the socket pushes back, so the common
// zero-delay case stays a synchronous loop.
async function writeFrame(res, frame) {
  if (!res.write(frame)) await drainedOrClosed(res);
  return !res.destroyed;
}

// Writes a stream's `count` deltas with the plan's pacing, and its mid-stream failure after `afterChunks` of
// them. `part(i)` is delta i ({tokens, reasoning}: what it adds to the generation), `frame(i, part)` its
// frames, `failure()` the frame that ends a midstream_error stream. Resolves true when every delta was written
// and the stream is still open for its ending.
async function writeDeltas(res, plan, gen, { count, part, frame, failure }) {
  const failAt = Math.min(plan.afterChunks, count);
  for (let i = 0; i <= count; i++) {
    if (i === failAt) {
      if (plan.scenario === 'midstream_error') {
        endGeneration(gen, { finishReason: 'error' });
        res.end(failure());
        return false;
      }
      if (plan.scenario === 'disconnect') {
        endGeneration(gen);
        abortSocket(res);
        return false;
      }
      if (plan.scenario === 'garbage' && !(await writeFrame(res, GARBAGE_FRAME))) return false;
    }
    if (i === count) break;
    if (plan.delayMs > 0) await sleep(plan.delayMs);
    if (i === plan.pauseAfter && plan.pauseMs > 0) await sleep(plan.pauseMs);
    const delta = part(i);
    if (res.destroyed || !(await writeFrame(res, frame(i, delta)))) return false;
    stats.completion_tokens_streamed += delta.tokens;
    addGenerated(gen, delta.tokens, delta.reasoning);
  }
  return true;
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

// The scenario decides how a planned answer goes out; `api` is the endpoint's wire form: `body(plan)` (the
// non-streamed JSON) and `stream(res, plan, gen)`.
function respond(res, plan, gen, api) {
  switch (plan.scenario) {
    case 'hang':
      return undefined;
    case 'error':
      return sendError(res, plan, plan.status);
    case 'disconnect':
      if (plan.stream) return api.stream(res, plan, gen);
      endGeneration(gen);
      return abortSocket(res);
    case 'garbage':
      if (plan.stream) return api.stream(res, plan, gen);
      completeGeneration(gen, plan);
      return sendJson(res, 200, '<html>upstream exploded</html>');
    case 'midstream_error':
      if (!plan.stream) return sendError(res, plan, 502);
      return api.stream(res, plan, gen);
    default:
      return plan.stream ? api.stream(res, plan, gen) : sendBody(res, plan, gen, api.body);
  }
}

function serve(res, plan, api) {
  if (plan.stream) countAbortedStream(res);
  const gen = makesGeneration(plan) ? startGeneration(plan, res) : null;
  return respond(res, plan, gen, api);
}

// ---------------------------------------------------------------------------
// Chat completions and legacy completions
// ---------------------------------------------------------------------------

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

function choicesOf(plan, choice) {
  const choices = [];
  for (let index = 0; index < plan.n; index++) choices.push(choice(index));
  return choices;
}

function completionBody(plan) {
  return {
    id: plan.id,
    object: 'chat.completion',
    created: plan.created,
    model: plan.model,
    provider: PROVIDER,
    choices: choicesOf(plan, (index) => ({
      index,
      message: messageFor(plan, index),
      finish_reason: plan.finishReason,
      native_finish_reason: plan.finishReason,
    })),
    usage: plan.usage,
  };
}

function textCompletionBody(plan) {
  const text = plan.texts.join('');
  return {
    id: plan.id,
    object: 'text_completion',
    created: plan.created,
    model: plan.model,
    provider: PROVIDER,
    choices: choicesOf(plan, (index) => ({
      text,
      index,
      logprobs: null,
      finish_reason: plan.finishReason,
      native_finish_reason: plan.finishReason,
    })),
    usage: plan.usage,
  };
}

// Builds the SSE frames of one chat stream; the shared JSON prefix is built once.
// Delta builders share one signature: (text, first delta of its choice, choice index).
function chatFrames(plan) {
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
      `"model":${JSON.stringify(plan.model)},"provider":"${PROVIDER}","error":${MIDSTREAM_ERROR_JSON},` +
      `"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error","native_finish_reason":"error"}]}\n\n`,
  };
}

// The same frame set for legacy completions: `choices[].text` instead of a delta (content only).
function textFrames(plan) {
  const head =
    `{"id":${JSON.stringify(plan.id)},"object":"text_completion","created":${plan.created},` +
    `"model":${JSON.stringify(plan.model)},"provider":"${PROVIDER}",`;
  const choice = (index, text, finish) =>
    `{"text":${JSON.stringify(text)},"index":${index},"logprobs":null,"finish_reason":${finish}` +
    `${finish === 'null' ? '' : `,"native_finish_reason":${finish}`}}`;
  return {
    content: (text, _first, index) => `data: ${head}"choices":[${choice(index, text, 'null')}]}\n\n`,
    finish: (_first, index) =>
      `data: ${head}"choices":[${choice(index, '', JSON.stringify(plan.finishReason))}]}\n\n`,
    usage: () => `data: ${head}"choices":[],"usage":${JSON.stringify(plan.usage)}}\n\n`,
    midstreamError: () =>
      `data: ${head}"error":${MIDSTREAM_ERROR_JSON},"choices":[${choice(0, '', '"error"')}]}\n\n`,
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

// Delta i is part i / n of choice i % n: the choices take turns. `frames` is chatFrames or textFrames.
async function sendStream(res, plan, gen, frames) {
  const parts = streamParts(plan);
  const count = parts.length * plan.n;
  res.writeHead(200, SSE_HEADERS);
  res.write(PROCESSING_FRAME);
  const deltas = {
    count,
    part: (i) => parts[Math.floor(i / plan.n)],
    frame: (i, part) => frames[part.kind](part.text, i < plan.n, i % plan.n),
    failure: frames.midstreamError,
  };
  if (!(await writeDeltas(res, plan, gen, deltas))) return;
  for (let index = 0; index < plan.n; index++) res.write(frames.finish(count === 0, index));
  res.write(frames.usage());
  res.end(DONE_FRAME);
  endGeneration(gen, { finishReason: plan.finishReason });
}

// A legacy prompt as a chat user message (strings of an array become text parts: their code points count, the
// answer quotes them joined by spaces); token arrays count their length. Null when it is not a prompt.
function completionPrompt(prompt) {
  const isTokens = (value) => Array.isArray(value) && value.every(Number.isInteger);
  if (typeof prompt === 'string') return { messages: [{ role: 'user', content: prompt }] };
  if (!Array.isArray(prompt) || prompt.length === 0) return null;
  if (prompt.every((p) => typeof p === 'string')) {
    return { messages: [{ role: 'user', content: prompt.map((text) => ({ type: 'text', text })) }] };
  }
  const empty = [{ role: 'user', content: '' }];
  if (isTokens(prompt)) return { messages: empty, promptTokens: prompt.length };
  if (prompt.every(isTokens)) {
    return { messages: empty, promptTokens: Math.max(1, prompt.reduce((sum, tokens) => sum + tokens.length, 0)) };
  }
  return null;
}

// ---------------------------------------------------------------------------
// Responses API
// ---------------------------------------------------------------------------

// An input message's text: a string, or its input_text / output_text parts as chat text parts.
function responsesContent(content) {
  if (typeof content === 'string') return content;
  if (!Array.isArray(content)) return '';
  return content
    .filter((part) => (part?.type === 'input_text' || part?.type === 'output_text') && typeof part.text === 'string')
    .map((part) => ({ type: 'text', text: part.text }));
}

// The input as chat messages, so the chat code counts the prompt and finds the last user text: instructions
// become a system message, a function_call_output a tool message; other items carry no prompt text.
function responsesMessages(body) {
  const messages = [];
  if (typeof body.instructions === 'string') messages.push({ role: 'system', content: body.instructions });
  if (typeof body.input === 'string') {
    messages.push({ role: 'user', content: body.input });
    return messages;
  }
  for (const item of body.input) {
    if (item?.type === 'function_call_output') {
      messages.push({ role: 'tool', content: responsesContent(item.output) });
    } else if (typeof item?.role === 'string' && (item.type === undefined || item.type === 'message')) {
      messages.push({ role: item.role, content: responsesContent(item.content) });
    }
  }
  return messages;
}

function responsesUsage(plan) {
  return {
    input_tokens: plan.promptTokens,
    input_tokens_details: { cached_tokens: 0 },
    output_tokens: plan.completionTokens,
    output_tokens_details: { reasoning_tokens: plan.reasoningTokens },
    total_tokens: plan.promptTokens + plan.completionTokens,
    cost: costOf(plan.promptTokens, plan.completionTokens),
    is_byok: false,
  };
}

// The output items: reasoning first (reasoning_chunks), then the message or the function call.
function responseItems(plan) {
  const suffix = plan.id.slice('gen-'.length);
  const items = [];
  if (plan.reasoningTexts.length > 0) items.push({ type: 'reasoning', id: `rs_${suffix}` });
  items.push(plan.toolCall ? { type: 'function_call', id: `fc_${suffix}` } : { type: 'message', id: `msg_${suffix}` });
  return items;
}

// The stream's deltas in order, each with the index of the output item it belongs to.
function responseParts(plan) {
  const last = plan.items.length - 1;
  return streamParts(plan)
    .filter((part) => part.kind !== 'toolHead')
    .map((part) => ({ ...part, item: part.kind === 'reasoning' ? 0 : last }));
}

function planResponse(body, id) {
  const plan = planCompletion(body, id, { messages: responsesMessages(body), maxTokens: body.max_output_tokens });
  plan.responseStatus = plan.finishReason === 'length' ? 'incomplete' : 'completed';
  plan.usage = wireUsage(responsesUsage(plan), plan.opts);
  plan.items = responseItems(plan);
  plan.errorEvent = plan.opts.error_event === 'error' ? 'error' : 'response.failed';
  plan.eventLines = plan.opts.event_lines !== false;
  plan.echo = {
    instructions: body.instructions ?? null,
    max_output_tokens: body.max_output_tokens ?? null,
    parallel_tool_calls: body.parallel_tool_calls ?? true,
    tool_choice: body.tool_choice ?? 'auto',
    tools: Array.isArray(body.tools) ? body.tools : [],
    temperature: body.temperature ?? null,
    top_p: body.top_p ?? null,
    text: plainObject(body.text) ?? { format: { type: 'text' } },
  };
  return plan;
}

// The response object at `status`: in_progress (no output, no usage yet), failed (the mid-stream error), or
// the end (completed | incomplete), with every output item done and the usage.
function responseObject(plan, status) {
  const ended = status === 'completed' || status === 'incomplete';
  const { instructions, max_output_tokens, parallel_tool_calls, tool_choice, tools, temperature, top_p, text } =
    plan.echo;
  return {
    id: plan.id,
    object: 'response',
    created_at: plan.created,
    completed_at: ended ? Math.floor(Date.now() / 1000) : null,
    model: plan.model,
    status,
    incomplete_details: status === 'incomplete' ? { reason: 'max_output_tokens' } : null,
    error: status === 'failed' ? MIDSTREAM_ERROR : null,
    ...(status === 'failed' ? { error_type: 'server' } : {}),
    instructions,
    max_output_tokens,
    output: ended ? plan.items.map((item) => outputItem(plan, item, true)) : [],
    parallel_tool_calls,
    tool_choice,
    tools,
    temperature,
    top_p,
    text,
    usage: ended ? plan.usage : null,
  };
}

function responseBody(plan) {
  return responseObject(plan, plan.responseStatus);
}

function itemText(plan, item) {
  if (item.type === 'reasoning') return plan.reasoningTexts.join('');
  if (item.type === 'function_call') return plan.toolCall.arguments;
  return plan.texts.join('');
}

// The one content part of a message or reasoning item (function calls have none).
function contentPart(item, text) {
  if (item.type === 'reasoning') return { type: 'reasoning_text', text };
  return { type: 'output_text', text, annotations: [] };
}

// An output item as output_item.added (`done` false: in progress, empty) or output_item.done and the
// non-streamed `output` show it. A truncated message is "incomplete".
function outputItem(plan, item, done) {
  const text = done ? itemText(plan, item) : '';
  const truncated = item.type === 'message' && plan.responseStatus === 'incomplete';
  const status = !done ? 'in_progress' : truncated ? 'incomplete' : 'completed';
  if (item.type === 'function_call') {
    const { name } = plan.toolCall;
    return { type: 'function_call', id: item.id, call_id: toolCallId(plan, 0), name, arguments: text, status };
  }
  const content = done ? [contentPart(item, text)] : [];
  if (item.type === 'reasoning') return { type: 'reasoning', id: item.id, status, summary: [], content };
  return { type: 'message', id: item.id, status, role: 'assistant', content };
}

const ITEM_EVENTS = {
  message: { delta: 'response.output_text.delta', done: 'response.output_text.done' },
  reasoning: { delta: 'response.reasoning_text.delta', done: 'response.reasoning_text.done' },
  function_call: { delta: 'response.function_call_arguments.delta', done: 'response.function_call_arguments.done' },
};

// The frames of one Responses stream, numbered in the order they are built (so build them in wire order).
function responseFrames(plan) {
  let sequence = 0;
  const frame = (type, payload) => {
    const data = JSON.stringify({ type, sequence_number: sequence++, ...payload });
    return plan.eventLines ? `event: ${type}\ndata: ${data}\n\n` : `data: ${data}\n\n`;
  };
  const at = (index) => ({ item_id: plan.items[index].id, output_index: index });
  const inPart = (index) => ({ ...at(index), content_index: 0 });
  const logprobs = (item) => (item.type === 'message' ? { logprobs: [] } : {});
  return {
    head: () =>
      frame('response.created', { response: responseObject(plan, 'in_progress') }) +
      frame('response.in_progress', { response: responseObject(plan, 'in_progress') }),
    open(index) {
      const item = plan.items[index];
      const added = frame('response.output_item.added', { output_index: index, item: outputItem(plan, item, false) });
      if (item.type === 'function_call') return added;
      return added + frame('response.content_part.added', { ...inPart(index), part: contentPart(item, '') });
    },
    delta(index, delta) {
      const item = plan.items[index];
      if (item.type === 'function_call') return frame(ITEM_EVENTS.function_call.delta, { ...at(index), delta });
      return frame(ITEM_EVENTS[item.type].delta, { ...inPart(index), delta, ...logprobs(item) });
    },
    close(index) {
      const item = plan.items[index];
      const text = itemText(plan, item);
      let out;
      if (item.type === 'function_call') {
        out = frame(ITEM_EVENTS.function_call.done, { ...at(index), name: plan.toolCall.name, arguments: text });
      } else {
        out =
          frame(ITEM_EVENTS[item.type].done, { ...inPart(index), text, ...logprobs(item) }) +
          frame('response.content_part.done', { ...inPart(index), part: contentPart(item, text) });
      }
      return out + frame('response.output_item.done', { output_index: index, item: outputItem(plan, item, true) });
    },
    end: () => frame(`response.${plan.responseStatus}`, { response: responseObject(plan, plan.responseStatus) }),
    failure: () =>
      plan.errorEvent === 'error'
        ? frame('error', { ...MIDSTREAM_ERROR, param: null })
        : frame('response.failed', { response: responseObject(plan, 'failed') }),
  };
}

// Items open as their first delta comes (closing the one before); the rest open and close at the end.
async function sendResponseStream(res, plan, gen) {
  const frames = responseFrames(plan);
  const parts = responseParts(plan);
  let current = -1;
  const advance = (index) => {
    let out = '';
    for (; current < index; current++) out += (current >= 0 ? frames.close(current) : '') + frames.open(current + 1);
    return out;
  };
  res.writeHead(200, SSE_HEADERS);
  res.write(PROCESSING_FRAME);
  res.write(frames.head());
  const deltas = {
    count: parts.length,
    part: (i) => parts[i],
    frame: (_i, part) => advance(part.item) + frames.delta(part.item, part.text),
    failure: frames.failure,
  };
  if (!(await writeDeltas(res, plan, gen, deltas))) return;
  res.write(advance(plan.items.length - 1) + frames.close(current));
  res.write(frames.end());
  res.end(DONE_FRAME);
  endGeneration(gen, { finishReason: plan.finishReason });
}

// ---------------------------------------------------------------------------
// Embeddings
// ---------------------------------------------------------------------------

// The inputs, each a non-empty string or token array; null when `input` is missing, empty or malformed.
function embeddingInputs(input) {
  const isText = (value) => typeof value === 'string' && value.length > 0;
  const isTokens = (value) => Array.isArray(value) && value.length > 0 && value.every(Number.isInteger);
  if (isText(input) || isTokens(input)) return [input];
  if (Array.isArray(input) && input.length > 0 && input.every((v) => isText(v) || isTokens(v))) return input;
  return null;
}

function fnv1a(text) {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) hash = Math.imul(hash ^ text.charCodeAt(i), 0x01000193);
  return hash >>> 0;
}

// A unit vector drawn from the input alone, in float32 values so the base64 form decodes to the same numbers.
function embeddingVector(input, dimensions) {
  const random = mulberry32(fnv1a(typeof input === 'string' ? `text:${input}` : `tokens:${input.join(',')}`));
  const raw = Array.from({ length: dimensions }, () => random() * 2 - 1);
  const norm = Math.sqrt(raw.reduce((sum, x) => sum + x * x, 0)) || 1;
  return raw.map((x) => Math.fround(x / norm));
}

function float32Base64(vector) {
  const bytes = Buffer.alloc(vector.length * 4);
  vector.forEach((x, i) => bytes.writeFloatLE(x, i * 4));
  return bytes.toString('base64');
}

function planEmbeddings(body, id, inputs) {
  const request = planRequest(body, id, 'embeddings');
  const promptTokens = inputs.reduce(
    (sum, input) => sum + (typeof input === 'string' ? tokensOfChars(charCount(input)) : input.length),
    0,
  );
  const usage = {
    prompt_tokens: promptTokens,
    total_tokens: promptTokens,
    cost: costOf(promptTokens, 0),
    is_byok: false,
  };
  return {
    ...request,
    stream: false,
    n: 1,
    inputs,
    dimensions: body.dimensions ?? DEFAULT_DIMENSIONS,
    base64: body.encoding_format === 'base64',
    finishReason: null,
    promptTokens,
    completionTokens: 0,
    reasoningTokens: 0,
    usage: wireUsage(usage, request.opts),
  };
}

function embeddingsBody(plan) {
  const data = plan.inputs.map((input, index) => {
    const vector = embeddingVector(input, plan.dimensions);
    return { object: 'embedding', index, embedding: plan.base64 ? float32Base64(vector) : vector };
  });
  return { object: 'list', data, model: plan.model, id: plan.id, provider: PROVIDER, usage: plan.usage };
}

// Each endpoint's wire form, for respond().
const CHAT = { body: completionBody, stream: (res, plan, gen) => sendStream(res, plan, gen, chatFrames(plan)) };
const TEXT_COMPLETIONS = {
  body: textCompletionBody,
  stream: (res, plan, gen) => sendStream(res, plan, gen, textFrames(plan)),
};
const RESPONSES = { body: responseBody, stream: sendResponseStream };
const EMBEDDINGS = { body: embeddingsBody, stream: null };

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

function reject(res, status, message) {
  sendJson(res, status, errorBody(status, message));
  return undefined;
}

// Reads, records and checks a POST's body. Answers the error itself (and resolves undefined) unless the request
// is authorized and its body a JSON object; every answer but 413 carries the request's X-Generation-Id.
async function readRequest(req, res, path) {
  const raw = await readBody(req);
  if (raw === null) {
    record(req, path, '', null);
    return reject(res, 413, ERROR_MESSAGES[413]);
  }
  const body = parseJson(raw);
  record(req, path, raw, body ?? null);
  const id = newGenerationId();
  res.setHeader('X-Generation-Id', id);
  if (!authorized(req)) return reject(res, 401, 'No auth credentials found');
  if (body === undefined) return reject(res, 400, 'Invalid JSON');
  if (body === null || typeof body !== 'object' || Array.isArray(body)) return reject(res, 400, 'Invalid request body');
  return { body, id };
}

async function handleChatCompletions(req, res, path) {
  stats.chat_completions++;
  const request = await readRequest(req, res, path);
  if (!request) return undefined;
  const { body, id } = request;
  if (!Array.isArray(body.messages)) return reject(res, 400, 'Input required: specify "prompt" or "messages"');
  const maxTokens = body.max_tokens ?? body.max_completion_tokens;
  return serve(res, planCompletion(body, id, { messages: body.messages, maxTokens, n: choicesOption(body.n) }), CHAT);
}

async function handleCompletions(req, res, path) {
  stats.completions++;
  const request = await readRequest(req, res, path);
  if (!request) return undefined;
  const { body, id } = request;
  const prompt = completionPrompt(body.prompt);
  if (!prompt) return reject(res, 400, 'Input required: specify "prompt" or "messages"');
  // Text only: no reasoning, no tool calls.
  const answerOpts = { ...standinOf(body), reasoning_chunks: undefined, tool_call: undefined };
  const plan = planCompletion(body, id, {
    ...prompt,
    maxTokens: body.max_tokens,
    n: choicesOption(body.n),
    answerOpts,
  });
  return serve(res, plan, TEXT_COMPLETIONS);
}

async function handleResponses(req, res, path) {
  stats.responses++;
  const request = await readRequest(req, res, path);
  if (!request) return undefined;
  const { body, id } = request;
  if (typeof body.input !== 'string' && !Array.isArray(body.input)) {
    return reject(res, 400, 'Input required: specify "input"');
  }
  if (body.store === true) return reject(res, 400, 'store: true is not supported: the Responses API is stateless');
  if (body.previous_response_id !== undefined && body.previous_response_id !== null) {
    return reject(res, 400, 'previous_response_id is not supported: send the full conversation in input');
  }
  return serve(res, planResponse(body, id), RESPONSES);
}

async function handleEmbeddings(req, res, path) {
  stats.embeddings++;
  const request = await readRequest(req, res, path);
  if (!request) return undefined;
  const { body, id } = request;
  const inputs = embeddingInputs(body.input);
  if (!inputs) return reject(res, 400, 'Input required: "input" must be a non-empty string, array or token array');
  const { dimensions, encoding_format: format } = body;
  const unsized = dimensions === undefined || dimensions === null;
  if (!unsized && !(Number.isInteger(dimensions) && dimensions >= 1 && dimensions <= MAX_DIMENSIONS)) {
    return reject(res, 400, `dimensions must be an integer from 1 to ${MAX_DIMENSIONS}`);
  }
  if (format !== undefined && format !== null && format !== 'float' && format !== 'base64') {
    return reject(res, 400, 'encoding_format must be "float" or "base64"');
  }
  return serve(res, planEmbeddings(body, id, inputs), EMBEDDINGS);
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

// OpenRouter lists embedding models apart, in the same shape; priced as this stand-in charges embeddings.
const EMBEDDING_MODELS_BODY = JSON.stringify({
  data: [
    {
      ...modelEntry('openai/text-embedding-3-small', 'OpenAI: Text Embedding 3 Small', 8192, 0, 'GPT', [], {
        ...DEFAULT_PRICING,
        completion: '0',
      }),
      architecture: { modality: 'text->text', input_modalities: ['text'], output_modalities: ['embeddings'], tokenizer: 'GPT' },
    },
  ],
});

async function handleModels(req, res, path) {
  const embeddings = path === `${BASE}/embeddings/models`;
  if (embeddings) stats.embedding_models++;
  else stats.models++;
  const raw = await readBody(req);
  record(req, path, raw ?? '', raw ? (parseJson(raw) ?? null) : null);
  sendJson(res, 200, embeddings ? EMBEDDING_MODELS_BODY : MODELS_BODY);
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

const POST_ROUTES = new Map([
  [`${BASE}/chat/completions`, handleChatCompletions],
  [`${BASE}/completions`, handleCompletions],
  [`${BASE}/responses`, handleResponses],
  [`${BASE}/embeddings`, handleEmbeddings],
]);

async function route(req, res) {
  const path = req.url.split('?', 1)[0];
  if (path.startsWith('/__standin/')) return handleControl(req, res, path);
  const post = POST_ROUTES.get(path);
  if (post) {
    if (req.method === 'POST') return post(req, res, path);
  } else if (path === `${BASE}/models` || path === `${BASE}/embeddings/models`) {
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
