-- API keys: only the SHA-256 of a key is stored; `id` is the key's public id (safe to log and show).
CREATE TABLE IF NOT EXISTS api_keys (
  id              TEXT PRIMARY KEY,
  key_hash        TEXT NOT NULL UNIQUE,
  user_id         TEXT NOT NULL,
  name            TEXT,
  active          INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
  -- Token budget for `budget_period` (NULL = unlimited).
  usage_limit     INTEGER CHECK (usage_limit IS NULL OR usage_limit > 0),
  budget_period   TEXT NOT NULL DEFAULT 'lifetime' CHECK (budget_period IN ('day', 'month', 'lifetime')),
  -- USD budget for `budget_period`, charged from OpenRouter's reported cost (NULL = unlimited).
  usd_limit       REAL CHECK (usd_limit IS NULL OR usd_limit > 0),
  -- Requests and tokens per minute (NULL = the gateway default / unlimited), concurrent requests (NULL = unlimited).
  rpm             INTEGER CHECK (rpm IS NULL OR rpm > 0),
  tpm             INTEGER CHECK (tpm IS NULL OR tpm > 0),
  max_concurrency INTEGER CHECK (max_concurrency IS NULL OR max_concurrency > 0),
  -- JSON array of model ids this key may use (NULL = any).
  allowed_models  TEXT,
  created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  revoked_at      TEXT
);
CREATE INDEX IF NOT EXISTS api_keys_user_id ON api_keys (user_id);

-- The billing ledger: one row per request that reached admission, keyed by request id so that a redelivered
-- usage event can never create a second row.
CREATE TABLE IF NOT EXISTS usage_logs (
  request_id        TEXT PRIMARY KEY,
  key_id            TEXT NOT NULL,
  user_id           TEXT NOT NULL,
  model             TEXT NOT NULL,
  served_model      TEXT,
  input_tokens      INTEGER NOT NULL DEFAULT 0,
  output_tokens     INTEGER NOT NULL DEFAULT 0,
  cached_tokens     INTEGER NOT NULL DEFAULT 0,
  reasoning_tokens  INTEGER NOT NULL DEFAULT 0,
  cost              REAL NOT NULL DEFAULT 0,
  -- 'reported' (from the upstream's usage) or 'estimated' (the stream was cut before usage arrived).
  usage_source      TEXT NOT NULL DEFAULT 'reported',
  status            INTEGER NOT NULL,
  streamed          INTEGER NOT NULL DEFAULT 0,
  finish_reason     TEXT,
  error             TEXT,
  latency_ms        INTEGER NOT NULL DEFAULT 0,
  ttft_ms           INTEGER,
  created_at        TEXT NOT NULL,
  -- Delivery to PostHog (NULL = pending or PostHog disabled), so a retried queue batch never re-sends.
  posthog_state     TEXT CHECK (posthog_state IS NULL OR posthog_state IN ('sent', 'rejected'))
);
CREATE INDEX IF NOT EXISTS usage_logs_user_created ON usage_logs (user_id, created_at);
CREATE INDEX IF NOT EXISTS usage_logs_key_created ON usage_logs (key_id, created_at);
