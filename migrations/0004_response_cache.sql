-- The response cache. Per key: how long answers to its requests are kept in KV (NULL = only requests that ask
-- with Cache-Control are cached), whose answers an entry may serve ('key': this key's own; 'user': every key of
-- the same user that shares), and whether requests that sample (temperature above 0, or unset) are cached too.
ALTER TABLE api_keys ADD COLUMN cache_ttl_seconds INTEGER CHECK (cache_ttl_seconds IS NULL OR cache_ttl_seconds > 0);
ALTER TABLE api_keys ADD COLUMN cache_scope TEXT NOT NULL DEFAULT 'key' CHECK (cache_scope IN ('key', 'user'));
ALTER TABLE api_keys ADD COLUMN cache_sampled INTEGER NOT NULL DEFAULT 0 CHECK (cache_sampled IN (0, 1));
-- Per request: answered from the cache (then `cost` is 0, the token counts are the original answer's, and
-- `saved_cost` is what the original answer cost upstream).
ALTER TABLE usage_logs ADD COLUMN cache_hit INTEGER NOT NULL DEFAULT 0 CHECK (cache_hit IN (0, 1));
ALTER TABLE usage_logs ADD COLUMN saved_cost REAL NOT NULL DEFAULT 0;
