//! Limits on the request head (URI length, number and size of header fields), checked
//! before anything else reads the request, so that an oversized head gets a 414 or 431
//! with a `{"detail": ...}` naming the limit.
//!
//! hyper enforces its own limits while it parses, but answers them with a bare status and
//! no body (hyper `proto/h1/role.rs`, `on_error`). Ours are set below hyper's
//! ([`HYPER_MAX_HEADERS`], [`HYPER_MAX_BUF`]), so a client sees hyper's bare answer only
//! for a head too large to be worth a reply (more than 64 KiB or 200 fields).

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::StatusCode;

use super::detail;

/// Longest request target, in bytes: nginx's `large_client_header_buffers` (8 KiB per
/// line), which the system agentgate replaces sat behind.
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header fields in one request: hyper's and httparse's default.
pub(crate) const MAX_HEADER_FIELDS: usize = 100;
/// Largest sum of header field names and values, in bytes: nginx's default total (4
/// buffers of 8 KiB).
pub(crate) const MAX_HEADER_BYTES: usize = 32 * 1024;

/// hyper's field limit: above ours, so that ours answers first with a detail.
pub(crate) const HYPER_MAX_HEADERS: usize = 2 * MAX_HEADER_FIELDS;
/// hyper's read buffer limit (its default is about 400 KiB per connection): room for a
/// head at our limits, not more.
pub(crate) const HYPER_MAX_BUF: usize = 64 * 1024;

/// axum middleware: 414 for a long URI, 431 for too many or too large header fields.
pub(crate) async fn check_head(req: Request, next: Next) -> Response {
    match refusal(&req) {
        Some((status, text)) => {
            tracing::debug!(%status, detail = %text, "request head refused");
            detail(status, &text)
        }
        None => next.run(req).await,
    }
}

fn refusal(req: &Request) -> Option<(StatusCode, String)> {
    let uri = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri > MAX_URI_BYTES {
        return Some((
            StatusCode::URI_TOO_LONG,
            format!("request URI of {uri} bytes exceeds the limit of {MAX_URI_BYTES} bytes"),
        ));
    }
    let headers = req.headers();
    // `len` counts every field, repeated names included (`keys_len` would not).
    if headers.len() > MAX_HEADER_FIELDS {
        return Some((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "{} header fields exceed the limit of {MAX_HEADER_FIELDS}",
                headers.len()
            ),
        ));
    }
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if bytes > MAX_HEADER_BYTES {
        return Some((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "header fields of {bytes} bytes in total exceed the limit of {MAX_HEADER_BYTES} bytes"
            ),
        ));
    }
    None
}
