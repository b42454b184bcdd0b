//! The HTTP API client of the simulator: certificate uploads and commands, over TLS
//! without a client certificate (as the SaaS backend calls the gateway), HTTP/1.1 with
//! keep-alive so that a connection carries many requests.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::SERVER_NAME;

/// Where the API is and how to authenticate to it.
#[derive(Clone)]
pub struct Api {
    target: SocketAddr,
    auth: Arc<str>,
    tls: tokio_rustls::TlsConnector,
}

/// One kept-alive connection to the API.
pub struct ApiConn {
    sender: SendRequest<Full<Bytes>>,
    auth: Arc<str>,
}

impl Api {
    pub fn new(target: SocketAddr, api_key: &str, tls: Arc<ClientConfig>) -> Self {
        Self {
            target,
            auth: format!("Bearer {api_key}").into(),
            tls: tokio_rustls::TlsConnector::from(tls),
        }
    }

    pub async fn connect(&self) -> anyhow::Result<ApiConn> {
        let tcp = TcpStream::connect(self.target).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(SERVER_NAME)?;
        let tls = self.tls.connect(name, tcp).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(ApiConn {
            sender,
            auth: self.auth.clone(),
        })
    }
}

impl ApiConn {
    /// POSTs `body` as JSON; returns the status and the body.
    pub async fn post_json(&mut self, path: &str, body: &Value) -> anyhow::Result<(u16, Bytes)> {
        let req = http::Request::post(path)
            .header(http::header::HOST, SERVER_NAME)
            .header(http::header::AUTHORIZATION, &*self.auth)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
        self.sender.ready().await?;
        let res = self.sender.send_request(req).await?;
        let status = res.status().as_u16();
        let body = res.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// A request without a body (GET, DELETE); returns the status.
    pub async fn status_of(&mut self, method: http::Method, path: &str) -> anyhow::Result<u16> {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, SERVER_NAME)
            .header(http::header::AUTHORIZATION, &*self.auth)
            .body(Full::new(Bytes::new()))?;
        self.sender.ready().await?;
        let res = self.sender.send_request(req).await?;
        let status = res.status().as_u16();
        res.into_body().collect().await?;
        Ok(status)
    }

    /// `POST /agent/certificate`.
    pub async fn upload(&mut self, agent_id: &str, cert_pem: &str) -> anyhow::Result<()> {
        let (status, body) = self
            .post_json(
                "/agent/certificate",
                &json!({ "agent_id": agent_id, "certificate": cert_pem }),
            )
            .await?;
        anyhow::ensure!(
            status == 200,
            "upload of {agent_id}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok(())
    }

    /// `POST /agents/{agent_id}/commands` with event `bench_command`; `Err` carries the
    /// failure reason for the report.
    pub async fn command(&mut self, agent_id: &str, seq: u64) -> Result<(), String> {
        let path = format!("/agents/{agent_id}/commands");
        let body =
            json!({ "event": "bench_command", "data": { "seq": seq }, "timeout_ms": 10_000 });
        match self.post_json(&path, &body).await {
            Ok((200, _)) => Ok(()),
            Ok((status, _)) => Err(format!("command: HTTP {status}")),
            Err(e) => Err(format!("command: {}", crate::agent::short(&e.to_string()))),
        }
    }
}
