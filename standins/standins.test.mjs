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

  it('serves /models without auth', async () => {
    const res = await fetch(`${server.url}/models`);
    assert.equal(res.status, 200);
    const { data } = await res.json();
    assert.deepEqual(
      data.map((m) => m.id),
      ['openai/gpt-4o-mini', 'anthropic/claude-3.5-sonnet', 'meta-llama/llama-3.1-8b-instruct'],
    );
    for (const model of data) {
      assert.equal(model.canonical_slug, model.id);
      assert.equal(typeof model.context_length, 'number');
      assert.equal(model.pricing.prompt, '0.000001');
      assert.equal(model.pricing.completion, '0.000002');
      assert.deepEqual(model.architecture.input_modalities, ['text']);
      assert.equal(model.top_provider.is_moderated, false);
      assert.ok(model.supported_parameters.includes('max_tokens'));
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
