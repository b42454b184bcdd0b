//! The shapes of the API's response bodies, for the OpenAPI document.
//!
//! The handlers build their bodies with `json!` (the views are shared by several
//! endpoints and change with `[cluster]`), so these types are the written contract rather
//! than the code path: `tests/openapi.rs` sends good and bad requests to a running gateway
//! and validates every real response against these schemas, which is what keeps the two
//! in step. Request bodies derive their schemas on the handlers' own body types.

// The types exist for their derived schemas only; nothing constructs them.
#![allow(dead_code)]

use serde_json::Value;
use utoipa::ToSchema;

/// Every error response: a 4xx or 5xx with a text that says what is wrong.
#[derive(ToSchema)]
#[schema(example = json!({"detail": "Invalid API key"}))]
pub(crate) struct ErrorDetail {
    /// What is wrong, in words; for a 5xx, without internals (see the gateway log).
    detail: String,
}

/// `POST /hello-world`.
#[derive(ToSchema)]
#[schema(example = json!({"message": "Hello, Test!"}))]
pub(crate) struct HelloResponse {
    message: String,
}

/// `GET /health`.
#[derive(ToSchema)]
pub(crate) struct Health {
    #[schema(pattern = "^ok$")]
    status: String,
}

/// The checks behind `GET /ready`.
#[derive(ToSchema)]
pub(crate) struct ReadyChecks {
    /// A server certificate is loaded (with ACME: the first order completed).
    server_certificate: bool,
    certificate_store: bool,
    /// Only with `[cluster]`: the Redis link, which never makes the node unready.
    redis: Option<RedisCheck>,
}

#[derive(ToSchema)]
pub(crate) struct RedisCheck {
    connected: bool,
    reconnects: u64,
    node_id: String,
    affects_readiness: bool,
}

/// `GET /ready` when ready.
#[derive(ToSchema)]
pub(crate) struct Ready {
    #[schema(pattern = "^ready$")]
    status: String,
    checks: ReadyChecks,
}

/// `GET /ready` before a server certificate is loaded (503): the error shape, with the
/// checks beside it.
#[derive(ToSchema)]
pub(crate) struct NotReady {
    #[schema(pattern = "^starting$")]
    status: String,
    detail: String,
    checks: ReadyChecks,
}

/// A stored agent certificate.
#[derive(ToSchema)]
pub(crate) struct CertificateView {
    agent_id: String,
    /// SHA-256 of the certificate's DER, lowercase hex.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    fingerprint: String,
    subject: String,
    #[schema(format = DateTime)]
    not_before: String,
    #[schema(format = DateTime)]
    not_after: String,
    /// `RSA-2048`, `ECDSA-P256`, `Ed25519`, ...
    key_type: String,
    self_signed: bool,
}

/// `POST /agent/certificate`.
#[derive(ToSchema)]
#[schema(example = json!({"message": "Certificate uploaded successfully", "agent_id": "12345678"}))]
pub(crate) struct UploadResponse {
    message: String,
    agent_id: String,
}

/// `GET /agent/certificates`: one page in agent id order.
#[derive(ToSchema)]
pub(crate) struct CertificateList {
    certificates: Vec<CertificateView>,
    /// Stored certificates in all.
    total: u64,
    /// `after` of the next page; null on the last page.
    next_after: Option<String>,
}

/// `DELETE /agent/certificate/{agent_id}`.
#[derive(ToSchema)]
pub(crate) struct DeleteResponse {
    message: String,
    agent_id: String,
    fingerprint: String,
    /// Live sessions of the agent closed on this node.
    closed_sessions: u64,
}

/// An agent's status: connected (heartbeats on time), stale (connected, heartbeats late),
/// disconnected.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub(crate) enum AgentStatus {
    Connected,
    Stale,
    Disconnected,
}

/// One Socket.IO session of an agent.
#[derive(ToSchema)]
pub(crate) struct SessionView {
    sid: String,
    /// `websocket` or `polling`; null for a session on another node.
    transport: Option<String>,
    remote_addr: String,
    #[schema(format = DateTime)]
    connected_since: String,
    /// Fingerprint of the client certificate the session authenticated with; null for an
    /// anonymous session (`allow_anonymous_agents`).
    fingerprint: Option<String>,
    /// Only with `[cluster]`: the node the session is connected to.
    node: Option<String>,
}

/// The newest heartbeat of an agent, as the agent sent it.
#[derive(ToSchema)]
pub(crate) struct HeartbeatView {
    #[schema(format = DateTime)]
    received_at: String,
    payload: Value,
    /// Only with `[cluster]`: the node that received it.
    node: Option<String>,
}

/// An agent: its status, sessions, newest heartbeat and certificate.
#[derive(ToSchema)]
pub(crate) struct AgentView {
    agent_id: String,
    status: AgentStatus,
    connected: bool,
    sessions: Vec<SessionView>,
    last_heartbeat: Option<HeartbeatView>,
    #[schema(format = DateTime)]
    disconnected_at: Option<String>,
    certificate: Option<CertificateView>,
    /// Only with `[cluster]`: the node of the newest session.
    node: Option<String>,
    /// Only in `GET /agents/{agent_id}`: what the agent registered with (an object), or
    /// null.
    metadata: Option<Value>,
}

/// `GET /agents`: one page in agent id order.
#[derive(ToSchema)]
pub(crate) struct AgentList {
    agents: Vec<AgentView>,
    total: u64,
    next_after: Option<String>,
}

/// `POST /agents/{agent_id}/commands`: the agent's acknowledgement.
#[derive(ToSchema)]
pub(crate) struct CommandResponse {
    agent_id: String,
    /// What the agent acknowledged with (any JSON).
    reply: Value,
}

/// The outcome of a command for one agent of a fan-out.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub(crate) enum FanOutStatus {
    Ok,
    NotConnected,
    Timeout,
    ClusterUnavailable,
    Failed,
}

/// One agent's result in a fan-out: `reply` when `status` is `ok`, `detail` otherwise.
#[derive(ToSchema)]
pub(crate) struct FanOutResult {
    agent_id: String,
    status: FanOutStatus,
    reply: Option<Value>,
    detail: Option<String>,
}

/// `POST /agents/commands`: one result per distinct agent id, in the order given.
#[derive(ToSchema)]
pub(crate) struct FanOutResponse {
    results: Vec<FanOutResult>,
}

/// `POST /install-tokens`.
#[derive(ToSchema)]
pub(crate) struct InstallToken {
    /// The one-time token the installer presents to `POST /agent/register`.
    install_token: String,
    agent_id: String,
    #[schema(format = DateTime)]
    expires_at: String,
}

/// `POST /agent/register`.
#[derive(ToSchema)]
pub(crate) struct RegisterResponse {
    agent_id: String,
    fingerprint: String,
    message: String,
}

/// `POST /tokens`: the shape of the replaced `generate-gateway-token` function's answer.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TokenIssued {
    /// The HS256 JWT (claims `jti`, `project`, `service`, `iat`, `exp`); shown only here.
    token: String,
    /// A random UUID.
    jti: String,
    #[schema(format = DateTime)]
    expires_at: String,
    project: String,
    service: String,
}

/// An active API token (never the token itself).
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TokenView {
    jti: String,
    project: String,
    service: String,
    description: String,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    expires_at: String,
}

/// `GET /tokens`.
#[derive(ToSchema)]
pub(crate) struct TokenList {
    /// Newest first.
    tokens: Vec<TokenView>,
    /// The `after` of the next page; null on the last.
    next_after: Option<String>,
}

/// `POST /tokens/{jti}/revoke`.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TokenRevoked {
    jti: String,
    revoked: bool,
    /// True when the jti was revoked before: nothing changed.
    already_revoked: bool,
    /// Until when the revocation is kept: the token's expiry, or for a jti this gateway
    /// did not issue, 365 days after the revocation.
    #[schema(format = DateTime)]
    expires_at: String,
}

/// One audit record: who (the API key's name, never the key) issued or revoked what.
#[derive(ToSchema)]
pub(crate) struct AuditRecordView {
    /// The record's cursor.
    id: String,
    #[schema(format = DateTime)]
    at: String,
    /// The name of the API key that made the change.
    key: String,
    /// `issue` or `revoke`.
    #[schema(pattern = "^(issue|revoke)$")]
    action: String,
    jti: String,
    /// Null for a jti this gateway did not issue.
    project: Option<String>,
    service: Option<String>,
    /// `issue` only.
    description: Option<String>,
    /// `revoke` only.
    reason: Option<String>,
}

/// `GET /tokens/audit`.
#[derive(ToSchema)]
pub(crate) struct AuditList {
    /// Newest first.
    records: Vec<AuditRecordView>,
    /// The `after` of the next page; null on the last.
    next_after: Option<String>,
}

/// A node of the cluster.
#[derive(ToSchema)]
pub(crate) struct NodeView {
    node_id: String,
    /// True for the node that answered.
    #[schema(rename = "self")]
    this: bool,
    agents: u64,
    sessions: u64,
    #[schema(format = DateTime)]
    last_heard: String,
    #[schema(format = DateTime)]
    started_at: String,
}

/// `GET /cluster/nodes`.
#[derive(ToSchema)]
pub(crate) struct ClusterNodes {
    /// The node that answered.
    node_id: String,
    nodes: Vec<NodeView>,
}

/// `GET /routes`.
#[derive(ToSchema)]
pub(crate) struct RouteList {
    routes: Vec<RouteDoc>,
    /// Runtime routes stored but not served by this node.
    not_served: Vec<NotServedDoc>,
}

/// A runtime route left out of this node's table, and why: shadowed by a config route of
/// its name or prefix, or not valid under the configuration in force.
#[derive(ToSchema)]
pub(crate) struct NotServedDoc {
    name: String,
    reason: String,
}

/// One route of the gateway (`[[routes]]` or registered at runtime).
#[derive(ToSchema)]
pub(crate) struct RouteDoc {
    name: String,
    prefix: String,
    /// `config` (`[[routes]]` of the file) or `runtime` (`POST /routes`).
    #[schema(pattern = "^(config|runtime)$")]
    source: String,
    /// `jwt`, `api_key`, `agent` or `none`.
    auth: String,
    /// The scope a key needs (`auth = "api_key"` only).
    scope: Option<String>,
    /// Claim name -> allowed values (`auth = "jwt"` only).
    claims: Option<std::collections::BTreeMap<String, Vec<String>>>,
    strip_prefix: bool,
    preserve_host: bool,
    timeout_ms: u64,
    retries: u32,
    health_check: Option<HealthCheckDoc>,
    upstreams: Vec<UpstreamDoc>,
}

#[derive(ToSchema)]
pub(crate) struct HealthCheckDoc {
    path: String,
    interval_secs: u64,
}

#[derive(ToSchema)]
pub(crate) struct UpstreamDoc {
    url: String,
    /// In the rotation (health check passing, not ejected).
    healthy: bool,
}
