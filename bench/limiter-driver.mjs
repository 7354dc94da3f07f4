// A Worker that runs next to the gateway in the same workerd (bench/run.mjs starts it through scripts/runtime.mjs
// with `extraWorkers`) and drives the gateway's own pieces directly, without HTTP and the gateway's request path:
//
//   GET /limiter?key=K&calls=N&seconds=S&concurrency=C&warmup=W&rpw=R&window_ms=MS
//       Admission calls on the KeyLimiter Durable Object of key K (idFromName(K), as the gateway names it), C in
//       flight at a time: W unrecorded, then N or as many as S seconds allow, whichever ends first. Like the
//       gateway, each admitted request's settlement rides on the key's next admission (`settle`); what is left at
//       the end goes out in one POST /settle. Returns counts, elapsed time, per-call latency.
//       With `object=noop`, the same calls go to NoopObject below instead: the floor of any Durable Object call.
//       With `lease=L`, each call also asks for a lease of L slots, as the gateway's isolates do on a busy key:
//       the slots granted count as admissions (an isolate admits that many requests without calling), and their
//       totals (all used and settled) ride on the next call, as the gateway reports them. `admissions` is then
//       calls' admissions plus leased slots, and `calls_per_admission` what the object saw per request.
//   GET /object-id?key=K
//       The object id of key K (its storage file is named after it).
//   GET /usage-events?prefix=P&count=M
//       M usage events (UsageEvent JSON strings, content type "text", as the gateway sends them) to the gateway's
//       usage queue, 100 per sendBatch, as fast as sendBatch returns.
//   GET /usage-rows?prefix=P
//       How many of those are in D1's usage_logs, and how many PostHog has accepted.
//
// workerd's clock advances only on I/O (1 ms resolution), so a single call's latency is 0, 1, 2, … ms; the mean
// comes from the elapsed time instead (Little's law: mean = C × elapsed / N).

const MODEL = 'openai/gpt-4o-mini';
const RESERVE = { tokens: 4200, usd: 0 };
const ACTUAL = { tokens: 300, usd: 0.0001 };
const BATCH = 100;

function limitsFor(params) {
  return {
    requests_per_window: Number(params.get('rpw') ?? 100_000_000),
    tokens_per_window: null,
    window_ms: Number(params.get('window_ms') ?? 60_000),
    budget: null,
    max_concurrency: null,
    lease_ms: 900_000,
  };
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

async function limiterRun(env, params) {
  const key = params.get('key');
  const maxCalls = Number(params.get('calls') ?? 1_000_000);
  const seconds = Number(params.get('seconds') ?? 0);
  const concurrency = Number(params.get('concurrency') ?? 1);
  const warmup = Number(params.get('warmup') ?? 0);
  const namespace = params.get('object') === 'noop' ? env.NOOP : env.KEY_LIMITER;
  const id = namespace.idFromName(key);
  const stub = namespace.get(id);
  const control = { version: '2026-01-01T00:00:00.000Z', revoked: false, limits: limitsFor(params), allowed_models: null };

  // Settlements of admitted requests, held for the key's next admission (as the gateway holds them per isolate).
  let pending = [];
  let next = 0;
  const leaseSlots = Number(params.get('lease') ?? 0);
  let reports = [];
  const counts = { admitted: 0, denied: 0, settled_on_admit: 0, admitted_with_warmup: 0, leased: 0, leases: 0, rows_written: 0 };
  const latencies = [];
  const reasons = {};

  async function admit(seq, record) {
    const requestId = `${key}-${seq}`;
    const settle = pending;
    pending = [];
    const carried = reports;
    reports = [];
    const message = { control, candidates: [{ request_id: requestId, models: [MODEL], reserve: RESERVE }], settle, reports: carried };
    if (leaseSlots > 0) message.lease = { lease_id: `${requestId}-lease`, slots: leaseSlots, per_slot: RESERVE, valid_ms: 1000 };
    const body = JSON.stringify(message);
    const t0 = Date.now();
    const response = await stub.fetch('https://key-limiter/admit', { method: 'POST', body });
    const answer = await response.json();
    const t1 = Date.now();
    if (response.status !== 200) throw new Error(`admit answered ${response.status}`);
    const decision = answer.decisions[0];
    if (decision.decision === 'admitted') {
      pending.push({ request_id: requestId, actual: ACTUAL });
      counts.admitted_with_warmup++;
    }
    const lease = answer.lease;
    if (lease) {
      // Every slot used at once and settled: the totals go back with the next call.
      const n = lease.slots;
      const times = (a) => ({ tokens: a.tokens * n, usd: a.usd * n });
      reports.push({ lease_id: lease.lease_id, totals: { returned: true, used: n, settled: n, reserved_used: times(RESERVE), reserved_settled: times(RESERVE), actual_settled: times(ACTUAL) } });
      counts.admitted_with_warmup += n;
    }
    if (!record) return;
    latencies.push(t1 - t0);
    counts.rows_written += answer.rows_written ?? 0;
    counts.settled_on_admit += settle.length;
    if (lease) {
      counts.leases++;
      counts.leased += lease.slots;
    }
    if (decision.decision === 'admitted') counts.admitted++;
    else {
      counts.denied++;
      reasons[decision.reason] = (reasons[decision.reason] ?? 0) + 1;
    }
  }

  async function phase(total, record, offset, deadline = Infinity) {
    next = 0;
    const loop = async () => {
      while (next < total && Date.now() < deadline) {
        const seq = offset + next++;
        await admit(seq, record);
      }
    };
    await Promise.all(Array.from({ length: Math.min(concurrency, total) }, loop));
  }

  await phase(warmup, false, 0);
  const started = Date.now();
  await phase(maxCalls, true, warmup, seconds > 0 ? started + seconds * 1000 : Infinity);
  const elapsed = Date.now() - started;
  const calls = latencies.length;

  const leftover = pending.length;
  if (leftover || reports.length) {
    const response = await stub.fetch('https://key-limiter/settle', { method: 'POST', body: JSON.stringify({ settle: pending, reports }) });
    await response.arrayBuffer();
    pending = [];
  }
  latencies.sort((a, b) => a - b);
  return {
    key,
    object_id: id.toString(),
    limits: control.limits,
    concurrency,
    warmup,
    calls,
    ...counts,
    lease_slots_asked: leaseSlots,
    admissions: counts.admitted + counts.leased,
    admissions_per_s: elapsed > 0 ? Math.round(((counts.admitted + counts.leased) * 1000) / elapsed) : null,
    calls_per_admission: counts.admitted + counts.leased > 0 ? calls / (counts.admitted + counts.leased) : null,
    rows_written_per_admission: counts.admitted + counts.leased > 0 ? counts.rows_written / (counts.admitted + counts.leased) : null,
    denial_reasons: reasons,
    settled_at_end: leftover,
    elapsed_ms: elapsed,
    latency_ms: {
      p50: percentile(latencies, 50),
      p90: percentile(latencies, 90),
      p99: percentile(latencies, 99),
      max: latencies.at(-1) ?? null,
      mean_from_elapsed: calls ? (concurrency * elapsed) / calls : null,
    },
  };
}

/** A usage event as the gateway sends it for a non-streamed chat completion (no captured content). */
function usageEvent(requestId, now) {
  return {
    request_id: requestId,
    key_id: 'bench-consumer',
    user_id: 'bench-user',
    model: MODEL,
    served_model: MODEL,
    input_tokens: 120,
    output_tokens: 180,
    cached_tokens: 0,
    reasoning_tokens: 0,
    cost_usd: 0.000126,
    usage_source: 'reported',
    latency_ms: 850,
    ttft_ms: null,
    status: 200,
    streamed: false,
    finish_reason: 'stop',
    error: null,
    timestamp_ms: now,
    temperature: 0.7,
    max_tokens: 4096,
  };
}

async function sendUsageEvents(env, params) {
  const prefix = params.get('prefix');
  const count = Number(params.get('count') ?? 5000);
  const started = Date.now();
  let bytes = 0;
  for (let i = 0; i < count; i += BATCH) {
    const messages = [];
    for (let j = i; j < Math.min(count, i + BATCH); j++) {
      const body = JSON.stringify(usageEvent(`${prefix}${String(j).padStart(6, '0')}`, started));
      bytes += body.length;
      messages.push({ body, contentType: 'text' });
    }
    await env.USAGE_EVENTS.sendBatch(messages);
  }
  return { sent: count, batches: Math.ceil(count / BATCH), bytes_per_event: count ? Math.round(bytes / count) : null, started_ms: started, send_ms: Date.now() - started };
}

async function usageRows(env, params) {
  const prefix = params.get('prefix');
  // A range on the primary key (not LIKE, which cannot use it): the count stays cheap next to a large ledger.
  const row = await env.DB.prepare(
    'SELECT count(*) AS rows, count(posthog_state) AS posthog FROM usage_logs WHERE request_id >= ?1 AND request_id < ?2',
  )
    .bind(prefix, `${prefix}\uffff`)
    .first();
  return { rows: row.rows, posthog: row.posthog, at_ms: Date.now() };
}

/** Reads the message and admits it, deciding nothing and storing nothing: what any Durable Object call costs. */
export class NoopObject {
  async fetch(request) {
    await request.arrayBuffer();
    return new Response(ADMITTED);
  }
}
const ADMITTED = JSON.stringify({ decisions: [{ decision: 'admitted' }] });

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const routes = {
      '/limiter': limiterRun,
      '/object-id': async (env, params) => ({ object_id: env.KEY_LIMITER.idFromName(params.get('key')).toString() }),
      '/usage-events': sendUsageEvents,
      '/usage-rows': usageRows,
    };
    const route = routes[url.pathname];
    if (!route) return new Response('not found', { status: 404 });
    try {
      return Response.json(await route(env, url.searchParams));
    } catch (error) {
      return Response.json({ error: String(error?.stack ?? error) }, { status: 500 });
    }
  },
};
