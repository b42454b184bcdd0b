//! Pebble, Let's Encrypt's ACME test server (Debian package `pebble`), run by a test on
//! loopback with real TLS-ALPN-01 validation (never `PEBBLE_VA_ALWAYS_VALID`): it connects
//! to `localhost:<tls_port>`, the gateway's listener. Debian ships no certificate for
//! Pebble's own HTTPS listener, so one is made here with rcgen (CA + localhost/127.0.0.1).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A Pebble that may or may not be running yet; killed when dropped.
pub struct Pebble {
    pub acme_port: u16,
    pub management_port: u16,
    /// The CA of Pebble's own HTTPS listener: `tls.acme.directory_ca_file`.
    pub listener_ca_file: PathBuf,
    listener_ca_pem: String,
    config_file: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

pub use super::free_port;

impl Pebble {
    /// Writes the certificates and the configuration into `dir`, on free ports, to validate
    /// TLS-ALPN-01 on `localhost:<tls_port>`. `validity_secs` sets the lifetime of the
    /// certificates it issues (Pebble's default: five years).
    pub fn prepare(dir: &Path, tls_port: u16, validity_secs: Option<u64>) -> Pebble {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "agentgate test: Pebble listener CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let listener_ca_file = dir.join("pebble-listener-ca.pem");
        let (cert_file, key_file) = (dir.join("pebble-cert.pem"), dir.join("pebble-key.pem"));
        std::fs::write(&listener_ca_file, ca.pem()).unwrap();
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();

        let (acme_port, management_port) = (free_port(), free_port());
        let mut pebble = json!({
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{management_port}"),
            "certificate": cert_file,
            "privateKey": key_file,
            // HTTP-01 is not used; the port only has to be set.
            "httpPort": free_port(),
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(secs) = validity_secs {
            pebble["certificateValidityPeriod"] = json!(secs);
        }
        let config_file = dir.join("pebble-config.json");
        std::fs::write(&config_file, json!({ "pebble": pebble }).to_string()).unwrap();
        Pebble {
            acme_port,
            management_port,
            listener_ca_file,
            listener_ca_pem: ca.pem(),
            config_file,
            child: None,
            log: Arc::default(),
        }
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// Starts Pebble and waits (bounded) until its directory answers.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "Pebble already started");
        let mut child = Command::new("pebble")
            .arg("-config")
            .arg(&self.config_file)
            // Real validation, at full speed, without deliberate badNonce rejections.
            .env_remove("PEBBLE_VA_ALWAYS_VALID")
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `pebble` ({e}): install the Debian package `pebble` \
                     (./scripts/test.sh does), these tests do not run without it"
                )
            });
        collect(child.stdout.take().unwrap(), self.log.clone());
        collect(child.stderr.take().unwrap(), self.log.clone());
        self.child = Some(child);
        for _ in 0..200 {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("pebble exited with {status}:\n{}", self.log());
            }
            if let Ok((200, _)) = self.management_get("/roots/0").await
                && let Ok((200, _)) = https_get(self.acme_port, "/dir", &self.listener_ca_pem).await
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("pebble did not answer within 10 s:\n{}", self.log());
    }

    /// Kills Pebble (its state is in memory and gone with it); `start` starts a fresh one.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The root that signs what this Pebble issues (a new one at every start).
    pub async fn root_pem(&self) -> String {
        let (status, body) = self.management_get("/roots/0").await.unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }

    /// newOrder requests Pebble has received (its log has one line per request).
    pub fn new_orders(&self) -> usize {
        self.log().matches("POST /order-plz").count()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn management_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        https_get(self.management_port, path, &self.listener_ca_pem).await
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

fn collect(stream: impl Read + Send + 'static, log: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}

/// One GET to `https://localhost:<port><path>` trusting only `ca_pem`.
pub async fn https_get(port: u16, path: &str, ca_pem: &str) -> std::io::Result<(u16, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", format!("localhost:{port}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
