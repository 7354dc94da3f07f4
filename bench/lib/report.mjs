// results object → Markdown. Every figure printed here is also in latest.json under the same names.

const TARGET_NAMES = { a: '(a) upstream', b: '(b) pass-through', g: '(g) gateway', m: "(g') gateway, storage on tmpfs", n: '(g0) gateway, leases off' };
const STORAGE = { g: 'disk (g)', m: "tmpfs (g')" };

const ms = (v) => (v === null || v === undefined ? '–' : v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0));
const signed = (v) => (v === null || v === undefined ? '–' : `${v >= 0 ? '+' : '−'}${ms(Math.abs(v))}`);
const num = (v) => (v === null || v === undefined ? '–' : v >= 100 ? Math.round(v).toLocaleString('en-US') : v.toFixed(1));
const ratio = (v) => (v === null || v === undefined ? '–' : `${v.toFixed(2)}×`);
const mb = (bytes) => (Number.isFinite(bytes) ? `${(bytes / 2 ** 20).toFixed(1)} MiB` : '–');
const kb = (bytes) => (Number.isFinite(bytes) ? `${(bytes / 1024).toFixed(1)} KiB` : '–');
const cpu = (x) => (x === null || x === undefined ? '–' : x.toFixed(2));

function errorsCell(run) {
  if (!run) return '–';
  if (run.errors === 0) return '0';
  const parts = [];
  for (const [status, n] of Object.entries(run.non2xx ?? {})) parts.push(`${n}×${status}`);
  if (run.transport_errors) parts.push(`${run.transport_errors} transport`);
  if (run.timeouts) parts.push(`${run.timeouts} timeout`);
  if (run.body_errors) parts.push(`${run.body_errors} bad body`);
  return `**${parts.join(', ')} — INVALID**`;
}

function cpuCell(run) {
  if (!run?.cpu) return '–';
  const c = run.cpu;
  return `${cpu(c.server)} / ${run.target === 'a' ? '=' : cpu(c.upstream)} / ${cpu(c.client)} / ${cpu(c.runner)} / ${cpu(c.other)}`;
}

export function renderMarkdown(r) {
  const out = [];
  const m = r.machine;
  out.push(`# Gateway benchmark — ${r.date}`);
  out.push('');
  out.push(
    `- Machine: ${m.cpu_model}, ${m.nproc} CPUs (nproc), ${(m.memory_bytes / 2 ** 30).toFixed(1)} GiB RAM, Linux ${m.kernel}; ` +
      `load average ${m.loadavg_at_start?.join(' ')} at start, ${m.loadavg_at_end?.join(' ') ?? '–'} at end`,
  );
  const v = r.versions;
  out.push(
    `- Versions: workerd ${v.workerd} (miniflare ${v.miniflare}), Node ${v.node}, ${v.rustc}, worker crate ${v.worker_crate}, ` +
      `gateway ${v.git}${v.git_dirty ? ' (uncommitted changes)' : ''}, wasm sha256 ${v.wasm_sha256}`,
  );
  const s = r.settings;
  out.push(
    `- Load: closed loop, HTTP/1.1 keep-alive, one connection per concurrent client; ${s.seconds} s measured after ${s.warmup_seconds} s warm-up ` +
      `per row; latencies in ms (nearest-rank percentiles over every request of the row).`,
  );
  out.push(
    `- Targets: (a) the OpenRouter stand-in directly, (b) a pass-through Worker (bench/passthrough.mjs) in workerd, ` +
      `(g) the gateway in workerd with its wrangler.toml bindings, storage (D1, KV, Durable Objects) on disk as \`wrangler dev\` keeps it; ` +
      `(g') the same gateway with the same storage files on a tmpfs${s.in_memory_on_tmpfs === false ? ' (**not available: on disk too**)' : ''}, so syncing them costs nothing; ` +
      '(g0) the gateway with admission leases off (`ADMISSION_LEASE_MS=0`: every request asks its key\'s object, as before leases). ' +
      'Same workerd build for all Workers; one API key for every gateway request.',
  );
  out.push('');

  out.push(`## Non-streaming chat completion (${r.payloads.nonstream_response_bytes} B JSON response)`);
  out.push('');
  out.push('| c | target | req/s | p50 | p90 | p99 | errors | CPU server / upstream / client / runner / other |');
  out.push('|---:|---|---:|---:|---:|---:|---|---|');
  for (const c of s.concurrency) {
    for (const t of ['a', 'b', 'g', 'm', 'n']) {
      const run = r.nonstream[c]?.[t];
      if (!run) continue;
      const l = run.latency_ms ?? {};
      out.push(`| ${c} | ${TARGET_NAMES[t]} | ${num(run.rps)} | ${ms(l.p50)} | ${ms(l.p90)} | ${ms(l.p99)} | ${errorsCell(run)} | ${cpuCell(run)} |`);
    }
  }
  out.push('');
  out.push(
    'CPU: cores used during the row (1.00 = one core busy) by the process serving the row, the stand-in behind it, ' +
      'the load generator, the Node process running Miniflare and this script, and everything else on the machine.',
  );
  out.push('');
  out.push('### Gateway overhead (non-streaming)');
  out.push('');
  out.push(
    "| c | added p50 vs (a) | added p99 vs (a) | added p50 vs (b) | added p99 vs (b) | req/s (g)/(b) | req/s (g)/(a) | (g') added p50 / p99 vs (b) | req/s (g')/(b) | (g0) added p50 vs (b) | req/s (g0)/(b) | object calls per request (g) / (g0) |",
  );
  out.push('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
  for (const c of s.concurrency) {
    const o = r.overhead[c];
    if (!o) continue;
    out.push(
      `| ${c} | ${signed(o.added_p50_vs_a)} | ${signed(o.added_p99_vs_a)} | ${signed(o.added_p50_vs_b)} | ${signed(o.added_p99_vs_b)} | ` +
        `${ratio(o.rps_ratio_g_b)} | ${ratio(o.rps_ratio_g_a)} | ${signed(o.in_memory_added_p50_vs_b)} / ${signed(o.in_memory_added_p99_vs_b)} | ${ratio(o.in_memory_rps_ratio_b)} | ` +
        `${signed(o.leases_off_added_p50_vs_b)} | ${ratio(o.leases_off_rps_ratio_b)} | ${perRequest(o.object_calls_per_request)} / ${perRequest(o.leases_off_object_calls_per_request)} |`,
    );
  }
  out.push('');
  platformBill(r, out);

  const kinds = [
    ['stream', 'needs no edit: `include_usage`, the native relay', 'usage chunk'],
    ['stream_edited', 'edited: no `include_usage`, the gateway removes the usage chunk', 'no usage chunk to the client'],
  ];
  for (const [kind, what, tail] of kinds) {
    if (!r[kind]) continue;
    out.push(`## Streaming chat completion, ${what} (${s.stream_chunks} chunks × ~${s.chunk_bytes} B, ${tail})`);
    out.push('');
    out.push('| c | target | streams/s | TTFB p50 | TTFB p99 | total p50 | total p99 | errors | CPU server / upstream / client / runner / other |');
    out.push('|---:|---|---:|---:|---:|---:|---:|---|---|');
    for (const c of s.stream_concurrency) {
      for (const t of ['a', 'b', 'g']) {
        const run = r[kind][c]?.[t];
        if (!run) continue;
        const l = run.latency_ms ?? {};
        const f = run.ttfb_ms ?? {};
        out.push(
          `| ${c} | ${TARGET_NAMES[t]} | ${num(run.rps)} | ${ms(f.p50)} | ${ms(f.p99)} | ${ms(l.p50)} | ${ms(l.p99)} | ${errorsCell(run)} | ${cpuCell(run)} |`,
        );
      }
    }
    out.push('');
    out.push('| c | TTFB p50 (g)−(b) | TTFB p99 (g)−(b) | total p50 (g)−(b) | total p99 (g)−(b) | streams/s (g)/(b) | (b)/(a) | CPU ms per event (b) | (g) |');
    out.push('|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
    for (const c of s.stream_concurrency) {
      const o = r[`${kind}_overhead`]?.[c];
      if (!o) continue;
      out.push(
        `| ${c} | ${signed(o.ttfb_p50_delta)} | ${signed(o.ttfb_p99_delta)} | ${signed(o.total_p50_delta)} | ${signed(o.total_p99_delta)} | ${ratio(o.rps_ratio_g_b)} | ${ratio(o.rps_ratio_b_a)} | ${o.cpu_ms_per_event_b ?? '—'} | ${o.cpu_ms_per_event_g ?? '—'} |`,
      );
    }
    out.push('');
  }

  limiterSections(r, out);

  out.push('## Other figures');
  out.push('');
  const w = r.wasm_bytes;
  out.push(
    w.reported
      ? `- **Bytes through wasm per streamed request** (gateway log, ${w.streams} streams at c=${w.concurrency}): ${w.bytes_in_per_stream.toLocaleString('en-US')} B copied in, ` +
          `${w.bytes_out_per_stream.toLocaleString('en-US')} B created for the client; the client received ${w.client_bytes_per_stream.toLocaleString('en-US')} B.`
      : `- **Bytes through wasm per streamed request**: not reported (the gateway's stream log line has no \`wasm_bytes_in\`/\`wasm_bytes_out\`).`,
  );
  for (const [label, mem] of [['gateway (native relay)', r.memory.g], ['gateway (edited relay)', r.memory.g_edited], ['pass-through', r.memory.b]]) {
    if (!mem) continue;
    out.push(
      `- **Peak memory, workerd process of the ${label}** (VmRSS every 100 ms): ${mb(mem.idle_rss)} idle; peak ${mb(mem.short.peak_rss)} during ` +
        `${mem.short.requests} × ${mem.short.chunks}-chunk streams (${mb(mem.short.client_bytes)} each); peak ${mb(mem.long.peak_rss)} during one ` +
        `${mem.long.chunks}-chunk stream (${mb(mem.long.client_bytes)}, ${ms(mem.long.total_ms_p50 / 1000)} s); within that stream ${mb(mem.long_mid_rss)} at its middle → ` +
        `${mb(mem.long_end_rss)} at its end: **${mem.verdict}**.`,
    );
  }
  if (r.rss_growth) {
    for (const g of r.rss_growth) {
      out.push(
        `- **RSS of the ${g.label} workerd across the whole run**: ${mb(g.start)} after start → ${mb(g.end)} after ${g.requests.toLocaleString('en-US')} requests ` +
          `(${kb(g.bytes_per_request)} per request).`,
      );
    }
  }
  out.push(`- **Wasm size**: ${kb(r.wasm_size.raw)} raw, ${kb(r.wasm_size.gzip)} gzip (level 9) — worker/build/index_bg.wasm; JS shim ${kb(r.wasm_size.js_raw)}.`);
  const cs = r.cold_start;
  out.push(
    `- **Cold start**: \`new Miniflare()\` → first 200 from /health: ${ms(cs.to_first_health_ms)} ms (workerd listening after ${ms(cs.to_ready_ms)} ms). ` +
      `First chat request after start: ${ms(cs.first_chat_ms)} ms; warm (p50 of ${cs.warm_requests}): ${ms(cs.warm_chat_p50_ms)} ms.`,
  );
  const hk = r.hot_key;
  out.push(
    `- **Limiter decisions/s, one hot key, end to end**: ${num(hk.rps)} req/s — the gateway's non-streaming chat at c=${hk.concurrency} with a single key ` +
      `(p99 ${ms(hk.p99_ms)} ms${hk.errors ? `, **${hk.errors} errors — INVALID**` : ''}). ${hk.limiter_note}`,
  );
  if (r.usage_probe) {
    const u = r.usage_probe;
    out.push(
      u.available
        ? `- **GET /v1/usage** (one key, c=${u.run.concurrency}): ${num(u.run.rps)} req/s, p50 ${ms(u.run.latency_ms?.p50)} ms, p99 ${ms(u.run.latency_ms?.p99)} ms, errors ${errorsCell(u.run)}.`
        : `- GET /v1/usage: not available (HTTP ${u.status}); not measured.`,
    );
  }
  if (r.usage_rows !== null && r.usage_rows !== undefined) out.push(`- usage_logs rows in D1 after the run: ${r.usage_rows.toLocaleString('en-US')}.`);
  const sv = r.served_by;
  out.push(
    `- **Served directly by workerd**: the gateway's port ${sv.g.port} is held by pid ${sv.g.pid} \`${sv.g.comm}\` (parent: this Node process ${sv.g.parent_is_runner ? 'yes' : 'NO'}); ` +
      `pass-through port ${sv.b.port} by pid ${sv.b.pid} \`${sv.b.comm}\`. No Node proxy sits in front (see bench/README.md).`,
  );
  out.push(`- Upstream stand-in ceiling (its own, non-streaming): ${num(r.upstream_ceiling.rps)} req/s at c=${r.upstream_ceiling.concurrency}, using ${cpu(r.upstream_ceiling.cpu)} cores.`);
  out.push('');

  out.push('## Notes and problems');
  out.push('');
  if (r.problems.length === 0) out.push('- none');
  for (const p of r.problems) out.push(`- ${p}`);
  out.push('');
  return out.join('\n');
}

const perRequest = (v) => (v === null || v === undefined ? '–' : v.toFixed(3));
const usd = (v) => (v === null || v === undefined ? '–' : `$${v < 0.01 ? v.toFixed(4) : v.toFixed(3)}`);

function platformBill(r, out) {
  const bill = r.platform_bill;
  if (!bill?.g) return;
  out.push(`### The platform bill per million non-streamed requests (c=${bill.concurrency})`);
  out.push('');
  out.push(
    `How counted: per request of the row, from the gateway's log lines (\`limiter_calls\`, \`limiter_rows\`: the calls each request made to its ` +
      `key's object and the storage rows they wrote; \`limiter_ms\` for the object's active time), the usage consumer's \`ledger_batch\` lines ` +
      `(D1 rows written per event, indexes included: ${bill.ledger.d1_rows_written.toLocaleString('en-US')} for ${bill.ledger.events.toLocaleString('en-US')} events over the run), ` +
      "and workerd's CPU over the row (Worker, object and consumer together: an upper bound for the Worker's CPU). Queue: one event per request, written, read and deleted. " +
      `Priced at Cloudflare's list prices of ${bill.g.prices_as_of} beyond the Workers Paid plan's included amounts (bench/README.md).`,
  );
  out.push('');
  out.push('| item | per request (g0) leases off | (g) leases | $ per million (g0) | (g) |');
  out.push('|---|---:|---:|---:|---:|');
  const before = bill.n?.lines ?? [];
  for (const line of bill.g.lines) {
    const b = before.find((x) => x.item === line.item);
    out.push(`| ${line.item} | ${perRequest(b?.per_request)} | ${perRequest(line.per_request)} | ${usd(b?.usd_per_million_requests)} | ${usd(line.usd_per_million_requests)} |`);
  }
  out.push(`| **total** | | | **${usd(bill.n?.usd_per_million_requests)}** | **${usd(bill.g.usd_per_million_requests)}** |`);
  out.push('');
  const admission = (a) => Object.entries(a ?? {}).map(([k, v]) => `${k} ${v.toLocaleString('en-US')}`).join(', ');
  out.push(`How requests were admitted: (g0) ${admission(bill.n?.admission)}; (g) ${admission(bill.g.admission)}.`);
  out.push('');
}

function limiterSections(r, out) {
  const s = r.settings;
  if (r.limiter?.length) {
    out.push("## Limiter decisions through one hot key's Durable Object");
    out.push('');
    out.push(
      `How measured: a driver Worker (bench/limiter-driver.mjs) in the gateway's workerd calls the gateway's KeyLimiter object of one key ` +
        `(one fresh key per row) with \`POST /admit\` messages like the gateway's, c calls in flight, each admitted request's settlement carried ` +
        `on the key's next admission; ${s.limiter_seconds} s per row after 200 unrecorded calls. No HTTP and no gateway request path: the object alone. ` +
        'Per-call latency is read from workerd\'s clock, which advances only on I/O in whole milliseconds; the mean is exact (c × elapsed / calls). ' +
        'Rows with a limit of 60 per 60 s: the warm-up has used the 60 up, so every measured call is a denial. ' +
        'Baseline: the same calls to a JS object in the driver that reads the message and answers "admitted", deciding and storing nothing — the floor of any Durable Object call here.',
    );
    out.push('');
    out.push('| storage | limit | c | decisions/s | admitted | denied | leased slots | admissions/s | calls / admission | rows / admission | call p50 | call p99 | call mean | CPU workerd / other |');
    out.push('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|');
    for (const x of r.limiter) {
      const limit = x.object === 'noop' ? '–' : x.requests_per_window >= 1e8 ? 'none' : `${x.requests_per_window} per ${x.window_ms / 1000} s`;
      const l = x.latency_ms;
      out.push(
        `| ${x.object === 'noop' ? 'baseline: no-op JS object' : STORAGE[x.target]} | ${limit}${x.lease_slots_asked ? `, leases of ${x.lease_slots_asked}` : ''} | ${x.concurrency} | ${num(x.decisions_per_s)} | ${x.admitted.toLocaleString('en-US')} | ${x.denied.toLocaleString('en-US')} | ` +
          `${(x.leased ?? 0).toLocaleString('en-US')} | ${num(x.admissions_per_s)} | ${perRequest(x.calls_per_admission)} | ${perRequest(x.rows_written_per_admission)} | ` +
          `${l.p50} | ${l.p99} | ${ms(l.mean_from_elapsed)} | ${cpu(x.cpu.server)} / ${cpu(x.cpu.other)} |`,
      );
    }
    out.push('');
  }

  if (r.limiter_hop?.length) {
    out.push('### Limiter hop per gateway request');
    out.push('');
    out.push(
      'How measured: `limiter_ms` of the gateway\'s request log line (the wait for the key\'s object to admit the request), over every request of the ' +
        'non-streaming row (warm-up included). workerd\'s `Date.now()` advances only on I/O, in whole milliseconds, so 0 means "under a millisecond".',
    );
    out.push('');
    out.push('| c | target | requests | p50 | p90 | p99 | max | mean |');
    out.push('|---:|---|---:|---:|---:|---:|---:|---:|');
    for (const h of r.limiter_hop) {
      out.push(`| ${h.concurrency} | ${TARGET_NAMES[h.target]} | ${h.requests.toLocaleString('en-US')} | ${h.p50} | ${h.p90} | ${h.p99} | ${h.max} | ${ms(h.mean)} |`);
    }
    out.push('');
  }

  if (r.storage_rows?.length) {
    out.push('### Storage rows per key (KeyLimiter SQLite, disk (g))');
    out.push('');
    out.push(
      'How measured: after the limiter rows, each key\'s object file (`<persist>/v3/do/gateway-KeyLimiter/<object id>.sqlite`) is opened read-only and ' +
        'its tables counted. Design bound: admissions still in the window (at most the limit) + 64 (rows that left the window are deleted 64 at a time) ' +
        '+ 2 (the `limits` meta row, a budget row). `bench` is the key every gateway request of the run used; its limit never binds, so it keeps ' +
        'its admissions of the last minute (plus fewer than 64): all of them when the run is shorter than that.',
    );
    out.push('');
    out.push('| key | limit | admissions | requests | budget | meta | total | bound |');
    out.push('|---|---|---:|---:|---:|---:|---:|---|');
    for (const k of r.storage_rows) {
      const limit = k.limit === null ? `${Number(s.rate_limit_per_minute).toLocaleString('en-US')} per 60 s (gateway)` : k.limit >= 1e8 ? 'none' : `${k.limit} per ${k.window_ms / 1000} s`;
      if (k.error) {
        out.push(`| ${k.key} | ${limit} | – | – | – | – | **${k.error}** | – |`);
        continue;
      }
      const bound = k.bound === null ? '–' : `${k.bound.toLocaleString('en-US')}${k.within_bound ? '' : ' **exceeded**'}`;
      out.push(
        `| ${k.key} | ${limit} | ${k.admitted === null ? '–' : k.admitted.toLocaleString('en-US')} | ${k.rows.requests.toLocaleString('en-US')} | ${k.rows.budget} | ${k.rows.meta} | ` +
          `${k.total.toLocaleString('en-US')} | ${bound} |`,
      );
    }
    out.push('');
  }

  const c = r.consumer;
  if (c) {
    const p = r.consumer_posthog;
    out.push('### Usage consumer: queue → D1 (→ PostHog)');
    out.push('');
    out.push(
      `How measured: the driver sends ${c.events.toLocaleString('en-US')} usage events (UsageEvent JSON strings of ${c.event_json_bytes} B, content type "text", ` +
        'distinct request ids) to the gateway\'s queue, 100 per `sendBatch`, as fast as it returns; the bench polls D1 (every 25 ms, through the driver) until every row ' +
        'is in `usage_logs` (with PostHog: until every row is marked as accepted by PostHog, the consumer\'s last step). events/s = events / (last row − first send). ' +
        'The queue settings are wrangler.toml\'s (max_batch_size 100, max_batch_timeout 5 s): the timeout bounds how long a partial batch waits (latency), ' +
        'not throughput — full batches go at once. Miniflare delivers one batch at a time per queue.',
    );
    out.push('');
    const rate = (x) => (x.complete ? `**${num(x.events_per_s)} events/s**` : '**incomplete**');
    out.push(
      `- **PostHog off** (gateway (g), storage on disk, ledger already holding ${c.ledger_rows_before?.toLocaleString('en-US') ?? '–'} rows): ${rate(c)} — all ${c.events.toLocaleString('en-US')} rows ${ms(c.to_last_row_ms)} ms after the first send ` +
        `(sending took ${ms(c.send_ms)} ms); workerd ${cpu(c.cpu.server)} cores, other processes ${cpu(c.cpu.other)}. D1 statements per batch: **1** (one INSERT … SELECT FROM json_each(?1) for the whole batch).`,
    );
    if (p) {
      const ph = p.posthog_standin;
      out.push(
        `- **PostHog on** (a third gateway, storage on disk, empty ledger, POSTHOG_HOST = the PostHog stand-in): ${rate(p)} to every row marked as sent ` +
          `(${ms(p.to_done_ms)} ms; all rows inserted after ${ms(p.to_last_row_ms)} ms); workerd ${cpu(p.cpu.server)} cores, PostHog stand-in ${cpu(p.cpu.standin)}, other processes ${cpu(p.cpu.other)}. ` +
          `D1 statements per batch: **3** (the INSERT, one SELECT of the rows PostHog has not accepted, one UPDATE marking them), plus one KV read (the model list, for prices) and one \`POST /batch/\`.`,
      );
      out.push(
        `- **PostHog request bytes per event**: ${ph.bytes_per_event?.toLocaleString('en-US') ?? '–'} B (${ph.bytes_received.toLocaleString('en-US')} B received by the stand-in for ` +
          `${ph.events_accepted.toLocaleString('en-US')} events accepted, ${ph.batches_accepted} requests: ${ph.events_per_request} events each; uncompressed JSON, no captured content).`,
      );
    }
    out.push('- Statements per batch are read from worker/src/consumer.rs (`deliver`), not counted at run time.');
    out.push('');
  }
}
