// Reads the gateway's one-JSON-line-per-request log from workerd's stdout/stderr while the bench runs, and
// keeps per-phase totals. The phase is the prefix of the request id the load generator sends
// (`<phase>-<worker>-<seq>`). Only lines that carry something the report needs are parsed, so the reader stays
// cheap next to a workerd serving thousands of requests per second.

import { createWriteStream } from 'node:fs';
import { createInterface } from 'node:readline';

const PHASE = /"request_id":"([^"]+)-\d+-\d+"/;

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
      p = { lines: 0, streams: 0, wasm_reported: 0, wasm_bytes_in: 0, wasm_bytes_out: 0, stream_end: {}, errors: {}, statuses: {} };
      this.phases.set(name, p);
    }
    return p;
  }

  line(line) {
    const routine = line.includes('"level":"info"') && !line.includes('"stream_end"');
    if (routine) {
      const m = PHASE.exec(line);
      if (m) this.phase(m[1]).lines++;
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
    const m = /^(.*)-\d+-\d+$/.exec(entry.request_id ?? '');
    const p = this.phase(m ? m[1] : '(other)');
    p.lines++;
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
    return { log_lines: p.lines, streams: p.streams, stream_end: p.stream_end, errors: p.errors, statuses: p.statuses, wasm };
  }

  close() {
    return new Promise((resolve) => this.raw.end(resolve));
  }
}
