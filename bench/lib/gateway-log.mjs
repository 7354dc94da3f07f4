// Reads the gateway's one-JSON-line-per-request log from workerd's stdout/stderr while the bench runs, and
// keeps per-phase totals. The phase is the prefix of the request id the load generator sends
// (`<phase>-<worker>-<seq>`, logged as `client_request_id`; the gateway's own `request_id` is random). Only lines that carry something the report needs are parsed, so the reader stays
// cheap next to a workerd serving thousands of requests per second.

import { createWriteStream } from 'node:fs';
import { createInterface } from 'node:readline';

const PHASE = /"client_request_id":"([^"]+)-\d+-\d+"/;
const LIMITER_MS = /"limiter_ms":(\d+)/;
// What each request cost its key's Durable Object: calls, rows written, and how it was admitted.
const LIMITER_CALLS = /"limiter_calls":(\d+)/;
const LIMITER_ROWS = /"limiter_rows":(\d+)/;
const ADMISSION = /"admission":"(\w+)"/;

export class GatewayLog {
  /** `rawPath`: where lines that are not routine successes are kept (warnings, errors, non-JSON output). */
  constructor(rawPath) {
    this.phases = new Map();
    // The usage consumer's ledger batches: events written and the D1 rows that wrote (indexes included).
    this.ledger = { events: 0, d1_rows_written: 0 };
    this.raw = createWriteStream(rawPath);
    this.recentProblems = [];
  }

  /** For Miniflare's `handleRuntimeStdio`. */
  attach(stdout, stderr) {
    createInterface({ input: stdout }).on('line', (line) => this.line(line));
    createInterface({ input: stderr }).on('line', (line) => this.line(line));
  }

  phase(name) {
    let p = this.phases.get(name);
    if (!p) {
      // limiter_ms: how many requests waited each whole number of milliseconds for their admission.
      p = { lines: 0, limiter_ms: new Map(), limiter_calls: 0, limiter_rows: 0, admission: {}, streams: 0, wasm_reported: 0, wasm_bytes_in: 0, wasm_bytes_out: 0, stream_end: {}, errors: {}, statuses: {} };
      this.phases.set(name, p);
    }
    return p;
  }

  line(line) {
    const routine = line.includes('"level":"info"') && !line.includes('"stream_end"');
    if (routine && line.includes('"event":"ledger_batch"')) {
      const events = /"events":(\d+)/.exec(line);
      const written = /"rows_written":(\d+)/.exec(line);
      if (events && written) {
        this.ledger.events += Number(events[1]);
        this.ledger.d1_rows_written += Number(written[1]);
      }
      return;
    }
    if (routine) {
      const m = PHASE.exec(line);
      if (m) {
        const p = this.phase(m[1]);
        p.lines++;
        const limiter = LIMITER_MS.exec(line);
        if (limiter) p.limiter_ms.set(Number(limiter[1]), (p.limiter_ms.get(Number(limiter[1])) ?? 0) + 1);
        this.limiterTraffic(p, line);
      }
      return;
    }
    this.raw.write(`${line}\n`);
    let entry;
    try {
      entry = JSON.parse(line.slice(line.indexOf('{')));
    } catch {
      this.problem(line);
      return;
    }
    if (entry.event !== 'request') {
      this.problem(line);
      return;
    }
    const m = /^(.*)-\d+-\d+$/.exec(entry.client_request_id ?? '');
    const p = this.phase(m ? m[1] : '(other)');
    p.lines++;
    if (Number.isFinite(entry.limiter_ms)) p.limiter_ms.set(entry.limiter_ms, (p.limiter_ms.get(entry.limiter_ms) ?? 0) + 1);
    this.limiterTraffic(p, line);
    p.statuses[entry.status] = (p.statuses[entry.status] ?? 0) + 1;
    if (entry.error) p.errors[entry.error] = (p.errors[entry.error] ?? 0) + 1;
    if (entry.stream_end) {
      p.streams++;
      p.stream_end[entry.stream_end] = (p.stream_end[entry.stream_end] ?? 0) + 1;
      if (Number.isFinite(entry.wasm_bytes_in) || Number.isFinite(entry.wasm_bytes_out)) {
        p.wasm_reported++;
        p.wasm_bytes_in += entry.wasm_bytes_in ?? 0;
        p.wasm_bytes_out += entry.wasm_bytes_out ?? 0;
      }
    }
    if (entry.status >= 400) this.problem(line);
  }

  limiterTraffic(p, line) {
    const calls = LIMITER_CALLS.exec(line);
    if (calls) p.limiter_calls += Number(calls[1]);
    const rows = LIMITER_ROWS.exec(line);
    if (rows) p.limiter_rows += Number(rows[1]);
    const admission = ADMISSION.exec(line);
    if (admission) p.admission[admission[1]] = (p.admission[admission[1]] ?? 0) + 1;
  }

  problem(line) {
    this.recentProblems.push(line.length > 400 ? `${line.slice(0, 400)}…` : line);
    if (this.recentProblems.length > 20) this.recentProblems.shift();
  }

  /** Totals for a phase; per-stream averages of the wasm byte counters when the gateway reports them. */
  summary(name) {
    const p = this.phases.get(name);
    if (!p) return null;
    const wasm =
      p.wasm_reported > 0
        ? {
            streams: p.wasm_reported,
            bytes_in_per_stream: Math.round(p.wasm_bytes_in / p.wasm_reported),
            bytes_out_per_stream: Math.round(p.wasm_bytes_out / p.wasm_reported),
          }
        : null;
    return {
      log_lines: p.lines,
      limiter_ms: limiterSummary(p.limiter_ms),
      // Per request line: calls to the key's object and the storage rows they wrote; how requests were admitted.
      limiter_calls_per_request: p.lines ? p.limiter_calls / p.lines : null,
      limiter_rows_per_request: p.lines ? p.limiter_rows / p.lines : null,
      admission: p.admission,
      streams: p.streams,
      stream_end: p.stream_end,
      errors: p.errors,
      statuses: p.statuses,
      wasm,
    };
  }

  close() {
    return new Promise((resolve) => this.raw.end(resolve));
  }
}

/** Nearest-rank percentiles and the mean of a histogram of whole milliseconds; null when no line had the field. */
function limiterSummary(histogram) {
  const values = [...histogram.entries()].sort((a, b) => a[0] - b[0]);
  const count = values.reduce((n, [, c]) => n + c, 0);
  if (count === 0) return null;
  const at = (p) => {
    const rank = Math.max(1, Math.ceil((p / 100) * count));
    let seen = 0;
    for (const [ms, c] of values) {
      seen += c;
      if (seen >= rank) return ms;
    }
    return values.at(-1)[0];
  };
  const sum = values.reduce((s, [ms, c]) => s + ms * c, 0);
  return { requests: count, p50: at(50), p90: at(90), p99: at(99), max: values.at(-1)[0], mean: Math.round((sum / count) * 100) / 100 };
}
