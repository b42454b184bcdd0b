//! The console's routes: the page and its files under `/ui/`, and its JSON endpoints
//! under `/ui/api/`.
//!
//! The JSON endpoints that read or change the fleet are the API's own handlers
//! (`crate::api::agents`, `certificate`, `enroll`), mounted a second time: the same
//! validation, errors and effects as `POST /agents/{id}/commands` and the rest. What
//! differs is the credential: [`require_session`] takes the place of the Bearer check and
//! puts the session's key (name and scopes) where the API's key check puts it, so the
//! per-endpoint scope check (`api::middleware::require_scope`) is the API's as well. Every
//! request that changes something carries the session's CSRF token in `X-CSRF-Token`.

use axum::extract::{FromRef, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;
use tower_http::set_header::SetResponseHeaderLayer;

use super::session::{self, Session, SessionError};
use super::{CSP, Console, assets, feed};
use crate::api::middleware::{check_key, refused_source, require_scope};
use crate::api::{ApiError, AppState, JsonBody, agent_id, agents, certificate, detail, enroll};
use crate::auth::ApiKey;
use crate::clock::rfc3339_unix;
use crate::identity::Peer;

/// What the console's handlers share: the API's state (for the API's handlers) and the
/// console's own.
#[derive(Clone)]
struct UiState {
    app: AppState,
    console: Console,
}

impl FromRef<UiState> for AppState {
    fn from_ref(ui: &UiState) -> AppState {
        ui.app.clone()
    }
}

/// The session a request came with (put there by [`require_session`]).
#[derive(Clone)]
struct SignedIn {
    id: String,
    session: Session,
}

/// Every route under `/ui`.
pub(crate) fn router(console: Console, app: AppState) -> Router {
    let self_signed = app.server_cert.is_self_signed();
    let ui = UiState { app, console };
    let signed_in = Router::new()
        .route("/ui/api/session", get(session_info))
        .route("/ui/api/sign-out", post(sign_out))
        .route("/ui/api/events", scoped(get(events), "agents:read"))
        .route(
            "/ui/api/agents/{agent_id}",
            scoped(get(agents::get_one), "agents:read"),
        )
        .route(
            "/ui/api/agents/{agent_id}/heartbeats",
            scoped(get(heartbeats), "agents:read"),
        )
        .route(
            "/ui/api/agents/{agent_id}/commands",
            scoped(post(agents::command), "agents:command"),
        )
        .route(
            "/ui/api/agent/certificate",
            scoped(post(certificate::upload), "certificates:write"),
        )
        .route(
            "/ui/api/agent/certificate/{agent_id}",
            scoped(
                axum::routing::delete(certificate::delete),
                "certificates:write",
            ),
        )
        .route(
            "/ui/api/install-tokens",
            scoped(post(enroll::issue), "certificates:write"),
        )
        .route_layer(middleware::from_fn_with_state(ui.clone(), require_session));
    let api = Router::new()
        .route("/ui/api/sign-in", post(sign_in))
        .merge(signed_in)
        // Answers that hold a CSRF token or an install token are never cached.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ));
    let router = Router::new()
        .route("/ui", get(assets::redirect))
        .route("/ui/", get(assets::index))
        .route("/ui/{*path}", get(assets::file))
        .merge(api)
        .with_state(ui)
        .layer(SetResponseHeaderLayer::overriding(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ));
    crate::api::router::security_headers(router, self_signed)
}

/// `method_router` behind the API's scope check for `scope`.
fn scoped(method_router: MethodRouter<UiState>, scope: &'static str) -> MethodRouter<UiState> {
    method_router.route_layer(middleware::from_fn_with_state(scope, require_scope))
}

/// Lets a request through only with a live session, and a state-changing one only with
/// the session's CSRF token; puts the session's key where the API's scope check reads it.
async fn require_session(State(ui): State<UiState>, mut req: Request, next: Next) -> Response {
    let Some(id) = session::cookie_of(req.headers()) else {
        return not_signed_in();
    };
    // Watching the live feed is not use: an open but abandoned page still times out.
    let touch = req.uri().path() != "/ui/api/events";
    let session = match ui.console.sessions.find(&id, touch).await {
        Ok(Some(session)) => session,
        Ok(None) => return not_signed_in(),
        Err(e) => return unavailable(&e),
    };
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    if !safe {
        let presented = req
            .headers()
            .get(session::CSRF_HEADER)
            .and_then(|v| v.to_str().ok());
        match presented {
            None => {
                return detail(
                    StatusCode::FORBIDDEN,
                    "missing X-CSRF-Token header: every console request that changes something carries the session's CSRF token (csrf_token of GET /ui/api/session)",
                );
            }
            Some(token) if !session.csrf_matches(token) => {
                return detail(
                    StatusCode::FORBIDDEN,
                    "the X-CSRF-Token header does not match this session's CSRF token",
                );
            }
            Some(_) => {}
        }
    }
    let key = session.api_key();
    req.extensions_mut().insert(key.clone());
    req.extensions_mut().insert(SignedIn { id, session });
    let mut response = next.run(req).await;
    response.extensions_mut().insert(key);
    response
}

fn not_signed_in() -> Response {
    detail(
        StatusCode::UNAUTHORIZED,
        "not signed in: no console session, or it ended (signed out or expired); sign in at /ui/",
    )
}

fn unavailable(e: &SessionError) -> Response {
    tracing::warn!(error = %e, "console session store unavailable");
    ApiError::ClusterUnavailable(e.to_string()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    api_key: String,
}

/// `POST /ui/api/sign-in` `{"api_key": "..."}`: opens a session for the key, under the
/// same failed-attempt limit as the API's Bearer check. Only a JSON body is read: an HTML
/// form of another site cannot send one, so no other site can sign a browser in.
async fn sign_in(
    State(ui): State<UiState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<SignIn>,
) -> Response {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return detail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "sign-in takes a JSON body {\"api_key\": ...} with Content-Type: application/json",
        );
    }
    let source = peer.map(|Extension(p)| p.remote_addr.ip());
    let now = std::time::Instant::now();
    if let Some(refused) = refused_source(&ui.app, source, now) {
        return refused;
    }
    let key = match check_key(&ui.app, source, body.api_key.trim(), now) {
        Ok(key) => key,
        Err(refused) => return refused.into_response(),
    };
    let sessions = &ui.console.sessions;
    let (id, session) = match sessions.create(&key).await {
        Ok(created) => created,
        Err(e) => return unavailable(&e),
    };
    tracing::info!(key = %key.name, source = ?source, "console sign-in");
    let mut response = Json(session_view(&session, sessions.config())).into_response();
    if let Ok(cookie) = HeaderValue::from_str(&session::set_cookie(&id, sessions.config())) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response.extensions_mut().insert::<ApiKey>(key);
    response
}

fn session_view(session: &Session, config: &crate::config::ConsoleConfig) -> serde_json::Value {
    json!({
        "key_name": session.key_name,
        "scopes": session.scopes,
        "csrf_token": session.csrf_token,
        "expires_at": rfc3339_unix(session.expires_at(config)),
        "idle_timeout_secs": config.session_idle.as_secs(),
    })
}

/// `GET /ui/api/session`: who is signed in, with what scopes, and the CSRF token.
async fn session_info(
    State(ui): State<UiState>,
    Extension(signed_in): Extension<SignedIn>,
) -> Json<serde_json::Value> {
    let mut v = session_view(&signed_in.session, ui.console.sessions.config());
    v["node"] = json!(ui.app.agents.cluster.as_ref().map(|c| c.node_id.clone()));
    Json(v)
}

/// `POST /ui/api/sign-out`: forgets the session (its cookie is refused from now on, on
/// every node) and removes the cookie.
async fn sign_out(
    State(ui): State<UiState>,
    Extension(signed_in): Extension<SignedIn>,
) -> Response {
    if let Err(e) = ui.console.sessions.remove(&signed_in.id).await {
        return unavailable(&e);
    }
    tracing::info!(key = %signed_in.session.key_name, "console sign-out");
    let mut response = Json(json!({ "message": "Signed out" })).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&session::clear_cookie())
            .unwrap_or_else(|_| HeaderValue::from_static("agentgate_console=; Max-Age=0")),
    );
    response
}

/// `GET /ui/api/events`: the live fleet (see `feed`).
async fn events(State(ui): State<UiState>, Extension(signed_in): Extension<SignedIn>) -> Response {
    let sessions = ui.console.sessions.clone();
    let id = signed_in.id;
    feed::events(ui.console.feed.clone(), move || {
        let (sessions, id) = (sessions.clone(), id.clone());
        Box::pin(async move {
            // A store outage does not end the stream; a session that is gone does.
            !matches!(sessions.find(&id, false).await, Ok(None))
        })
    })
    .into_response()
}

/// `GET /ui/api/agents/{agent_id}/heartbeats`: the times of the agent's last heartbeats
/// that this node's feed saw, oldest first (the agent page's timeline).
async fn heartbeats(
    State(ui): State<UiState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = agent_id(&id)?;
    let times: Vec<String> = ui
        .console
        .feed
        .timeline(&id)
        .into_iter()
        .map(|ms| crate::clock::rfc3339(crate::cluster::fleet::from_unix_ms(ms)))
        .collect();
    Ok(Json(json!({ "agent_id": id, "heartbeats": times })))
}
