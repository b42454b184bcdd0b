//! The optional plain-HTTP listener (`[http_redirect]`): every request, whatever its
//! method, gets a 301 to the same host and path on https, as nginx's
//! `return 301 https://$host$request_uri;` did in the set-up agentgate replaces. Nothing
//! else is served in clear text: no API, no Socket.IO, no ACME (TLS-ALPN-01 needs none).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listener;

/// A client that sends no request line in this time is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` until `shutdown` is cancelled; connections run on `tracker`, at most
/// `max_connections` at once. `https_port` goes into the `Location` header (not when 443).
pub async fn serve(
    listener: TcpListener,
    https_port: u16,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    if let Ok(local) = listener.local_addr() {
        tracing::info!(%local, https_port, "plain-HTTP listener redirecting to https");
    }
    let conn_shutdown = shutdown.clone();
    listener::accept_loop(
        listener,
        max_connections,
        shutdown,
        tracker,
        || {},
        move |tcp, _peer, permit| {
            let shutdown = conn_shutdown.clone();
            async move {
                let _permit = permit;
                let service =
                    hyper::service::service_fn(move |req: Request<Incoming>| async move {
                        Ok::<_, Infallible>(redirect(&req, https_port))
                    });
                listener::serve_plain_http(tcp, service, HEADER_READ_TIMEOUT, shutdown).await;
            }
        },
    )
    .await;
}

/// The answer to one request: 301 to its https URL, or 400 without a usable host.
pub fn redirect<B>(req: &Request<B>, https_port: u16) -> Response<Full<Bytes>> {
    match location(req, https_port).and_then(|l| HeaderValue::from_str(&l).ok()) {
        Some(location) => {
            let body = format!(
                "moved to {}\n",
                location.to_str().unwrap_or("the https site")
            );
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
            let headers = resp.headers_mut();
            headers.insert(header::LOCATION, location);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        }
        None => {
            // The one error shape of the gateway, `{"detail": ...}`, on this listener too.
            let mut resp = Response::new(Full::new(Bytes::from_static(
                br#"{"detail":"a Host header naming this server is required"}"#,
            )));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
    }
}

/// `https://<host><:port unless 443><path and query>`, the host taken from an
/// absolute-form request target or else the Host header (RFC 9112 §3.2), without its port.
fn location<B>(req: &Request<B>, https_port: u16) -> Option<String> {
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => req
            .headers()
            .get(header::HOST)?
            .to_str()
            .ok()?
            .parse::<http::uri::Authority>()
            .ok()?,
    };
    let host = authority.host();
    // Userinfo has no place in a Host header, and would put another name before the host.
    if host.is_empty() || authority.as_str().contains('@') {
        return None;
    }
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    Some(format!("https://{host}{port}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn located(target: &str, host: Option<&str>, https_port: u16) -> (u16, Option<String>) {
        let mut req = Request::builder().uri(target);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let resp = redirect(&req.body(()).unwrap(), https_port);
        let loc = resp
            .headers()
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_owned());
        (resp.status().as_u16(), loc)
    }

    #[test]
    fn keeps_host_path_and_query_and_drops_the_http_port() {
        assert_eq!(
            located(
                "/agent/certificate/a?x=1&y=2",
                Some("gw.example.com:80"),
                443
            ),
            (
                301,
                Some("https://gw.example.com/agent/certificate/a?x=1&y=2".into())
            )
        );
        assert_eq!(
            located("/", Some("gw.example.com"), 8443),
            (301, Some("https://gw.example.com:8443/".into()))
        );
        assert_eq!(
            located("/p", Some("[::1]:8080"), 443),
            (301, Some("https://[::1]/p".into()))
        );
        assert_eq!(
            located("http://other.example/x", Some("ignored"), 443),
            (301, Some("https://other.example/x".into()))
        );
    }

    #[test]
    fn refuses_a_missing_or_bad_host() {
        assert_eq!(located("/", None, 443), (400, None));
        assert_eq!(located("/", Some("evil@gw.example.com"), 443), (400, None));
        assert_eq!(located("/", Some("a b"), 443), (400, None));
    }
}
