//! Binds each Engine.IO session to the TLS identity that opened it.
//!
//! socketioxide looks a long-polling or upgrade request up by its `sid` query parameter
//! alone, so without this layer anyone who learns an agent's sid could read its events and
//! send as it (DESIGN.md, "Facts already checked", the pitfall). The guard records the
//! owner of every sid when the polling handshake answers, and refuses a request carrying a
//! sid from a connection with no identity or another identity. A WebSocket opened without
//! polling never exposes its sid to a request, so it needs no entry.
//!
//! When such a session moves to a WebSocket, the binding also records the connection the
//! WebSocket runs on ([`ReadGate`]), which is where backpressure stops reading
//! ([`super::backpressure`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;

use super::backpressure::ReadGate;
use crate::identity::{Fingerprint, Peer};

/// The Socket.IO request path, as socketioxide serves it.
pub const SOCKET_IO_PATH: &str = "/socket.io";

/// Largest polling handshake body we read to learn the sid (it is about 120 bytes).
const MAX_HANDSHAKE_BODY: usize = 4096;

/// sid -> the fingerprint of the connection that opened it (`None`: anonymous).
#[derive(Debug, Clone, Default)]
pub struct SessionBindings {
    /// A std Mutex: no `.await` while it is held.
    inner: Arc<Mutex<HashMap<String, Binding>>>,
}

#[derive(Debug, Clone)]
struct Binding {
    owner: Option<Fingerprint>,
    created: Instant,
    /// The connection of the session's WebSocket, once it upgraded.
    gate: Option<ReadGate>,
    /// Closed by the gateway (its replies overflowed); every later request is refused.
    closed: bool,
}

impl SessionBindings {
    pub fn bind(&self, sid: &str, owner: Option<Fingerprint>) {
        self.lock().insert(
            sid.to_owned(),
            Binding {
                owner,
                created: Instant::now(),
                gate: None,
                closed: false,
            },
        );
    }

    /// Records the connection a bound session's WebSocket runs on.
    pub(crate) fn attach_gate(&self, sid: &str, gate: ReadGate) {
        if let Some(binding) = self.lock().get_mut(sid) {
            binding.gate = Some(gate);
        }
    }

    /// Marks a bound session closed: the guard refuses its requests from now on.
    pub(crate) fn close(&self, sid: &str) {
        if let Some(binding) = self.lock().get_mut(sid) {
            binding.closed = true;
        }
    }

    pub(crate) fn is_closed(&self, sid: &str) -> bool {
        self.lock().get(sid).is_some_and(|b| b.closed)
    }

    /// The connection of the session's WebSocket, if it upgraded from polling.
    pub(crate) fn gate_of(&self, sid: &str) -> Option<ReadGate> {
        self.lock().get(sid).and_then(|b| b.gate.clone())
    }

    pub fn unbind(&self, sid: &str) {
        self.lock().remove(sid);
    }

    /// `Some(owner)` if the sid is bound.
    pub fn owner_of(&self, sid: &str) -> Option<Option<Fingerprint>> {
        self.lock().get(sid).map(|b| b.owner)
    }

    /// Drops bindings older than `max_age` for which `alive` says the session is gone:
    /// sessions that were opened and never joined a namespace leave no disconnect event.
    pub fn prune(&self, max_age: Duration, alive: impl Fn(&str) -> bool) -> usize {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|sid, b| b.created.elapsed() < max_age || alive(sid));
        before - map.len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Binding>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What [`packet_limit`] needs: `limits.max_packet_bytes` and where refusals are told.
#[derive(Clone)]
pub(crate) struct PacketLimit {
    pub(crate) bytes: u64,
    pub(crate) refusals: crate::limits::Refusals,
}

/// axum middleware in front of the Socket.IO layer: a polling POST whose declared length
/// is over `limits.max_packet_bytes` gets a 413 naming the key before its body is read;
/// one that turns out larger while engineioxide reads it (chunked) gets the same 413 in
/// place of engineioxide's. Both are counted and logged as refusals of that limit. On a
/// WebSocket upgrade it arms the connection's frame reader ([`ReadGate::watch_frames`]):
/// a message over the limit ends the session, counted and logged the same way (tungstenite
/// would refuse it too, but as a transport error that says nothing). (A WebSocket message over it ends
/// the session: tungstenite refuses it, and the session ends with a transport error.)
pub(crate) async fn packet_limit(
    State(limit): State<PacketLimit>,
    req: Request,
    next: Next,
) -> Response {
    if !is_socket_io_path(req.uri().path()) {
        return next.run(req).await;
    }
    let source = req.extensions().get::<Peer>().map(|p| p.remote_addr.ip());
    if req.method() != Method::POST {
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let gate = req.extensions().get::<ReadGate>().cloned();
        let response = next.run(req).await;
        // Armed once the upgrade is accepted, before hyper writes the 101 and hands the
        // connection over: a refused upgrade leaves an HTTP connection, not frames.
        if upgrade
            && response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(gate) = gate
        {
            gate.watch_frames(super::backpressure::FrameWatch {
                limit: limit.bytes,
                refusals: limit.refusals.clone(),
                source,
            });
        }
        return response;
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let text = |n: Option<u64>| {
        let size = n.map_or_else(String::new, |n| format!(" of {n} bytes"));
        format!(
            "Engine.IO payload{size} exceeds the limit of {} bytes (limits.max_packet_bytes)",
            limit.bytes
        )
    };
    if let Some(n) = declared.filter(|n| *n > limit.bytes) {
        let text = text(Some(n));
        limit.refusals.refused("max_packet_bytes", source, &text);
        let mut response = crate::api::detail(StatusCode::PAYLOAD_TOO_LARGE, &text);
        crate::api::body_left_unread(&mut response);
        return response;
    }
    let response = next.run(req).await;
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
        return response;
    }
    let text = text(None);
    limit.refusals.refused("max_packet_bytes", source, &text);
    let mut response = crate::api::detail(StatusCode::PAYLOAD_TOO_LARGE, &text);
    crate::api::body_left_unread(&mut response);
    response
}

/// axum middleware in front of the Socket.IO layer.
pub async fn guard(State(bindings): State<SessionBindings>, req: Request, next: Next) -> Response {
    if !is_socket_io_path(req.uri().path()) {
        return next.run(req).await;
    }
    let owner = req
        .extensions()
        .get::<Peer>()
        .and_then(|p| p.identity.as_ref())
        .map(|i| i.fingerprint);
    let query = req.uri().query().unwrap_or("").to_owned();
    let req = slim(req);
    // The same parse as engineioxide's (first `sid=`, no percent-decoding), so the guard
    // and the engine always look at the same sid.
    if let Some(sid) = query.split('&').find_map(|s| s.strip_prefix("sid=")) {
        return match bindings.owner_of(sid) {
            Some(bound) if bound == owner && bindings.is_closed(sid) => refuse(
                StatusCode::BAD_REQUEST,
                "this Socket.IO session was closed: the client sent events faster than it read the replies",
            ),
            Some(bound) if bound == owner => {
                if query.split('&').any(|s| s == "transport=websocket")
                    && let Some(gate) = req.extensions().get::<ReadGate>()
                {
                    bindings.attach_gate(sid, gate.clone());
                }
                next.run(req).await
            }
            Some(_) => {
                let remote = req.extensions().get::<Peer>().map(|p| p.remote_addr);
                tracing::warn!(
                    ?remote,
                    sid,
                    "refused Socket.IO request: session belongs to another identity"
                );
                refuse(
                    StatusCode::FORBIDDEN,
                    "this Socket.IO session was opened by another client identity",
                )
            }
            // Not bound here: the session ended, or it lives on another node (a load
            // balancer without source affinity). Answered at once, in Engine.IO's own
            // shape (`code` 1, "Session ID unknown", as the reference server sends), so
            // the client drops the session and reconnects instead of polling on.
            None => unknown_session(),
        };
    }
    let is_polling_handshake =
        req.method() == Method::GET && query.split('&').any(|s| s == "transport=polling");
    let response = next.run(req).await;
    if !is_polling_handshake || response.status() != StatusCode::OK {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match http_body_util::Limited::new(body, MAX_HANDSHAKE_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Socket.IO handshake could not be read",
            );
        }
    };
    match handshake_sid(&bytes) {
        Some(sid) => bindings.bind(&sid, owner),
        // Without a binding every later request of this session is refused, which is the
        // safe failure; it would mean socketioxide changed its handshake format.
        None => {
            tracing::error!("Socket.IO polling handshake without a sid; the session cannot be used")
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// The headers engineioxide reads: the WebSocket handshake's, and the content type of a
/// polling POST.
const KEPT_HEADERS: [HeaderName; 5] = [
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::UPGRADE,
    header::CONNECTION,
    header::CONTENT_TYPE,
];

/// socketioxide keeps the head of the request that opened a session for as long as the
/// session lives (it is what `HttpExtension` reads): every header the client sent and
/// every extension of the stack, for hours, for each agent. Worse, hyper parses the URI
/// and header values as slices of its connection read buffer, so one retained value keeps
/// that whole buffer (16 KiB) alive. Only what the engine and our handlers read goes on:
/// copies of the URI and of [`KEPT_HEADERS`], the [`Peer`], the connection's [`ReadGate`]
/// and hyper's upgrade handle (measured with valgrind's massif and the fleet simulator, BENCHMARKS.md).
fn slim(req: Request) -> Request {
    let (mut parts, body) = req.into_parts();
    let mut headers = HeaderMap::with_capacity(KEPT_HEADERS.len());
    for name in KEPT_HEADERS {
        if let Some(value) = parts.headers.get(&name)
            && let Ok(copy) = HeaderValue::from_bytes(value.as_bytes())
        {
            headers.insert(name, copy);
        }
    }
    // A valid URI re-parses; should it not, the original (sharing the buffer) is kept.
    if let Ok(uri) = parts.uri.to_string().parse() {
        parts.uri = uri;
    }
    let mut extensions = http::Extensions::new();
    if let Some(peer) = parts.extensions.remove::<Peer>() {
        extensions.insert(peer);
    }
    if let Some(upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() {
        extensions.insert(upgrade);
    }
    if let Some(gate) = parts.extensions.remove::<ReadGate>() {
        extensions.insert(gate);
    }
    parts.headers = headers;
    parts.extensions = extensions;
    Request::from_parts(parts, body)
}

pub fn is_socket_io_path(path: &str) -> bool {
    path.strip_prefix(SOCKET_IO_PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The sid of an Engine.IO v4 open packet: `0{"sid":"...",...}`.
fn handshake_sid(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Open {
        sid: String,
    }
    let json = body.strip_prefix(b"0")?;
    serde_json::from_slice::<Open>(json).ok().map(|o| o.sid)
}

/// The detail of [`unknown_session`].
pub const UNKNOWN_SESSION: &str = "unknown Socket.IO session id: the session has ended or was opened on another node (with several nodes, the load balancer must keep each client on one node by source address; README, \"Running several nodes\")";

/// Engine.IO's "Session ID unknown" error (HTTP 400, `{"code": 1, "message": ...}`) with
/// our `detail` beside it.
fn unknown_session() -> Response {
    let body = serde_json::json!({
        "code": 1,
        "message": "Session ID unknown",
        "detail": UNKNOWN_SESSION,
    });
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

fn refuse(status: StatusCode, detail: &str) -> Response {
    crate::api::detail(status, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sid_of_an_open_packet() {
        let body = br#"0{"sid":"AAAAAAAAAAAAAAAA","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":100000}"#;
        assert_eq!(handshake_sid(body).as_deref(), Some("AAAAAAAAAAAAAAAA"));
        assert_eq!(handshake_sid(b"4hello"), None);
    }

    #[test]
    fn matches_the_socket_io_path_only() {
        assert!(is_socket_io_path("/socket.io/"));
        assert!(is_socket_io_path("/socket.io"));
        assert!(!is_socket_io_path("/socket.iox/"));
        assert!(!is_socket_io_path("/agent/certificate"));
    }

    #[test]
    fn prune_keeps_live_and_young_sessions() {
        let b = SessionBindings::default();
        b.bind("young", None);
        assert_eq!(b.prune(Duration::from_secs(60), |_| false), 0);
        assert_eq!(b.prune(Duration::ZERO, |sid| sid == "young"), 0);
        assert_eq!(b.prune(Duration::ZERO, |_| false), 1);
        assert_eq!(
            b.prune(Duration::ZERO, |_| false),
            0,
            "nothing left to prune"
        );
    }
}
