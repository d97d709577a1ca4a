//! Directory sources: a bundle repository on a local or mounted file system.

use super::{Source, SourceError};
use crate::fsread::{read_regular_file_capped, ReadFileErrorKind};
use crate::ingest::Item;
use crate::BoxFuture;
use std::path::PathBuf;

/// A bundle repository in a local directory (e.g. a USB stick mounted at
/// `/mnt/usb/cairn`). A missing directory is *unavailable* (not mounted),
/// not empty. Files larger than the limit are refused before reading.
#[derive(Debug, Clone)]
pub struct DirSource {
    name: String,
    dir: PathBuf,
}

impl DirSource {
    /// A source reading the repository at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            name: dir.display().to_string(),
            dir,
        }
    }

    fn read(&self, rel_path: &str, limit: u64) -> Result<Option<Vec<u8>>, SourceError> {
        if !self.dir.is_dir() {
            return Err(SourceError::Unavailable {
                source_name: self.name.clone(),
                reason: "directory does not exist (not mounted?)".into(),
            });
        }
        // A file on the stick is read only as a regular file (no link, no
        // FIFO), capped before allocation: crate::fsread.
        match read_regular_file_capped(&self.dir.join(rel_path), limit) {
            Ok(v) => Ok(Some(v)),
            Err(e) => match e.kind {
                ReadFileErrorKind::NotFound => Ok(None),
                ReadFileErrorKind::TooLarge { .. } => Err(SourceError::TooLarge {
                    source_name: self.name.clone(),
                    path: rel_path.to_owned(),
                    limit,
                }),
                ReadFileErrorKind::Symlink | ReadFileErrorKind::NotRegular(_) => {
                    Err(SourceError::Invalid {
                        source_name: self.name.clone(),
                        path: rel_path.to_owned(),
                        reason: e.to_string(),
                    })
                }
                ReadFileErrorKind::Io(_) => Err(SourceError::Unavailable {
                    source_name: self.name.clone(),
                    reason: e.to_string(),
                }),
            },
        }
    }
}

impl Source for DirSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn get<'a>(
        &'a self,
        item: &'a Item,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        let this = self.clone();
        let rel = item.path();
        Box::pin(async move {
            let Some(rel) = rel else { return Ok(None) };
            match tokio::task::spawn_blocking(move || this.read(&rel, limit)).await {
                Ok(r) => r,
                Err(e) => Err(SourceError::Unavailable {
                    source_name: self.name.clone(),
                    reason: format!("read task failed: {e}"),
                }),
            }
        })
    }

    fn fetch_to_file<'a>(
        &'a self,
        address: &'a str,
        limit: u64,
        dest: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<Option<u64>, SourceError>> {
        let this = self.clone();
        let (address, dest) = (address.to_owned(), dest.to_path_buf());
        Box::pin(async move {
            let Some(rel) = Item::Object(address.clone()).path() else {
                return Ok(None);
            };
            let name = this.name.clone();
            let task = tokio::task::spawn_blocking(move || {
                if !this.dir.is_dir() {
                    return Err(SourceError::Unavailable {
                        source_name: this.name.clone(),
                        reason: "directory does not exist (not mounted?)".into(),
                    });
                }
                let p = this.dir.join(&rel);
                // Only a regular file (no link, no FIFO), as for objects.
                match std::fs::symlink_metadata(&p) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(SourceError::Unavailable {
                            source_name: this.name.clone(),
                            reason: format!("{}: {e}", p.display()),
                        })
                    }
                    Ok(m) if !m.file_type().is_file() => {
                        return Err(SourceError::Invalid {
                            source_name: this.name.clone(),
                            path: rel,
                            reason: "not a regular file".into(),
                        })
                    }
                    Ok(_) => {}
                }
                let mut f = std::fs::File::open(&p).map_err(|e| SourceError::Unavailable {
                    source_name: this.name.clone(),
                    reason: format!("{}: {e}", p.display()),
                })?;
                cairn_oci::blobfile::copy_verified(&mut f, &address, limit, &dest, &rel)
                    .map(Some)
                    .map_err(|e| super::blob_error(&this.name, &rel, e))
            });
            match task.await {
                Ok(r) => r,
                Err(e) => Err(SourceError::Unavailable {
                    source_name: name,
                    reason: format!("read task failed: {e}"),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_regular_files_and_refuses_links_fifos_and_oversized_files() {
        let d = tempfile::tempdir().unwrap();
        let s = DirSource::new(d.path());
        std::fs::create_dir_all(d.path().join("channels")).unwrap();
        std::fs::write(d.path().join("channels/stable"), b"head").unwrap();
        assert_eq!(
            s.read("channels/stable", 16).unwrap(),
            Some(b"head".to_vec())
        );
        assert_eq!(s.read("channels/missing", 16).unwrap(), None);
        assert!(matches!(
            s.read("channels/stable", 3),
            Err(SourceError::TooLarge { limit: 3, .. })
        ));
        std::os::unix::fs::symlink("/dev/zero", d.path().join("channels/link")).unwrap();
        assert!(matches!(
            s.read("channels/link", 16),
            Err(SourceError::Invalid { .. })
        ));
        let fifo = d.path().join("channels/fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            s.read("channels/fifo", 16),
            Err(SourceError::Invalid { .. })
        ));
        let gone = DirSource::new(d.path().join("not-mounted"));
        assert!(matches!(
            gone.read("channels/stable", 16),
            Err(SourceError::Unavailable { .. })
        ));
    }
}
