//! What every response carries, whatever produced it: security headers and the request id.

/// Hardening for an API that only ever returns JSON or SSE: nothing may be sniffed, framed, or run as a page.
pub const SECURITY_HEADERS: [(&str, &str); 5] = [
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("strict-transport-security", "max-age=31536000; includeSubDomains"),
    ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
    ("x-frame-options", "DENY"),
];

const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's `x-request-id` when it is safe to echo and log; `None` means "generate one".
pub fn sane_request_id(candidate: Option<&str>) -> Option<&str> {
    let id = candidate?.trim();
    let ok = !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then_some(id)
}

/// A new request id from 16 random bytes.
pub fn new_request_id(random: [u8; 16]) -> String {
    format!("req_{}", hex::encode(random))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_request_ids_are_kept_only_when_sane() {
        assert_eq!(sane_request_id(Some("abc-123_x.y:z")), Some("abc-123_x.y:z"));
        assert_eq!(sane_request_id(Some("  padded  ")), Some("padded"));
        for bad in ["", "with space", "semi;colon", "new\nline", "ünïcode", &"a".repeat(129)] {
            assert_eq!(sane_request_id(Some(bad)), None, "{bad:?}");
        }
        assert_eq!(sane_request_id(None), None);
    }

    #[test]
    fn generated_ids_are_prefixed_hex() {
        let id = new_request_id([0xab; 16]);
        assert_eq!(id.len(), 4 + 32);
        assert!(id.starts_with("req_abab"));
    }
}
