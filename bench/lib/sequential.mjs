// What the small side benchmarks (bench/stores.mjs, bench/cache.mjs) share: an OpenRouter stand-in of their own,
// latency percentiles of requests made one at a time, writing their results, and running with cleanups.

import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import { round } from './procs.mjs';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** Starts standins/openrouter.mjs; resolves with its base URL and a function that stops it. */
export async function startStandin() {
  const child = spawn(process.execPath, [join(ROOT, 'standins', 'openrouter.mjs'), '--port', '0', '--exit-with-stdin'], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const line = await new Promise((resolve) => createInterface({ input: child.stdout }).once('line', resolve));
  return { base: JSON.parse(line).listening, stop: () => child.kill('SIGTERM') };
}

/** The p-th percentile of sorted numbers (nearest rank). */
export function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

/** p50, p90 and p99 of a list of milliseconds, rounded to 0.01 ms. */
export function latencySummary(times) {
  const sorted = [...times].sort((a, b) => a - b);
  const ms = (p) => round(percentile(sorted, p), 2);
  return { requests: sorted.length, p50_ms: ms(50), p90_ms: ms(90), p99_ms: ms(99) };
}

/** Writes `<outDir>/<name>.json` and `.md` (`markdown(results)`), and prints the Markdown. */
export function writeResults(outDir, name, results, markdown) {
  mkdirSync(outDir, { recursive: true });
  writeFileSync(join(outDir, `${name}.json`), `${JSON.stringify(results, null, 2)}\n`);
  writeFileSync(join(outDir, `${name}.md`), markdown(results));
  process.stdout.write(`${markdown(results)}\n`);
}

/** Runs `main`, then every cleanup (the last pushed first) whatever happened, then exits (1 if `main` failed). */
export function runBenchmark(main, cleanups, log) {
  const cleanup = async () => {
    for (const undo of cleanups.reverse()) await Promise.resolve().then(undo).catch(() => {});
  };
  main()
    .then(cleanup, async (error) => {
      log(`failed: ${error.stack ?? error.message}`);
      await cleanup();
      process.exitCode = 1;
    })
    .then(() => process.exit());
}
