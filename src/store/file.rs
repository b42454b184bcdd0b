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

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every `<agent_id>.pem` in the directory. Files that are not certificates for
    /// the agent their name says are returned as skipped, not as errors: one bad file must
    /// not keep every other agent out.
    pub fn load_all(&self) -> io::Result<(Vec<StoredCert>, Vec<Skipped>)> {
        let mut loaded = Vec::new();
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
            match self.load_one(&path, stem) {
                Ok(cert) => loaded.push(cert),
                Err(reason) => skipped.push(Skipped { path, reason }),
            }
        }
        loaded.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        Ok((loaded, skipped))
    }

    fn load_one(&self, path: &Path, stem: &str) -> Result<StoredCert, String> {
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
