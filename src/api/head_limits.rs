//! Limits on the request head (URI length, number and size of header fields), checked
//! before anything else reads the request, so that an oversized head gets a 414 or 431
//! with a `{"detail": ...}` naming the limit.
//!
//! hyper enforces its own limits while it parses, but answers them with a bare status and
//! no body (hyper `proto/h1/role.rs`, `on_error`). Ours are set below hyper's
//! ([`HeadLimits::hyper_max_headers`], [`HeadLimits::hyper_max_buf`]), so a client sees
//! hyper's bare answer only for a head too large to be worth a reply (twice our field
//! count, or more bytes than our limits add up to).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::StatusCode;

use super::detail;
use crate::metrics::Metrics;

/// Default longest request target, in bytes: nginx's `large_client_header_buffers` (8 KiB
/// per line), which the system agentgate replaces sat behind.
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;
/// Default most header fields in one request: hyper's and httparse's default.
pub(crate) const MAX_HEADER_FIELDS: usize = 100;
/// Default largest sum of header field names and values, in bytes: nginx's default total
/// (4 buffers of 8 KiB).
pub(crate) const MAX_HEADER_BYTES: usize = 32 * 1024;

/// hyper's smallest read buffer (it refuses a smaller `max_buf_size`), and our floor: its
/// default is about 400 KiB per connection.
const HYPER_MIN_BUF: usize = 64 * 1024;

/// The request head limits of `[limits]` (`max_uri_bytes`, `max_header_fields`,
/// `max_header_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    pub uri_bytes: usize,
    pub header_fields: usize,
    pub header_bytes: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self {
            uri_bytes: MAX_URI_BYTES,
            header_fields: MAX_HEADER_FIELDS,
            header_bytes: MAX_HEADER_BYTES,
        }
    }
}

impl HeadLimits {
    /// hyper's field limit: above ours, so that ours answers first with a detail.
    pub(crate) fn hyper_max_headers(&self) -> usize {
        2 * self.header_fields
    }

    /// hyper's read buffer limit: room for a head at our limits (request line, fields and
    /// their separators), not more.
    pub(crate) fn hyper_max_buf(&self) -> usize {
        (self.uri_bytes + self.header_bytes + 4 * self.hyper_max_headers() + 1024)
            .max(HYPER_MIN_BUF)
    }
}

/// What [`check_head`] needs.
#[derive(Clone)]
pub(crate) struct HeadCheck {
    pub(crate) limits: HeadLimits,
    pub(crate) metrics: Metrics,
}

/// axum middleware: 414 for a long URI, 431 for too many or too large header fields.
pub(crate) async fn check_head(
    State(check): State<HeadCheck>,
    req: Request,
    next: Next,
) -> Response {
    match check.refuse(&req) {
        Some(refused) => refused,
        None => next.run(req).await,
    }
}

impl HeadCheck {
    /// The 414 or 431 for a request head over the limits (counted and logged), or `None`.
    pub(crate) fn refuse<B>(&self, req: &http::Request<B>) -> Option<Response> {
        let (status, limit, text) = refusal(&self.limits, req)?;
        self.metrics.limit_refusal(limit);
        tracing::debug!(%status, detail = %text, "request head refused");
        Some(detail(status, &text))
    }
}

fn refusal<B>(
    limits: &HeadLimits,
    req: &http::Request<B>,
) -> Option<(StatusCode, &'static str, String)> {
    let uri = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri > limits.uri_bytes {
        return Some((
            StatusCode::URI_TOO_LONG,
            "max_uri_bytes",
            format!(
                "request URI of {uri} bytes exceeds the limit of {} bytes (limits.max_uri_bytes)",
                limits.uri_bytes
            ),
        ));
    }
    let headers = req.headers();
    // `len` counts every field, repeated names included (`keys_len` would not).
    if headers.len() > limits.header_fields {
        return Some((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "max_header_fields",
            format!(
                "{} header fields exceed the limit of {} (limits.max_header_fields)",
                headers.len(),
                limits.header_fields
            ),
        ));
    }
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if bytes > limits.header_bytes {
        return Some((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "max_header_bytes",
            format!(
                "header fields of {bytes} bytes in total exceed the limit of {} bytes (limits.max_header_bytes)",
                limits.header_bytes
            ),
        ));
    }
    None
}
