-- The ledger is keyed by the gateway's own request ids. The id a client sent (`x-client-request-id` or
-- `x-request-id`) is recorded beside them for support look-ups; it is not unique and keys nothing.
ALTER TABLE usage_logs ADD COLUMN client_request_id TEXT;
-- OpenRouter's generation id (`X-Generation-Id`), by which an estimated row is reconciled.
ALTER TABLE usage_logs ADD COLUMN generation_id TEXT;
-- Reconciliation of a row billed by estimate: NULL (not needed), 'pending', 'done' (usage_source becomes
-- 'reconciled') or 'failed' (OpenRouter never had the generation: the estimate stands).
ALTER TABLE usage_logs ADD COLUMN reconcile_state TEXT
  CHECK (reconcile_state IS NULL OR reconcile_state IN ('pending', 'done', 'failed'));
ALTER TABLE usage_logs ADD COLUMN reconciled_at TEXT;
CREATE INDEX IF NOT EXISTS usage_logs_client_request ON usage_logs (key_id, client_request_id);

-- Keys inserted by hand with the original design's columns (key_hash, user_id, active) get an id: SQLite lets a
-- TEXT PRIMARY KEY be NULL, and a key without an id cannot be named, limited or billed. SQLite cannot change a
-- column's default in place, so the table is rebuilt; rows without an id get one.
CREATE TABLE api_keys_new (
  id              TEXT PRIMARY KEY NOT NULL DEFAULT (lower(hex(randomblob(6)))),
  key_hash        TEXT NOT NULL UNIQUE,
  user_id         TEXT NOT NULL,
  name            TEXT,
  active          INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
  usage_limit     INTEGER CHECK (usage_limit IS NULL OR usage_limit > 0),
  budget_period   TEXT NOT NULL DEFAULT 'lifetime' CHECK (budget_period IN ('day', 'month', 'lifetime')),
  usd_limit       REAL CHECK (usd_limit IS NULL OR usd_limit > 0),
  rpm             INTEGER CHECK (rpm IS NULL OR rpm > 0),
  tpm             INTEGER CHECK (tpm IS NULL OR tpm > 0),
  max_concurrency INTEGER CHECK (max_concurrency IS NULL OR max_concurrency > 0),
  allowed_models  TEXT,
  created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  revoked_at      TEXT
);
INSERT INTO api_keys_new (id, key_hash, user_id, name, active, usage_limit, budget_period, usd_limit, rpm, tpm,
  max_concurrency, allowed_models, created_at, updated_at, revoked_at)
SELECT COALESCE(id, lower(hex(randomblob(6)))), key_hash, user_id, name, active, usage_limit, budget_period, usd_limit,
  rpm, tpm, max_concurrency, allowed_models, created_at, updated_at, revoked_at FROM api_keys;
DROP TABLE api_keys;
ALTER TABLE api_keys_new RENAME TO api_keys;
CREATE INDEX IF NOT EXISTS api_keys_user_id ON api_keys (user_id);
