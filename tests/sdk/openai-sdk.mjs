#!/usr/bin/env node
// Drives the gateway with the official `openai` Node SDK, unmodified, on every endpoint, streamed and not,
// including errors, and prints what the SDK returned or raised as one JSON object on stdout. It asserts nothing:
// tests/tests/surface.rs asserts on this output and on the gateway's ledger, where each call is found by the
// client request id it sent (`<prefix>-<call>`).
//
//   node tests/sdk/openai-sdk.mjs <gateway base URL> <API key> <prefix>
//
// Requests carry a `standin` object (the OpenRouter stand-in's steering, which the SDK passes through as an
// unknown body field, as it would any provider extension).

import OpenAI from 'openai';

const [base, apiKey, prefix] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey, maxRetries: 0, timeout: 30_000 });
const MODEL = 'openai/gpt-4o-mini';
const EMBEDDING_MODEL = 'openai/text-embedding-3-small';

const options = (name) => ({ headers: { 'x-client-request-id': `${prefix}-${name}` } });

function failure(e) {
  return {
    ok: false,
    error: e?.constructor?.name,
    status: e?.status,
    code: e?.code ?? e?.error?.code,
    param: e?.param ?? e?.error?.param,
    type: e?.type ?? e?.error?.type,
    message: String(e?.message ?? e),
  };
}

const calls = {
  async responses() {
    const r = await client.responses.create(
      { model: MODEL, input: `hello ${prefix}`, instructions: 'Be brief.', max_output_tokens: 64, standin: {} },
      options('responses'),
    );
    return { id: r.id, status: r.status, text: r.output_text, usage: r.usage, object: r.object };
  },
  async responses_stream() {
    const stream = await client.responses.create(
      { model: MODEL, input: [{ role: 'user', content: `stream ${prefix}` }], stream: true, standin: { chunks: 4 } },
      options('responses_stream'),
    );
    const types = [];
    let text = '';
    let usage = null;
    for await (const event of stream) {
      types.push(event.type);
      if (event.type === 'response.output_text.delta') text += event.delta;
      if (event.type === 'response.completed') usage = event.response.usage;
    }
    return { types, text, usage };
  },
  async responses_stream_helper() {
    const stream = client.responses.stream(
      { model: MODEL, input: `helper ${prefix}`, standin: { chunks: 3 } },
      options('responses_stream_helper'),
    );
    const final = await stream.finalResponse();
    return { status: final.status, text: final.output_text, usage: final.usage };
  },
  async responses_stream_cut() {
    const stream = client.responses.stream(
      { model: MODEL, input: `cut ${prefix}`, standin: { scenario: 'disconnect', after_chunks: 2, chunks: 6 } },
      options('responses_stream_cut'),
    );
    const types = [];
    stream.on('event', (event) => types.push(event.type));
    const final = await stream.finalResponse();
    return { status: final.status, error: final.error, text: final.output_text, types };
  },
  async responses_stream_failed() {
    const stream = await client.responses.create(
      { model: MODEL, input: `fail ${prefix}`, stream: true, standin: { scenario: 'midstream_error', after_chunks: 1 } },
      options('responses_stream_failed'),
    );
    const types = [];
    let failed = null;
    for await (const event of stream) {
      types.push(event.type);
      if (event.type === 'response.failed') failed = event.response;
    }
    return { types, status: failed?.status, error: failed?.error };
  },
  async responses_invalid() {
    await client.responses.create({ model: MODEL, input: 7 }, options('responses_invalid'));
    return {};
  },
  async responses_upstream_429() {
    await client.responses.create(
      { model: MODEL, input: `busy ${prefix}`, standin: { scenario: 'error', status: 429, retry_after: 3 } },
      options('responses_upstream_429'),
    );
    return {};
  },
  async embeddings() {
    // The SDK asks for base64 and decodes it to floats itself.
    const r = await client.embeddings.create(
      { model: EMBEDDING_MODEL, input: [`first ${prefix}`, 'second text'], dimensions: 8 },
      options('embeddings'),
    );
    return { object: r.object, count: r.data.length, vector: r.data[0].embedding, index: r.data[1].index, usage: r.usage };
  },
  async embeddings_float() {
    const r = await client.embeddings.create(
      { model: EMBEDDING_MODEL, input: `float ${prefix}`, encoding_format: 'float' },
      options('embeddings_float'),
    );
    return { count: r.data.length, vector: r.data[0].embedding, usage: r.usage };
  },
  async embeddings_tokens() {
    const r = await client.embeddings.create(
      { model: EMBEDDING_MODEL, input: [[1, 2, 3, 4, 5]], encoding_format: 'float' },
      options('embeddings_tokens'),
    );
    return { count: r.data.length, usage: r.usage };
  },
  async embeddings_invalid() {
    await client.embeddings.create({ model: EMBEDDING_MODEL, input: '' }, options('embeddings_invalid'));
    return {};
  },
  async completions() {
    const r = await client.completions.create(
      { model: MODEL, prompt: `complete ${prefix}`, max_tokens: 32, standin: {} },
      options('completions'),
    );
    return { object: r.object, text: r.choices[0].text, finish_reason: r.choices[0].finish_reason, usage: r.usage };
  },
  async completions_stream() {
    const stream = await client.completions.create(
      { model: MODEL, prompt: `legacy ${prefix}`, stream: true, standin: { chunks: 3 } },
      options('completions_stream'),
    );
    let text = '';
    let chunks = 0;
    let empty = 0;
    for await (const chunk of stream) {
      chunks++;
      if (chunk.choices.length === 0) empty++;
      else text += chunk.choices[0].text;
    }
    return { text, chunks, usage_only_chunks: empty };
  },
  async completions_stream_usage() {
    const stream = await client.completions.create(
      { model: MODEL, prompt: `usage ${prefix}`, stream: true, stream_options: { include_usage: true }, standin: {} },
      options('completions_stream_usage'),
    );
    let usage = null;
    for await (const chunk of stream) if (chunk.usage) usage = chunk.usage;
    return { usage };
  },
  async completions_invalid() {
    await client.completions.create({ model: MODEL, max_tokens: 5 }, options('completions_invalid'));
    return {};
  },
  async models_retrieve() {
    const m = await client.models.retrieve(MODEL, options('models_retrieve'));
    return { id: m.id, object: m.object, owned_by: m.owned_by };
  },
  async models_missing() {
    await client.models.retrieve('nobody/no-such-model', options('models_missing'));
    return {};
  },
};

const results = {};
for (const [name, call] of Object.entries(calls)) {
  try {
    results[name] = { ok: true, ...(await call()) };
  } catch (e) {
    results[name] = failure(e);
  }
}
process.stdout.write(`${JSON.stringify(results)}\n`);
