// Cloudflare's published list prices (Workers Paid plan, Standard usage model), in USD per million units, beyond
// each plan's included monthly amounts. Source and date: bench/README.md ("The platform bill").
export const PRICES = {
  as_of: '2026-07-07',
  worker_requests: 0.3,
  worker_cpu_ms: 0.02,
  do_requests: 0.15,
  do_gb_s: 12.5,
  do_rows_written: 1.0,
  d1_rows_written: 1.0,
  queue_operations: 0.4,
  kv_reads: 0.5,
};

/** Durable Objects are billed at 128 MB while active, whatever they use. */
export const DO_BILLED_GB = 0.125;

/** A usage event is one message under 64 KB: written, read and deleted once each (no retries in the bench). */
export const QUEUE_OPERATIONS_PER_EVENT = 3;

/** What a million requests cost, from their operations per request: `{ item: count per request }`. */
export function billPerMillion(perRequest) {
  const lines = Object.entries(perRequest).map(([item, count]) => ({
    item,
    per_request: count,
    usd_per_million_requests: count === null ? null : count * PRICES[item],
  }));
  const total = lines.reduce((sum, l) => sum + (l.usd_per_million_requests ?? 0), 0);
  return { lines, usd_per_million_requests: total, prices_as_of: PRICES.as_of };
}
