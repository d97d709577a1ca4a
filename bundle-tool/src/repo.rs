//! The bundle repository: a plain directory that any static file server,
//! object store or USB stick can carry unchanged.
//!
//! ```text
//! roots/<version>                    signed root envelopes, 1, 2, ...
//! channels/<channel>                 the channel's latest release envelope
//! objects/sha256/<2 hex>/<64 hex>    content-addressed objects (bundle
//!                                    manifests and Kubernetes objects)
//! ```
//!
//! The path functions here are shared by directory and HTTP sources.
//! Writes are atomic (temporary file + rename) and objects are written only
//! if absent, so a crash never leaves a partial file under a final name.

use crate::bundle::verify_object;
use crate::{Error, Result};
use cairn_keys::fs::write_atomic;
use std::path::{Path, PathBuf};

pub use cairn_core::layout::{channel_path, object_path_str, root_path};

/// A bundle repository on the local file system.
#[derive(Clone, Debug)]
pub struct RepoDir {
    root: PathBuf,
}

impl RepoDir {
    /// Opens (without creating) the repository at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Reads `rel` if it exists, refusing files over `limit` bytes before
    /// reading them.
    pub fn read(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let p = self.root.join(rel);
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io(&p)(e)),
        };
        if !meta.is_file() {
            return Err(Error::Repository(format!(
                "{}: not a regular file",
                p.display()
            )));
        }
        if meta.len() > limit {
            return Err(Error::TooLarge {
                what: p.display().to_string(),
                limit,
                actual: meta.len(),
            });
        }
        std::fs::read(&p).map(Some).map_err(Self::io(&p))
    }

    /// Writes `rel` atomically, creating parent directories.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        let p = self.root.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(Self::io(parent))?;
        }
        write_atomic(&p, bytes, None).map_err(Self::io(&p))
    }

    /// Whether an object is present (its content is not checked).
    pub fn has_object(&self, address: &str) -> bool {
        object_path_str(address).is_some_and(|rel| self.root.join(rel).is_file())
    }

    /// Reads an object and checks it against its address.
    pub fn get_object(&self, address: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let rel = object_path_str(address)
            .ok_or_else(|| Error::Repository(format!("malformed object address `{address}`")))?;
        match self.read(&rel, limit)? {
            Some(bytes) => {
                verify_object(address, &bytes)?;
                Ok(Some(bytes))
            }
            None => Ok(None),
        }
    }

    /// Stores an object after checking it against its address; a present
    /// object is left untouched. Returns whether it was written.
    pub fn put_object(&self, address: &str, bytes: &[u8]) -> Result<bool> {
        verify_object(address, bytes)?;
        if self.has_object(address) {
            return Ok(false);
        }
        let rel = object_path_str(address)
            .ok_or_else(|| Error::Repository(format!("malformed object address `{address}`")))?;
        self.write(&rel, bytes)?;
        Ok(true)
    }

    /// Starts a batch of object writes: faster than [`RepoDir::put_object`]
    /// for many objects (one file-system sync instead of one fsync per
    /// file) with the same guarantee — no partial file ever appears under
    /// an object's final name.
    pub fn object_batch(&self) -> ObjectBatch<'_> {
        ObjectBatch {
            repo: self,
            pending: Vec::new(),
            names: std::collections::BTreeSet::new(),
        }
    }

    /// The channel's release envelope, if any.
    pub fn channel(&self, channel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        self.read(&channel_path(channel), limit)
    }

    /// Names of all channels present.
    pub fn channels(&self) -> Result<Vec<String>> {
        self.list("channels")
    }

    /// All root envelopes, sorted by version.
    pub fn roots(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for name in self.list("roots")? {
            let Ok(v) = name.parse::<u64>() else { continue };
            if let Some(b) = self.read(&root_path(v), cairn_keys::root::MAX_ROOT_BYTES as u64)? {
                out.push((v, b));
            }
        }
        out.sort_by_key(|(v, _)| *v);
        Ok(out)
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let p = self.root.join(dir);
        let rd = match std::fs::read_dir(&p) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io(&p)(e)),
        };
        let mut names = Vec::new();
        for e in rd {
            let e = e.map_err(Self::io(&p))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

/// Objects being written in one batch (see [`RepoDir::object_batch`]).
///
/// [`ObjectBatch::add`] writes each object to a temporary file next to its
/// final name without syncing; [`ObjectBatch::commit`] makes all of them
/// durable at once, renames them into place and syncs again. Dropping a
/// batch without committing removes its temporary files.
pub struct ObjectBatch<'a> {
    repo: &'a RepoDir,
    pending: Vec<(PathBuf, PathBuf)>,
    names: std::collections::BTreeSet<String>,
}

impl ObjectBatch<'_> {
    /// Checks `bytes` against `address` and stages it unless the
    /// repository or this batch already has it. Returns whether it was
    /// staged.
    pub fn add(&mut self, address: &str, bytes: &[u8]) -> Result<bool> {
        verify_object(address, bytes)?;
        if self.names.contains(address) || self.repo.has_object(address) {
            return Ok(false);
        }
        let rel = object_path_str(address)
            .ok_or_else(|| Error::Repository(format!("malformed object address `{address}`")))?;
        let dest = self.repo.root.join(rel);
        let dir = dest.parent().unwrap_or(&self.repo.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(RepoDir::io(&dir))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            &address[7..],
            std::process::id(),
            self.pending.len()
        ));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(bytes)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(RepoDir::io(&tmp)(e));
        }
        self.pending.push((tmp, dest));
        self.names.insert(address.to_owned());
        Ok(true)
    }

    /// Stages a file already verified against `address` (an image blob
    /// streamed into a temporary file on the repository's file system) to
    /// be renamed into place at commit, unless the repository or this
    /// batch already has it. Returns whether it was staged. The caller
    /// has checked the content; the file is moved, not copied.
    pub fn add_verified_file(&mut self, address: &str, file: PathBuf) -> Result<bool> {
        if self.names.contains(address) || self.repo.has_object(address) {
            return Ok(false);
        }
        let rel = object_path_str(address)
            .ok_or_else(|| Error::Repository(format!("malformed object address `{address}`")))?;
        let dest = self.repo.root.join(rel);
        let dir = dest.parent().unwrap_or(&self.repo.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(RepoDir::io(&dir))?;
        self.pending.push((file, dest));
        self.names.insert(address.to_owned());
        Ok(true)
    }

    /// Makes every staged object durable, renames them into place and
    /// syncs the directories. Returns how many objects were written.
    pub fn commit(mut self) -> Result<usize> {
        let pending = std::mem::take(&mut self.pending);
        let result = (|| {
            sync_files(&self.repo.root, pending.iter().map(|(t, _)| t.as_path()))?;
            for (tmp, dest) in &pending {
                std::fs::rename(tmp, dest).map_err(RepoDir::io(dest))?;
            }
            let dirs: std::collections::BTreeSet<&Path> =
                pending.iter().filter_map(|(_, d)| d.parent()).collect();
            sync_files(&self.repo.root, dirs.into_iter())?;
            Ok(pending.len())
        })();
        if result.is_err() {
            for (tmp, _) in &pending {
                let _ = std::fs::remove_file(tmp);
            }
        }
        result
    }
}

impl Drop for ObjectBatch<'_> {
    fn drop(&mut self) {
        for (tmp, _) in &self.pending {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Makes `paths` (files or directories under `root`) durable: one
/// `syncfs` of `root`'s file system on Linux, an fsync per path elsewhere.
fn sync_files<'p>(root: &Path, paths: impl Iterator<Item = &'p Path>) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        let _ = paths;
        use std::os::fd::AsRawFd;
        let dir = std::fs::File::open(root).map_err(RepoDir::io(root))?;
        // SAFETY: syncfs on a valid, open file descriptor.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(RepoDir::io(root)(std::io::Error::last_os_error()));
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = root;
        for p in paths {
            std::fs::File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(RepoDir::io(p))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_refuse_traversal() {
        assert_eq!(object_path_str("sha256:../../etc/passwd"), None);
        let a = cairn_keys::sha256_address(b"x");
        assert!(object_path_str(&a).unwrap().starts_with("objects/sha256/"));
    }

    #[test]
    fn put_get_verify() {
        let d = tempfile::tempdir().unwrap();
        let r = RepoDir::new(d.path());
        let a = cairn_keys::sha256_address(b"hello");
        assert!(r.put_object(&a, b"hello").unwrap());
        assert!(!r.put_object(&a, b"hello").unwrap());
        assert_eq!(r.get_object(&a, 100).unwrap().unwrap(), b"hello");
        assert!(matches!(
            r.put_object(&a, b"hellp"),
            Err(Error::ObjectMismatch { .. })
        ));
        // A flipped byte on disk is caught on read.
        std::fs::write(d.path().join(object_path_str(&a).unwrap()), b"hellp").unwrap();
        assert!(matches!(
            r.get_object(&a, 100),
            Err(Error::ObjectMismatch { .. })
        ));
        assert!(matches!(r.get_object(&a, 2), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn batches_write_on_commit_and_clean_up_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let r = RepoDir::new(d.path());
        let (a, b) = (
            cairn_keys::sha256_address(b"a"),
            cairn_keys::sha256_address(b"b"),
        );
        let mut batch = r.object_batch();
        assert!(batch.add(&a, b"a").unwrap());
        assert!(!batch.add(&a, b"a").unwrap());
        assert!(matches!(
            batch.add(&b, b"x"),
            Err(Error::ObjectMismatch { .. })
        ));
        assert!(
            !r.has_object(&a),
            "nothing under the final name before commit"
        );
        assert_eq!(batch.commit().unwrap(), 1);
        assert_eq!(r.get_object(&a, 10).unwrap().unwrap(), b"a");
        let mut batch = r.object_batch();
        assert!(batch.add(&b, b"b").unwrap());
        drop(batch);
        assert!(!r.has_object(&b));
        let leftovers: Vec<_> = std::fs::read_dir(
            d.path()
                .join(object_path_str(&b).unwrap())
                .parent()
                .unwrap(),
        )
        .unwrap()
        .collect();
        assert!(leftovers.is_empty(), "temporary files removed");
    }
}
