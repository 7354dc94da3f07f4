-- Which API a request used: 'chat/completions', 'completions', 'responses' or 'embeddings' (the path after
-- /v1/). Rows written before this column existed were all chat completions.
ALTER TABLE usage_logs ADD COLUMN endpoint TEXT NOT NULL DEFAULT 'chat/completions'
  CHECK (endpoint IN ('chat/completions', 'completions', 'responses', 'embeddings'));
