//! The ACME task: polls rustls-acme's state (which orders and renews only while polled),
//! logs every event in the operator's terms and keeps [`super::AcmeStatus`] up to date.

use std::io;
use std::time::Duration;

use futures_util::StreamExt;
use rustls_acme::{EventError, EventOk};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::problem::describe_order_error;
use super::{Acme, CertOrigin, Event, certificate_info};
use crate::clock::rfc3339;

/// The library backs off `1 << n` seconds after the n-th consecutive failed order
/// (n from 0), with n capped at 16 (rustls-acme 0.15.4, `AcmeState::poll_next_infinite`).
const MAX_BACKOFF_EXPONENT: u32 = 16;

/// Longest single sleep of the renewal reminder. `renew_at` is wall-clock time and
/// timers run on the monotonic clock: waking daily keeps the two from drifting apart
/// over the months between renewals.
const MAX_TIMER: Duration = Duration::from_secs(86_400);

impl Acme {
    /// Polls the ACME state until `shutdown` is cancelled: loads the cache, orders,
    /// renews, logs each event. Meant to be spawned once; a second call returns at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let state = self
            .shared
            .state
            .lock()
            .map(|mut s| s.take())
            .ok()
            .flatten();
        let Some(mut state) = state else {
            tracing::error!("ACME task started twice; this one does nothing");
            return;
        };
        self.log_start().await;
        let mut run = RunState::default();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sleep_towards(run.renewal_due) => {
                    if run.renewal_due.is_some_and(|due| due <= OffsetDateTime::now_utc()) {
                        run.renewal_due = None;
                        tracing::info!(
                            domains = ?self.shared.domains, directory = %self.shared.directory_url,
                            "ACME renewal due: ordering a new certificate"
                        );
                    }
                    continue;
                }
                event = state.next() => event,
            };
            // The state is an endless stream; `None` would mean the library changed that.
            let Some(event) = event else { break };
            self.on_event(event, &mut run);
        }
        tracing::debug!("ACME task stopped");
    }

    async fn log_start(&self) {
        let s = &self.shared;
        let cached = s.cache.read_cert(&s.domains, &s.directory_url).await;
        let cached = match cached {
            Ok(Some(pem)) => certificate_info(&pem, CertOrigin::Cache).map_err(|e| {
                format!("the cached certificate cannot be read ({e}); placing an order now")
            }),
            Ok(None) => Err("no certificate in the cache: placing an order now".to_owned()),
            Err(e) => Err(format!(
                "reading the cache failed ({e}); placing an order now"
            )),
        };
        let plan = match &cached {
            Ok(info) if info.renew_at() <= OffsetDateTime::now_utc() => {
                "the cached certificate is due for renewal: placing an order now".to_owned()
            }
            Ok(info) => format!(
                "serving the cached certificate; next order at {}",
                rfc3339(info.renew_at())
            ),
            Err(plan) => plan.clone(),
        };
        tracing::info!(
            domains = ?s.domains, directory = %s.directory_url, cache_dir = %s.cache.dir.display(),
            "ACME started: {plan}"
        );
        if s.staging {
            tracing::warn!(
                "ACME directory is Let's Encrypt staging: clients do not trust its certificates; \
                 set tls.acme.directory = \"letsencrypt\" once issuance works"
            );
        }
        if s.listen_port != 443 {
            tracing::info!(
                listen_port = s.listen_port,
                "TLS-ALPN-01 validation connects to port 443 of each domain: it must be forwarded to this listener"
            );
        }
    }

    fn on_event(&self, event: Event, run: &mut RunState) {
        let s = &self.shared;
        match event {
            Ok(EventOk::DeployedCachedCert) => match s.cache.last_cert_info(CertOrigin::Cache) {
                Ok(info) => {
                    tracing::info!(
                        serial = %info.serial, not_after = %rfc3339(info.not_after),
                        renew_at = %rfc3339(info.renew_at()),
                        "ACME serving the certificate from the cache"
                    );
                    run.renewal_due = Some(info.renew_at());
                    s.status.send_modify(|st| st.certificate = Some(info));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ACME serving the cached certificate, which agentgate cannot describe")
                }
            },
            Ok(EventOk::DeployedNewCert) => {
                run.pending_issue = Some(s.status.borrow().certificate.is_some());
                s.status.send_modify(|st| {
                    st.issued += 1;
                    st.consecutive_failures = 0;
                    st.last_error = None;
                });
            }
            Ok(EventOk::CertCacheStore) => self.log_issued(run, None),
            Err(EventError::CertCacheStore(e)) => self.log_issued(run, Some(e)),
            Ok(EventOk::AccountCacheStore) => tracing::info!(
                cache_dir = %s.cache.dir.display(),
                "ACME account key generated and stored; the account is registered with the CA by the order"
            ),
            Err(EventError::AccountCacheStore(e)) => tracing::error!(
                cache_dir = %s.cache.dir.display(), error = %e,
                "ACME account key could not be stored; a restart will register a new account"
            ),
            Err(EventError::Order(e)) => {
                let message = describe_order_error(&e);
                let mut failures = 0;
                s.status.send_modify(|st| {
                    st.failed_orders += 1;
                    st.consecutive_failures += 1;
                    st.last_error = Some(message.clone());
                    failures = st.consecutive_failures;
                });
                let retry_in_secs = 1u64 << (failures.saturating_sub(1)).min(MAX_BACKOFF_EXPONENT);
                match s.status.borrow().certificate.as_ref() {
                    Some(current) => tracing::warn!(
                        error = %message, retry_in_secs, failures,
                        serving_until = %rfc3339(current.not_after),
                        "ACME order failed; the current certificate stays in service"
                    ),
                    None => tracing::error!(
                        error = %message, retry_in_secs, failures,
                        "ACME order failed; no certificate yet, so TLS handshakes are refused until an order succeeds"
                    ),
                }
            }
            Err(EventError::CertCacheLoad(e)) => tracing::error!(
                cache_dir = %s.cache.dir.display(), error = %e,
                "ACME cache: reading the certificate failed; ordering a new one"
            ),
            Err(EventError::AccountCacheLoad(e)) => tracing::error!(
                cache_dir = %s.cache.dir.display(), error = %e,
                "ACME cache: reading the account key failed; a new account will be registered"
            ),
            Err(EventError::CachedCertParse(e)) => tracing::warn!(
                cache_dir = %s.cache.dir.display(), error = %e,
                "ACME cache: the cached certificate is unusable; ordering a new one"
            ),
            Err(EventError::NewCertParse(e)) => {
                let message = format!("the CA returned a certificate that cannot be used: {e}");
                tracing::error!(error = %message, "ACME order failed");
                s.status.send_modify(|st| {
                    st.failed_orders += 1;
                    st.last_error = Some(message.clone());
                });
            }
        }
    }

    /// Logs a new certificate once the library has handed it to the cache (the event that
    /// announces it carries no certificate; the cache write that follows does).
    fn log_issued(&self, run: &mut RunState, store_error: Option<io::Error>) {
        let s = &self.shared;
        let Some(renewal) = run.pending_issue.take() else {
            if let Some(e) = store_error {
                tracing::error!(error = %e, "ACME cache: storing a certificate failed");
            }
            return;
        };
        let what = if renewal {
            "ACME certificate renewed"
        } else {
            "ACME certificate issued"
        };
        match s.cache.last_cert_info(CertOrigin::Issued) {
            Ok(info) => {
                run.renewal_due = Some(info.renew_at());
                match &store_error {
                    None => tracing::info!(
                        serial = %info.serial, names = ?info.names,
                        not_after = %rfc3339(info.not_after), renew_at = %rfc3339(info.renew_at()),
                        "{what} and stored in the cache"
                    ),
                    Some(e) => tracing::error!(
                        serial = %info.serial, not_after = %rfc3339(info.not_after), error = %e,
                        "{what} but not stored in the cache: a restart will order again"
                    ),
                }
                s.status.send_modify(|st| st.certificate = Some(info));
            }
            Err(e) => tracing::warn!(error = %e, "{what}, but agentgate cannot describe it"),
        }
    }
}

/// Bookkeeping of one `run`.
#[derive(Default)]
struct RunState {
    /// A new certificate was deployed and is about to be stored: `Some(is_renewal)`.
    pending_issue: Option<bool>,
    /// When the library will order the next renewal, for the log line that says so.
    renewal_due: Option<OffsetDateTime>,
}

/// Sleeps until `due` (in steps of at most a day), or forever without one.
async fn sleep_towards(due: Option<OffsetDateTime>) {
    let Some(due) = due else {
        return std::future::pending().await;
    };
    let left = (due - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    let left = Duration::try_from(left).unwrap_or(MAX_TIMER).min(MAX_TIMER);
    tokio::time::sleep(left).await;
}
