// results object → Markdown. Every figure printed here is also in latest.json under the same names.

const TARGET_NAMES = { a: '(a) upstream', b: '(b) pass-through', g: '(g) gateway', m: "(g') gateway, in-memory storage" };

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
      `(g') the same gateway with Miniflare's in-memory storage. Same workerd build for all Workers; one API key for every gateway request.`,
  );
  out.push('');

  out.push(`## Non-streaming chat completion (${r.payloads.nonstream_response_bytes} B JSON response)`);
  out.push('');
  out.push('| c | target | req/s | p50 | p90 | p99 | errors | CPU server / upstream / client / runner / other |');
  out.push('|---:|---|---:|---:|---:|---:|---|---|');
  for (const c of s.concurrency) {
    for (const t of ['a', 'b', 'g', 'm']) {
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
    "| c | added p50 vs (a) | added p99 vs (a) | added p50 vs (b) | added p99 vs (b) | req/s (g)/(b) | req/s (g)/(a) | (g') added p50 / p99 vs (b) | req/s (g')/(b) |",
  );
  out.push('|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
  for (const c of s.concurrency) {
    const o = r.overhead[c];
    if (!o) continue;
    out.push(
      `| ${c} | ${signed(o.added_p50_vs_a)} | ${signed(o.added_p99_vs_a)} | ${signed(o.added_p50_vs_b)} | ${signed(o.added_p99_vs_b)} | ` +
        `${ratio(o.rps_ratio_g_b)} | ${ratio(o.rps_ratio_g_a)} | ${signed(o.in_memory_added_p50_vs_b)} / ${signed(o.in_memory_added_p99_vs_b)} | ${ratio(o.in_memory_rps_ratio_b)} |`,
    );
  }
  out.push('');

  out.push(`## Streaming chat completion (${s.stream_chunks} chunks × ~${s.chunk_bytes} B + usage chunk, ${r.payloads.stream_response_bytes} B SSE)`);
  out.push('');
  out.push('| c | target | streams/s | TTFB p50 | TTFB p99 | total p50 | total p99 | errors | CPU server / upstream / client / runner / other |');
  out.push('|---:|---|---:|---:|---:|---:|---:|---|---|');
  for (const c of s.stream_concurrency) {
    for (const t of ['a', 'b', 'g']) {
      const run = r.stream[c]?.[t];
      if (!run) continue;
      const l = run.latency_ms ?? {};
      const f = run.ttfb_ms ?? {};
      out.push(
        `| ${c} | ${TARGET_NAMES[t]} | ${num(run.rps)} | ${ms(f.p50)} | ${ms(f.p99)} | ${ms(l.p50)} | ${ms(l.p99)} | ${errorsCell(run)} | ${cpuCell(run)} |`,
      );
    }
  }
  out.push('');
  out.push('| c | TTFB p50 (g)−(b) | TTFB p99 (g)−(b) | total p50 (g)−(b) | total p99 (g)−(b) | streams/s (g)/(b) |');
  out.push('|---:|---:|---:|---:|---:|---:|');
  for (const c of s.stream_concurrency) {
    const o = r.stream_overhead[c];
    if (!o) continue;
    out.push(
      `| ${c} | ${signed(o.ttfb_p50_delta)} | ${signed(o.ttfb_p99_delta)} | ${signed(o.total_p50_delta)} | ${signed(o.total_p99_delta)} | ${ratio(o.rps_ratio_g_b)} |`,
    );
  }
  out.push('');

  out.push('## Other figures');
  out.push('');
  const w = r.wasm_bytes;
  out.push(
    w.reported
      ? `- **Bytes through wasm per streamed request** (gateway log, ${w.streams} streams at c=${w.concurrency}): ${w.bytes_in_per_stream.toLocaleString('en-US')} B copied in, ` +
          `${w.bytes_out_per_stream.toLocaleString('en-US')} B created for the client; the client received ${w.client_bytes_per_stream.toLocaleString('en-US')} B.`
      : `- **Bytes through wasm per streamed request**: not reported (the gateway's stream log line has no \`wasm_bytes_in\`/\`wasm_bytes_out\`).`,
  );
  for (const [label, mem] of [['gateway', r.memory.g], ['pass-through', r.memory.b]]) {
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
