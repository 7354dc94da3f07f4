//! (method, path) → what the gateway does with the request. Pure, so the whole table is unit-tested.

use crate::endpoint::Endpoint;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A model API: chat completions, completions, responses or embeddings.
    Model(Endpoint),
    Models,
    /// `GET /v1/models/{id}`: the id as sent, percent-decoded (model ids hold `/`, which SDKs encode as `%2F`).
    ModelInfo(String),
    /// The key owner's view of its limits and usage.
    OwnUsage,
    Health,
    /// A CORS preflight (`OPTIONS` on any path).
    Preflight,
    Admin(AdminRoute),
    MethodNotAllowed {
        allowed: &'static str,
    },
    NotFound,
}

/// The admin API, under `/admin/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRoute {
    CreateKey,
    ListKeys,
    GetKey(String),
    UpdateKey(String),
    RevokeKey(String),
    Usage,
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
    let get = method == "GET" || method == "HEAD";
    match path {
        "/v1/chat/completions" => only(method == "POST", Route::Model(Endpoint::ChatCompletions), "POST"),
        "/v1/completions" => only(method == "POST", Route::Model(Endpoint::Completions), "POST"),
        "/v1/responses" => only(method == "POST", Route::Model(Endpoint::Responses), "POST"),
        "/v1/embeddings" => only(method == "POST", Route::Model(Endpoint::Embeddings), "POST"),
        "/v1/models" => only(get, Route::Models, "GET"),
        "/v1/usage" => only(get, Route::OwnUsage, "GET"),
        "/health" => only(get, Route::Health, "GET"),
        "/admin/keys" => match method {
            "POST" => Route::Admin(AdminRoute::CreateKey),
            "GET" => Route::Admin(AdminRoute::ListKeys),
            _ => Route::MethodNotAllowed { allowed: "GET, POST" },
        },
        "/admin/usage" => only(get, Route::Admin(AdminRoute::Usage), "GET"),
        _ if path.starts_with("/v1/models/") => match model_id(&path["/v1/models/".len()..]) {
            Some(id) => only(get, Route::ModelInfo(id), "GET"),
            None => Route::NotFound,
        },
        _ => match path.strip_prefix("/admin/keys/") {
            Some(id) if !id.is_empty() && !id.contains('/') => match method {
                "GET" => Route::Admin(AdminRoute::GetKey(id.to_owned())),
                "PATCH" => Route::Admin(AdminRoute::UpdateKey(id.to_owned())),
                "DELETE" => Route::Admin(AdminRoute::RevokeKey(id.to_owned())),
                _ => Route::MethodNotAllowed { allowed: "GET, PATCH, DELETE" },
            },
            _ => Route::NotFound,
        },
    }
}

/// A model id from the path: percent-decoded, non-empty, valid UTF-8 without control characters.
fn model_id(raw: &str) -> Option<String> {
    let id = percent_encoding::percent_decode_str(raw).decode_utf8().ok()?;
    (!id.is_empty() && !id.chars().any(char::is_control)).then(|| id.into_owned())
}

fn only(method_ok: bool, route: Route, allowed: &'static str) -> Route {
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
        assert_eq!(route("POST", "/v1/chat/completions"), Route::Model(Endpoint::ChatCompletions));
        assert_eq!(route("POST", "/v1/chat/completions/"), Route::Model(Endpoint::ChatCompletions));
        assert_eq!(route("POST", "/v1/completions"), Route::Model(Endpoint::Completions));
        assert_eq!(route("POST", "/v1/responses"), Route::Model(Endpoint::Responses));
        assert_eq!(route("POST", "/v1/embeddings"), Route::Model(Endpoint::Embeddings));
        assert_eq!(route("GET", "/v1/responses"), Route::MethodNotAllowed { allowed: "POST" });
        assert_eq!(route("GET", "/v1/models"), Route::Models);
        assert_eq!(route("GET", "/v1/usage"), Route::OwnUsage);
        assert_eq!(route("GET", "/v1/models/openai%2Fgpt-4o"), Route::ModelInfo("openai/gpt-4o".into()));
        assert_eq!(route("GET", "/v1/models/openai/gpt-4o:free"), Route::ModelInfo("openai/gpt-4o:free".into()));
        assert_eq!(route("POST", "/v1/models/m"), Route::MethodNotAllowed { allowed: "GET" });
        assert_eq!(route("GET", "/v1/models/%FF"), Route::NotFound);
        assert_eq!(route("GET", "/v1/models/a%0Ab"), Route::NotFound);
        assert_eq!(route("GET", "/health"), Route::Health);
        assert_eq!(route("HEAD", "/health"), Route::Health);
    }

    #[test]
    fn admin_routes_carry_the_key_id() {
        assert_eq!(route("POST", "/admin/keys"), Route::Admin(AdminRoute::CreateKey));
        assert_eq!(route("GET", "/admin/keys/"), Route::Admin(AdminRoute::ListKeys));
        assert_eq!(route("GET", "/admin/keys/abc123"), Route::Admin(AdminRoute::GetKey("abc123".into())));
        assert_eq!(route("PATCH", "/admin/keys/abc123"), Route::Admin(AdminRoute::UpdateKey("abc123".into())));
        assert_eq!(route("DELETE", "/admin/keys/abc123"), Route::Admin(AdminRoute::RevokeKey("abc123".into())));
        assert_eq!(route("GET", "/admin/usage"), Route::Admin(AdminRoute::Usage));
        assert_eq!(route("PUT", "/admin/keys/abc"), Route::MethodNotAllowed { allowed: "GET, PATCH, DELETE" });
        assert_eq!(route("GET", "/admin/keys/a/b"), Route::NotFound);
    }

    #[test]
    fn wrong_method_names_the_allowed_one() {
        assert_eq!(route("GET", "/v1/chat/completions"), Route::MethodNotAllowed { allowed: "POST" });
        assert_eq!(route("DELETE", "/v1/models"), Route::MethodNotAllowed { allowed: "GET" });
        // Methods the `worker` crate does not know (it would call them GET) are refused, not served.
        for method in ["PROPFIND", "FOO", "get"] {
            assert_eq!(route(method, "/v1/models"), Route::MethodNotAllowed { allowed: "GET" }, "{method}");
            assert_eq!(route(method, "/health"), Route::MethodNotAllowed { allowed: "GET" }, "{method}");
            assert!(matches!(route(method, "/admin/keys"), Route::MethodNotAllowed { .. }), "{method}");
        }
    }

    #[test]
    fn everything_else_is_not_found_and_options_is_a_preflight() {
        for path in [
            "/",
            "",
            "/v1",
            "/v1/completion",
            "/v1/responses/x",
            "/v1/chat/completions/x",
            "//v1/models",
            "/V1/models",
            "/admin",
        ] {
            assert_eq!(route("POST", path), Route::NotFound, "{path}");
        }
        assert_eq!(route("OPTIONS", "/anything"), Route::Preflight);
    }
}
