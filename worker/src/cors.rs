//! CORS: which headers a response carries for a browser origin. Origins not on the `ALLOWED_ORIGINS` list get
//! no CORS headers at all, so the browser refuses them.

use crate::config::AllowedOrigins;

/// Headers every SDK needs to read from a cross-origin response.
const EXPOSED_HEADERS: &str =
    "x-request-id, x-client-request-id, retry-after, retry-after-ms, x-ratelimit-limit-requests, \
x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, \
x-ratelimit-reset-tokens, ratelimit, ratelimit-policy, x-generation-id, x-cache, age";
const ALLOWED_METHODS: &str = "GET, POST, OPTIONS";
/// Used when a preflight names no headers; otherwise the requested list is echoed (the OpenAI SDKs send many
/// `x-stainless-*` headers, and a fixed list would break them whenever they add one).
const DEFAULT_ALLOWED_HEADERS: &str = "authorization, content-type, x-request-id, x-client-request-id";
const PREFLIGHT_MAX_AGE_SECS: &str = "86400";

pub type HeaderList = Vec<(&'static str, String)>;

/// Headers for an actual (non-preflight) response.
pub fn response_headers(origin: Option<&str>, allowed: &AllowedOrigins) -> HeaderList {
    match allowed_origin(origin, allowed) {
        Some(origin) => vec![
            ("access-control-allow-origin", origin.to_owned()),
            ("access-control-expose-headers", EXPOSED_HEADERS.to_owned()),
            ("vary", "Origin".to_owned()),
        ],
        None => vec![("vary", "Origin".to_owned())],
    }
}

/// Headers for a preflight answer (the status is always 204; without these headers the browser refuses).
pub fn preflight_headers(
    origin: Option<&str>,
    requested_headers: Option<&str>,
    allowed: &AllowedOrigins,
) -> HeaderList {
    let Some(origin) = allowed_origin(origin, allowed) else {
        return vec![("vary", "Origin".to_owned())];
    };
    let allow_headers = match requested_headers.map(str::trim) {
        Some(list) if !list.is_empty() && is_header_list(list) => list.to_ascii_lowercase(),
        _ => DEFAULT_ALLOWED_HEADERS.to_owned(),
    };
    vec![
        ("access-control-allow-origin", origin.to_owned()),
        ("access-control-allow-methods", ALLOWED_METHODS.to_owned()),
        ("access-control-allow-headers", allow_headers),
        ("access-control-max-age", PREFLIGHT_MAX_AGE_SECS.to_owned()),
        ("vary", "Origin, Access-Control-Request-Headers".to_owned()),
    ]
}

fn allowed_origin<'a>(origin: Option<&'a str>, allowed: &AllowedOrigins) -> Option<&'a str> {
    origin.filter(|o| allowed.allows(o))
}

/// A comma-separated list of header names (RFC 9110 tokens), so echoing it cannot inject anything.
fn is_header_list(list: &str) -> bool {
    list.len() <= 2048
        && list.split(',').map(str::trim).all(|name| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> AllowedOrigins {
        AllowedOrigins::List(vec!["http://localhost:3000".to_owned()])
    }

    fn get<'a>(headers: &'a HeaderList, name: &str) -> Option<&'a str> {
        headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn allowed_origin_is_echoed_with_exposed_headers() {
        let h = response_headers(Some("http://localhost:3000"), &list());
        assert_eq!(get(&h, "access-control-allow-origin"), Some("http://localhost:3000"));
        assert!(get(&h, "access-control-expose-headers").is_some_and(|v| v.contains("x-request-id")));
        assert!(get(&h, "access-control-expose-headers").is_some_and(|v| v.contains("x-cache, age")));
    }

    #[test]
    fn other_origins_and_no_origin_get_no_cors_headers() {
        for origin in [Some("https://evil.example"), Some("http://localhost:3000.evil.example"), None] {
            let h = response_headers(origin, &list());
            assert!(h.iter().all(|(n, _)| !n.starts_with("access-control-")), "{origin:?}");
            let p = preflight_headers(origin, Some("authorization"), &list());
            assert!(p.iter().all(|(n, _)| !n.starts_with("access-control-")), "{origin:?}");
        }
    }

    #[test]
    fn preflight_echoes_valid_requested_headers_only() {
        let p = preflight_headers(Some("http://localhost:3000"), Some("Authorization, X-Stainless-OS"), &list());
        assert_eq!(get(&p, "access-control-allow-headers"), Some("authorization, x-stainless-os"));
        assert_eq!(get(&p, "access-control-allow-methods"), Some(ALLOWED_METHODS));
        let p = preflight_headers(Some("http://localhost:3000"), Some("x\r\nset-cookie: a"), &list());
        assert_eq!(get(&p, "access-control-allow-headers"), Some(DEFAULT_ALLOWED_HEADERS));
    }

    #[test]
    fn wildcard_config_allows_any_origin_by_echoing_it() {
        let h = response_headers(Some("https://anywhere.example"), &AllowedOrigins::Any);
        assert_eq!(get(&h, "access-control-allow-origin"), Some("https://anywhere.example"));
    }
}
