//! The object's SQLite storage: schema, loading the state, and writing the [`Change`]s of each decision.
//!
//! `SqlStorage::exec` is synchronous, so a decision and its writes happen in one turn of the event loop with no
//! `.await` between them: nothing else can interleave, and the runtime's output gate holds the response until the
//! writes are durable.

use serde::Deserialize;
use worker::{Result, SqlStorage, SqlStorageValue};

use crate::protocol::Amount;
use crate::quota::{Admission, BudgetSpend, Change, Quota, Reservation};

/// `requests`: one row per admitted request still in a window or still reserved. `tokens` is what it holds in the
/// token window (reserved, then actual); `reserved_*`, `expires_at_ms` and `unsettled_event` are set while it is
/// unsettled. `adjusted`: requests whose charge was corrected after settlement (see `Quota::adjust`).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL, tokens INTEGER NOT NULL,
  reserved_tokens INTEGER, reserved_usd REAL, expires_at_ms INTEGER);
CREATE INDEX IF NOT EXISTS requests_at ON requests (at_ms);
CREATE TABLE IF NOT EXISTS budget (id INTEGER PRIMARY KEY CHECK (id = 1), period_key TEXT NOT NULL,
  tokens INTEGER NOT NULL, usd REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adjusted (request_id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL);
";

/// Columns added after the first schema, each added once to objects created before it.
const ADDED_COLUMNS: [(&str, &str); 1] = [("requests", "unsettled_event TEXT")];

pub struct Store {
    sql: SqlStorage,
}

#[derive(Deserialize)]
struct RequestRow {
    request_id: String,
    at_ms: f64,
    tokens: f64,
    reserved_tokens: Option<f64>,
    reserved_usd: Option<f64>,
    expires_at_ms: Option<f64>,
}

#[derive(Deserialize)]
struct BudgetRow {
    period_key: String,
    tokens: f64,
    usd: f64,
}

#[derive(Deserialize)]
struct MetaRow {
    value: String,
}

#[derive(Deserialize)]
struct AdjustedRow {
    request_id: String,
    at_ms: f64,
}

#[derive(Deserialize)]
struct ColumnRow {
    name: String,
}

#[derive(Deserialize)]
struct EventRow {
    unsettled_event: Option<String>,
}

impl Store {
    pub fn open(sql: SqlStorage) -> Result<Store> {
        sql.exec(SCHEMA, None)?;
        let store = Store { sql };
        for (table, column) in ADDED_COLUMNS {
            let name = column.split(' ').next().unwrap_or(column);
            let present = store
                .sql
                .exec(&format!("SELECT name FROM pragma_table_info('{table}')"), None)?
                .to_array::<ColumnRow>()?
                .iter()
                .any(|c| c.name == name);
            if !present {
                store.sql.exec(&format!("ALTER TABLE {table} ADD COLUMN {column}"), None)?;
            }
        }
        Ok(store)
    }

    pub fn load(&self) -> Result<Quota> {
        let rows = self
            .sql
            .exec("SELECT request_id, at_ms, tokens, reserved_tokens, reserved_usd, expires_at_ms FROM requests", None)?
            .to_array::<RequestRow>()?;
        let reservations = rows
            .iter()
            .filter_map(|r| {
                Some(Reservation {
                    request_id: r.request_id.clone(),
                    at_ms: r.at_ms as u64,
                    reserved: Amount { tokens: r.reserved_tokens? as u64, usd: r.reserved_usd.unwrap_or(0.0) },
                    expires_at_ms: r.expires_at_ms? as u64,
                })
            })
            .collect();
        let admissions = rows
            .into_iter()
            .map(|r| Admission { request_id: r.request_id, at_ms: r.at_ms as u64, tokens: r.tokens as u64 })
            .collect();
        let budget = self
            .sql
            .exec("SELECT period_key, tokens, usd FROM budget WHERE id = 1", None)?
            .to_array::<BudgetRow>()?
            .into_iter()
            .next()
            .map(|r| BudgetSpend { period_key: r.period_key, spent: Amount { tokens: r.tokens as u64, usd: r.usd } });
        let adjusted = self
            .sql
            .exec("SELECT request_id, at_ms FROM adjusted", None)?
            .to_array::<AdjustedRow>()?
            .into_iter()
            .map(|r| (r.request_id, r.at_ms as u64))
            .collect();
        Ok(Quota::new(admissions, reservations, budget, adjusted))
    }

    /// Writes a decision's changes. `unsettled_event` is the admitted request's event for the case its Worker
    /// never settles it (see `AdmitRequest::unsettled_event`).
    pub fn apply(&self, changes: &[Change], unsettled_event: Option<&str>) -> Result<()> {
        for change in changes {
            match change {
                Change::Admitted { reservation: r } => self.exec(
                    "INSERT INTO requests (request_id, at_ms, tokens, reserved_tokens, reserved_usd, expires_at_ms, \
                     unsettled_event) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    vec![
                        r.request_id.as_str().into(),
                        int(r.at_ms),
                        int(r.reserved.tokens),
                        int(r.reserved.tokens),
                        r.reserved.usd.into(),
                        int(r.expires_at_ms),
                        unsettled_event.map_or(SqlStorageValue::Null, |e| e.into()),
                    ],
                )?,
                Change::Settled { request_id, tokens } => self.exec(
                    "UPDATE requests SET tokens = ?, reserved_tokens = NULL, reserved_usd = NULL, expires_at_ms = NULL, \
                     unsettled_event = NULL WHERE request_id = ?",
                    vec![int(*tokens), request_id.as_str().into()],
                )?,
                Change::Adjusted { request_id, at_ms } => self.exec(
                    "INSERT OR IGNORE INTO adjusted (request_id, at_ms) VALUES (?, ?)",
                    vec![request_id.as_str().into(), int(*at_ms)],
                )?,
                Change::ForgetAdjustedBefore(at_ms) => {
                    self.exec("DELETE FROM adjusted WHERE at_ms < ?", vec![int(*at_ms)])?
                }
                Change::ForgetUpTo(at_ms) => {
                    self.exec("DELETE FROM requests WHERE at_ms <= ? AND expires_at_ms IS NULL", vec![int(*at_ms)])?
                }
                Change::SetBudget(b) => self.exec(
                    "INSERT OR REPLACE INTO budget (id, period_key, tokens, usd) VALUES (1, ?, ?, ?)",
                    vec![b.period_key.as_str().into(), int(b.spent.tokens), b.spent.usd.into()],
                )?,
            }
        }
        Ok(())
    }

    /// The usage events stored with these (unsettled) requests, for the lease alarm to send.
    pub fn unsettled_events(&self, request_ids: &[&str]) -> Result<Vec<String>> {
        let mut events = Vec::new();
        for id in request_ids {
            let rows = self
                .sql
                .exec("SELECT unsettled_event FROM requests WHERE request_id = ?", vec![(*id).into()])?
                .to_array::<EventRow>()?;
            events.extend(rows.into_iter().filter_map(|r| r.unsettled_event));
        }
        Ok(events)
    }

    /// A small JSON value kept by name (the last limits seen, which the lease alarm needs after a restart; the
    /// control pushed by the admin API). A value that does not parse is an error, not an absence: a lost
    /// revocation must not read as "nothing was pushed".
    pub fn load_meta<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let row = self
            .sql
            .exec("SELECT value FROM meta WHERE name = ?", vec![name.into()])?
            .to_array::<MetaRow>()?
            .into_iter()
            .next();
        row.map(|r| serde_json::from_str(&r.value)).transpose().map_err(worker::Error::from)
    }

    pub fn save_meta<T: serde::Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let json = serde_json::to_string(value)?;
        self.exec("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", vec![name.into(), json.into()])
    }

    fn exec(&self, query: &str, bindings: Vec<SqlStorageValue>) -> Result<()> {
        self.sql.exec(query, bindings)?;
        Ok(())
    }
}

/// SQLite integers are signed; our counts and timestamps always fit.
fn int(n: u64) -> SqlStorageValue {
    SqlStorageValue::from(i64::try_from(n).unwrap_or(i64::MAX))
}
