//! OpenAI-compatible LLM gateway on Cloudflare Workers: the Worker's entry points.
//!
//! The request path lives in [`pipeline`]; decisions are made by the pure modules (`auth`, `validate`, `sse`,
//! `cors`, `routes`, `models`, `config`, `error`), which are unit-tested natively; [`bindings`] is the only code
//! that touches the runtime's bindings.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod admin;
pub mod admit;
pub mod answer;
pub mod auth;
pub mod bindings;
pub mod cache;
pub mod catalog;
pub mod config;
pub mod consumer;
pub mod cors;
pub mod endpoint;
pub mod error;
pub mod forward;
pub mod keys;
pub mod limiter;
pub mod log;
pub mod models;
mod pipeline;
pub mod posthog;
pub mod pricing;
pub mod reconcile;
pub mod relay;
pub mod respond;
pub mod routes;
pub mod sse;
pub mod store;
pub mod usage;
pub mod usage_event;
pub mod usage_report;
pub mod validate;

use worker::{event, Context, Env, Request, Response, Result};

pub use key_limiter::KeyLimiter;

#[event(fetch)]
async fn fetch(req: Request, env: Env, ctx: Context) -> Result<Response> {
    Ok(pipeline::handle(req, env, ctx).await)
}
