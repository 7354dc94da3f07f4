// wrangler.toml → Miniflare worker options for the gateway, derived (not restated) so the bench runs the Worker
// with the bindings the deployment declares. A binding type the bench cannot reproduce is an error, not a silent
// omission: a benchmark of a Worker missing a binding would measure something else.

import { readFileSync, readdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { parseToml } from './toml.mjs';

// Top-level wrangler.toml keys that declare bindings this bench does not know how to give the Worker.
const UNSUPPORTED_BINDINGS = [
  'r2_buckets', 'services', 'ai', 'analytics_engine_datasets', 'hyperdrive', 'vectorize', 'browser', 'send_email',
  'workflows', 'ratelimits', 'unsafe', 'version_metadata', 'secrets_store_secrets', 'dispatch_namespaces',
  'mtls_certificates', 'assets', 'images', 'pipelines', 'wasm_modules', 'text_blobs', 'data_blobs', 'containers',
  'logfwdr', 'worker_loaders', 'vpc_services',
];
const SUPPORTED_QUEUE_KEYS = new Set(['producers', 'consumers']);

export function readWranglerToml(root) {
  const path = join(root, 'wrangler.toml');
  return { path, config: parseToml(readFileSync(path, 'utf8')) };
}

/**
 * Builds the gateway's Miniflare worker options from wrangler.toml.
 * Returns { options, declared }: `declared` lists the binding names per kind, as wrangler.toml spells them.
 */
export function gatewayWorkerOptions(root, config, { varOverrides = {} } = {}) {
  const unsupported = UNSUPPORTED_BINDINGS.filter((k) => config[k] !== undefined);
  const queueKeys = Object.keys(config.queues ?? {}).filter((k) => !SUPPORTED_QUEUE_KEYS.has(k));
  if (unsupported.length || queueKeys.length) {
    throw new Error(
      `wrangler.toml declares bindings the bench does not reproduce: ${[...unsupported, ...queueKeys.map((k) => `queues.${k}`)].join(', ')}. ` +
        'Teach bench/lib/worker-config.mjs to bind them (Miniflare supports most), then rerun.',
    );
  }
  if (!config.main) throw new Error('wrangler.toml has no `main`');

  const main = resolve(root, config.main);
  const moduleDir = dirname(main);
  // worker-build emits one ES module that imports its wasm as a sibling module (`import x from "./index_bg.wasm"`).
  const wasm = readdirSync(moduleDir).filter((f) => f.endsWith('.wasm'));
  const modules = [
    { type: 'ESModule', path: main },
    ...wasm.map((f) => ({ type: 'CompiledWasm', path: join(moduleDir, f) })),
  ];

  const d1 = (config.d1_databases ?? []).map((d) => {
    if (d.remote) throw new Error(`D1 binding ${d.binding} is remote-only; the bench runs locally`);
    return d;
  });
  const kv = config.kv_namespaces ?? [];
  const doBindings = config.durable_objects?.bindings ?? [];
  const sqliteClasses = new Set((config.migrations ?? []).flatMap((m) => m.new_sqlite_classes ?? []));
  for (const b of doBindings) {
    if (b.script_name) throw new Error(`Durable Object ${b.name} lives in another script (${b.script_name}); not reproduced`);
  }
  const producers = config.queues?.producers ?? [];
  const consumers = config.queues?.consumers ?? [];
  const vars = config.vars ?? {};
  for (const [name, value] of Object.entries(vars)) {
    if (typeof value === 'object') throw new Error(`[vars] ${name} is a JSON var; not reproduced`);
  }

  const options = {
    name: config.name ?? 'gateway',
    modules,
    modulesRoot: moduleDir,
    compatibilityDate: config.compatibility_date,
    compatibilityFlags: config.compatibility_flags ?? [],
    d1Databases: Object.fromEntries(d1.map((d) => [d.binding, d.database_id ?? d.database_name])),
    kvNamespaces: Object.fromEntries(kv.map((k) => [k.binding, k.id ?? k.binding])),
    durableObjects: Object.fromEntries(
      doBindings.map((b) => [b.name, { className: b.class_name, useSQLite: sqliteClasses.has(b.class_name) }]),
    ),
    queueProducers: Object.fromEntries(
      producers.map((p) => [p.binding, { queueName: p.queue, ...(p.delivery_delay ? { deliveryDelay: p.delivery_delay } : {}) }]),
    ),
    queueConsumers: Object.fromEntries(
      consumers.map((c) => [
        c.queue,
        dropUndefined({
          maxBatchSize: c.max_batch_size,
          maxBatchTimeout: c.max_batch_timeout,
          maxRetries: c.max_retries,
          deadLetterQueue: c.dead_letter_queue,
          retryDelay: c.retry_delay,
        }),
      ]),
    ),
    // Strings, as `wrangler dev` passes [vars]; the overrides are the bench's (upstream, limits).
    bindings: Object.fromEntries(
      Object.entries({ ...vars, ...varOverrides }).map(([k, v]) => [k, typeof v === 'string' ? v : String(v)]),
    ),
  };

  const declared = {
    d1: d1.map((d) => d.binding),
    kv: kv.map((k) => k.binding),
    durableObjects: doBindings.map((b) => b.name),
    queueProducers: producers.map((p) => p.binding),
    queueConsumers: consumers.map((c) => c.queue),
    vars: Object.keys(vars),
  };
  const migrationsDirs = d1.map((d) => ({ binding: d.binding, dir: resolve(root, d.migrations_dir ?? 'migrations') }));
  return { options, declared, migrationsDirs };
}

/**
 * Compares the env the running Worker actually sees (`mf.getBindings()`) with what wrangler.toml declares plus
 * the bench's own vars; throws on any difference.
 */
export function assertBindingsMatch(actualEnv, declared, extraVars) {
  const expected = new Set([
    ...declared.d1,
    ...declared.kv,
    ...declared.durableObjects,
    ...declared.queueProducers,
    ...declared.vars,
    ...extraVars,
  ]);
  const actual = new Set(Object.keys(actualEnv));
  const missing = [...expected].filter((n) => !actual.has(n));
  const extra = [...actual].filter((n) => !expected.has(n));
  if (missing.length || extra.length) {
    throw new Error(
      `the gateway's bindings differ from wrangler.toml: missing [${missing.join(', ')}], unexpected [${extra.join(', ')}]`,
    );
  }
  return [...expected].sort();
}

function dropUndefined(object) {
  return Object.fromEntries(Object.entries(object).filter(([, v]) => v !== undefined));
}
