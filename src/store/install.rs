//! The database side of enrollment on one node: install tokens (by SHA-256) in the
//! `install_tokens` table and the metadata agents register with in `agent_metadata` (see
//! [`super::db`]). With `[cluster]` the same records live in Redis ([`super::redis`]).
//!
//! A redemption is one transaction that checks the token, marks it used, records the
//! metadata and writes the agent's certificate file, committed only once the file is
//! durable: the database thread runs one transaction at a time, so of two concurrent
//! redemptions of one token the second finds it used.

use std::sync::Arc;

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::db::Db;
use super::{Backend, CertStore, PutOutcome, StoreError, StoredCert, outcome};

/// An install token's record, as the redemption check reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenRow {
    pub agent_id: String,
    pub expires_at: i64,
    pub used: bool,
}

/// A token record of an earlier version's `enrollment.json`, to import.
#[derive(Debug, Clone)]
pub(crate) struct ImportedToken {
    pub token_sha256: String,
    pub agent_id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

/// Records a token for `agent_id`; in the same transaction, forgets tokens spent (used
/// or expired) more than `keep_spent` seconds ago.
pub(crate) async fn issue(
    db: &Db,
    token_sha256: String,
    agent_id: String,
    created_at: i64,
    expires_at: i64,
    keep_spent: i64,
) -> Result<(), StoreError> {
    db.call(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM install_tokens WHERE max(expires_at, coalesce(used_at, 0)) + ?1 <= ?2",
            params![keep_spent, created_at],
        )?;
        tx.execute(
            "INSERT INTO install_tokens (token_sha256, agent_id, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![token_sha256, agent_id, created_at, expires_at],
        )?;
        tx.commit()
    })
    .await?;
    Ok(())
}

/// The record of the token with this hash, if any.
pub(crate) async fn token(db: &Db, token_sha256: String) -> Result<Option<TokenRow>, StoreError> {
    Ok(db.call(move |conn| read_token(conn, &token_sha256)).await?)
}

/// The metadata (JSON text) an agent registered with.
pub(crate) async fn metadata(db: &Db, agent_id: String) -> Result<Option<String>, StoreError> {
    Ok(db
        .call(move |conn| {
            conn.query_row(
                "SELECT metadata FROM agent_metadata WHERE agent_id = ?1",
                [agent_id],
                |r| r.get(0),
            )
            .optional()
        })
        .await?)
}

/// Forgets an agent's metadata (its certificate was deleted).
pub(crate) async fn forget(db: &Db, agent_id: String) -> Result<(), StoreError> {
    db.call(move |conn| conn.execute("DELETE FROM agent_metadata WHERE agent_id = ?1", [agent_id]))
        .await?;
    Ok(())
}

/// Imports tokens and metadata in one transaction; rows already there are kept (so an
/// import interrupted after its commit and run again changes nothing). Returns how many
/// tokens and metadata entries were new.
pub(crate) async fn import(
    db: &Db,
    tokens: Vec<ImportedToken>,
    metadata: Vec<(String, String)>,
) -> Result<(usize, usize), StoreError> {
    Ok(db
        .call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut new_tokens = 0;
            for t in &tokens {
                new_tokens += tx.execute(
                    "INSERT OR IGNORE INTO install_tokens (token_sha256, agent_id, created_at, expires_at, used_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![t.token_sha256, t.agent_id, t.created_at, t.expires_at, t.used_at],
                )?;
            }
            let mut new_metadata = 0;
            for (agent_id, text) in &metadata {
                new_metadata += tx.execute(
                    "INSERT OR IGNORE INTO agent_metadata (agent_id, metadata) VALUES (?1, ?2)",
                    params![agent_id, text],
                )?;
            }
            tx.commit()?;
            Ok((new_tokens, new_metadata))
        })
        .await?)
}

fn read_token(
    conn: &rusqlite::Connection,
    token_sha256: &str,
) -> rusqlite::Result<Option<TokenRow>> {
    conn.query_row(
        "SELECT agent_id, expires_at, used_at IS NOT NULL FROM install_tokens WHERE token_sha256 = ?1",
        [token_sha256],
        |r| {
            Ok(TokenRow {
                agent_id: r.get(0)?,
                expires_at: r.get(1)?,
                used: r.get(2)?,
            })
        },
    )
    .optional()
}

/// How a redemption's transaction ended.
enum Step<E> {
    Done,
    Refused(E),
    /// The certificate file could not be written; the transaction was rolled back.
    File(std::io::Error),
}

impl CertStore {
    /// Redeems the install token `token_sha256` for `cert`'s agent at `now`: in one
    /// transaction, `check` decides on the token's record (as it is inside the
    /// transaction), the token is marked used, `metadata` recorded and the certificate
    /// file written; then the index gets the certificate. `Ok(Err(_))` is `check`'s
    /// refusal: nothing was written.
    ///
    /// Should the commit itself fail after the file was renamed into place (the disk
    /// filling up between the two), the certificate is stored and the token still unused:
    /// it can then only be redeemed again for the same agent, which writes the same kind
    /// of file, so nothing is granted that the token did not grant.
    pub(crate) async fn redeem<E: Send + 'static>(
        &self,
        db: &Db,
        token_sha256: String,
        metadata: String,
        now: i64,
        cert: StoredCert,
        check: impl FnOnce(Option<&TokenRow>) -> Result<(), E> + Send + 'static,
    ) -> Result<Result<PutOutcome, E>, StoreError> {
        // Held across the transaction, as `put` holds it: file order and index order agree
        // with uploads and with the directory watcher.
        let _writer = self.shared.write_lock.lock().await;
        let cert = Arc::new(cert);
        let shared = self.shared.clone();
        let to_write = cert.clone();
        let step = db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let row = read_token(&tx, &token_sha256)?;
                if let Err(e) = check(row.as_ref()) {
                    return Ok(Step::Refused(e));
                }
                tx.execute(
                    "UPDATE install_tokens SET used_at = ?2 WHERE token_sha256 = ?1",
                    params![token_sha256, now],
                )?;
                tx.execute(
                    "INSERT INTO agent_metadata (agent_id, metadata) VALUES (?1, ?2)
                     ON CONFLICT (agent_id) DO UPDATE SET metadata = excluded.metadata",
                    params![to_write.agent_id.as_str(), metadata],
                )?;
                let written = match &shared.backend {
                    Backend::Files(files) => files.write(&to_write),
                    Backend::Redis(_) => Err(std::io::Error::other(
                        "install tokens in the database with a store on Redis",
                    )),
                };
                if let Err(e) = written {
                    // Dropping `tx` rolls the token and the metadata back.
                    return Ok(Step::File(e));
                }
                tx.commit()?;
                Ok(Step::Done)
            })
            .await?;
        match step {
            Step::Done => {
                let replaced = self.write().insert(cert.clone());
                Ok(Ok(outcome(cert, replaced)))
            }
            Step::Refused(e) => Ok(Err(e)),
            Step::File(e) => Err(StoreError::Io(e)),
        }
    }
}
