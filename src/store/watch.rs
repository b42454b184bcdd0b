//! Hand edits to the file store's directory (issue 11, point 5): operators of the system
//! agentgate replaces revoke an agent with `rm certs/<id>.pem` and add one by copying a
//! file in, so the directory is watched (inotify through `notify`) and rescanned
//! periodically as a fallback for filesystems that send no events (NFS, some overlays).
//!
//! A rescan only stats the files; it reads a file only when its size, mtime, ctime or
//! inode changed since the last look. What it finds reaches the index like a change made
//! on another node: the gateway's change hook (`server::close_revoked_sessions`) closes
//! the sessions of a removed or replaced certificate. The gateway's own temporary files
//! (`fsutil::TMP_PREFIX`) are never read, nor removed here: one may be an upload in
//! progress.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher;
use tokio_util::sync::CancellationToken;

use super::CertStore;
use crate::fsutil::TMP_PREFIX;
use crate::identity::AgentId;

/// How long after an event the rescan starts, so that the events of one `cp` (truncate,
/// writes, close) lead to one read of the finished file.
pub(crate) const EVENT_SETTLE: Duration = Duration::from_millis(50);

/// Rescan period while inotify works: a safety net only (a missed event, a queue
/// overflow), so it can be slow.
pub(crate) const RESCAN_WITH_EVENTS: Duration = Duration::from_secs(10);

/// Rescan period when no watch could be set up: the only way edits are seen, so edits take
/// effect within this (the issue asks for 1 s).
pub(crate) const RESCAN_WITHOUT_EVENTS: Duration = Duration::from_millis(500);

/// What a file looked like when it was last read; a change of any field means "read it
/// again".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    len: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            len: meta.len(),
            ino: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The `<agent_id>.pem` files of the directory (by file stem) and their stamps; the
/// gateway's temporary files and other names are left out.
pub(crate) fn list(dir: &Path) -> std::io::Result<HashMap<String, (PathBuf, Stamp)>> {
    let mut files = HashMap::new();
    for entry in fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        let Some(stem) = name.strip_suffix(".pem") else {
            continue;
        };
        // `metadata` follows a symlink, as the reader does; a file gone since the listing
        // is simply not there.
        let path = entry.path();
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        files.insert(stem.to_owned(), (path, Stamp::of(&meta)));
    }
    Ok(files)
}

/// An inotify watch of `dir` that sends a wake-up to `tx` on every event that may mean a
/// changed file (a full channel already holds a wake-up, which is all an event means
/// here).
fn watcher(
    dir: &Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if calls_for_rescan(&event) {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Whether an event of the watch may mean a changed file. Opening or reading a file does
/// not, and a rescan itself opens the directory and reads the files it finds changed: with
/// those events waking it, the watch rescanned its directory some 20 times a second
/// forever (every rescan's `opendir` woke the next one 50 ms later), each a `stat` of
/// every file under the store's write lock. A close after writing (`cp` done) does; so
/// does an error (a queue overflow may have lost anything).
fn calls_for_rescan(event: &notify::Result<notify::Event>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match event {
        Err(_) => true,
        Ok(event) => match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
    }
}

/// Watches `dir` for the store until `stop` is cancelled.
pub(crate) fn spawn(store: CertStore, dir: PathBuf, stop: CancellationToken) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watcher = watcher(&dir, tx);
    let (watcher, period) = match watcher {
        Ok(w) => (Some(w), RESCAN_WITH_EVENTS),
        Err(e) => {
            tracing::warn!(
                dir = %dir.display(), error = %e, rescan_ms = RESCAN_WITHOUT_EVENTS.as_millis() as u64,
                "cannot watch the certificate store directory; rescanning it periodically instead"
            );
            (None, RESCAN_WITHOUT_EVENTS)
        }
    };
    tokio::spawn(async move {
        // Dropped when the task ends, which removes the inotify watch.
        let _watcher = watcher;
        // The files of the agents loaded at start are taken as read; any other file (one
        // skipped at start, or one that came since) is read at the first rescan.
        let mut seen = match tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || list(&dir)
        })
        .await
        {
            Ok(Ok(files)) => files
                .into_iter()
                .filter(|(stem, _)| {
                    stem.parse::<AgentId>()
                        .is_ok_and(|id| store.by_agent(&id).is_some())
                })
                .map(|(k, (_, s))| (k, s))
                .collect(),
            _ => HashMap::new(),
        };
        // The first tick is at once: what changed between the load at start and the watch.
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
                Some(()) = rx.recv() => {
                    tokio::time::sleep(EVENT_SETTLE).await;
                    // Events that came while settling are covered by this rescan.
                    while rx.try_recv().is_ok() {}
                }
            }
            seen = store.rescan_dir(&dir, seen).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a rescan does to the directory (list it, stat and read its files) wakes no
    /// rescan; a file copied in does.
    #[tokio::test]
    async fn a_rescan_does_not_wake_the_next_but_a_new_file_does() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("agent-1.pem");
        fs::write(&pem, "not a certificate").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let _watch = watcher(dir.path(), tx).unwrap();
        for _ in 0..3 {
            let listed = list(dir.path()).unwrap();
            assert_eq!(listed.len(), 1);
            fs::read(&pem).unwrap();
        }
        let woke = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(woke.is_err(), "reading the directory woke a rescan");
        fs::write(dir.path().join("agent-2.pem"), "copied in").unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(woke, Ok(Some(())), "a new file woke no rescan");
    }
}
