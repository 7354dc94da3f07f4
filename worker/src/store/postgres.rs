//! The PostgreSQL store (Neon, `migrations-postgres/`), reached through the `HYPERDRIVE` binding with
//! `tokio-postgres` over the runtime's TCP socket.
//!
//! - Statements run with `query_typed` / `execute_typed`: the parameter types travel with the statement, so
//!   nothing is prepared (one round trip, and no prepared statement for Hyperdrive's pool to track).
//! - Reads return each row as one JSON text column (`row_to_json`), decoded into the same structs D1's rows
//!   decode into: one row type per table, whichever store filled it.
//! - A ledger batch is one JSON parameter expanded with `jsonb_to_recordset`, as D1 expands it with `json_each`.
//! - One connection per [`Postgres`] (one invocation), opened at its first statement; a failed statement drops it,
//!   and a retried one (after a failure or a timeout) opens a new one.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;
use worker::postgres_tls::PassthroughTls;
use worker::{Env, Error, SecureTransport, Socket};

use super::{group_expression, ledger::RowState, AGGREGATES, KEY_COLUMNS, RECORD_COLUMNS};
use crate::bindings::{self, iso_time, log_error};
use crate::keys::{KeyFields, KeyRecord, KeyRow};
use crate::usage_event::UsageEvent;
use crate::usage_report::{GroupBy, UsageFilter, UsageRow};

pub const HYPERDRIVE: &str = "HYPERDRIVE";

/// A statement parameter and its Postgres type.
type Param<'a> = (&'a (dyn ToSql + Sync), Type);

pub struct Postgres {
    env: Env,
    client: RefCell<Option<Rc<Client>>>,
}

impl Postgres {
    pub fn new(env: &Env) -> Self {
        Self { env: env.clone(), client: RefCell::new(None) }
    }

    pub async fn active_key(&self, hash: &str) -> Result<Option<KeyRecord>, Error> {
        let sql = format!("SELECT {RECORD_COLUMNS} FROM api_keys WHERE key_hash = $1 AND active = 1");
        Ok(self.rows(&sql, &[(&hash, Type::TEXT)]).await?.into_iter().next())
    }

    pub async fn insert_key(&self, id: &str, hash: &str, fields: &KeyFields, now_ms: u64) -> Result<(), Error> {
        let now = iso_time(now_ms);
        let name = fields.name.clone().flatten();
        let models = fields.allowed_models.clone().flatten().map(|m| json!(m).to_string());
        let period = fields.budget_period.as_deref().unwrap_or("lifetime");
        let [rpm, tpm, usage_limit, max_concurrency] =
            [fields.rpm, fields.tpm, fields.usage_limit, fields.max_concurrency].map(|n| n.flatten().map(int));
        let usd_limit = fields.usd_limit.flatten();
        let cache_ttl = fields.cache_ttl_seconds.flatten().map(int);
        let cache_scope = fields.cache_scope.as_deref().unwrap_or("key");
        let cache_sampled = i32::from(fields.cache_sampled == Some(true));
        let sql = "INSERT INTO api_keys (id, key_hash, user_id, name, rpm, tpm, usage_limit, budget_period, \
                   usd_limit, max_concurrency, allowed_models, created_at, updated_at, cache_ttl_seconds, \
                   cache_scope, cache_sampled) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14, $15)";
        let params: [Param; 15] = [
            (&id, Type::TEXT),
            (&hash, Type::TEXT),
            (&fields.user_id, Type::TEXT),
            (&name, Type::TEXT),
            (&rpm, Type::INT8),
            (&tpm, Type::INT8),
            (&usage_limit, Type::INT8),
            (&period, Type::TEXT),
            (&usd_limit, Type::FLOAT8),
            (&max_concurrency, Type::INT8),
            (&models, Type::TEXT),
            (&now, Type::TEXT),
            (&cache_ttl, Type::INT8),
            (&cache_scope, Type::TEXT),
            (&cache_sampled, Type::INT4),
        ];
        self.execute(sql, &params).await.map(drop)
    }

    pub async fn update_key(&self, id: &str, fields: &KeyFields, now_ms: u64) -> Result<(), Error> {
        let now = iso_time(now_ms);
        let name = fields.name.as_ref().map(|n| n.as_deref());
        let limits = [fields.rpm, fields.tpm, fields.usage_limit, fields.max_concurrency, fields.cache_ttl_seconds]
            .map(|set| set.map(|n| n.map(int)));
        let cache_sampled = fields.cache_sampled.map(i32::from);
        let models = fields.allowed_models.as_ref().map(|m| m.as_ref().map(|m| json!(m).to_string()));
        let active = fields.active.map(i32::from);
        let revoked_at = fields.active.map(|active| (!active).then(|| now.clone()));

        let mut sets: Vec<(&str, Param)> = vec![("updated_at", (&now, Type::TEXT))];
        if let Some(name) = &name {
            sets.push(("name", (name, Type::TEXT)));
        }
        let limit_columns = ["rpm", "tpm", "usage_limit", "max_concurrency", "cache_ttl_seconds"];
        for (column, value) in limit_columns.into_iter().zip(&limits) {
            if let Some(value) = value {
                sets.push((column, (value, Type::INT8)));
            }
        }
        if let Some(period) = &fields.budget_period {
            sets.push(("budget_period", (period, Type::TEXT)));
        }
        if let Some(usd) = &fields.usd_limit {
            sets.push(("usd_limit", (usd, Type::FLOAT8)));
        }
        if let Some(models) = &models {
            sets.push(("allowed_models", (models, Type::TEXT)));
        }
        if let Some(scope) = &fields.cache_scope {
            sets.push(("cache_scope", (scope, Type::TEXT)));
        }
        if let Some(sampled) = &cache_sampled {
            sets.push(("cache_sampled", (sampled, Type::INT4)));
        }
        if let (Some(active), Some(revoked_at)) = (&active, &revoked_at) {
            sets.push(("active", (active, Type::INT4)));
            sets.push(("revoked_at", (revoked_at, Type::TEXT)));
        }
        let assignments: Vec<String> =
            sets.iter().enumerate().map(|(i, (column, _))| format!("{column} = ${}", i + 1)).collect();
        let sql = format!("UPDATE api_keys SET {} WHERE id = ${}", assignments.join(", "), sets.len() + 1);
        let params: Vec<Param> = sets.into_iter().map(|(_, param)| param).chain([(&id as _, Type::TEXT)]).collect();
        self.execute(&sql, &params).await.map(drop)
    }

    pub async fn key(&self, id: &str) -> Result<Option<KeyRow>, Error> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
        Ok(self.rows(&sql, &[(&id, Type::TEXT)]).await?.into_iter().next())
    }

    pub async fn keys(&self, after: Option<&str>, user_id: Option<&str>, limit: u64) -> Result<Vec<KeyRow>, Error> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE ($1::text IS NULL OR id > $1) \
             AND ($2::text IS NULL OR user_id = $2) ORDER BY id LIMIT $3"
        );
        let limit = int(limit);
        self.rows(&sql, &[(&after, Type::TEXT), (&user_id, Type::TEXT), (&limit, Type::INT8)]).await
    }

    pub async fn usage(&self, group_by: GroupBy, filter: &UsageFilter) -> Result<Vec<UsageRow>, Error> {
        let params: [Param; 4] = [
            (&filter.user_id, Type::TEXT),
            (&filter.key_id, Type::TEXT),
            (&filter.from, Type::TEXT),
            (&filter.to, Type::TEXT),
        ];
        self.rows(&aggregate_sql(group_by), &params).await
    }

    /// Returns the rows inserted (a redelivered row is not counted).
    pub async fn insert_ledger_rows(&self, rows_json: &str) -> Result<u64, Error> {
        self.execute(INSERT_BATCH, &[(&rows_json, Type::TEXT)]).await
    }

    pub async fn ledger_states(&self, ids_json: &str) -> Result<Vec<RowState>, Error> {
        self.rows(ROW_STATES, &[(&ids_json, Type::TEXT)]).await
    }

    pub async fn mark_posthog(&self, ids_json: &str, state: &str) -> Result<(), Error> {
        self.execute(MARK_POSTHOG, &[(&ids_json, Type::TEXT), (&state, Type::TEXT)]).await.map(drop)
    }

    pub async fn reconcile_done(&self, reconciled: &UsageEvent, now_ms: u64) -> Result<(), Error> {
        let counts =
            [reconciled.input_tokens, reconciled.output_tokens, reconciled.cached_tokens, reconciled.reasoning_tokens]
                .map(int);
        let now = iso_time(now_ms);
        let params: [Param; 7] = [
            (&reconciled.request_id, Type::TEXT),
            (&counts[0], Type::INT8),
            (&counts[1], Type::INT8),
            (&counts[2], Type::INT8),
            (&counts[3], Type::INT8),
            (&reconciled.cost_usd, Type::FLOAT8),
            (&now, Type::TEXT),
        ];
        self.execute(RECONCILE_DONE, &params).await.map(drop)
    }

    pub async fn reconcile_failed(&self, request_id: &str, now_ms: u64) -> Result<(), Error> {
        let now = iso_time(now_ms);
        self.execute(RECONCILE_FAILED, &[(&request_id, Type::TEXT), (&now, Type::TEXT)]).await.map(drop)
    }

    /// Runs a query that selects `T`'s columns; each row travels as one JSON object.
    async fn rows<T: DeserializeOwned>(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<T>, Error> {
        let sql = format!("SELECT row_to_json(r)::text FROM ({sql}) r");
        let tried = Cell::new(false);
        let rows = bindings::retried("Postgres query", || async {
            let client = self.client(tried.replace(true)).await?;
            self.checked(client.query_typed(&sql, params).await)
        })
        .await?;
        rows.iter()
            .map(|row| {
                let text: &str = row.try_get(0).map_err(pg_error)?;
                serde_json::from_str(text).map_err(|e| Error::RustError(format!("Postgres row: {e}")))
            })
            .collect()
    }

    /// Runs a statement; returns the rows it changed.
    async fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64, Error> {
        let tried = Cell::new(false);
        bindings::retried("Postgres statement", || async {
            let client = self.client(tried.replace(true)).await?;
            self.checked(client.execute_typed(sql, params).await)
        })
        .await
    }

    /// A statement's result; a failure drops the connection, so the next statement opens a fresh one.
    fn checked<T>(&self, result: Result<T, tokio_postgres::Error>) -> Result<T, Error> {
        result.map_err(|e| {
            self.client.borrow_mut().take();
            pg_error(e)
        })
    }

    /// This invocation's connection, opened now if it is not open yet or if this is a retry (`fresh`: the try
    /// before may have timed out on a connection that no longer answers).
    async fn client(&self, fresh: bool) -> Result<Rc<Client>, Error> {
        if fresh {
            self.client.borrow_mut().take();
        }
        if let Some(client) = self.client.borrow().clone() {
            return Ok(client);
        }
        let hyperdrive = self.env.hyperdrive(HYPERDRIVE)?;
        let config: tokio_postgres::Config = hyperdrive.connection_string().parse().map_err(pg_error)?;
        // As workers-rs' example connects: the client asks for TLS (`sslmode` defaults to `prefer`) and the socket
        // is upgraded if the server agrees; a local server without TLS declines and the connection stays plain.
        let socket = Socket::builder()
            .secure_transport(SecureTransport::StartTls)
            .connect(hyperdrive.host(), hyperdrive.port())?;
        let (client, connection) = config.connect_raw(socket, PassthroughTls).await.map_err(pg_error)?;
        wasm_bindgen_futures::spawn_local(async move {
            if let Err(e) = connection.await {
                log_error("postgres_connection_failed", &e.to_string());
            }
        });
        let client = Rc::new(client);
        *self.client.borrow_mut() = Some(client.clone());
        Ok(client)
    }
}

/// The aggregate query and its four parameters (`user_id`, `key_id`, `from`, `to`; null = no filter).
fn aggregate_sql(group_by: GroupBy) -> String {
    format!(
        "SELECT {} AS grp, {AGGREGATES} FROM usage_logs WHERE ($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR key_id = $2) \
         AND ($3::text IS NULL OR created_at >= $3) AND ($4::text IS NULL OR created_at < $4) \
         GROUP BY 1 ORDER BY 1",
        group_expression(group_by)
    )
}

/// One row per element of the JSON array `$1`; a request id already there is skipped (redelivery).
const INSERT_BATCH: &str = "INSERT INTO usage_logs (request_id, client_request_id, generation_id, key_id, \
user_id, model, served_model, input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost, usage_source, \
status, streamed, finish_reason, error, latency_ms, ttft_ms, created_at, reconcile_state, endpoint, cache_hit, \
saved_cost) SELECT request_id, client_request_id, generation_id, key_id, user_id, model, served_model, input_tokens, \
output_tokens, cached_tokens, reasoning_tokens, cost, usage_source, status, streamed, finish_reason, error, \
latency_ms, ttft_ms, created_at, reconcile_state, endpoint, cache_hit, saved_cost FROM jsonb_to_recordset($1::jsonb) AS r(\
request_id text, client_request_id text, generation_id text, key_id text, user_id text, model text, \
served_model text, input_tokens bigint, output_tokens bigint, cached_tokens bigint, reasoning_tokens bigint, \
cost double precision, usage_source text, status integer, streamed integer, finish_reason text, error text, \
latency_ms bigint, ttft_ms bigint, created_at text, reconcile_state text, endpoint text, cache_hit integer, \
saved_cost double precision) ON CONFLICT (request_id) DO NOTHING";

/// Where the batch's rows stand: PostHog's verdict and reconciliation.
const ROW_STATES: &str = "SELECT request_id, posthog_state, reconcile_state FROM usage_logs \
WHERE request_id IN (SELECT jsonb_array_elements_text($1::jsonb))";

/// Replaces a pending row's estimate with OpenRouter's account. Changes nothing once the row is reconciled.
const RECONCILE_DONE: &str = "UPDATE usage_logs SET input_tokens = $2, output_tokens = $3, cached_tokens = $4, \
reasoning_tokens = $5, cost = $6, usage_source = 'reconciled', reconcile_state = 'done', reconciled_at = $7 \
WHERE request_id = $1 AND reconcile_state = 'pending'";

/// Gives a pending row up: its estimate stands.
const RECONCILE_FAILED: &str = "UPDATE usage_logs SET reconcile_state = 'failed', reconciled_at = $2 \
WHERE request_id = $1 AND reconcile_state = 'pending'";

/// Records PostHog's verdict (`sent` or `rejected`) for these request ids.
const MARK_POSTHOG: &str = "UPDATE usage_logs SET posthog_state = $2 \
WHERE request_id IN (SELECT jsonb_array_elements_text($1::jsonb))";

/// A count as Postgres' `bigint` (every count and limit the gateway keeps is far below its range).
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn pg_error(e: impl std::fmt::Display) -> Error {
    Error::RustError(format!("Postgres: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ledger::COLUMNS;

    #[test]
    fn the_batch_insert_writes_and_types_every_ledger_column() {
        let (insert, record) = INSERT_BATCH.split_once(" AS r(").unwrap_or_default();
        let target = insert.split(" SELECT ").next().unwrap_or_default();
        for column in COLUMNS {
            assert!(target.contains(column), "insert lacks {column}");
            assert!(record.contains(&format!("{column} ")), "the record type lacks {column}");
        }
    }

    #[test]
    fn reports_group_by_position() {
        assert!(aggregate_sql(GroupBy::Day).starts_with("SELECT substr(created_at, 1, 10) AS grp"));
        assert!(aggregate_sql(GroupBy::Total).contains("GROUP BY 1 ORDER BY 1"));
    }
}
