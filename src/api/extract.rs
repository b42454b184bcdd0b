//! Extractors with this API's errors: JSON bodies ([`JsonBody`]), query strings
//! ([`ApiQuery`]), agent ids from paths ([`agent_id`]), and the paging parameters and
//! helper both list endpoints share ([`PageQuery`], [`Page`]).

use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

use super::ApiError;
use crate::agents::registry::AgentStatus;
use crate::identity::AgentId;

/// Parses an agent id from a path or body, as a 400 with the rule when it is invalid.
pub fn agent_id(s: &str) -> Result<AgentId, ApiError> {
    AgentId::parse(s).map_err(|e| ApiError::BadRequest(format!("invalid agent_id: {e}")))
}

/// Query parameters with this API's errors (400 with a detail).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))
    }
}

/// The body limit of the endpoint a request is for: put into the request by the router
/// (`limits.max_body_bytes` on every endpoint, `limits.register_body_bytes` on the one
/// that takes a body without an API key), read by [`JsonBody`].
#[derive(Clone)]
pub(crate) struct BodyLimit {
    pub(crate) bytes: usize,
    /// The `[limits]` key that sets it, without `limits.`.
    pub(crate) key: &'static str,
    pub(crate) refusals: crate::limits::Refusals,
}

/// A JSON object body with this API's errors: 413 over the endpoint's [`BodyLimit`] (or,
/// on a router that sets none, the default of `limits.max_body_bytes`), 422 for
/// malformed JSON, missing fields or a body that is not an object (as FastAPI answered),
/// whatever the Content-Type says.
///
/// serde builds a struct from a JSON array too (fields by position: `["x"]` reads as
/// `{"name": "x"}`), which no client of this API means; every body here is an object, so
/// anything else is refused before serde sees it.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().cloned();
        let (bytes, key) = limit.as_ref().map_or(
            (
                crate::config::RawLimits::default().max_body_bytes,
                "max_body_bytes",
            ),
            |l| (l.bytes, l.key),
        );
        let source = req
            .extensions()
            .get::<crate::identity::Peer>()
            .map(|p| p.remote_addr.ip());
        let too_large = || {
            let e = ApiError::BodyTooLarge { limit: bytes, key };
            if let Some(limit) = &limit {
                limit.refusals.refused(key, source, &e.to_string());
            }
            e
        };
        // A declared length over the limit is refused before a byte of the body is read.
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > bytes as u64) {
            return Err(too_large());
        }
        // Read here rather than with axum's `Bytes`, whose own default limit (2 MB) would
        // answer first for a larger configured one.
        let limited = http_body_util::Limited::new(req.into_body(), bytes);
        let bytes = http_body_util::BodyExt::collect(limited)
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    ApiError::BadBody(format!("could not read the request body: {e}"))
                }
            })?
            .to_bytes();
        if let Some(kind) = not_an_object(&bytes) {
            return Err(ApiError::InvalidJson(format!(
                "invalid JSON body: the request body must be a JSON object, got {kind}"
            )));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::InvalidJson(format!("invalid JSON body: {e}")))
    }
}

/// What the body holds when it is JSON but not an object (`None` for an object, and for
/// text that is not JSON at all, which serde's own error describes better). JSON text is
/// an object exactly when its first non-whitespace byte is `{` (RFC 8259 §2, §4).
fn not_an_object(body: &[u8]) -> Option<&'static str> {
    let first = body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    match first {
        b'{' => None,
        b'[' => Some("an array"),
        b'"' => Some("a string"),
        b'-' | b'0'..=b'9' => Some("a number"),
        b't' | b'f' => Some("a boolean"),
        b'n' => Some("null"),
        _ => None,
    }
}

/// Largest page size of the list endpoints.
pub const MAX_PAGE: usize = 1000;
/// Page size when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;

/// `?limit=N&after=<agent_id>&status=...`: keyset pagination over agent ids (stable while
/// the set changes, unlike offsets). Each value is parsed here, so a bad one is a 400 whose
/// detail names the parameter.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size (default 100).
    #[serde(default, deserialize_with = "limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// `next_after` of the previous page.
    #[serde(default, deserialize_with = "after")]
    #[param(value_type = Option<String>)]
    pub after: Option<AgentId>,
    /// Only the agents with this status (default all).
    #[serde(default, deserialize_with = "status")]
    pub status: Option<StatusFilter>,
}

/// `?status=` of `GET /agents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StatusFilter {
    All,
    Connected,
    Stale,
    Disconnected,
}

impl StatusFilter {
    /// The one status the filter keeps, `None` for all.
    pub fn status(self) -> Option<AgentStatus> {
        match self {
            Self::All => None,
            Self::Connected => Some(AgentStatus::Connected),
            Self::Stale => Some(AgentStatus::Stale),
            Self::Disconnected => Some(AgentStatus::Disconnected),
        }
    }
}

pub(crate) fn limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    // Query values arrive as strings; a number is parsed from the text.
    let text = String::deserialize(d)?;
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(Some(n)),
        _ => Err(D::Error::custom(format!(
            "limit must be a whole number between 1 and {MAX_PAGE}, got '{text}'"
        ))),
    }
}

fn after<'de, D: Deserializer<'de>>(d: D) -> Result<Option<AgentId>, D::Error> {
    let text = String::deserialize(d)?;
    AgentId::parse(&text)
        .map(Some)
        .map_err(|e| D::Error::custom(format!("after must be an agent id: {e}")))
}

fn status<'de, D: Deserializer<'de>>(d: D) -> Result<Option<StatusFilter>, D::Error> {
    StatusFilter::deserialize(d)
        .map(Some)
        .map_err(|e| D::Error::custom(format!("status: {e}")))
}

impl PageQuery {
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_PAGE)
    }
}

/// One page of a list ordered by a key (an agent id, unless said otherwise): at most
/// `limit` items, and the cursor of the next page when there is one.
pub struct Page<T, K = AgentId> {
    pub items: Vec<T>,
    pub next_after: Option<K>,
}

impl<T, K: Clone> Page<T, K> {
    /// Cuts a page from the first `limit + 1` items after the cursor (fewer when the list
    /// ends): the extra item only tells that a next page exists. Every list endpoint
    /// fetches its items from an ordered index (`range(after..).take(limit + 1)`), so a page
    /// costs O(limit · log n) whatever the size of the list.
    pub fn cut(mut fetched: Vec<T>, limit: usize, key: impl Fn(&T) -> &K) -> Self {
        let next_after = if fetched.len() > limit {
            fetched.truncate(limit);
            fetched.last().map(|last| key(last).clone())
        } else {
            None
        };
        Self {
            items: fetched,
            next_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(q: &str) -> Result<PageQuery, String> {
        let uri: axum::http::Uri = format!("/agents?{q}").parse().unwrap();
        Query::<PageQuery>::try_from_uri(&uri)
            .map(|Query(q)| q)
            .map_err(|e| e.body_text())
    }

    #[test]
    fn bad_paging_values_are_refused_naming_the_parameter() {
        let q = query("limit=5&after=a1&status=stale").unwrap();
        assert_eq!(
            (q.limit(), q.after.unwrap().as_str(), q.status),
            (5, "a1", Some(StatusFilter::Stale))
        );
        assert_eq!(query("").unwrap().limit(), DEFAULT_PAGE);
        for (q, names) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=x", "limit"),
            ("after=../etc", "after"),
            ("status=sleeping", "status"),
        ] {
            let e = query(q).unwrap_err();
            assert!(
                e.contains(&format!("{names} ")) || e.contains(&format!("{names}:")),
                "{q}: {e}"
            );
        }
        assert!(query("offset=3").unwrap_err().contains("offset"));
    }

    #[test]
    fn only_an_object_is_an_object_body() {
        assert_eq!(not_an_object(br#" {"name": "x"}"#), None);
        assert_eq!(not_an_object(br#"["x"]"#), Some("an array"));
        assert_eq!(not_an_object(b"\n\t \"x\""), Some("a string"));
        assert_eq!(not_an_object(b"-1"), Some("a number"));
        assert_eq!(not_an_object(b"true"), Some("a boolean"));
        assert_eq!(not_an_object(b"null"), Some("null"));
        // Not JSON at all, or empty: left to serde, whose error says where it broke.
        assert_eq!(not_an_object(b"<xml/>"), None);
        assert_eq!(not_an_object(b""), None);
    }

    #[test]
    fn a_page_keeps_limit_items_and_points_after_the_last() {
        let ids: Vec<AgentId> = ["a", "b", "c"].iter().map(|s| s.parse().unwrap()).collect();
        let page = Page::cut(ids.clone(), 2, |id| id);
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.next_after.unwrap().as_str(), "b");
        let last = Page::cut(ids, 3, |id| id);
        assert_eq!((last.items.len(), last.next_after), (3, None));
    }
}
