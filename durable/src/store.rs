//! The object's SQLite storage: schema, loading the state, and writing the [`Change`]s of each decision.
//!
//! `SqlStorage::exec` is synchronous, so a decision and its writes happen in one turn of the event loop with no
//! `.await` between them: nothing else can interleave, and the runtime's output gate holds the response until the
//! writes are durable.

use std::collections::HashMap;

use serde::Deserialize;
use worker::{Result, SqlStorage, SqlStorageValue};

use crate::protocol::Amount;
use crate::quota::{Admission, BudgetSpend, Change, Expired, LeaseState, Quota, Reservation};

/// `requests`: one row per admitted request still in a window or still reserved. `tokens` is what it holds in the
/// token window (reserved, then actual); `reserved_*`, `expires_at_ms` and `unsettled_event` are set while it is
/// unsettled. A lease is a row too (named by its lease id, stamped at its end): `count` is how many requests
/// it counts for (1 for a request) and `lease` its state (`quota::LeaseState`, JSON) while it is open. `adjusted`: requests whose charge was corrected after settlement (see `Quota::adjust`).
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
const ADDED_COLUMNS: [(&str, &str); 3] = [
    ("requests", "unsettled_event TEXT"),
    ("requests", "count INTEGER NOT NULL DEFAULT 1"),
    ("requests", "lease TEXT"),
];

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
    count: f64,
    lease: Option<String>,
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
            .exec(
                "SELECT request_id, at_ms, tokens, reserved_tokens, reserved_usd, expires_at_ms, count, lease \
                 FROM requests",
                None,
            )?
            .to_array::<RequestRow>()?;
        let mut reservations = Vec::new();
        for r in &rows {
            let (Some(tokens), Some(expires_at_ms)) = (r.reserved_tokens, r.expires_at_ms) else { continue };
            // An unreadable lease state is an error, not an absence: a lease read as a request would be settled
            // as one.
            let lease = r.lease.as_deref().map(serde_json::from_str::<LeaseState>).transpose()?;
            reservations.push(Reservation {
                request_id: r.request_id.clone(),
                at_ms: r.at_ms as u64,
                reserved: Amount { tokens: tokens as u64, usd: r.reserved_usd.unwrap_or(0.0) },
                expires_at_ms: expires_at_ms as u64,
                lease,
            });
        }
        let admissions = rows
            .into_iter()
            .map(|r| Admission {
                request_id: r.request_id,
                at_ms: r.at_ms as u64,
                tokens: r.tokens as u64,
                count: r.count as u32,
            })
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
    /// Returns the rows written.
    pub fn apply(&self, changes: &[Change], unsettled_events: &HashMap<&str, &str>) -> Result<u64> {
        let mut written = 0;
        for change in changes {
            written += match change {
                Change::Admitted { reservation: r } => self.exec(
                    "INSERT INTO requests (request_id, at_ms, tokens, reserved_tokens, reserved_usd, expires_at_ms, \
                     unsettled_event, count, lease) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    vec![
                        r.request_id.as_str().into(),
                        int(r.at_ms),
                        int(r.reserved.tokens),
                        int(r.reserved.tokens),
                        r.reserved.usd.into(),
                        int(r.expires_at_ms),
                        unsettled_events.get(r.request_id.as_str()).map_or(SqlStorageValue::Null, |e| (*e).into()),
                        int(u64::from(r.lease.map_or(1, |l| l.slots))),
                        lease_json(r)?,
                    ],
                )?,
                Change::LeaseReported { lease_id, count, tokens, reservation } => self.exec(
                    "UPDATE requests SET count = ?, tokens = ?, reserved_tokens = ?, reserved_usd = ?, \
                     expires_at_ms = ?, lease = ?, unsettled_event = CASE WHEN ? THEN unsettled_event END \
                     WHERE request_id = ?",
                    vec![
                        int(u64::from(*count)),
                        int(*tokens),
                        reservation.as_ref().map_or(SqlStorageValue::Null, |r| int(r.reserved.tokens)),
                        reservation.as_ref().map_or(SqlStorageValue::Null, |r| r.reserved.usd.into()),
                        reservation.as_ref().map_or(SqlStorageValue::Null, |r| int(r.expires_at_ms)),
                        reservation.as_ref().map_or(Ok(SqlStorageValue::Null), lease_json)?,
                        i64::from(reservation.is_some()).into(),
                        lease_id.as_str().into(),
                    ],
                )?,
                Change::Settled { request_id, tokens } => self.exec(
                    "UPDATE requests SET tokens = ?, reserved_tokens = NULL, reserved_usd = NULL, expires_at_ms = NULL, \
                     unsettled_event = NULL, lease = NULL WHERE request_id = ?",
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
            };
        }
        Ok(written)
    }

    /// The usage events stored with these (unsettled) requests, for the lease alarm to send. A lease's event
    /// says what was charged for it: all it still held (its isolate never accounted for it).
    pub fn unsettled_events(&self, expired: &[Expired]) -> Result<Vec<String>> {
        let mut events = Vec::new();
        for e in expired {
            let rows = self
                .sql
                .exec("SELECT unsettled_event FROM requests WHERE request_id = ?", vec![e.request_id.as_str().into()])?
                .to_array::<EventRow>()?;
            for event in rows.into_iter().filter_map(|r| r.unsettled_event) {
                events.push(if e.lease { charged_event(&event, e.charged) } else { event });
            }
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

    pub fn save_meta<T: serde::Serialize>(&self, name: &str, value: &T) -> Result<u64> {
        let json = serde_json::to_string(value)?;
        self.exec("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", vec![name.into(), json.into()])
    }

    /// Runs a statement; returns the rows it wrote (as the platform bills them).
    fn exec(&self, query: &str, bindings: Vec<SqlStorageValue>) -> Result<u64> {
        let cursor = self.sql.exec(query, bindings)?;
        // Rows are billed once the cursor is consumed; these statements return none.
        let _ = cursor.to_array::<serde_json::Value>();
        Ok(cursor.rows_written() as u64)
    }
}

fn charged_event(event: &str, charged: Amount) -> String {
    let Ok(serde_json::Value::Object(mut event)) = serde_json::from_str::<serde_json::Value>(event) else {
        return event.to_owned();
    };
    event.insert("input_tokens".into(), 0.into());
    event.insert("output_tokens".into(), charged.tokens.into());
    event.insert("cost_usd".into(), serde_json::Number::from_f64(charged.usd).map_or(0.into(), Into::into));
    serde_json::Value::Object(event).to_string()
}

fn lease_json(r: &Reservation) -> Result<SqlStorageValue> {
    Ok(match &r.lease {
        Some(lease) => serde_json::to_string(lease)?.into(),
        None => SqlStorageValue::Null,
    })
}

/// SQLite integers are signed; our counts and timestamps always fit.
fn int(n: u64) -> SqlStorageValue {
    SqlStorageValue::from(i64::try_from(n).unwrap_or(i64::MAX))
}
