//! The embedded database of a node without `[cluster]`: `<data_dir>/agentgate.db`, SQLite
//! through rusqlite (SQLite compiled in, `bundled`). It holds the state that is not a
//! certificate: install tokens and agent metadata, API tokens, their revocations, the
//! audit records, and the routes registered at runtime. Certificates stay files in the
//! store directory, which operators edit by hand. With `[cluster]` the same state lives in
//! Redis (see [`super::redis`]) and this database is not opened.
//!
//! SQLite is blocking, so one thread owns the connection and runs the closures that
//! [`Db::call`] sends it, one at a time in order of arrival; the async side awaits the
//! answer and never blocks the runtime. One writer at a time is SQLite's own rule anyway,
//! and a closure is a transaction boundary the caller chooses. WAL journal with
//! `synchronous = FULL`: a write acknowledged to a client survives a power loss.
//!
//! The schema is versioned by `PRAGMA user_version` and migrated forward at open, each
//! step in one transaction; a database written by a newer agentgate is refused (with the
//! versions in the message) rather than guessed at.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

/// The schema, one entry per version: entry `i` moves a database from version `i` to
/// `i + 1`. Append only once released; never edit a released step.
const MIGRATIONS: &[&str] = &[
    // 1: everything but certificates.
    r"
    CREATE TABLE install_tokens (
        token_sha256 TEXT PRIMARY KEY,
        agent_id     TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL,
        used_at      INTEGER
    ) STRICT;
    CREATE TABLE agent_metadata (
        agent_id TEXT PRIMARY KEY,
        metadata TEXT NOT NULL
    ) STRICT;
    CREATE TABLE api_tokens (
        jti         TEXT PRIMARY KEY,
        project     TEXT NOT NULL,
        service     TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        created_by  TEXT NOT NULL
    ) STRICT;
    CREATE INDEX api_tokens_by_created ON api_tokens (created_at, jti);
    CREATE INDEX api_tokens_by_expiry ON api_tokens (expires_at);
    CREATE TABLE token_revocations (
        jti        TEXT PRIMARY KEY,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER NOT NULL,
        revoked_by TEXT NOT NULL,
        reason     TEXT NOT NULL
    ) STRICT;
    CREATE INDEX token_revocations_by_expiry ON token_revocations (expires_at);
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      INTEGER NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        jti     TEXT NOT NULL,
        project TEXT,
        service TEXT,
        detail  TEXT NOT NULL
    ) STRICT;
    CREATE TABLE routes (
        name       TEXT PRIMARY KEY,
        prefix     TEXT NOT NULL UNIQUE,
        spec       TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;
    ",
];

/// Work sent to the database thread.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Handle on the database thread; cheap to clone. The thread ends when the last handle
/// is dropped (after the jobs already sent).
#[derive(Clone)]
pub(crate) struct Db {
    jobs: mpsc::Sender<Job>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this agentgate knows ({known}); \
         it was written by a newer version: run that one, or restore a backup"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database thread is gone (it panicked); nothing more can be stored.
    #[error("database {path}: the database thread has stopped")]
    Stopped { path: PathBuf },
}

impl Db {
    /// Opens (creating it if needed, readable by the owner only) and migrates the database
    /// at `path`, then starts its thread.
    pub(crate) fn open(path: &Path) -> Result<Self, DbError> {
        let sqlite = |source| DbError::Sqlite {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| DbError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        let mut conn = Connection::open(path).map_err(sqlite)?;
        restrict_permissions(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sqlite)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sqlite)?;
        migrate(&mut conn, path)?;

        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("agentgate-db".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|source| DbError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            jobs,
            path: Arc::new(path.to_owned()),
        })
    }

    /// Runs `f` on the database thread and returns its result. `f` should be short (it
    /// holds up every other caller) and does its own transaction when it writes more
    /// than one row (`conn.transaction()`), so that a failure leaves nothing half-written.
    pub(crate) async fn call<R, F>(&self, f: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // The caller may have gone (request cancelled); the work is done either way.
            let _ = tx.send(f(conn));
        });
        let stopped = || DbError::Stopped {
            path: self.path.to_path_buf(),
        };
        self.jobs.send(job).map_err(|_| stopped())?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(|source| DbError::Sqlite {
                path: self.path.to_path_buf(),
                source,
            })
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), DbError> {
    let sqlite = |source| DbError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(sqlite)?;
    if found > known {
        return Err(DbError::TooNew {
            path: path.to_owned(),
            found,
            known,
        });
    }
    for (version, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)
            .map_err(sqlite)?;
        tx.execute_batch(step).map_err(sqlite)?;
        tx.pragma_update(None, "user_version", version as i64 + 1)
            .map_err(sqlite)?;
        tx.commit().map_err(sqlite)?;
        tracing::info!(path = %path.display(), version = version + 1, "database schema migrated");
    }
    Ok(())
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) -> Result<(), DbError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        DbError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) -> Result<(), DbError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creates_migrates_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("agentgate.db");
        let db = Db::open(&path).unwrap();
        db.call(|c| {
            c.execute(
                "INSERT INTO routes (name, prefix, spec, created_at, updated_at) VALUES ('a', '/a', '{}', 1, 1)",
                [],
            )
        })
        .await
        .unwrap();
        drop(db);
        let db = Db::open(&path).unwrap();
        let (n, version): (i64, i64) = db
            .call(|c| {
                let n = c.query_row("SELECT count(*) FROM routes", [], |r| r.get(0))?;
                let v = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
                Ok((n, v))
            })
            .await
            .unwrap();
        assert_eq!((n, version), (1, MIGRATIONS.len() as i64));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentgate.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Db::open(&path).unwrap_err();
        assert!(matches!(err, DbError::TooNew { found: 99, .. }), "{err}");
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[tokio::test]
    async fn an_error_in_a_call_is_returned_and_the_thread_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("agentgate.db")).unwrap();
        let err = db
            .call(|c| c.execute("INSERT INTO no_such_table VALUES (1)", []))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no_such_table"), "{err}");
        let n: i64 = db
            .call(|c| c.query_row("SELECT count(*) FROM audit", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(n, 0);
    }
}
