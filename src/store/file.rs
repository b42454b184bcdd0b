//! File backend: `<dir>/<agent_id>.pem`, the layout of the system agentgate replaces, so an
//! existing `CERT_STORAGE_DIR` is adopted as is.
//!
//! Writes are atomic: a temporary file in the same directory, fsync, rename over the
//! target, fsync of the directory (the rename is only durable once the directory is).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::cert::{self, StoredCert};
use crate::fsutil::{TMP_PREFIX, write_atomic};
use crate::identity::AgentId;

/// Fewest files per loading thread: below this, starting a thread costs more than it saves.
const LOAD_CHUNK_MIN: usize = 256;

#[derive(Debug)]
pub struct FileBackend {
    dir: PathBuf,
}

/// A file that was not loaded at start-up, and why.
#[derive(Debug)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

impl FileBackend {
    /// Opens (and creates, if missing) the store directory.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Reads every `<agent_id>.pem` in the directory. Files that are not certificates for
    /// the agent their name says are returned as skipped, not as errors: one bad file must
    /// not keep every other agent out.
    ///
    /// The files are parsed on every core: the gateway serves nothing until its store is
    /// loaded. (The costliest part, the self-signature check, is not done here at all; see
    /// [`StoredCert::self_signed`] and BENCHMARKS.md, "Microbenchmarks".)
    pub fn load_all(&self) -> io::Result<(Vec<StoredCert>, Vec<Skipped>)> {
        let mut candidates = Vec::new();
        let mut skipped = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                skipped.push(Skipped {
                    path,
                    reason: "file name is not UTF-8".into(),
                });
                continue;
            };
            if name.starts_with(TMP_PREFIX) {
                // Left by a write that was interrupted before its rename; never visible.
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".pem") else {
                continue;
            };
            let stem = stem.to_owned();
            candidates.push((path, stem));
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(candidates.len().div_ceil(LOAD_CHUNK_MIN));
        let results = self.load_each(&candidates, threads);
        let mut loaded = Vec::with_capacity(candidates.len());
        for result in results {
            match result {
                Ok(cert) => loaded.push(cert),
                Err(skip) => skipped.push(skip),
            }
        }
        loaded.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        Ok((loaded, skipped))
    }

    /// Loads `(path, stem)` pairs on `threads` threads (at least one), in their order.
    fn load_each(
        &self,
        candidates: &[(PathBuf, String)],
        threads: usize,
    ) -> Vec<Result<StoredCert, Skipped>> {
        let chunk = candidates.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            let workers: Vec<_> = candidates
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(path, stem)| {
                                self.load_one(path, stem).map_err(|reason| Skipped {
                                    path: path.clone(),
                                    reason,
                                })
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                // A worker only panics if parsing does, which the same code would do
                // on this thread; re-raise it here rather than lose the files.
                .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// The directory this backend stores in.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `path` as the certificate of agent `stem`, with the upload rules.
    pub(crate) fn load_one(&self, path: &Path, stem: &str) -> Result<StoredCert, String> {
        let agent_id = AgentId::parse(stem).map_err(|e| format!("file name: {e}"))?;
        let meta = fs::metadata(path).map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
        if text.contains("PRIVATE KEY") {
            return Err("contains a private key; refusing to load it".into());
        }
        let der = cert::single_certificate_der(&text).map_err(|e| e.to_string())?;
        cert::parse_for(agent_id, der).map_err(|e| e.to_string())
    }

    /// Atomically writes `cert` as `<dir>/<agent_id>.pem` (mode 0644: certificates are
    /// public, as in the system agentgate replaces).
    pub fn write(&self, cert: &StoredCert) -> io::Result<()> {
        write_atomic(
            &self.path_of(&cert.agent_id),
            cert.to_pem().as_bytes(),
            0o644,
        )
    }

    /// Removes `<dir>/<agent_id>.pem`; a missing file is not an error.
    pub fn remove(&self, agent_id: &AgentId) -> io::Result<()> {
        match fs::remove_file(self.path_of(agent_id)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn path_of(&self, agent_id: &AgentId) -> PathBuf {
        // AgentId excludes '/', NUL and a leading '.', so this never leaves `dir`.
        self.dir.join(format!("{agent_id}.pem"))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loading_on_several_threads_finds_what_one_thread_finds() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..7 {
            let id = AgentId::parse(&format!("agent-{i}")).unwrap();
            let cert = crate::certgen::generate(&id, 30).unwrap();
            fs::write(dir.path().join(format!("{id}.pem")), cert.cert_pem).unwrap();
        }
        let other = crate::certgen::generate(&AgentId::parse("x").unwrap(), 30).unwrap();
        fs::write(dir.path().join("wrong-cn.pem"), &other.cert_pem).unwrap();
        fs::write(dir.path().join("garbage.pem"), "not a certificate").unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        let candidates: Vec<(PathBuf, String)> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
                (path, stem)
            })
            .collect();
        let summary = |results: Vec<Result<StoredCert, Skipped>>| {
            results
                .into_iter()
                .map(|r| match r {
                    Ok(c) => format!("ok {}", c.agent_id),
                    Err(s) => format!("skipped {}", s.path.display()),
                })
                .collect::<Vec<_>>()
        };
        let one = summary(backend.load_each(&candidates, 1));
        assert_eq!(one.iter().filter(|s| s.starts_with("ok")).count(), 7);
        assert_eq!(one.len(), 9);
        for threads in [2, 3, 4, 9, 20] {
            assert_eq!(summary(backend.load_each(&candidates, threads)), one);
        }
    }
}
