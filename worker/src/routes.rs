//! (method, path) → what the gateway does with the request. Pure, so the whole table is unit-tested.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    ChatCompletions,
    Models,
    Health,
    /// A CORS preflight (`OPTIONS` on any path).
    Preflight,
    MethodNotAllowed { allowed: &'static str },
    NotFound,
}

pub fn route(method: &str, path: &str) -> Route {
    if method == "OPTIONS" {
        return Route::Preflight;
    }
    // A trailing slash is a common client-side slip; it names the same resource.
    let path = match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    };
    let (route, allowed) = match path {
        "/v1/chat/completions" => (Route::ChatCompletions, "POST"),
        "/v1/models" => (Route::Models, "GET"),
        "/health" => (Route::Health, "GET"),
        _ => return Route::NotFound,
    };
    let method_ok = method == allowed || (allowed == "GET" && method == "HEAD");
    if method_ok {
        route
    } else {
        Route::MethodNotAllowed { allowed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_routes_match_their_method() {
        assert_eq!(route("POST", "/v1/chat/completions"), Route::ChatCompletions);
        assert_eq!(route("POST", "/v1/chat/completions/"), Route::ChatCompletions);
        assert_eq!(route("GET", "/v1/models"), Route::Models);
        assert_eq!(route("GET", "/health"), Route::Health);
        assert_eq!(route("HEAD", "/health"), Route::Health);
    }

    #[test]
    fn wrong_method_names_the_allowed_one() {
        assert_eq!(route("GET", "/v1/chat/completions"), Route::MethodNotAllowed { allowed: "POST" });
        assert_eq!(route("DELETE", "/v1/models"), Route::MethodNotAllowed { allowed: "GET" });
    }

    #[test]
    fn everything_else_is_not_found_and_options_is_a_preflight() {
        for path in ["/", "", "/v1", "/v1/completions", "/v1/chat/completions/x", "//v1/models", "/V1/models"] {
            assert_eq!(route("POST", path), Route::NotFound, "{path}");
        }
        assert_eq!(route("OPTIONS", "/anything"), Route::Preflight);
    }
}
