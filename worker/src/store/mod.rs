//! The key store and the usage ledger behind one interface, [`Store`], with two implementations: D1
//! ([`d1`], `migrations/`) and PostgreSQL through Hyperdrive ([`postgres`], `migrations-postgres/`, in the
//! Worker's `postgres` build). `DB_PROVIDER` chooses; the request path, the admin API and the queue consumer
//! only see typed operations. Every SQL statement lives in its store's module; the ledger's rows are built once,
//! in [`ledger`], for both.
//!
//! Every operation is bounded and tried again after a transient failure, so every statement is idempotent:
//! ledger inserts ignore conflicts and updates set values. (A key insert retried after its first try did land
//! fails on the key's id: the admin call answers 503 and nothing is written twice.)

#[cfg(feature = "postgres")]
pub mod postgres;

pub mod d1;
pub mod ledger;

use worker::{Env, Error};

use crate::bindings::iso_time;
use crate::config::{Config, StoreKind};
use crate::keys::{KeyFields, KeyRecord, KeyRow};
use crate::usage_event::UsageEvent;
use crate::usage_report::{GroupBy, UsageFilter, UsageRow};
use ledger::RowState;

/// One invocation's store. Opening it is free; the Postgres store connects at its first operation and keeps
/// the connection until it is dropped (a connection cannot outlive the request that opened it).
pub enum Store {
    D1(Env),
    #[cfg(feature = "postgres")]
    Postgres(postgres::Postgres),
}

impl Store {
    pub fn open(env: &Env, config: &Config) -> Self {
        match config.store {
            StoreKind::D1 => Self::D1(env.clone()),
            #[cfg(feature = "postgres")]
            StoreKind::Postgres => Self::Postgres(postgres::Postgres::new(env)),
        }
    }

    /// The active key with this hash, as authentication needs it.
    pub async fn active_key(&self, hash: &str) -> Result<Option<KeyRecord>, Error> {
        match self {
            Self::D1(env) => d1::active_key(env, hash).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.active_key(hash).await,
        }
    }

    /// Inserts a new key under the id chosen for it; `now` is its creation time.
    pub async fn insert_key(&self, id: &str, hash: &str, fields: &KeyFields, now_ms: u64) -> Result<(), Error> {
        match self {
            Self::D1(env) => d1::insert_key(env, id, hash, fields, now_ms).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.insert_key(id, hash, fields, now_ms).await,
        }
    }

    /// Writes the fields that are set (`Some(None)` clears a limit); `active: false` also stamps `revoked_at`.
    pub async fn update_key(&self, id: &str, fields: &KeyFields, now_ms: u64) -> Result<(), Error> {
        match self {
            Self::D1(env) => d1::update_key(env, id, fields, now_ms).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.update_key(id, fields, now_ms).await,
        }
    }

    /// One key's row, by its public id.
    pub async fn key(&self, id: &str) -> Result<Option<KeyRow>, Error> {
        match self {
            Self::D1(env) => d1::key(env, id).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.key(id).await,
        }
    }

    /// Up to `limit` keys after the id `after`, of one user or all, ordered by id.
    pub async fn keys(&self, after: Option<&str>, user_id: Option<&str>, limit: u64) -> Result<Vec<KeyRow>, Error> {
        match self {
            Self::D1(env) => d1::keys(env, after, user_id, limit).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.keys(after, user_id, limit).await,
        }
    }

    /// Requests, tokens and cost from the ledger, filtered and grouped.
    pub async fn usage(&self, group_by: GroupBy, filter: &UsageFilter) -> Result<Vec<UsageRow>, Error> {
        match self {
            Self::D1(env) => d1::usage(env, group_by, filter).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.usage(group_by, filter).await,
        }
    }

    /// Writes the events' rows, one per request id (a redelivered event changes nothing); returns the rows the
    /// store reports written. `reconcile` says which rows await reconciliation.
    pub async fn insert_ledger_rows(
        &self,
        events: &[&UsageEvent],
        reconcile: impl Fn(&UsageEvent) -> bool,
    ) -> Result<u64, Error> {
        let rows = ledger::rows_json(events.iter().copied(), iso_time, reconcile);
        match self {
            Self::D1(env) => d1::insert_ledger_rows(env, &rows).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.insert_ledger_rows(&rows).await,
        }
    }

    /// Where these requests' rows stand (PostHog's verdict, reconciliation).
    pub async fn ledger_states<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Result<Vec<RowState>, Error> {
        let ids = ledger::ids_json(ids);
        match self {
            Self::D1(env) => d1::ledger_states(env, &ids).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.ledger_states(&ids).await,
        }
    }

    /// Records PostHog's verdict (`sent` or `rejected`) for these requests.
    pub async fn mark_posthog<'a>(&self, ids: impl IntoIterator<Item = &'a str>, state: &str) -> Result<(), Error> {
        let ids = ledger::ids_json(ids);
        match self {
            Self::D1(env) => d1::mark_posthog(env, &ids, state).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.mark_posthog(&ids, state).await,
        }
    }

    /// Replaces a pending row's estimate with the reconciled event's counts and cost.
    pub async fn reconcile_done(&self, reconciled: &UsageEvent, now_ms: u64) -> Result<(), Error> {
        match self {
            Self::D1(env) => d1::reconcile_done(env, reconciled, now_ms).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.reconcile_done(reconciled, now_ms).await,
        }
    }

    /// Gives a pending row's reconciliation up: its estimate stands.
    pub async fn reconcile_failed(&self, request_id: &str, now_ms: u64) -> Result<(), Error> {
        match self {
            Self::D1(env) => d1::reconcile_failed(env, request_id, now_ms).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.reconcile_failed(request_id, now_ms).await,
        }
    }
}

/// The columns of a [`KeyRow`]: every admin read selects these (never `key_hash`).
const KEY_COLUMNS: &str = "id, user_id, name, active, rpm, tpm, usage_limit, budget_period, usd_limit, \
max_concurrency, allowed_models, created_at, updated_at, revoked_at, cache_ttl_seconds, cache_scope, cache_sampled";

/// The columns of a [`KeyRecord`]: what authentication reads of an active key.
const RECORD_COLUMNS: &str = "id, user_id, rpm, tpm, usage_limit, budget_period, usd_limit, max_concurrency, \
allowed_models, updated_at, cache_ttl_seconds, cache_scope, cache_sampled";

/// What a usage report sums, the same in both dialects: the tokens and cost of the upstream's work, and apart
/// from them the cache hits (which used no budget and cost nothing) and what their original answers cost.
const AGGREGATES: &str = "COUNT(*) AS requests, \
COALESCE(SUM(CASE WHEN cache_hit = 0 THEN input_tokens ELSE 0 END), 0) AS input_tokens, \
COALESCE(SUM(CASE WHEN cache_hit = 0 THEN output_tokens ELSE 0 END), 0) AS output_tokens, \
COALESCE(SUM(CASE WHEN cache_hit = 0 THEN cached_tokens ELSE 0 END), 0) AS cached_tokens, \
COALESCE(SUM(cost), 0) AS cost_usd, COALESCE(SUM(cache_hit), 0) AS cache_hits, \
COALESCE(SUM(saved_cost), 0) AS saved_cost_usd";

/// The SQL expression a report groups on, the same in both dialects (fixed strings only: never built from input).
fn group_expression(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::Total => "'total'",
        GroupBy::Day => "substr(created_at, 1, 10)",
        GroupBy::Model => "model",
        GroupBy::Key => "key_id",
        GroupBy::User => "user_id",
        GroupBy::Endpoint => "endpoint",
    }
}
