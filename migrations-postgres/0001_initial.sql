-- The Postgres store (DB_PROVIDER=neon): the same tables, columns and constraints as the D1 schema after
-- migrations/0001-0003, written once for Postgres. Timestamps stay RFC 3339 text, as in D1, so reports filter
-- and group by day the same way in both stores. A later D1 migration gets its Postgres twin here.

-- API keys: only the SHA-256 of a key is stored; `id` is the key's public id (safe to log and show).
CREATE TABLE IF NOT EXISTS api_keys (
  id              TEXT PRIMARY KEY DEFAULT substr(md5(random()::text), 1, 12),
  key_hash        TEXT NOT NULL UNIQUE,
  user_id         TEXT NOT NULL,
  name            TEXT,
  active          INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
  -- Token budget for `budget_period` (NULL = unlimited).
  usage_limit     BIGINT CHECK (usage_limit IS NULL OR usage_limit > 0),
  budget_period   TEXT NOT NULL DEFAULT 'lifetime' CHECK (budget_period IN ('day', 'month', 'lifetime')),
  -- USD budget for `budget_period`, charged from OpenRouter's reported cost (NULL = unlimited).
  usd_limit       DOUBLE PRECISION CHECK (usd_limit IS NULL OR usd_limit > 0),
  -- Requests and tokens per minute (NULL = the gateway default / unlimited), concurrent requests (NULL = unlimited).
  rpm             BIGINT CHECK (rpm IS NULL OR rpm > 0),
  tpm             BIGINT CHECK (tpm IS NULL OR tpm > 0),
  max_concurrency BIGINT CHECK (max_concurrency IS NULL OR max_concurrency > 0),
  -- JSON array of model ids this key may use (NULL = any).
  allowed_models  TEXT,
  created_at      TEXT NOT NULL DEFAULT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
  updated_at      TEXT NOT NULL DEFAULT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
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
  input_tokens      BIGINT NOT NULL DEFAULT 0,
  output_tokens     BIGINT NOT NULL DEFAULT 0,
  cached_tokens     BIGINT NOT NULL DEFAULT 0,
  reasoning_tokens  BIGINT NOT NULL DEFAULT 0,
  cost              DOUBLE PRECISION NOT NULL DEFAULT 0,
  -- 'reported' (from the upstream's usage), 'estimated' (the stream was cut before usage arrived) or
  -- 'reconciled' (OpenRouter's account replaced the estimate).
  usage_source      TEXT NOT NULL DEFAULT 'reported',
  status            INTEGER NOT NULL,
  streamed          INTEGER NOT NULL DEFAULT 0,
  finish_reason     TEXT,
  error             TEXT,
  latency_ms        BIGINT NOT NULL DEFAULT 0,
  ttft_ms           BIGINT,
  created_at        TEXT NOT NULL,
  -- Delivery to PostHog (NULL = pending or PostHog disabled), so a retried queue batch never re-sends.
  posthog_state     TEXT CHECK (posthog_state IS NULL OR posthog_state IN ('sent', 'rejected')),
  -- The id a client sent (`x-client-request-id` or `x-request-id`), for support look-ups; it keys nothing.
  client_request_id TEXT,
  -- OpenRouter's generation id (`X-Generation-Id`), by which an estimated row is reconciled.
  generation_id     TEXT,
  reconcile_state   TEXT CHECK (reconcile_state IS NULL OR reconcile_state IN ('pending', 'done', 'failed')),
  reconciled_at     TEXT,
  -- Which API a request used (the path after /v1/).
  endpoint          TEXT NOT NULL DEFAULT 'chat/completions'
    CHECK (endpoint IN ('chat/completions', 'completions', 'responses', 'embeddings'))
);
CREATE INDEX IF NOT EXISTS usage_logs_user_created ON usage_logs (user_id, created_at);
CREATE INDEX IF NOT EXISTS usage_logs_key_created ON usage_logs (key_id, created_at);
CREATE INDEX IF NOT EXISTS usage_logs_client_request ON usage_logs (key_id, client_request_id);
