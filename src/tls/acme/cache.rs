//! The ACME cache directory: account key and certificates, named as rustls-acme's
//! `DirCache` names them.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use base64::prelude::BASE64_URL_SAFE_NO_PAD;
use rustls_acme::{AccountCache, CertCache};

use super::{CertInfoError, CertOrigin, CertificateInfo, certificate_info};

/// The cache directory: rustls-acme's `DirCache` file naming (so either can read the
/// other's files), with atomic writes of mode 0600, and a note of the last certificate
/// read or written so that the task can describe what the library deployed.
#[derive(Clone)]
pub(super) struct AcmeCache {
    pub(super) dir: Arc<PathBuf>,
    /// A std Mutex: held to copy bytes in or out, never across an await.
    last_cert: Arc<Mutex<Option<Vec<u8>>>>,
}

impl AcmeCache {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir: Arc::new(dir),
            last_cert: Arc::default(),
        }
    }

    pub(super) async fn read_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        read_if_exists(cached_cert_path(&self.dir, domains, directory_url)).await
    }

    fn remember(&self, pem: Option<&[u8]>) {
        if let Ok(mut last) = self.last_cert.lock() {
            *last = pem.map(<[u8]>::to_vec);
        }
    }

    pub(super) fn last_cert_info(
        &self,
        origin: CertOrigin,
    ) -> Result<CertificateInfo, CertInfoError> {
        let pem = self
            .last_cert
            .lock()
            .map_err(|_| CertInfoError::Poisoned)?
            .clone()
            .ok_or(CertInfoError::NothingCached)?;
        certificate_info(&pem, origin)
    }

    async fn write(&self, path: PathBuf, contents: &[u8]) -> io::Result<()> {
        let dir = self.dir.clone();
        let contents = contents.to_vec();
        tokio::task::spawn_blocking(move || {
            ensure_private_dir(&dir)?;
            crate::fsutil::write_atomic(&path, &contents, 0o600)
        })
        .await
        .map_err(io::Error::other)?
    }
}

#[async_trait]
impl CertCache for AcmeCache {
    type EC = io::Error;

    async fn load_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        let found = self.read_cert(domains, directory_url).await?;
        self.remember(found.as_deref());
        Ok(found)
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory_url: &str,
        cert: &[u8],
    ) -> io::Result<()> {
        self.remember(Some(cert));
        self.write(cached_cert_path(&self.dir, domains, directory_url), cert)
            .await
    }
}

#[async_trait]
impl AccountCache for AcmeCache {
    type EA = io::Error;

    async fn load_account(
        &self,
        contact: &[String],
        directory_url: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        read_if_exists(cached_account_path(&self.dir, contact, directory_url)).await
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory_url: &str,
        account: &[u8],
    ) -> io::Result<()> {
        self.write(
            cached_account_path(&self.dir, contact, directory_url),
            account,
        )
        .await
    }
}

/// The cache file of the certificate for `domains` from `directory_url`: a staging
/// certificate is never taken for a production one, nor one for other names.
pub fn cached_cert_path(dir: &Path, domains: &[String], directory_url: &str) -> PathBuf {
    dir.join(format!("cached_cert_{}", cache_key(domains, directory_url)))
}

pub(super) fn cached_account_path(dir: &Path, contact: &[String], directory_url: &str) -> PathBuf {
    dir.join(format!(
        "cached_account_{}",
        cache_key(contact, directory_url)
    ))
}

/// rustls-acme `DirCache`: SHA-256 over each item and a NUL, then the directory URL,
/// in unpadded URL-safe base64.
fn cache_key(items: &[String], directory_url: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for item in items {
        ctx.update(item.as_bytes());
        ctx.update(&[0]);
    }
    ctx.update(directory_url.as_bytes());
    BASE64_URL_SAFE_NO_PAD.encode(ctx.finish())
}

async fn read_if_exists(path: PathBuf) -> io::Result<Option<Vec<u8>>> {
    match tokio::fs::read(&path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// Creates `dir` with mode 0700 if missing; warns when an existing one is open to others.
pub(super) fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            cache_dir = %dir.display(), mode = format!("{:o}", mode & 0o777),
            "ACME cache directory is readable by others; it holds private keys (chmod 700 it)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_file_names_follow_rustls_acme_dir_cache() {
        // The name rustls-acme 0.15.4's DirCache gives ["example.com"] at the staging directory.
        let domains = vec!["example.com".to_owned()];
        let url = rustls_acme::acme::LETS_ENCRYPT_STAGING_DIRECTORY;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"example.com\0");
        ctx.update(url.as_bytes());
        let expected = format!(
            "cached_cert_{}",
            BASE64_URL_SAFE_NO_PAD.encode(ctx.finish())
        );
        let path = cached_cert_path(Path::new("/c"), &domains, url);
        assert_eq!(path, Path::new("/c").join(expected));
        let production = rustls_acme::acme::LETS_ENCRYPT_PRODUCTION_DIRECTORY;
        assert_ne!(
            path,
            cached_cert_path(Path::new("/c"), &domains, production)
        );
    }
}
