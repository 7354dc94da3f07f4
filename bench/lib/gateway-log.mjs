// Reads the gateway's one-JSON-line-per-request log from workerd's stdout/stderr while the bench runs, and
// keeps per-phase totals. The phase is the prefix of the request id the load generator sends
// (`<phase>-<worker>-<seq>`, logged as `client_request_id`; the gateway's own `request_id` is random). Only lines that carry something the report needs are parsed, so the reader stays
// cheap next to a workerd serving thousands of requests per second.

import { createWriteStream } from 'node:fs';
import { createInterface } from 'node:readline';

const PHASE = /"client_request_id":"([^"]+)-\d+-\d+"/;
const LIMITER_MS = /"limiter_ms":(\d+)/;

export class GatewayLog {
  /** `rawPath`: where lines that are not routine successes are kept (warnings, errors, non-JSON output). */
  constructor(rawPath) {
    this.phases = new Map();
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
      p = { lines: 0, limiter_ms: new Map(), streams: 0, wasm_reported: 0, wasm_bytes_in: 0, wasm_bytes_out: 0, stream_end: {}, errors: {}, statuses: {} };
      this.phases.set(name, p);
    }
    return p;
  }

  line(line) {
    const routine = line.includes('"level":"info"') && !line.includes('"stream_end"');
    if (routine) {
      const m = PHASE.exec(line);
      if (m) {
        const p = this.phase(m[1]);
        p.lines++;
        const limiter = LIMITER_MS.exec(line);
        if (limiter) p.limiter_ms.set(Number(limiter[1]), (p.limiter_ms.get(Number(limiter[1])) ?? 0) + 1);
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
