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
    ]);
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
