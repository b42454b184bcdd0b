//! The HTTP API (axum): routes, the Bearer API key check, JSON bodies and errors.
//!
//! Every error is `{"detail": "..."}` with a 4xx that names what is wrong; the one 5xx is
//! a store that cannot write, logged once and shown to the client without internals.
//!
//! # Layout
//! - [`router`]: which handler answers which path, and which paths need the API key;
//! - `middleware`: the API key check and the request observer (metrics, access log);
//! - `extract`: JSON bodies, query strings, agent ids and the paging both lists share;
//! - `error`: [`ApiError`] and its one mapping to statuses, and `json_errors`, which
//!   gives every other error response its `{"detail": ...}`;
//! - `head_limits`: URI length and header limits, answered with 414 and 431;
//! - `openapi`: the OpenAPI 3.1 document (`GET /openapi.json`, from the handlers'
//!   `#[utoipa::path]` annotations) and Swagger UI (`GET /docs`); `schema`: the response
//!   shapes it names;
//! - one file per resource: `agents`, `certificate`, `cluster`, `enroll`, `hello`, `ops`,
//!   `routes`, `tokens`;
//! - paths no endpoint matches go to the gateway ([`crate::proxy`]).

pub(crate) mod agents;
pub(crate) mod certificate;
pub(crate) mod cluster;
pub(crate) mod enroll;
pub(crate) mod error;
pub(crate) mod extract;
pub(crate) mod head_limits;
pub(crate) mod hello;
pub(crate) mod middleware;
pub(crate) mod openapi;
pub(crate) mod ops;
pub(crate) mod router;
pub(crate) mod routes;
pub(crate) mod schema;
pub(crate) mod tokens;

use tokio_util::task::TaskTracker;

use crate::agents::Agents;
pub use crate::auth::{ApiKeys, ApiTokens};
use crate::clock::Clock;
use crate::enroll::Enrollment;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::store::CertStore;
use crate::tls::ServerCert;
pub use error::{ApiError, detail};
pub(crate) use error::{body_left_unread, json_errors};
pub(crate) use extract::BodyLimit;
pub use extract::{ApiQuery, JsonBody, Page, PageQuery, agent_id};
pub use middleware::observe;
pub use router::{MetricsExposure, metrics_router, router};

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: CertStore,
    /// Connected agents; staleness (`agents.stale_after_secs`) is decided by its registry.
    pub agents: Agents,
    /// The keys, and the failed attempts per source address (`limits.api_key_failures`)
    /// that the gateway's `api_key` routes count into too.
    pub api_keys: ApiKeys,
    pub metrics: Metrics,
    pub enrollment: Enrollment,
    /// API tokens (`/tokens`) and the revocations the JWT check reads.
    pub tokens: ApiTokens,
    pub server_cert: ServerCert,
    /// "Now" for certificate validity at upload and for the views; the same clock as the
    /// registry's and the enrollment store's.
    pub clock: Clock,
    /// In-flight API requests (not Socket.IO), drained first on shutdown.
    pub requests: TaskTracker,
    /// The gateway half: routes to upstream services (the router's fallback).
    pub proxy: Proxy,
    /// `limits.max_body_bytes` and `limits.register_body_bytes`, applied per endpoint by
    /// the router.
    pub body_limits: crate::config::BodyLimits,
}
