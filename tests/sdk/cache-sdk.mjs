#!/usr/bin/env node
// The response cache through the official `openai` Node SDK, unmodified: answers stored from one kind of request
// (streamed or not) and replayed to the other, read by the SDK's stream iterator and its stream helper. Prints
// what the SDK returned (and the `x-cache` header) as one JSON object; tests/tests/cache.rs asserts on it.
//
//   node tests/sdk/cache-sdk.mjs <gateway base URL> <API key of a caching key> <marker> store|replay
//
// `store` makes the first request of each pair (misses: the gateway stores their answers after responding);
// `replay` makes the others, once the caller has seen the gateway log that it stored them. Each call sends
// `x-client-request-id: <marker>-<call>`.

import OpenAI from 'openai';

const [base, apiKey, marker, phase] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey, maxRetries: 0, timeout: 30_000 });
const MODEL = 'openai/gpt-4o-mini';

// A plain answer, and one with two choices calling a tool after some reasoning: each asked for twice.
const plain = { model: MODEL, temperature: 0, max_tokens: 64, messages: [{ role: 'user', content: `plain ${marker}` }], standin: { chunks: 4 } };
const tools = {
  model: MODEL,
  temperature: 0,
  n: 2,
  messages: [{ role: 'user', content: `tools ${marker}` }],
  tools: [{ type: 'function', function: { name: 'lookup', parameters: { type: 'object' } } }],
  standin: { reasoning_chunks: 2, tool_call: { name: 'lookup', arguments: JSON.stringify({ query: marker, page: 2 }) } },
};

async function iterate(stream) {
  const out = { ids: [], chunks: 0, content: {}, finish: {}, tool_calls: {}, usage: null };
  for await (const chunk of stream) {
    out.chunks++;
    if (!out.ids.includes(chunk.id)) out.ids.push(chunk.id);
    if (chunk.usage) out.usage = chunk.usage;
    for (const choice of chunk.choices) {
      const i = choice.index;
      if (choice.delta?.content) out.content[i] = (out.content[i] ?? '') + choice.delta.content;
      for (const call of choice.delta?.tool_calls ?? []) {
        const calls = (out.tool_calls[i] ??= []);
        const kept = (calls[call.index] ??= { id: null, name: '', arguments: '' });
        if (call.id) kept.id = call.id;
        if (call.function?.name) kept.name = call.function.name;
        if (call.function?.arguments) kept.arguments += call.function.arguments;
      }
      if (choice.finish_reason) out.finish[i] = choice.finish_reason;
    }
  }
  return out;
}

function summary(completion) {
  return {
    id: completion.id,
    object: completion.object,
    choices: completion.choices.map((c) => ({
      content: c.message.content,
      finish_reason: c.finish_reason,
      tool_calls: (c.message.tool_calls ?? []).map((t) => ({ id: t.id, name: t.function.name, arguments: t.function.arguments })),
    })),
    usage: completion.usage,
  };
}

const options = (name) => ({ headers: { 'x-client-request-id': `${marker}-${name}` } });
const embedding = { model: 'openai/text-embedding-3-small', input: [`embed ${marker}`, 'second'], dimensions: 8 };

const phases = {
  // A non-streamed miss, a streamed one, an embeddings one.
  store: {
    async plain_body() {
      const { data, response } = await client.chat.completions.create(plain, options('plain_body')).withResponse();
      return { x_cache: response.headers.get('x-cache'), ...summary(data) };
    },
    async tools_stream() {
      const { data, response } = await client.chat.completions
        .create({ ...tools, stream: true, stream_options: { include_usage: true } }, options('tools_stream'))
        .withResponse();
      return { x_cache: response.headers.get('x-cache'), ...(await iterate(data)) };
    },
    async embeddings_first() {
      const { data, response } = await client.embeddings.create(embedding, options('embeddings_first')).withResponse();
      return { x_cache: response.headers.get('x-cache'), vector: data.data[0].embedding, usage: data.usage };
    },
  },
  // The same requests the other way: the plain answer streamed (with and without the usage chunk, and through
  // the helper), the streamed tool calls as a body and through the helper, the embeddings again.
  replay: {
    async plain_stream() {
      const { data, response } = await client.chat.completions
        .create({ ...plain, stream: true, stream_options: { include_usage: true } }, options('plain_stream'))
        .withResponse();
      return { x_cache: response.headers.get('x-cache'), age: response.headers.get('age'), ...(await iterate(data)) };
    },
    async plain_stream_no_usage() {
      const { data, response } = await client.chat.completions
        .create({ ...plain, stream: true }, options('plain_stream_no_usage'))
        .withResponse();
      return { x_cache: response.headers.get('x-cache'), ...(await iterate(data)) };
    },
    async plain_helper() {
      return summary(await client.chat.completions.stream(plain, options('plain_helper')).finalChatCompletion());
    },
    async tools_body() {
      const { data, response } = await client.chat.completions.create(tools, options('tools_body')).withResponse();
      return { x_cache: response.headers.get('x-cache'), ...summary(data) };
    },
    async tools_helper() {
      return summary(await client.chat.completions.stream(tools, options('tools_helper')).finalChatCompletion());
    },
    async embeddings_again() {
      const { data, response } = await client.embeddings.create(embedding, options('embeddings_again')).withResponse();
      return { x_cache: response.headers.get('x-cache'), vector: data.data[0].embedding, usage: data.usage };
    },
  },
};

const results = {};
for (const [name, call] of Object.entries(phases[phase] ?? {})) {
  try {
    results[name] = { ok: true, ...(await call()) };
  } catch (e) {
    results[name] = { ok: false, error: e?.constructor?.name, status: e?.status, message: String(e?.message ?? e) };
  }
}
process.stdout.write(`${JSON.stringify(results)}\n`);
