//! Usage read-out from the ledger (`GET /admin/usage` and the owner's `GET /v1/usage`): how a report is grouped
//! and filtered, and the CSV rendering for billing exports; the query itself is the store's. Pure.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Total,
    Day,
    Model,
    Key,
    User,
    Endpoint,
}

impl GroupBy {
    pub fn parse(raw: Option<&str>) -> Result<GroupBy, ApiError> {
        match raw {
            None | Some("") | Some("total") => Ok(GroupBy::Total),
            Some("day") => Ok(GroupBy::Day),
            Some("model") => Ok(GroupBy::Model),
            Some("key") => Ok(GroupBy::Key),
            Some("user") => Ok(GroupBy::User),
            Some("endpoint") => Ok(GroupBy::Endpoint),
            Some(_) => {
                Err(ApiError::invalid_param("group_by", "'group_by' must be day, model, key, user or endpoint."))
            }
        }
    }

    pub fn column_name(self) -> &'static str {
        match self {
            GroupBy::Total => "total",
            GroupBy::Day => "day",
            GroupBy::Model => "model",
            GroupBy::Key => "key_id",
            GroupBy::User => "user_id",
            GroupBy::Endpoint => "endpoint",
        }
    }
}

/// Filters of a usage query; every value is a bound parameter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageFilter {
    pub user_id: Option<String>,
    pub key_id: Option<String>,
    /// Inclusive lower bound on `created_at` (a date or an RFC 3339 time; also a prefix such as `2026-11`).
    pub from: Option<String>,
    /// Exclusive upper bound.
    pub to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub grp: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub cost_usd: f64,
    /// Requests answered from the response cache (their tokens are not in the counts above), and what their
    /// original answers cost.
    pub cache_hits: u64,
    pub saved_cost_usd: f64,
}

/// A time bound as accepted in `from`/`to`: `YYYY`, `YYYY-MM`, `YYYY-MM-DD`, or an RFC 3339 UTC time
/// (`…THH:MM[:SS[.fff]]Z`) — all compare correctly with the ledger's `created_at` as strings.
pub fn parse_time_bound(field: &str, raw: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else { return Ok(None) };
    let b = raw.as_bytes();
    let digits = |range: std::ops::Range<usize>| range.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    let date_ok = match b.len() {
        4 => digits(0..4),
        7 => digits(0..4) && b[4] == b'-' && digits(5..7),
        _ => b.len() >= 10 && digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10),
    };
    let time_ok = b.len() <= 10
        || (b[10] == b'T'
            && raw.ends_with('Z')
            && raw[11..raw.len() - 1].bytes().all(|c| c.is_ascii_digit() || c == b':' || c == b'.')
            && raw.len() <= 24);
    if date_ok && time_ok {
        Ok(Some(raw.to_owned()))
    } else {
        Err(ApiError::invalid_param(field, format!("'{field}' must be a date (YYYY-MM-DD) or an RFC 3339 UTC time.")))
    }
}

/// The rows as CSV: a header, one line per group, RFC 4180 quoting. Cells that a spreadsheet would run as a
/// formula (starting with `=`, `+`, `-`, `@`, a tab or a carriage return, OWASP's list) are prefixed with `'`.
pub fn to_csv(group_by: GroupBy, rows: &[UsageRow]) -> String {
    let mut out = format!(
        "{},requests,input_tokens,output_tokens,cached_tokens,cost_usd,cache_hits,saved_cost_usd\r\n",
        group_by.column_name()
    );
    for row in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{}\r\n",
            csv_cell(&row.grp),
            row.requests,
            row.input_tokens,
            row.output_tokens,
            row.cached_tokens,
            row.cost_usd,
            row.cache_hits,
            row.saved_cost_usd
        ));
    }
    out
}

fn csv_cell(value: &str) -> String {
    let value =
        if value.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{value}") } else { value.to_owned() };
    if value.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_values() {
        assert_eq!(GroupBy::parse(None).ok(), Some(GroupBy::Total));
        assert_eq!(GroupBy::parse(Some("day")).ok(), Some(GroupBy::Day));
        assert_eq!(GroupBy::parse(Some("model; DROP TABLE")).err().and_then(|e| e.param).as_deref(), Some("group_by"));
        assert_eq!(GroupBy::parse(Some("endpoint")).ok(), Some(GroupBy::Endpoint));
    }

    #[test]
    fn time_bounds() {
        for ok in ["2026", "2026-11", "2026-11-27", "2026-11-27T13:08Z", "2026-11-27T13:08:30.123Z"] {
            assert_eq!(parse_time_bound("from", Some(ok)).ok().flatten().as_deref(), Some(ok), "{ok}");
        }
        for bad in [
            "yesterday",
            "2026-1-2",
            "2026-11-27 13:08",
            "2026-11-27T13:08:30+02:00",
            "'; --",
            "2026-11-27T13:08:30.123456789Z",
        ] {
            assert!(parse_time_bound("from", Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(parse_time_bound("to", None).ok(), Some(None));
    }

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let rows = vec![
            UsageRow {
                grp: "openai/gpt-4o".into(),
                requests: 2,
                input_tokens: 10,
                output_tokens: 5,
                cached_tokens: 0,
                cost_usd: 0.25,
                cache_hits: 3,
                saved_cost_usd: 0.5,
            },
            UsageRow {
                grp: "a,\"b\"".into(),
                requests: 1,
                input_tokens: 1,
                output_tokens: 1,
                cached_tokens: 1,
                cost_usd: 0.0,
                cache_hits: 0,
                saved_cost_usd: 0.0,
            },
            UsageRow {
                grp: "=cmd()".into(),
                requests: 1,
                input_tokens: 0,
                output_tokens: 0,
                cached_tokens: 0,
                cost_usd: 0.0,
                cache_hits: 0,
                saved_cost_usd: 0.0,
            },
        ];
        let csv = to_csv(GroupBy::Model, &rows);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines[0],
            "model,requests,input_tokens,output_tokens,cached_tokens,cost_usd,cache_hits,saved_cost_usd"
        );
        assert_eq!(lines[1], "openai/gpt-4o,2,10,5,0,0.25,3,0.5");
        assert_eq!(lines[2], "\"a,\"\"b\"\"\",1,1,1,1,0,0,0");
        assert_eq!(lines[3], "'=cmd(),1,0,0,0,0,0,0");
        let sneaky = |grp: &str| UsageRow { grp: grp.into(), ..rows[2].clone() };
        let csv = to_csv(GroupBy::Model, &[sneaky("\t=cmd()"), sneaky("\r=cmd()")]);
        assert!(csv.contains("'\t=cmd(),"), "{csv}");
        assert!(csv.contains("\"'\r=cmd()\","), "a cell with a CR is also quoted: {csv}");
    }
}
