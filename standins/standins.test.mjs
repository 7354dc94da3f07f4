// Self-test for the OpenRouter and PostHog stand-ins: each runs as a child
// process on a free port, exactly as the gateway's tests and `npm run dev` use them.
//
//   node --test standins/selftest.mjs

import { describe, it, before, after, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

const here = (name) => fileURLToPath(new URL(name, import.meta.url));

// Starts a stand-in and resolves with its URL from the first stdout line.
async function startStandin(script, args = []) {
  const child = spawn(process.execPath, [here(script), '--port', '0', '--exit-with-stdin', ...args], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: child.stdout });
  const [line] = await Promise.race([
    new Promise((resolve) => lines.once('line', (l) => resolve([l]))),
    new Promise((_, reject) => child.once('exit', (code) => reject(new Error(`${script} exited with ${code}`)))),
  ]);
  const { listening } = JSON.parse(line);
  return {
    url: listening,
    origin: new URL(listening).origin,
    stop: () =>
      new Promise((resolve) => {
        child.once('exit', resolve);
        child.kill('SIGTERM');
      }),
  };
}

function sseEvents(text) {
  return text.split('\n\n').filter(Boolean);
}

function dataOf(frame) {
  assert.ok(frame.startsWith('data: '), `not a data frame: ${frame}`);
  return frame.slice('data: '.length);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

describe('openrouter stand-in', () => {
  let server;
  const AUTH = { Authorization: 'Bearer sk-or-test', 'Content-Type': 'application/json' };
  const messages = [
    { role: 'system', content: 'Be brief.' },
    { role: 'user', content: 'ping pong' },
  ];
  const answer = 'Hello from the OpenRouter stand-in. You said: ping pong';
  const answerWords = answer.split(' ').length;

  const chat = (body, headers = AUTH) =>
    fetch(`${server.url}/chat/completions`, {
      method: 'POST',
      headers,
      body: typeof body === 'string' ? body : JSON.stringify(body),
    });

  const streamFrames = async (body) => sseEvents(await (await chat({ ...body, stream: true })).text());
  const streamChunks = async (body) => (await streamFrames(body)).slice(1, -1).map((f) => JSON.parse(dataOf(f)));
  const promptTokens = Math.ceil(('Be brief.'.length + 'ping pong'.length) / 4);
  const reasoning = 'The user wrote: ping pong so a short friendly greeting will do.';
  const reasoningWords = reasoning.split(' ').length;

  const generation = (id, headers = AUTH) =>
    fetch(`${server.url}/generation${id === undefined ? '' : `?id=${encodeURIComponent(id)}`}`, { headers });
  const generationList = async () => (await (await fetch(`${server.origin}/__standin/generations`)).json()).generations;
  const stats = async () => (await fetch(`${server.origin}/__standin/stats`)).json();

  // Polls until the generation is queryable; every miss before that must be the documented 404.
  async function pollGeneration(id, deadlineMs = 3000) {
    const deadline = Date.now() + deadlineMs;
    for (;;) {
      const res = await generation(id);
      if (res.status === 200) return (await res.json()).data;
      assert.equal(res.status, 404);
      assert.deepEqual(await res.json(), { error: { code: 404, message: 'Generation not found' } });
      assert.ok(Date.now() < deadline, `generation ${id} still not found`);
      await sleep(10);
    }
  }

  // The generation of a request that never got headers back, found by its unique model name.
  async function generationOfModel(model, deadlineMs = 3000) {
    const deadline = Date.now() + deadlineMs;
    for (;;) {
      const found = (await generationList()).find((g) => g.model === model);
      if (found) return found;
      assert.ok(Date.now() < deadline, `no generation for ${model}`);
      await sleep(10);
    }
  }

  // Reads a streamed body until `enough(text)` holds, then closes the connection like an aborting client.
  async function readThenCancel(res, enough) {
    const reader = res.body.getReader();
    let text = '';
    while (!enough(text)) {
      const { done, value } = await reader.read();
      assert.ok(!done, 'the stream ended before the client meant to cancel');
      text += Buffer.from(value).toString();
    }
    await reader.cancel();
    return text;
  }

  const contentFrames = (text) => (text.match(/"delta":\{/g) ?? []).length;

  // Resolves with what a stalled body delivered once nothing more arrived for `quietMs`.
  async function readUntilStalled(res, quietMs = 150) {
    const reader = res.body.getReader();
    let text = '';
    for (;;) {
      const next = await Promise.race([reader.read(), sleep(quietMs).then(() => 'stalled')]);
      if (next === 'stalled') break;
      assert.ok(!next.done, `the body ended: ${text}`);
      text += Buffer.from(next.value).toString();
    }
    await reader.cancel();
    return text;
  }

  before(async () => {
    server = await startStandin('openrouter.mjs');
  });
  after(() => server.stop());
  beforeEach(() => fetch(`${server.origin}/__standin/requests`, { method: 'DELETE' }));

  it('streams chunks in order, then finish, usage and [DONE]', async () => {
    const res = await chat({ model: 'openai/gpt-4o-mini', stream: true, messages, standin: {} });
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-type'), 'text/event-stream');
    assert.equal(res.headers.get('cache-control'), 'no-cache');
    const generationId = res.headers.get('x-generation-id');
    assert.match(generationId, /^gen-/);

    const frames = sseEvents(await res.text());
    assert.equal(frames[0], ': OPENROUTER PROCESSING');
    assert.equal(frames.at(-1), 'data: [DONE]');
    const chunks = frames.slice(1, -1).map((f) => JSON.parse(dataOf(f)));
    const content = chunks.slice(0, -2);
    const [finish, usage] = chunks.slice(-2);

    assert.equal(content.length, answerWords);
    assert.equal(content[0].choices[0].delta.role, 'assistant');
    assert.equal(content[1].choices[0].delta.role, undefined);
    assert.equal(content.map((c) => c.choices[0].delta.content).join(''), answer);
    for (const chunk of chunks) {
      assert.equal(chunk.id, generationId);
      assert.equal(chunk.object, 'chat.completion.chunk');
      assert.equal(chunk.model, 'openai/gpt-4o-mini');
      assert.equal(chunk.created, chunks[0].created);
    }
    assert.equal(finish.choices[0].finish_reason, 'stop');
    assert.equal(finish.choices[0].delta.content, '');
    assert.deepEqual(usage.choices, []);
    const promptTokens = Math.ceil(('Be brief.'.length + 'ping pong'.length) / 4);
    assert.equal(usage.usage.prompt_tokens, promptTokens);
    assert.equal(usage.usage.completion_tokens, answerWords);
    assert.equal(usage.usage.total_tokens, promptTokens + answerWords);
    assert.equal(usage.usage.cost, promptTokens * 0.000001 + answerWords * 0.000002);
    assert.equal(usage.usage.is_byok, false);
  });

  it('paces streams when the request carries no standin object', async () => {
    const started = Date.now();
    const frames = await streamFrames({ model: 'm', messages });
    assert.equal(frames.at(-1), 'data: [DONE]');
    assert.ok(Date.now() - started >= answerWords * 25 - 10, 'expected ~25 ms before each chunk');
  });

  it('honours standin.chunks and chunk_bytes', async () => {
    const res = await chat({ model: 'm', stream: true, messages, standin: { chunks: 20, chunk_bytes: 100 } });
    const frames = sseEvents(await res.text()).slice(1, -3);
    assert.equal(frames.length, 20);
    for (const frame of frames) {
      const size = JSON.parse(dataOf(frame)).choices[0].delta.content.length;
      assert.ok(size >= 90 && size <= 130, `chunk of ${size} bytes`);
    }
  });

  it('answers non-stream requests, taking the model from `models`', async () => {
    const res = await chat({
      models: ['anthropic/claude-3.5-sonnet'],
      messages: [
        {
          role: 'user',
          content: [{ type: 'text', text: 'ping' }, { type: 'image_url' }, { type: 'text', text: 'pong' }],
        },
      ],
      standin: {},
    });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('x-generation-id'), /^gen-/);
    const body = await res.json();
    assert.equal(body.object, 'chat.completion');
    assert.equal(body.model, 'anthropic/claude-3.5-sonnet');
    assert.equal(body.provider, 'StandIn');
    assert.equal(body.choices[0].message.role, 'assistant');
    assert.equal(body.choices[0].message.content, answer);
    assert.equal(body.choices[0].finish_reason, 'stop');
    assert.equal(body.usage.prompt_tokens, 2);
    assert.deepEqual(body.usage.prompt_tokens_details, { cached_tokens: 0, cache_write_tokens: 0 });
    assert.deepEqual(body.usage.completion_tokens_details, { reasoning_tokens: 0 });
  });

  it('stops at max_tokens with finish_reason "length"', async () => {
    const plain = await (await chat({ model: 'm', max_tokens: 3, messages, standin: {} })).json();
    assert.equal(plain.choices[0].message.content, 'Hello from the');
    assert.equal(plain.choices[0].finish_reason, 'length');
    assert.equal(plain.usage.completion_tokens, 3);

    const frames = await streamFrames({ model: 'm', max_tokens: 3, messages, standin: {} });
    assert.equal(frames.length, 1 + 3 + 3);
    assert.equal(JSON.parse(dataOf(frames.at(-3))).choices[0].finish_reason, 'length');
    assert.equal(JSON.parse(dataOf(frames.at(-2))).usage.completion_tokens, 3);
  });

  it('reports the finish reason standin.finish_reason names, streamed or not', async () => {
    const plain = await (await chat({ model: 'm', messages, standin: { finish_reason: 'error' } })).json();
    assert.equal(plain.choices[0].finish_reason, 'error');
    assert.equal(plain.choices[0].message.content, answer);
    const frames = await streamFrames({ model: 'm', messages, standin: { finish_reason: 'content_filter' } });
    assert.equal(JSON.parse(dataOf(frames.at(-3))).choices[0].finish_reason, 'content_filter');
    assert.equal(frames.at(-1), 'data: [DONE]');
  });

  it('returns OpenRouter errors with status, shape and Retry-After', async () => {
    const res = await chat({ model: 'm', stream: true, messages, standin: { scenario: 'error', retry_after: 7 } });
    assert.equal(res.status, 429);
    assert.equal(res.headers.get('retry-after'), '7');
    assert.match(res.headers.get('content-type'), /application\/json/);
    const body = await res.json();
    assert.equal(body.error.code, 429);
    assert.equal(typeof body.error.message, 'string');
    assert.deepEqual(body.error.metadata, { provider_name: 'StandIn' });

    const credits = await chat({ model: 'm', messages, standin: { scenario: 'error', status: 402 } });
    assert.equal(credits.status, 402);
    assert.equal(credits.headers.get('retry-after'), null);
    assert.equal((await credits.json()).error.code, 402);
  });

  it('ends a stream with the mid-stream error event', async () => {
    const standin = { scenario: 'midstream_error', after_chunks: 3 };
    const frames = await streamFrames({ model: 'm', messages, standin });
    assert.equal(frames.length, 1 + 3 + 1);
    const event = JSON.parse(dataOf(frames.at(-1)));
    assert.deepEqual(event.error, { code: 'server_error', message: 'Provider disconnected unexpectedly' });
    assert.equal(event.choices[0].finish_reason, 'error');
    assert.equal(event.choices[0].native_finish_reason, 'error');

    const plain = await chat({ model: 'm', messages, standin: { scenario: 'midstream_error' } });
    assert.equal(plain.status, 502);
    assert.equal((await plain.json()).error.code, 502);
  });

  it('sends garbage that is not JSON', async () => {
    const plain = await chat({ model: 'm', messages, standin: { scenario: 'garbage' } });
    assert.equal(plain.status, 200);
    assert.match(plain.headers.get('content-type'), /application\/json/);
    await assert.rejects(plain.json(), SyntaxError);

    const frames = await streamFrames({ model: 'm', messages, standin: { scenario: 'garbage' } });
    assert.equal(frames[3], 'data: {not json at all');
    assert.equal(frames.at(-1), 'data: [DONE]');
    assert.equal(frames.length, 1 + answerWords + 1 + 3);
  });

  it('drops the connection on "disconnect"', async () => {
    const standin = { scenario: 'disconnect', after_chunks: 1 };
    const res = await chat({ model: 'm', stream: true, messages, standin });
    assert.equal(res.status, 200);
    const reader = res.body.getReader();
    const received = [];
    let failure;
    try {
      for (let r = await reader.read(); !r.done; r = await reader.read()) received.push(Buffer.from(r.value));
    } catch (err) {
      failure = err;
    }
    assert.ok(failure, 'the client should see the connection drop, not a clean end');
    const text = Buffer.concat(received).toString();
    assert.match(text, /"content":"Hello "/);
    assert.doesNotMatch(text, /\[DONE\]/);

    await assert.rejects(chat({ model: 'm', messages, standin: { scenario: 'disconnect' } }));
  });

  it('counts streams the client abandons', async () => {
    const before = await (await fetch(`${server.origin}/__standin/stats`)).json();
    const res = await chat({ model: 'm', stream: true, messages, standin: { delay_ms: 50 } });
    const reader = res.body.getReader();
    await reader.read();
    await reader.cancel();
    await sleep(100);
    const afterStats = await (await fetch(`${server.origin}/__standin/stats`)).json();
    assert.equal(afterStats.aborted_streams, before.aborted_streams + 1);
    assert.ok(afterStats.chat_completions > before.chat_completions);
  });

  it('serves /models without auth, one entry unpriced and one with a per-request fee', async () => {
    const res = await fetch(`${server.url}/models`);
    assert.equal(res.status, 200);
    const { data } = await res.json();
    assert.deepEqual(
      data.map((m) => m.id),
      [
        'openai/gpt-4o-mini',
        'anthropic/claude-3.5-sonnet',
        'meta-llama/llama-3.1-8b-instruct',
        'standin/unpriced',
        'standin/per-request',
      ],
    );
    for (const model of data) {
      assert.equal(model.canonical_slug, model.id);
      assert.equal(typeof model.context_length, 'number');
      assert.deepEqual(model.architecture.input_modalities, ['text']);
      assert.equal(model.top_provider.is_moderated, false);
      assert.ok(model.supported_parameters.includes('max_tokens'));
      if (model.id === 'standin/unpriced') {
        assert.equal('pricing' in model, false);
        continue;
      }
      assert.equal(model.pricing.prompt, '0.000001');
      assert.equal(model.pricing.completion, '0.000002');
      assert.equal(model.pricing.request, model.id === 'standin/per-request' ? '0.0005' : '0');
    }
  });

  it('lists embedding models apart, priced as embeddings are charged', async () => {
    const before = (await (await fetch(`${server.origin}/__standin/stats`)).json()).embedding_models;
    const { data } = await (await fetch(`${server.url}/embeddings/models`)).json();
    assert.deepEqual(data.map((m) => m.id), ['openai/text-embedding-3-small']);
    assert.deepEqual(data[0].architecture.output_modalities, ['embeddings']);
    assert.equal(data[0].pricing.prompt, '0.000001');
    assert.equal(data[0].pricing.completion, '0');
    const after = (await (await fetch(`${server.origin}/__standin/stats`)).json()).embedding_models;
    assert.equal(after, before + 1);
  });

  it('records requests and clears them', async () => {
    await chat({ model: 'm', messages, standin: { note: 'recorded' } });
    await fetch(`${server.url}/models`);
    const { requests } = await (await fetch(`${server.origin}/__standin/requests`)).json();
    assert.equal(requests.length, 2);
    assert.equal(requests[0].method, 'POST');
    assert.equal(requests[0].path, '/api/v1/chat/completions');
    assert.equal(requests[0].headers.authorization, 'Bearer sk-or-test');
    assert.equal(requests[0].body.standin.note, 'recorded');
    assert.deepEqual(JSON.parse(requests[0].raw_body), requests[0].body);
    assert.equal(typeof requests[0].received_at, 'number');
    assert.equal(requests[1].path, '/api/v1/models');
    assert.equal(requests[1].body, null);

    assert.equal((await fetch(`${server.origin}/__standin/requests`, { method: 'DELETE' })).status, 204);
    assert.deepEqual((await (await fetch(`${server.origin}/__standin/requests`)).json()).requests, []);
  });

  it('rejects missing auth and malformed JSON', async () => {
    const unauthorized = await chat({ model: 'm', messages }, { 'Content-Type': 'application/json' });
    assert.equal(unauthorized.status, 401);
    assert.equal((await unauthorized.json()).error.code, 401);

    const malformed = await chat('{"model":', AUTH);
    assert.equal(malformed.status, 400);
    assert.deepEqual(await malformed.json(), { error: { code: 400, message: 'Invalid JSON' } });
  });

  it('GET /generation wants auth and an id, and 404s unknown ids', async () => {
    const before = await stats();
    const anonymous = await generation('gen-1', {});
    assert.equal(anonymous.status, 401);
    assert.equal((await anonymous.json()).error.code, 401);
    const noId = await generation(undefined);
    assert.equal(noId.status, 400);
    assert.equal((await noId.json()).error.code, 400);
    const unknown = await generation('gen-does-not-exist');
    assert.equal(unknown.status, 404);
    assert.match(unknown.headers.get('content-type'), /application\/json/);
    assert.deepEqual(await unknown.json(), { error: { code: 404, message: 'Generation not found' } });

    const res = await chat({ model: 'm', messages, standin: { generation_lag_ms: 0 } });
    await res.json();
    assert.equal((await generation(res.headers.get('x-generation-id'))).status, 200);
    const after = await stats();
    assert.equal(after.generation_lookups, before.generation_lookups + 4);
    assert.equal(after.generation_found, before.generation_found + 1);
    assert.equal(after.generation_not_found, before.generation_not_found + 1);
    assert.equal(after.generation_failed, before.generation_failed);
  });

  it('keeps a generation 404 while it runs and until the lag has passed after its end', async () => {
    const started = Date.now();
    const res = await chat({ model: 'm', messages, standin: { generation_lag_ms: 300 } });
    await res.json();
    const id = res.headers.get('x-generation-id');
    assert.equal((await generation(id)).status, 404);
    await pollGeneration(id);
    assert.ok(Date.now() - started >= 290, `visible after ${Date.now() - started} ms`);

    // The default lag (1500 ms) hides a fresh generation too.
    const plain = await chat({ model: 'm', messages, standin: {} });
    await plain.json();
    const fresh = plain.headers.get('x-generation-id');
    assert.equal((await generation(fresh)).status, 404);
    assert.equal((await generationList()).find((g) => g.id === fresh).lag_ms, 1500);

    // A request that hangs has no end yet, so no lag can start; when the client gives up it is a cancel.
    const model = `hang/${Math.random()}`;
    const aborter = new AbortController();
    const pending = fetch(`${server.url}/chat/completions`, {
      method: 'POST',
      headers: AUTH,
      body: JSON.stringify({ model, messages, standin: { scenario: 'hang', generation_lag_ms: 0 } }),
      signal: aborter.signal,
    }).catch((err) => err);
    const running = await generationOfModel(model);
    assert.equal(running.ended, false);
    await sleep(50);
    assert.equal((await generation(running.id)).status, 404);
    aborter.abort();
    await pending;
    const hungUp = await pollGeneration(running.id);
    assert.equal(hungUp.cancelled, true);
    assert.equal(hungUp.tokens_completion, 0);
    assert.equal(hungUp.finish_reason, null);
  });

  it('records a completed stream with the counts and shape OpenRouter uses', async () => {
    const res = await chat({ model: 'openai/gpt-4o-mini', stream: true, messages, standin: { generation_lag_ms: 0 } });
    const frames = sseEvents(await res.text());
    const usage = JSON.parse(dataOf(frames.at(-2))).usage;
    const data = await pollGeneration(res.headers.get('x-generation-id'));
    assert.deepEqual(Object.keys(data), [
      'id',
      'upstream_id',
      'total_cost',
      'cache_discount',
      'upstream_inference_cost',
      'created_at',
      'model',
      'app_id',
      'streamed',
      'cancelled',
      'provider_name',
      'latency',
      'moderation_latency',
      'generation_time',
      'finish_reason',
      'native_finish_reason',
      'tokens_prompt',
      'tokens_completion',
      'native_tokens_prompt',
      'native_tokens_completion',
      'native_tokens_reasoning',
      'native_tokens_cached',
      'num_media_prompt',
      'num_media_completion',
      'num_search_results',
      'origin',
      'usage',
      'is_byok',
      'api_type',
    ]);
    assert.equal(data.api_type, 'completions');
    assert.equal(data.id, res.headers.get('x-generation-id'));
    assert.equal(typeof data.upstream_id, 'string');
    assert.equal(data.model, 'openai/gpt-4o-mini');
    assert.equal(data.streamed, true);
    assert.equal(data.cancelled, false);
    assert.equal(data.provider_name, 'StandIn');
    assert.equal(data.finish_reason, 'stop');
    assert.equal(data.native_finish_reason, 'stop');
    assert.equal(data.tokens_prompt, usage.prompt_tokens);
    assert.equal(data.tokens_completion, usage.completion_tokens);
    assert.equal(data.tokens_completion, answerWords);
    assert.equal(data.native_tokens_prompt, promptTokens);
    assert.equal(data.native_tokens_completion, answerWords);
    assert.equal(data.native_tokens_reasoning, 0);
    assert.equal(data.native_tokens_cached, 0);
    assert.equal(data.total_cost, usage.cost);
    assert.equal(data.usage, usage.cost);
    assert.equal(data.upstream_inference_cost, usage.cost);
    assert.equal(data.is_byok, false);
    assert.equal(data.cache_discount, null);
    assert.equal(data.app_id, null);
    assert.equal(data.origin, '');
    assert.match(data.created_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$/);
    assert.ok(Math.abs(Date.parse(data.created_at) - Date.now()) < 60_000);
    assert.ok(Number.isInteger(data.latency) && Number.isInteger(data.generation_time));
    assert.ok(data.generation_time >= data.latency);
  });

  it('counts only what a cancelled stream wrote before the client closed it', async () => {
    const chunks = 40;
    const res = await chat({
      model: 'm',
      stream: true,
      messages,
      standin: { chunks, delay_ms: 10, generation_lag_ms: 0 },
    });
    const received = await readThenCancel(res, (text) => contentFrames(text) >= 3);
    const data = await pollGeneration(res.headers.get('x-generation-id'));
    assert.equal(data.cancelled, true);
    assert.equal(data.finish_reason, null);
    assert.equal(data.streamed, true);
    assert.ok(data.tokens_completion >= contentFrames(received), `${data.tokens_completion} tokens`);
    assert.ok(data.tokens_completion > 0 && data.tokens_completion < chunks, `${data.tokens_completion} tokens`);
    assert.equal(data.tokens_prompt, promptTokens);
    assert.equal(data.total_cost, promptTokens * 0.000001 + data.tokens_completion * 0.000002);
  });

  it('records a non-streamed answer, and none for errors answered before any token', async () => {
    const res = await chat({ model: 'm', messages, max_tokens: 4, standin: { generation_lag_ms: 0 } });
    const body = await res.json();
    const data = await pollGeneration(body.id);
    assert.equal(data.streamed, false);
    assert.equal(data.cancelled, false);
    assert.equal(data.finish_reason, 'length');
    assert.equal(data.tokens_completion, 4);
    assert.equal(data.tokens_prompt, body.usage.prompt_tokens);
    assert.equal(data.total_cost, body.usage.cost);

    const failed = [
      await chat({ model: 'm', messages, standin: { scenario: 'error', status: 503, generation_lag_ms: 0 } }),
      await chat({ model: 'm', messages, standin: { scenario: 'midstream_error', generation_lag_ms: 0 } }),
      await chat({ model: 'm', standin: { generation_lag_ms: 0 } }),
      await chat('{"model":'),
    ];
    await sleep(20);
    const recorded = new Set((await generationList()).map((g) => g.id));
    for (const res of failed) {
      assert.ok(res.status >= 400);
      await res.arrayBuffer();
      const id = res.headers.get('x-generation-id');
      assert.match(id, /^gen-/);
      assert.equal(recorded.has(id), false);
      assert.equal((await generation(id)).status, 404);
    }
  });

  it('ends generations the stand-in cut itself, not as cancels', async () => {
    const cut = await chat({
      model: 'm',
      stream: true,
      messages,
      standin: { scenario: 'disconnect', after_chunks: 2, generation_lag_ms: 0 },
    });
    await assert.rejects(cut.text());
    const cutData = await pollGeneration(cut.headers.get('x-generation-id'));
    assert.equal(cutData.cancelled, false);
    assert.equal(cutData.finish_reason, null);
    assert.equal(cutData.tokens_completion, 2);

    const failing = await chat({
      model: 'm',
      stream: true,
      messages,
      standin: { scenario: 'midstream_error', after_chunks: 3, generation_lag_ms: 0 },
    });
    await failing.text();
    const failingData = await pollGeneration(failing.headers.get('x-generation-id'));
    assert.equal(failingData.finish_reason, 'error');
    assert.equal(failingData.cancelled, false);
    assert.equal(failingData.tokens_completion, 3);

    const model = `disconnect/${Math.random()}`;
    await assert.rejects(chat({ model, messages, standin: { scenario: 'disconnect', generation_lag_ms: 0 } }));
    const plain = await generationOfModel(model);
    assert.equal(plain.ended, true);
    assert.equal(plain.cancelled, false);
    assert.equal(plain.tokens_completion, 0);
  });

  it('stall_body sends headers and half a JSON body, then nothing', async () => {
    const res = await chat({ model: 'm', messages, standin: { scenario: 'stall_body', generation_lag_ms: 0 } });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type'), /application\/json/);
    const length = Number(res.headers.get('content-length'));
    const received = await readUntilStalled(res);
    assert.ok(received.length > 0 && received.length < length, `${received.length} of ${length} bytes`);
    assert.ok(received.startsWith('{"id":"gen-'), received);
    // The answer was generated before its first byte, so the generation is complete, not cancelled.
    const data = await pollGeneration(res.headers.get('x-generation-id'));
    assert.equal(data.cancelled, false);
    assert.equal(data.tokens_completion, answerWords);

    const frames = await streamFrames({ model: 'm', messages, standin: { scenario: 'stall_body' } });
    assert.equal(frames.at(-1), 'data: [DONE]');
  });

  it('pads error bodies to error_body_bytes and can stall them', async () => {
    const padded = await chat({
      model: 'm',
      messages,
      standin: { scenario: 'error', status: 502, error_body_bytes: 20_000 },
    });
    assert.equal(padded.status, 502);
    const text = await padded.text();
    assert.equal(Buffer.byteLength(text), 20_000);
    const { error } = JSON.parse(text);
    assert.equal(error.code, 502);
    assert.equal(error.metadata.provider_name, 'StandIn');
    assert.ok(error.metadata.raw.length > 19_000);

    const stalled = await chat({
      model: 'm',
      messages,
      standin: { scenario: 'error', status: 429, retry_after: 2, stall_error_body: true },
    });
    assert.equal(stalled.status, 429);
    assert.equal(stalled.headers.get('retry-after'), '2');
    const length = Number(stalled.headers.get('content-length'));
    const received = await readUntilStalled(stalled);
    assert.ok(received.length > 0 && received.length < length, `${received.length} of ${length} bytes`);
    assert.ok(received.startsWith('{"error":{"code":429'), received);
  });

  it('merges usage_override over the wire usage only', async () => {
    const standin = { usage_override: { prompt_tokens: 1e30, cost: -1 }, generation_lag_ms: 0 };
    const body = await (await chat({ model: 'm', messages, standin })).json();
    assert.equal(body.usage.prompt_tokens, 1e30);
    assert.equal(body.usage.cost, -1);
    assert.equal(body.usage.completion_tokens, answerWords);
    assert.deepEqual(body.usage.completion_tokens_details, { reasoning_tokens: 0 });

    const chunks = await streamChunks({ model: 'm', messages, standin });
    const usage = chunks.at(-1).usage;
    assert.equal(usage.prompt_tokens, 1e30);
    assert.equal(usage.cost, -1);

    const data = await pollGeneration(body.id);
    assert.equal(data.tokens_prompt, promptTokens);
    assert.equal(data.total_cost, promptTokens * 0.000001 + answerWords * 0.000002);
  });

  it('streams reasoning deltas before the content and counts them as completion tokens', async () => {
    const standin = { reasoning_chunks: 4, generation_lag_ms: 0 };
    const chunks = await streamChunks({ model: 'm', messages, standin });
    const deltas = chunks.slice(0, -2).map((c) => c.choices[0].delta);
    const thinking = deltas.slice(0, 4);
    for (const delta of thinking) {
      assert.equal(delta.content, null);
      assert.equal(typeof delta.reasoning, 'string');
    }
    assert.equal(thinking[0].role, 'assistant');
    assert.equal(deltas[4].role, undefined);
    assert.equal(thinking.map((d) => d.reasoning).join(''), reasoning);
    assert.equal(deltas.slice(4).map((d) => d.content).join(''), answer);
    const { usage } = chunks.at(-1);
    assert.equal(usage.completion_tokens, answerWords + reasoningWords);
    assert.equal(usage.completion_tokens_details.reasoning_tokens, reasoningWords);
    const streamed = await pollGeneration(chunks[0].id);
    assert.equal(streamed.tokens_completion, answerWords + reasoningWords);
    assert.equal(streamed.native_tokens_reasoning, reasoningWords);

    const body = await (await chat({ model: 'm', messages, standin })).json();
    assert.equal(body.choices[0].message.reasoning, reasoning);
    assert.equal(body.choices[0].message.content, answer);
    assert.equal(body.usage.completion_tokens, answerWords + reasoningWords);
    assert.equal(body.usage.completion_tokens_details.reasoning_tokens, reasoningWords);
  });

  it('answers with a tool call, streamed in argument fragments', async () => {
    const args = '{"location":"Paris, France","unit":"celsius"}';
    const tokens = Math.ceil(args.length / 4);
    const standin = { tool_call: { name: 'get_weather', arguments: args }, generation_lag_ms: 0 };
    const chunks = await streamChunks({ model: 'm', messages, standin });
    const [head, ...fragments] = chunks.slice(0, -2).map((c) => c.choices[0].delta);
    assert.equal(head.role, 'assistant');
    assert.equal(head.content, null);
    assert.equal(head.tool_calls.length, 1);
    const call = head.tool_calls[0];
    assert.equal(call.index, 0);
    assert.match(call.id, /^call_/);
    assert.equal(call.type, 'function');
    assert.deepEqual(call.function, { name: 'get_weather', arguments: '' });
    assert.ok(fragments.length > 1);
    for (const delta of fragments) {
      assert.equal(delta.tool_calls[0].index, 0);
      assert.equal(delta.tool_calls[0].id, undefined);
      assert.ok(delta.tool_calls[0].function.arguments.length <= 4);
    }
    assert.equal(fragments.map((d) => d.tool_calls[0].function.arguments).join(''), args);
    const finish = chunks.at(-2).choices[0];
    assert.equal(finish.finish_reason, 'tool_calls');
    assert.equal(chunks.at(-1).usage.completion_tokens, tokens);
    assert.equal((await pollGeneration(chunks[0].id)).tokens_completion, tokens);

    const body = await (await chat({ model: 'm', messages, standin })).json();
    const { message } = body.choices[0];
    assert.equal(message.content, null);
    assert.equal(body.choices[0].finish_reason, 'tool_calls');
    assert.equal(message.tool_calls.length, 1);
    assert.match(message.tool_calls[0].id, /^call_/);
    assert.equal(message.tool_calls[0].type, 'function');
    assert.deepEqual(message.tool_calls[0].function, { name: 'get_weather', arguments: args });
    assert.equal(body.usage.completion_tokens, tokens);

    // A cancelled call counts ceil(chars / 4) of the fragments that were written.
    const long = JSON.stringify({ text: 'x'.repeat(400) });
    const res = await chat({
      model: 'm',
      stream: true,
      messages,
      standin: { tool_call: { name: 'echo', arguments: long }, delay_ms: 10, generation_lag_ms: 0 },
    });
    const received = await readThenCancel(res, (text) => contentFrames(text) >= 4);
    const data = await pollGeneration(res.headers.get('x-generation-id'));
    assert.equal(data.cancelled, true);
    assert.ok(data.tokens_completion >= contentFrames(received) - 1);
    assert.ok(data.tokens_completion > 0 && data.tokens_completion < Math.ceil(long.length / 4));
  });

  it('serves n choices, interleaved in streams, with usage for all of them', async () => {
    const body = await (await chat({ model: 'm', n: 2, messages, standin: { generation_lag_ms: 0 } })).json();
    assert.deepEqual(body.choices.map((c) => c.index), [0, 1]);
    for (const choice of body.choices) {
      assert.equal(choice.message.content, answer);
      assert.equal(choice.finish_reason, 'stop');
    }
    assert.equal(body.usage.completion_tokens, 2 * answerWords);
    assert.equal(body.usage.prompt_tokens, promptTokens);
    assert.equal((await pollGeneration(body.id)).tokens_completion, 2 * answerWords);

    const chunks = await streamChunks({ model: 'm', n: 3, messages, standin: {} });
    const content = chunks.slice(0, -4);
    assert.deepEqual(
      content.slice(0, 6).map((c) => c.choices[0].index),
      [0, 1, 2, 0, 1, 2],
    );
    for (const index of [0, 1, 2]) {
      const mine = content.filter((c) => c.choices[0].index === index).map((c) => c.choices[0].delta);
      assert.equal(mine.map((d) => d.content).join(''), answer);
      assert.equal(mine[0].role, 'assistant');
      assert.ok(mine.slice(1).every((d) => d.role === undefined));
    }
    const finishes = chunks.slice(-4, -1).map((c) => c.choices[0]);
    assert.deepEqual(finishes.map((c) => [c.index, c.finish_reason]), [
      [0, 'stop'],
      [1, 'stop'],
      [2, 'stop'],
    ]);
    assert.equal(chunks.at(-1).usage.completion_tokens, 3 * answerWords);
  });

  // --- Responses, embeddings and legacy completions --------------------------------------------------------

  const post = (endpoint, body, headers = AUTH) =>
    fetch(`${server.url}/${endpoint}`, {
      method: 'POST',
      headers,
      body: typeof body === 'string' ? body : JSON.stringify(body),
    });
  const postJson = async (endpoint, body) => (await post(endpoint, body)).json();
  const postFrames = async (endpoint, body) => sseEvents(await (await post(endpoint, body)).text());
  const cost = (prompt, completion) => prompt * 0.000001 + completion * 0.000002;
  const finished = (text, index, reason) => ({
    text,
    index,
    logprobs: null,
    finish_reason: reason,
    native_finish_reason: reason,
  });

  // A Responses stream's frames after the comment: {event (the `event:` line, if any), data (parsed, or the raw
  // text when it is not JSON)}.
  async function typedEvents(res) {
    const frames = sseEvents(await res.text());
    assert.equal(frames[0], ': OPENROUTER PROCESSING');
    return frames.slice(1).map((frame) => {
      const lines = frame.split('\n');
      const event = lines.find((l) => l.startsWith('event: '))?.slice('event: '.length);
      const raw = dataOf(lines.find((l) => l.startsWith('data: ')));
      return { event, data: parseOr(raw) };
    });
  }
  const parseOr = (text) => {
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  };
  const typesOf = (events) => events.map((e) => (typeof e.data === 'string' ? e.data : e.data.type));
  const responseEventTypes = (deltas, end = 'response.completed') => [
    'response.created',
    'response.in_progress',
    'response.output_item.added',
    'response.content_part.added',
    ...new Array(deltas).fill('response.output_text.delta'),
    'response.output_text.done',
    'response.content_part.done',
    'response.output_item.done',
    end,
    '[DONE]',
  ];

  // Reads a body the stand-in resets: what arrived, and that it ended in an error rather than cleanly.
  async function readUntilReset(res) {
    const reader = res.body.getReader();
    const received = [];
    let failure;
    try {
      for (let r = await reader.read(); !r.done; r = await reader.read()) received.push(Buffer.from(r.value));
    } catch (err) {
      failure = err;
    }
    assert.ok(failure, 'the client should see the connection drop, not a clean end');
    return Buffer.concat(received).toString();
  }

  const responsesInput = [
    { type: 'function_call_output', call_id: 'call_1', output: 'sunny' },
    { type: 'message', role: 'user', content: [{ type: 'input_text', text: 'ping pong' }] },
  ];
  // 'Be brief.' + 'sunny' + 'ping pong' code points.
  const responsesPromptTokens = Math.ceil((9 + 5 + 9) / 4);

  it('answers /responses non-streamed in OpenAI\'s shape, with usage, cost and a generation', async () => {
    const tools = [{ type: 'function', name: 'get_weather', parameters: { type: 'object' } }];
    const res = await post('responses', {
      model: 'openai/gpt-4o-mini',
      instructions: 'Be brief.',
      input: responsesInput,
      tools,
      standin: { generation_lag_ms: 0 },
    });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type'), /application\/json/);
    const body = await res.json();
    assert.equal(body.id, res.headers.get('x-generation-id'));
    assert.match(body.id, /^gen-/);
    assert.equal(body.object, 'response');
    assert.ok(Number.isInteger(body.created_at) && Number.isInteger(body.completed_at));
    assert.equal(body.model, 'openai/gpt-4o-mini');
    assert.equal(body.status, 'completed');
    assert.equal(body.incomplete_details, null);
    assert.equal(body.error, null);
    assert.equal(body.instructions, 'Be brief.');
    assert.equal(body.max_output_tokens, null);
    assert.equal(body.parallel_tool_calls, true);
    assert.deepEqual(body.tools, tools);
    assert.equal(body.temperature, null);
    assert.equal(body.top_p, null);
    assert.deepEqual(body.text, { format: { type: 'text' } });
    assert.equal(body.output.length, 1);
    const [message] = body.output;
    assert.match(message.id, /^msg_/);
    assert.deepEqual(message, {
      type: 'message',
      id: message.id,
      status: 'completed',
      role: 'assistant',
      content: [{ type: 'output_text', text: answer, annotations: [] }],
    });
    assert.deepEqual(body.usage, {
      input_tokens: responsesPromptTokens,
      input_tokens_details: { cached_tokens: 0 },
      output_tokens: answerWords,
      output_tokens_details: { reasoning_tokens: 0 },
      total_tokens: responsesPromptTokens + answerWords,
      cost: cost(responsesPromptTokens, answerWords),
      is_byok: false,
    });
    const data = await pollGeneration(body.id);
    assert.equal(data.api_type, 'completions');
    assert.equal(data.streamed, false);
    assert.equal(data.finish_reason, 'stop');
    assert.equal(data.tokens_prompt, responsesPromptTokens);
    assert.equal(data.tokens_completion, answerWords);
    assert.equal(data.total_cost, body.usage.cost);

    // A string input is the user's text; usage_override merges over the wire usage only.
    const plain = await post('responses', {
      model: 'm',
      input: 'ping pong',
      standin: { usage_override: { input_tokens: 1e30, cost: -1 }, generation_lag_ms: 0 },
    });
    const plainBody = await plain.json();
    assert.equal(plainBody.output[0].content[0].text, answer);
    assert.equal(plainBody.instructions, null);
    assert.equal(plainBody.usage.input_tokens, 1e30);
    assert.equal(plainBody.usage.cost, -1);
    assert.equal(plainBody.usage.output_tokens, answerWords);
    assert.equal((await pollGeneration(plainBody.id)).tokens_prompt, Math.ceil(9 / 4));
  });

  it('streams /responses as numbered typed events, then [DONE]', async () => {
    const res = await post('responses', {
      model: 'openai/gpt-4o-mini',
      instructions: 'Be brief.',
      input: responsesInput,
      stream: true,
      standin: { generation_lag_ms: 0 },
    });
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-type'), 'text/event-stream');
    const id = res.headers.get('x-generation-id');
    const events = await typedEvents(res);
    assert.deepEqual(typesOf(events), responseEventTypes(answerWords));
    assert.equal(events.at(-1).event, undefined, 'the [DONE] sentinel is data only');
    const typed = events.slice(0, -1).map((e) => e.data);
    typed.forEach((data, i) => {
      assert.equal(data.sequence_number, i);
      assert.equal(events[i].event, data.type, 'the event line names the type');
    });

    const [created, inProgress, added, partAdded] = typed;
    for (const { response } of [created, inProgress]) {
      assert.equal(response.id, id);
      assert.equal(response.object, 'response');
      assert.equal(response.status, 'in_progress');
      assert.deepEqual(response.output, []);
      assert.equal(response.usage, null);
      assert.equal(response.completed_at, null);
    }
    const itemId = added.item.id;
    assert.deepEqual(added, {
      type: 'response.output_item.added',
      sequence_number: 2,
      output_index: 0,
      item: { type: 'message', id: itemId, status: 'in_progress', role: 'assistant', content: [] },
    });
    assert.deepEqual(partAdded, {
      type: 'response.content_part.added',
      sequence_number: 3,
      item_id: itemId,
      output_index: 0,
      content_index: 0,
      part: { type: 'output_text', text: '', annotations: [] },
    });
    const deltas = typed.filter((d) => d.type === 'response.output_text.delta');
    for (const delta of deltas) {
      assert.deepEqual(Object.keys(delta), [
        'type',
        'sequence_number',
        'item_id',
        'output_index',
        'content_index',
        'delta',
        'logprobs',
      ]);
      assert.equal(delta.item_id, itemId);
      assert.deepEqual(delta.logprobs, []);
    }
    assert.equal(deltas.map((d) => d.delta).join(''), answer);
    const [textDone, partDone, itemDone, completed] = typed.slice(-4);
    assert.equal(textDone.text, answer);
    assert.deepEqual(textDone.logprobs, []);
    assert.deepEqual(partDone.part, { type: 'output_text', text: answer, annotations: [] });
    assert.equal(itemDone.item.status, 'completed');
    assert.deepEqual(itemDone.item.content, [{ type: 'output_text', text: answer, annotations: [] }]);
    assert.equal(completed.response.status, 'completed');
    assert.deepEqual(completed.response.output, [itemDone.item]);
    assert.equal(completed.response.usage.input_tokens, responsesPromptTokens);
    assert.equal(completed.response.usage.output_tokens, answerWords);
    assert.equal(completed.response.usage.cost, cost(responsesPromptTokens, answerWords));
    const data = await pollGeneration(id);
    assert.equal(data.streamed, true);
    assert.equal(data.tokens_completion, answerWords);
    assert.equal(data.total_cost, completed.response.usage.cost);

    // chunks shape the deltas; event_lines: false sends data-only events.
    const input = 'ping pong';
    const standin = { chunks: 3, event_lines: false };
    const shaped = await typedEvents(await post('responses', { model: 'm', input, stream: true, standin }));
    assert.deepEqual(typesOf(shaped), responseEventTypes(3));
    assert.ok(shaped.every((e) => e.event === undefined));
  });

  it('stops /responses at max_output_tokens with status "incomplete"', async () => {
    const capped = { model: 'm', input: 'ping pong', max_output_tokens: 3 };
    const body = await postJson('responses', { ...capped, standin: { generation_lag_ms: 0 } });
    assert.equal(body.status, 'incomplete');
    assert.deepEqual(body.incomplete_details, { reason: 'max_output_tokens' });
    assert.equal(body.max_output_tokens, 3);
    assert.equal(body.output[0].status, 'incomplete');
    assert.equal(body.output[0].content[0].text, 'Hello from the');
    assert.equal(body.usage.output_tokens, 3);
    const data = await pollGeneration(body.id);
    assert.equal(data.finish_reason, 'length');
    assert.equal(data.tokens_completion, 3);

    const events = await typedEvents(await post('responses', { ...capped, stream: true, standin: {} }));
    assert.deepEqual(typesOf(events), responseEventTypes(3, 'response.incomplete'));
    const { response } = events.at(-2).data;
    assert.equal(response.status, 'incomplete');
    assert.deepEqual(response.incomplete_details, { reason: 'max_output_tokens' });
    assert.equal(response.output[0].content[0].text, 'Hello from the');
    assert.equal(response.usage.output_tokens, 3);
  });

  it('streams a /responses reasoning item and function call', async () => {
    const args = '{"location":"Paris, France","unit":"celsius"}';
    const tokens = Math.ceil(args.length / 4);
    const standin = { reasoning_chunks: 2, tool_call: { name: 'get_weather', arguments: args }, generation_lag_ms: 0 };
    const request = { model: 'm', input: 'ping pong', standin };
    const events = await typedEvents(await post('responses', { ...request, stream: true }));
    const typed = events.slice(0, -1).map((e) => e.data);
    typed.forEach((data, i) => assert.equal(data.sequence_number, i));
    const fragments = typed.filter((d) => d.type === 'response.function_call_arguments.delta');
    assert.deepEqual(typesOf(events), [
      'response.created',
      'response.in_progress',
      'response.output_item.added',
      'response.content_part.added',
      'response.reasoning_text.delta',
      'response.reasoning_text.delta',
      'response.reasoning_text.done',
      'response.content_part.done',
      'response.output_item.done',
      'response.output_item.added',
      ...fragments.map(() => 'response.function_call_arguments.delta'),
      'response.function_call_arguments.done',
      'response.output_item.done',
      'response.completed',
      '[DONE]',
    ]);
    const reasoningDeltas = typed.filter((d) => d.type === 'response.reasoning_text.delta');
    assert.equal(reasoningDeltas.map((d) => d.delta).join(''), reasoning);
    const call = typed.find((d) => d.type === 'response.output_item.added' && d.output_index === 1).item;
    assert.match(call.id, /^fc_/);
    assert.match(call.call_id, /^call_/);
    assert.deepEqual(call, {
      type: 'function_call',
      id: call.id,
      call_id: call.call_id,
      name: 'get_weather',
      arguments: '',
      status: 'in_progress',
    });
    for (const fragment of fragments) {
      assert.equal(fragment.item_id, call.id);
      assert.equal(fragment.output_index, 1);
    }
    assert.equal(fragments.map((d) => d.delta).join(''), args);
    const argsDone = typed.find((d) => d.type === 'response.function_call_arguments.done');
    assert.deepEqual([argsDone.name, argsDone.arguments], ['get_weather', args]);
    const { response } = typed.at(-1);
    assert.deepEqual(
      response.output.map((item) => [item.type, item.status]),
      [
        ['reasoning', 'completed'],
        ['function_call', 'completed'],
      ],
    );
    assert.deepEqual(response.output[0].content, [{ type: 'reasoning_text', text: reasoning }]);
    assert.equal(response.output[1].arguments, args);
    assert.equal(response.usage.output_tokens, reasoningWords + tokens);
    assert.equal(response.usage.output_tokens_details.reasoning_tokens, reasoningWords);
    const data = await pollGeneration(response.id);
    assert.equal(data.tokens_completion, reasoningWords + tokens);
    assert.equal(data.native_tokens_reasoning, reasoningWords);

    // Non-streamed: the same items (their ids are the response's own).
    const body = await postJson('responses', request);
    assert.equal(body.status, 'completed');
    const withoutIds = (items) => items.map(({ id, call_id, ...item }) => item);
    assert.deepEqual(withoutIds(body.output), withoutIds(response.output));
    assert.match(body.output[0].id, /^rs_/);
    assert.match(body.output[1].id, /^fc_/);
  });

  it('fails /responses the way OpenRouter does', async () => {
    const input = 'ping pong';
    const missing = await post('responses', { model: 'm', standin: {} });
    assert.equal(missing.status, 400);
    assert.deepEqual(await missing.json(), { error: { code: 400, message: 'Input required: specify "input"' } });
    for (const refused of [{ store: true }, { previous_response_id: 'resp_1' }]) {
      const res = await post('responses', { model: 'm', input, ...refused });
      assert.equal(res.status, 400);
      assert.equal((await res.json()).error.code, 400);
    }

    // `error`: the status and OpenRouter's error body before any event, and no generation.
    const standin = { scenario: 'error', status: 503, retry_after: 3 };
    const failed = await post('responses', { model: 'm', input, stream: true, standin });
    assert.equal(failed.status, 503);
    assert.equal(failed.headers.get('retry-after'), '3');
    assert.deepEqual((await failed.json()).error, {
      code: 503,
      message: 'No available model provider that meets your routing requirements',
      metadata: { provider_name: 'StandIn' },
    });
    await sleep(20);
    assert.equal((await generationList()).some((g) => g.id === failed.headers.get('x-generation-id')), false);

    // midstream_error: response.failed after after_chunks deltas, then the end (no [DONE]).
    const cut = await post('responses', {
      model: 'm',
      input,
      stream: true,
      standin: { scenario: 'midstream_error', after_chunks: 3, generation_lag_ms: 0 },
    });
    const cutEvents = await typedEvents(cut);
    assert.deepEqual(typesOf(cutEvents), [...responseEventTypes(3).slice(0, 7), 'response.failed']);
    const failure = cutEvents.at(-1).data;
    assert.equal(cutEvents.at(-1).event, 'response.failed');
    assert.equal(failure.sequence_number, 7);
    assert.equal(failure.response.status, 'failed');
    assert.deepEqual(failure.response.error, { code: 'server_error', message: 'Provider disconnected unexpectedly' });
    assert.equal(failure.response.error_type, 'server');
    assert.equal(failure.response.usage, null);
    const cutData = await pollGeneration(cut.headers.get('x-generation-id'));
    assert.equal(cutData.finish_reason, 'error');
    assert.equal(cutData.tokens_completion, 3);

    // error_event "error": OpenAI's flat error event instead.
    const flatStandin = { scenario: 'midstream_error', error_event: 'error' };
    const flat = await typedEvents(await post('responses', { model: 'm', input, stream: true, standin: flatStandin }));
    assert.equal(flat.at(-1).event, 'error');
    assert.deepEqual(flat.at(-1).data, {
      type: 'error',
      sequence_number: 6,
      code: 'server_error',
      message: 'Provider disconnected unexpectedly',
      param: null,
    });

    // garbage: a frame that is not JSON after after_chunks deltas, then the stream goes on.
    const garbageStandin = { scenario: 'garbage' };
    const garbage = await typedEvents(
      await post('responses', { model: 'm', input, stream: true, standin: garbageStandin }),
    );
    assert.equal(garbage[6].data, '{not json at all');
    assert.equal(garbage[6].event, undefined);
    assert.deepEqual(typesOf(garbage.filter((_, i) => i !== 6)), responseEventTypes(answerWords));

    // disconnect: the connection resets after after_chunks deltas.
    const dropped = await post('responses', {
      model: 'm',
      input,
      stream: true,
      standin: { scenario: 'disconnect', after_chunks: 1, generation_lag_ms: 0 },
    });
    const text = await readUntilReset(dropped);
    assert.match(text, /"delta":"Hello "/);
    assert.doesNotMatch(text, /response\.completed|\[DONE\]/);
    const droppedData = await pollGeneration(dropped.headers.get('x-generation-id'));
    assert.equal(droppedData.tokens_completion, 1);
    assert.equal(droppedData.cancelled, false);

    // Non-streamed: midstream_error is a 502, disconnect a reset, stall_body half a body, garbage not JSON.
    const plain = await post('responses', { model: 'm', input, standin: { scenario: 'midstream_error' } });
    assert.equal(plain.status, 502);
    assert.equal((await plain.json()).error.code, 502);
    await assert.rejects(post('responses', { model: 'm', input, standin: { scenario: 'disconnect' } }));
    const stalled = await post('responses', { model: 'm', input, standin: { scenario: 'stall_body' } });
    assert.equal(stalled.status, 200);
    const received = await readUntilStalled(stalled);
    assert.ok(received.startsWith('{"id":"gen-') && received.length < Number(stalled.headers.get('content-length')));
    const junk = await post('responses', { model: 'm', input, standin: { scenario: 'garbage' } });
    assert.equal(junk.status, 200);
    await assert.rejects(junk.json(), SyntaxError);

    // hang: no answer at all; the generation runs until the client gives up.
    const model = `hang-responses/${Math.random()}`;
    const aborter = new AbortController();
    const pending = fetch(`${server.url}/responses`, {
      method: 'POST',
      headers: AUTH,
      body: JSON.stringify({ model, input, stream: true, standin: { scenario: 'hang', generation_lag_ms: 0 } }),
      signal: aborter.signal,
    }).catch((err) => err);
    assert.equal((await generationOfModel(model)).ended, false);
    aborter.abort();
    assert.ok((await pending) instanceof Error);
  });

  it('serves /embeddings as floats or base64, deterministic, with usage, cost and a generation', async () => {
    const res = await post('embeddings', {
      model: 'openai/text-embedding-3-small',
      input: ['ping pong', 'hi'],
      standin: { generation_lag_ms: 0 },
    });
    assert.equal(res.status, 200);
    const body = await res.json();
    assert.deepEqual(Object.keys(body), ['object', 'data', 'model', 'id', 'provider', 'usage']);
    assert.equal(body.object, 'list');
    assert.equal(body.model, 'openai/text-embedding-3-small');
    assert.equal(body.id, res.headers.get('x-generation-id'));
    assert.deepEqual(
      body.data.map((d) => [d.object, d.index, d.embedding.length]),
      [
        ['embedding', 0, 8],
        ['embedding', 1, 8],
      ],
    );
    for (const { embedding } of body.data) {
      assert.ok(embedding.every(Number.isFinite));
      assert.ok(Math.abs(Math.hypot(...embedding) - 1) < 1e-6, 'unit length');
    }
    assert.notDeepEqual(body.data[0].embedding, body.data[1].embedding);
    const promptTokens = Math.ceil(9 / 4) + 1;
    assert.deepEqual(body.usage, {
      prompt_tokens: promptTokens,
      total_tokens: promptTokens,
      cost: cost(promptTokens, 0),
      is_byok: false,
    });
    const data = await pollGeneration(body.id);
    assert.equal(data.api_type, 'embeddings');
    assert.equal(data.streamed, false);
    assert.equal(data.tokens_prompt, promptTokens);
    assert.equal(data.tokens_completion, 0);
    assert.equal(data.total_cost, body.usage.cost);

    // The same text gets the same vector, wherever it stands; dimensions sizes it.
    const again = await (await post('embeddings', { model: 'm', input: ['x', 'ping pong'], dimensions: 16 })).json();
    const single = await (await post('embeddings', { model: 'm', input: 'ping pong', dimensions: 16 })).json();
    assert.equal(again.data[1].embedding.length, 16);
    assert.deepEqual(again.data[1].embedding, single.data[0].embedding);
    assert.deepEqual(
      (await (await post('embeddings', { model: 'm', input: 'ping pong' })).json()).data[0].embedding,
      body.data[0].embedding,
    );

    // base64: the little-endian float32 bytes of the same vector.
    const encoded = await (
      await post('embeddings', { model: 'm', input: 'ping pong', dimensions: 16, encoding_format: 'base64' })
    ).json();
    assert.equal(typeof encoded.data[0].embedding, 'string');
    const bytes = Buffer.from(encoded.data[0].embedding, 'base64');
    assert.equal(bytes.length, 16 * 4);
    const decoded = Array.from({ length: 16 }, (_, i) => bytes.readFloatLE(i * 4));
    assert.deepEqual(decoded, single.data[0].embedding);

    // Token arrays count their length.
    const tokens = await (await post('embeddings', { model: 'm', input: [[1, 2, 3], [4]] })).json();
    assert.equal(tokens.data.length, 2);
    assert.equal(tokens.usage.prompt_tokens, 4);
    const flatTokens = await (await post('embeddings', { model: 'm', input: [5, 6, 7] })).json();
    assert.equal(flatTokens.data.length, 1);
    assert.equal(flatTokens.usage.prompt_tokens, 3);
  });

  it('fails /embeddings the way OpenRouter does', async () => {
    const invalid = [
      {},
      { input: '' },
      { input: [] },
      { input: ['ok', ''] },
      { input: [[]] },
      { input: 'x', dimensions: 0 },
      { input: 'x', encoding_format: 'hex' },
    ];
    for (const bad of invalid) {
      const res = await post('embeddings', { model: 'm', ...bad });
      assert.equal(res.status, 400, JSON.stringify(bad));
      assert.equal((await res.json()).error.code, 400);
    }
    const unauthorized = await post('embeddings', { model: 'm', input: 'x' }, { 'Content-Type': 'application/json' });
    assert.equal(unauthorized.status, 401);

    const failed = await post('embeddings', { model: 'm', input: 'x', standin: { scenario: 'error', status: 402 } });
    assert.equal(failed.status, 402);
    assert.deepEqual((await failed.json()).error, {
      code: 402,
      message: 'Insufficient credits',
      metadata: { provider_name: 'StandIn' },
    });

    const garbage = await post('embeddings', { model: 'm', input: 'x', standin: { scenario: 'garbage' } });
    assert.equal(garbage.status, 200);
    await assert.rejects(garbage.json(), SyntaxError);

    const stalled = await post('embeddings', { model: 'm', input: 'x', standin: { scenario: 'stall_body' } });
    const received = await readUntilStalled(stalled);
    assert.ok(received.startsWith('{"object":"list"'), received);
    assert.ok(received.length < Number(stalled.headers.get('content-length')));

    const started = Date.now();
    assert.equal((await post('embeddings', { model: 'm', input: 'x', standin: { delay_ms: 120 } })).status, 200);
    assert.ok(Date.now() - started >= 110);

    const model = `hang-embeddings/${Math.random()}`;
    const aborter = new AbortController();
    const pending = fetch(`${server.url}/embeddings`, {
      method: 'POST',
      headers: AUTH,
      body: JSON.stringify({ model, input: 'x', standin: { scenario: 'hang', generation_lag_ms: 0 } }),
      signal: aborter.signal,
    }).catch((err) => err);
    assert.equal((await generationOfModel(model)).ended, false);
    aborter.abort();
    assert.ok((await pending) instanceof Error);
    assert.equal((await pollGeneration((await generationOfModel(model)).id)).cancelled, true);
  });

  it('answers legacy /completions, non-streamed and streamed like chat', async () => {
    const promptTokens = Math.ceil('ping pong'.length / 4);
    const model = 'openai/gpt-3.5-turbo-instruct';
    const res = await post('completions', { model, prompt: 'ping pong', standin: { generation_lag_ms: 0 } });
    assert.equal(res.status, 200);
    const body = await res.json();
    assert.equal(body.id, res.headers.get('x-generation-id'));
    assert.deepEqual(Object.keys(body), ['id', 'object', 'created', 'model', 'provider', 'choices', 'usage']);
    assert.equal(body.object, 'text_completion');
    assert.equal(body.provider, 'StandIn');
    assert.deepEqual(body.choices, [finished(answer, 0, 'stop')]);
    assert.equal(body.usage.prompt_tokens, promptTokens);
    assert.equal(body.usage.completion_tokens, answerWords);
    assert.equal(body.usage.total_tokens, promptTokens + answerWords);
    assert.equal(body.usage.cost, cost(promptTokens, answerWords));
    assert.deepEqual(body.usage.completion_tokens_details, { reasoning_tokens: 0 });
    const data = await pollGeneration(body.id);
    assert.equal(data.api_type, 'completions');
    assert.equal(data.tokens_completion, answerWords);

    // n choices, max_tokens, string-array and token-array prompts.
    const capped = await postJson('completions', { model: 'm', prompt: 'ping pong', n: 2, max_tokens: 3, standin: {} });
    assert.deepEqual(
      capped.choices.map((c) => [c.index, c.text, c.finish_reason]),
      [
        [0, 'Hello from the', 'length'],
        [1, 'Hello from the', 'length'],
      ],
    );
    assert.equal(capped.usage.completion_tokens, 6);
    const parts = await postJson('completions', { model: 'm', prompt: ['ping', 'pong'], standin: {} });
    assert.equal(parts.choices[0].text, answer);
    assert.equal(parts.usage.prompt_tokens, 2);
    const tokens = await postJson('completions', { model: 'm', prompt: [1, 2, 3, 4, 5], standin: {} });
    assert.equal(tokens.usage.prompt_tokens, 5);
    const batches = await postJson('completions', { model: 'm', prompt: [[1, 2], [3]], standin: {} });
    assert.equal(batches.usage.prompt_tokens, 3);

    // Streamed: a chunk per piece, the finish chunk, the usage chunk whatever stream_options say, [DONE].
    const streamed = await post('completions', {
      model: 'm',
      prompt: 'ping pong',
      stream: true,
      stream_options: { include_usage: false },
      standin: { generation_lag_ms: 0 },
    });
    assert.equal(streamed.headers.get('content-type'), 'text/event-stream');
    const frames = sseEvents(await streamed.text());
    assert.equal(frames[0], ': OPENROUTER PROCESSING');
    assert.equal(frames.at(-1), 'data: [DONE]');
    const chunks = frames.slice(1, -1).map((f) => JSON.parse(dataOf(f)));
    const content = chunks.slice(0, -2);
    const [finish, usage] = chunks.slice(-2);
    assert.equal(content.length, answerWords);
    for (const chunk of chunks) {
      assert.equal(chunk.id, streamed.headers.get('x-generation-id'));
      assert.equal(chunk.object, 'text_completion');
      assert.equal(chunk.provider, 'StandIn');
    }
    for (const chunk of content) {
      assert.deepEqual(Object.keys(chunk.choices[0]), ['text', 'index', 'logprobs', 'finish_reason']);
      assert.equal(chunk.choices[0].finish_reason, null);
      assert.equal(chunk.choices[0].logprobs, null);
    }
    assert.equal(content.map((c) => c.choices[0].text).join(''), answer);
    assert.deepEqual(finish.choices, [finished('', 0, 'stop')]);
    assert.deepEqual(usage.choices, []);
    assert.equal(usage.usage.prompt_tokens, promptTokens);
    assert.equal(usage.usage.completion_tokens, answerWords);
    assert.equal(usage.usage.cost, cost(promptTokens, answerWords));
    assert.equal((await pollGeneration(usage.id)).tokens_completion, answerWords);

    const twoChoices = { model: 'm', prompt: 'x', n: 2, stream: true };
    const shaped = await postFrames('completions', { ...twoChoices, standin: { chunks: 3 } });
    assert.equal(shaped.length, 1 + 3 * 2 + 2 + 1 + 1);
  });

  it('fails legacy /completions the way chat fails', async () => {
    const prompt = 'ping pong';
    const missing = await post('completions', { model: 'm' });
    assert.equal(missing.status, 400);
    const message = 'Input required: specify "prompt" or "messages"';
    assert.deepEqual(await missing.json(), { error: { code: 400, message } });

    const failed = await post('completions', { model: 'm', prompt, stream: true, standin: { scenario: 'error' } });
    assert.equal(failed.status, 429);
    assert.equal((await failed.json()).error.code, 429);

    const cut = await post('completions', {
      model: 'm',
      prompt,
      stream: true,
      standin: { scenario: 'midstream_error', after_chunks: 2, generation_lag_ms: 0 },
    });
    const frames = sseEvents(await cut.text());
    assert.equal(frames.length, 1 + 2 + 1);
    const event = JSON.parse(dataOf(frames.at(-1)));
    assert.equal(event.object, 'text_completion');
    assert.deepEqual(event.error, { code: 'server_error', message: 'Provider disconnected unexpectedly' });
    assert.deepEqual(event.choices, [finished('', 0, 'error')]);
    const cutData = await pollGeneration(cut.headers.get('x-generation-id'));
    assert.equal(cutData.finish_reason, 'error');
    assert.equal(cutData.tokens_completion, 2);

    const garbageStandin = { scenario: 'garbage' };
    const garbage = await postFrames('completions', { model: 'm', prompt, stream: true, standin: garbageStandin });
    assert.equal(garbage[3], 'data: {not json at all');
    assert.equal(garbage.at(-1), 'data: [DONE]');

    const cutAfterOne = { scenario: 'disconnect', after_chunks: 1 };
    const dropped = await post('completions', { model: 'm', prompt, stream: true, standin: cutAfterOne });
    const text = await readUntilReset(dropped);
    assert.match(text, /"text":"Hello "/);
    assert.doesNotMatch(text, /\[DONE\]/);

    const plain = await post('completions', { model: 'm', prompt, standin: { scenario: 'midstream_error' } });
    assert.equal(plain.status, 502);
    const stalled = await post('completions', { model: 'm', prompt, standin: { scenario: 'stall_body' } });
    assert.ok((await readUntilStalled(stalled)).startsWith('{"id":"gen-'));
  });

  it('records and counts the new endpoints', async () => {
    const before = await stats();
    await (await post('responses', { model: 'm', input: 'a', standin: { note: 'r' } })).arrayBuffer();
    await (await post('embeddings', { model: 'm', input: 'a' })).arrayBuffer();
    await (await post('completions', { model: 'm', prompt: 'a', standin: {} })).arrayBuffer();
    const after = await stats();
    assert.equal(after.responses, before.responses + 1);
    assert.equal(after.embeddings, before.embeddings + 1);
    assert.equal(after.completions, before.completions + 1);
    assert.equal(after.chat_completions, before.chat_completions);
    const { requests } = await (await fetch(`${server.origin}/__standin/requests`)).json();
    assert.deepEqual(
      requests.map((r) => r.path),
      ['/api/v1/responses', '/api/v1/embeddings', '/api/v1/completions'],
    );
    assert.equal(requests[0].body.standin.note, 'r');
    assert.equal((await fetch(`${server.url}/embeddings`)).status, 405);
  });

  it('fails generation lookups at --generation-fail-rate, reproducibly for a seed', async () => {
    const lookups = async (args) => {
      const standin = await startStandin('openrouter.mjs', ['--generation-lag-ms', '0', ...args]);
      try {
        const res = await fetch(`${standin.url}/chat/completions`, {
          method: 'POST',
          headers: AUTH,
          body: JSON.stringify({ model: 'm', messages, standin: {} }),
        });
        await res.json();
        const id = res.headers.get('x-generation-id');
        const statuses = [];
        for (let i = 0; i < 12; i++) {
          const lookup = await fetch(`${standin.url}/generation?id=${id}`, { headers: AUTH });
          const body = await lookup.json();
          if (lookup.status === 503) assert.equal(body.error.code, 503);
          else assert.equal(body.data.id, id);
          statuses.push(lookup.status);
        }
        const counters = await (await fetch(`${standin.origin}/__standin/stats`)).json();
        assert.equal(counters.generation_lookups, 12);
        assert.equal(counters.generation_failed, statuses.filter((s) => s === 503).length);
        assert.equal(counters.generation_found, statuses.filter((s) => s === 200).length);

        const listed = `${standin.origin}/__standin/generations`;
        assert.deepEqual((await (await fetch(listed)).json()).generations.map((g) => g.id), [id]);
        assert.equal((await fetch(listed, { method: 'DELETE' })).status, 204);
        assert.deepEqual((await (await fetch(listed)).json()).generations, []);
        return statuses;
      } finally {
        await standin.stop();
      }
    };
    assert.deepEqual(await lookups(['--generation-fail-rate', '1']), new Array(12).fill(503));
    const first = await lookups(['--generation-fail-rate', '0.5', '--seed', '7']);
    assert.deepEqual(await lookups(['--generation-fail-rate', '0.5', '--seed', '7']), first);
    assert.ok(first.includes(200) && first.includes(503), `expected a mix, got ${first}`);
  });
});

describe('posthog stand-in', () => {
  let server;
  const uuid = '0190b0a4-6c8e-7c3e-9c1a-2f1e5d3c4b5a';
  const event = (extra = {}) => ({
    event: 'gateway_request',
    distinct_id: 'key_1',
    uuid,
    timestamp: new Date().toISOString(),
    properties: { tokens: 3 },
    ...extra,
  });
  const post = (base, body, headers = { 'Content-Type': 'application/json' }) =>
    fetch(`${base}/batch/`, { method: 'POST', headers, body: typeof body === 'string' ? body : JSON.stringify(body) });
  const postEvent = (base) => post(base, { api_key: 'phc_test', batch: [event()] });
  const setFaults = (base, faults) =>
    fetch(`${base}/__standin/faults`, { method: 'POST', body: JSON.stringify(faults) });
  const inspect = async (base) => (await fetch(`${base}/__standin/events`)).json();

  before(async () => {
    server = await startStandin('posthog.mjs');
  });
  after(() => server.stop());
  beforeEach(async () => {
    await fetch(`${server.url}/__standin/events`, { method: 'DELETE' });
    await setFaults(server.url, { fail_rate: 0, timeout_rate: 0, status: null, stall_ms: 0 });
  });

  it('accepts a valid batch and drops invalid events', async () => {
    const batch = [
      event(),
      event({ distinct_id: undefined }),
      event({ uuid: 'not-a-uuid' }),
      event({ properties: { blob: 'x'.repeat(1024 * 1024) } }),
      event({ uuid: undefined, event: 'second' }),
    ];
    const res = await post(server.url, { api_key: 'phc_test', batch });
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { status: 1 });

    const seen = await inspect(server.url);
    assert.deepEqual(seen.events.map((e) => e.event), ['gateway_request', 'second']);
    assert.equal(typeof seen.events[0].received_at, 'number');
    assert.equal(seen.batches_accepted, 1);
    assert.equal(seen.batches_failed, 0);
    assert.ok(seen.bytes_received > 1024 * 1024);
  });

  it('rejects bad keys and bad payloads like PostHog', async () => {
    const badKey = await post(server.url, { api_key: 'sk_nope', batch: [event()] });
    assert.equal(badKey.status, 401);
    assert.deepEqual(await badKey.json(), {
      type: 'authentication_error',
      code: 'invalid_api_key',
      detail: 'Project API key invalid. You can find your project API key in PostHog project settings.',
      attr: null,
    });

    const badJson = await post(server.url, '{"api_key":');
    assert.equal(badJson.status, 400);
    const badJsonBody = await badJson.json();
    assert.equal(badJsonBody.type, 'validation_error');
    assert.equal(badJsonBody.code, 'invalid_payload');

    const noKey = await post(server.url, { batch: [event()] });
    assert.equal(noKey.status, 400);
    assert.equal((await noKey.json()).code, 'invalid_payload');

    assert.deepEqual((await inspect(server.url)).events, []);
  });

  it('accepts gzip bodies (/batch without trailing slash too)', async () => {
    const body = gzipSync(JSON.stringify({ api_key: 'phc_test', batch: [event(), event()] }));
    const res = await fetch(`${server.url}/batch`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'Content-Encoding': 'gzip' },
      body,
    });
    assert.equal(res.status, 200);
    const seen = await inspect(server.url);
    assert.equal(seen.events.length, 2);
    assert.equal(seen.bytes_received, body.length);
  });

  it('injects failures and stalls at runtime', async () => {
    await setFaults(server.url, { fail_rate: 1, status: 429 });
    const limited = await postEvent(server.url);
    assert.equal(limited.status, 429);
    assert.equal(limited.headers.get('retry-after'), '1');

    await setFaults(server.url, { fail_rate: 0, status: null, stall_ms: 150 });
    const started = Date.now();
    assert.equal((await postEvent(server.url)).status, 200);
    assert.ok(Date.now() - started >= 140);

    await setFaults(server.url, { stall_ms: 0, timeout_rate: 1, timeout_ms: 50 });
    await assert.rejects(postEvent(server.url));

    const seen = await inspect(server.url);
    assert.equal(seen.events.length, 1);
    assert.equal(seen.batches_accepted, 1);
    assert.equal(seen.batches_failed, 1);
    assert.equal(seen.batches_timed_out, 1);

    const bad = await setFaults(server.url, { fail_rate: 2 });
    assert.equal(bad.status, 400);
  });

  it('fails every batch with 5xx at --fail-rate 1 and records nothing', async () => {
    const failing = await startStandin('posthog.mjs', ['--fail-rate', '1']);
    try {
      const statuses = [];
      for (let i = 0; i < 3; i++) {
        const res = await postEvent(failing.url);
        statuses.push(res.status);
        if (res.status === 503) assert.equal(res.headers.get('retry-after'), '1');
        assert.equal((await res.json()).type, 'server_error');
      }
      assert.deepEqual(statuses, [500, 502, 503]);
      const seen = await inspect(failing.url);
      assert.deepEqual(seen.events, []);
      assert.equal(seen.batches_failed, 3);
      assert.equal(seen.batches_accepted, 0);
    } finally {
      await failing.stop();
    }
  });

  it('is reproducible for a given seed', async () => {
    const outcomes = async () => {
      const standin = await startStandin('posthog.mjs', ['--fail-rate', '0.5', '--seed', '7']);
      try {
        const statuses = [];
        for (let i = 0; i < 12; i++) statuses.push((await postEvent(standin.url)).status);
        return statuses;
      } finally {
        await standin.stop();
      }
    };
    const first = await outcomes();
    assert.deepEqual(await outcomes(), first);
    assert.ok(first.includes(200) && first.some((s) => s >= 500), `expected a mix, got ${first}`);
  });
});
