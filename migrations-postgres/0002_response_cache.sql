-- The twin of migrations/0004_response_cache.sql: the response cache's key settings and ledger columns.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS cache_ttl_seconds BIGINT CHECK (cache_ttl_seconds IS NULL OR cache_ttl_seconds > 0);
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS cache_scope TEXT NOT NULL DEFAULT 'key' CHECK (cache_scope IN ('key', 'user'));
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS cache_sampled INTEGER NOT NULL DEFAULT 0 CHECK (cache_sampled IN (0, 1));
ALTER TABLE usage_logs ADD COLUMN IF NOT EXISTS cache_hit INTEGER NOT NULL DEFAULT 0 CHECK (cache_hit IN (0, 1));
ALTER TABLE usage_logs ADD COLUMN IF NOT EXISTS saved_cost DOUBLE PRECISION NOT NULL DEFAULT 0;
