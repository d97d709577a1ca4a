//! Directory sources: a bundle repository on a local or mounted file system.

use super::{Source, SourceError};
use crate::ingest::Item;
use crate::BoxFuture;
use cairn_bundle::repo::RepoDir;
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
        match RepoDir::new(&self.dir).read(rel_path, limit) {
            Ok(v) => Ok(v),
            Err(cairn_bundle::Error::TooLarge { .. }) => Err(SourceError::TooLarge {
                source_name: self.name.clone(),
                path: rel_path.to_owned(),
                limit,
            }),
            Err(cairn_bundle::Error::Repository(reason)) => Err(SourceError::Invalid {
                source_name: self.name.clone(),
                path: rel_path.to_owned(),
                reason,
            }),
            Err(e) => Err(SourceError::Unavailable {
                source_name: self.name.clone(),
                reason: e.to_string(),
            }),
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
}
