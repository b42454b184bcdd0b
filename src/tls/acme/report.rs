//! What `agentgate check-config` prints about ACME.

use std::io;

use time::OffsetDateTime;

use super::cache::{cached_account_path, cached_cert_path};
use super::{CertOrigin, certificate_info};
use crate::clock::rfc3339;
use crate::config::{AcmeConfig, AcmeDirectory, ClusterConfig};

/// What `agentgate check-config` prints about ACME: the settings, and whether the cache
/// holds a certificate that a start would serve without ordering, and until when. With
/// `[cluster]` the account and certificate live in Redis, which `check-config` does not
/// contact; it says so instead of reporting on a cache directory nobody uses.
pub fn report(acme: &AcmeConfig, cluster: Option<&ClusterConfig>) -> String {
    let url = acme.directory.url();
    let dir = &acme.cache_dir;
    let mut out = String::from("\n# ACME (tls.mode = \"acme\"):\n");
    let mut line = |k: &str, v: &str| out.push_str(&format!("#   {k}: {v}\n"));
    let kind = match acme.directory {
        AcmeDirectory::LetsEncrypt => " (Let's Encrypt production)",
        AcmeDirectory::LetsEncryptStaging => {
            " (Let's Encrypt staging: certificates are not trusted by clients)"
        }
        AcmeDirectory::Url(_) => "",
    };
    line("directory", &format!("{url}{kind}"));
    line("domains", &acme.domains.join(", "));
    let contact = if acme.contact.is_empty() {
        "(none)".to_owned()
    } else {
        acme.contact.join(", ")
    };
    line("contact", &contact);
    if let Some(cluster) = cluster {
        line(
            "shared through Redis",
            &format!(
                "{} (not contacted by check-config): one node orders under a lock, every node \
                 serves the certificate from Redis and answers TLS-ALPN-01",
                cluster.redis_url.redacted()
            ),
        );
        return out;
    }
    line("cache_dir", &dir.display().to_string());
    let path = cached_cert_path(dir, &acme.domains, url);
    let account = cached_account_path(dir, &acme.contact, url);
    line(
        "account key",
        if account.exists() {
            "present in the cache"
        } else {
            "none yet (created by the first order)"
        },
    );
    let now = OffsetDateTime::now_utc();
    let cert = match std::fs::read(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            "none in the cache: the first start places an order".to_owned()
        }
        Err(e) => format!(
            "unreadable ({}: {e}): a start places an order",
            path.display()
        ),
        Ok(pem) => match certificate_info(&pem, CertOrigin::Cache) {
            Err(e) => format!(
                "unusable ({}: {e}): a start places an order",
                path.display()
            ),
            Ok(info) if !info.is_valid_at(now) => format!(
                "not valid now (valid {} to {}; {}): a start places an order",
                rfc3339(info.not_before),
                rfc3339(info.not_after),
                path.display()
            ),
            Ok(info) => format!(
                "valid until {} (serial {}, names {}; renewal from {}; {})",
                rfc3339(info.not_after),
                info.serial,
                info.names.join(", "),
                rfc3339(info.renew_at()),
                path.display()
            ),
        },
    };
    line("cached certificate", &cert);
    out
}
