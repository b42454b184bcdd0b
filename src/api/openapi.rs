//! The OpenAPI 3.1 document (`GET /openapi.json`) and Swagger UI (`GET /docs`).
//!
//! The paths come from the handlers' `#[utoipa::path]` annotations, collected by the same
//! list that builds the router ([`super::router::endpoints`]), so an endpoint cannot be
//! routed without being documented or documented without being routed. [`ApiDoc`] adds
//! what no single handler says: the title and the text on Socket.IO, the Bearer scheme,
//! and the error responses that every operation shares (see [`CommonErrors`]).
//! Swagger UI's files are compiled in from `utoipa-swagger-ui-vendored`; nothing is
//! fetched at build or run time.

use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::schema;

/// Where the document is served.
pub(crate) const OPENAPI_PATH: &str = "/openapi.json";
/// Where Swagger UI is served (and `/docs/...` for its files).
pub(crate) const DOCS_PATH: &str = "/docs";

/// The name of the Bearer security scheme in the document; the protected operations
/// name it in `security(("api_key" = []))`.
pub(crate) const API_KEY_SCHEME: &str = "api_key";

/// The parts of the document that belong to no handler.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "agentgate",
        description = "mTLS gateway for a fleet of orchestrator agents: the certificate API, \
enrollment, commands to agents, and operations.\n\n\
**Authentication.** Operations marked with the lock need `Authorization: Bearer <API key>` \
(one of `api_keys`); without it they answer 403, with two Authorization fields 400. \
`/health`, `/ready`, `/metrics`, `/agent/register` (the install token is the credential), \
this document and `/docs` need no key.\n\n\
**Errors.** Every 4xx and 5xx carries `{\"detail\": \"...\"}` saying what is wrong.\n\n\
**Agents (Socket.IO, not REST).** Agents connect to `/socket.io/` (Socket.IO v5 over \
Engine.IO v4, WebSocket or long-polling, namespace `/`) on the same TLS listener, \
presenting their client certificate in the handshake; the certificate's CN is the agent \
id. Events: the agent emits `heartbeat` `{cpu_usage, memory_usage, disk_usage, \
timestamp?}` and receives `heartbeat_ack` `{status, agent_id, received_at}` (a malformed \
payload also gets an `error` event; the socket stays up); commands sent through \
`POST /agents/{agent_id}/commands` arrive as the named event with an acknowledgement, \
which is the command's reply.\n\n\
**Client generation.** Any OpenAPI 3.1 generator reads this document, for example \
`openapi-generator-cli generate -i https://<host>/openapi.json -g python -o client`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(schema::ErrorDetail)),
    tags(
        (name = "certificates", description = "Agent certificates: upload, inspect, list, revoke"),
        (name = "agents", description = "Connected agents and commands to them"),
        (name = "enrollment", description = "One-time install tokens; agents register their own certificate"),
        (name = "cluster", description = "The nodes of a cluster (with `[cluster]`)"),
        (name = "tokens", description = "API tokens (JWTs for `auth = \"jwt\"` routes): issue, list, revoke, audit; scope `tokens:admin`"),
        (name = "gateway", description = "Routes to upstream services: those of the configuration file and those registered at runtime"),
        (name = "operations", description = "Liveness, readiness, metrics (no API key)"),
        (name = "hello", description = "The API key check, kept from the replaced system"),
    ),
)]
pub(crate) struct ApiDoc;

/// Adds the Bearer scheme and the error responses that do not depend on the handler:
/// - every operation: 414 and 431 (`head_limits`, before any route is matched);
/// - every operation with a JSON body (all go through `JsonBody`): 413 over its body limit
///   (`limits.max_body_bytes`; `limits.register_body_bytes` for `POST /agent/register`),
///   422 for a body that is not a JSON object of the documented shape,
///   400 when it cannot be read;
/// - every operation behind the API key: 403 (no key, wrong key), 400 (two
///   Authorization fields) and 429 (too many failed attempts from the address).
///
/// A status a handler documents itself keeps the handler's description.
pub(crate) struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_KEY_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("One of the gateway's `api_keys`"))
                    .build(),
            ),
        );
        for item in doc.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                let mut add = |status: &str, text: &str| {
                    op.responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error_response(text));
                };
                add("414", "The request target is too long");
                add("431", "The request header fields are too large");
                if op.request_body.is_some() {
                    add("400", "The request body could not be read");
                    add("413", "The request body exceeds its limit");
                    add(
                        "422",
                        "The body is not a JSON object of the documented shape (the detail names the field)",
                    );
                }
                if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    add("400", "More than one Authorization field");
                    add("403", "No API key, or a key that is not one of `api_keys`");
                    add(
                        "429",
                        "Too many failed API-key attempts from this address (`limits.api_key_failures`); see Retry-After",
                    );
                }
            }
        }
    }
}

/// The served document: [`ApiDoc`] with the operations of the router's endpoint list,
/// then [`CommonErrors`] over all of them.
pub(crate) fn document(paths: Document) -> Document {
    let mut doc = ApiDoc::openapi();
    doc.merge(paths);
    CommonErrors.modify(&mut doc);
    doc
}

/// A response with the `{"detail"}` body.
pub(crate) fn error_response(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorDetail")))
                .build(),
        )
        .build()
        .into()
}

/// `GET /openapi.json` and Swagger UI at `GET /docs`, neither behind the API key.
pub(crate) fn docs_router<S: Clone + Send + Sync + 'static>(doc: Document) -> Router<S> {
    SwaggerUi::new(DOCS_PATH).url(OPENAPI_PATH, doc).into()
}
