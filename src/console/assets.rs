//! The console's files, embedded in the binary at build time (`include_bytes!`): nothing
//! is read from disk or fetched at run time, so the console works offline and is exactly
//! the version of the binary. ES modules are served as written; there is no build step.
//!
//! Every file is revalidated (`Cache-Control: no-cache` with a strong `ETag`, the SHA-256
//! of its bytes): an upgrade of the gateway shows its new console at the next load, and an
//! unchanged file costs a `304` without a body.

use std::sync::LazyLock;

use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::api::ApiError;
use crate::digest::sha256_hex;

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $type:expr) => {
        Asset {
            path: $path,
            content_type: $type,
            bytes: include_bytes!(concat!("../../ui/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file under `/ui/`; `index.html` is also `/ui/`.
static ASSETS: [Asset; 7] = [
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.js", JS),
    asset!("fleet.js", JS),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("vendor/preact/preact.module.js", JS),
    asset!("vendor/preact/hooks.module.js", JS),
    asset!("vendor/htm/htm.module.js", JS),
];

/// The strong ETag of each asset, computed once.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            // A quoted hex digest is always a valid header value.
            HeaderValue::from_str(&format!("\"{}\"", &sha256_hex(a.bytes)[..32]))
                .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
        })
        .collect()
});

/// `GET /ui`: the console lives under `/ui/` (relative module URLs resolve from there).
pub(crate) async fn redirect() -> Redirect {
    Redirect::permanent("/ui/")
}

/// `GET /ui/`: the page.
pub(crate) async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /ui/{*path}`: a script, the style sheet, a vendored module.
pub(crate) async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.path == path) else {
        return ApiError::NotFound(format!("no console file /ui/{path}")).into_response();
    };
    let (asset, etag) = (&ASSETS[i], &ETAGS[i]);
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == etag.to_str().unwrap_or_default() || tag.trim() == "*");
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = Response::new(Body::from(asset.bytes));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        r
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_page_imports_is_embedded() {
        let paths: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        for asset in ASSETS
            .iter()
            .filter(|a| a.content_type == JS || a.path == "index.html")
        {
            let text = std::str::from_utf8(asset.bytes).unwrap();
            // `from"./x.js"`, `from './x.js'`, `src="app.js"`, `href="style.css"`.
            for quote in ['"', '\''] {
                for part in text.split(quote).skip(1).step_by(2) {
                    let relative = part.strip_prefix("./").unwrap_or(part);
                    let is_ref = (part.ends_with(".js") || part.ends_with(".css"))
                        && !part.contains(' ')
                        && !part.starts_with("http");
                    if is_ref {
                        let base = asset.path.rsplit_once('/').map_or("", |(d, _)| d);
                        let joined = if base.is_empty() || !part.starts_with("./") {
                            relative.to_owned()
                        } else {
                            format!("{base}/{relative}")
                        };
                        assert!(
                            paths.contains(&joined.as_str()),
                            "{} refers to {part}, which is not embedded",
                            asset.path
                        );
                    }
                }
            }
        }
    }
}
