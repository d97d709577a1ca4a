//! The manifests-directory target: one file per object, e.g. in the k3s
//! auto-deploy folder (`/var/lib/rancher/k3s/server/manifests/cairn`).
//!
//! File names come from [`super::plan::file_names`]; content is the
//! object's canonical JSON, byte for byte (valid YAML, and its SHA-256 is
//! the object's address, so drift is detected by hashing). Ownership is the
//! inventory kept in the store: files the agent did not write are never
//! modified or deleted. The inventory of intended files is made durable
//! before any write, so a crash never leaves an unowned file behind. Writes
//! are atomic (temporary file, fsync, rename).

use super::plan::{self, Action, DesiredFile, Inventory, Observed, WriteReason};
use super::{ApplyReport, DesiredState, Target, TargetError};
use crate::store::Store;
use crate::BoxFuture;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Files larger than this are never read back (they cannot be objects).
const MAX_OBSERVED_BYTES: u64 = 64 << 20;

/// A directory of manifests.
#[derive(Clone, Debug)]
pub struct ManifestsDir {
    dir: PathBuf,
    store: Store,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredInventory {
    format: u32,
    dir: PathBuf,
    files: Inventory,
}

impl ManifestsDir {
    /// A target writing into `dir` (created if missing), keeping its
    /// inventory in `store`.
    pub fn new(dir: PathBuf, store: Store) -> Self {
        Self { dir, store }
    }

    fn key(&self) -> String {
        format!("manifests-dir:{}", self.dir.display())
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TargetError + '_ {
        move |source| TargetError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn load_inventory(&self) -> Result<Inventory, TargetError> {
        match self.store.inventory(&self.key())? {
            None => Ok(Inventory::new()),
            Some(bytes) => serde_json::from_slice::<StoredInventory>(&bytes)
                .map(|s| s.files)
                .map_err(|e| TargetError::Inventory {
                    target: self.describe(),
                    reason: e.to_string(),
                }),
        }
    }

    fn save_inventory(&self, files: &Inventory) -> Result<(), TargetError> {
        let doc = StoredInventory {
            format: 1,
            dir: self.dir.clone(),
            files: files.clone(),
        };
        let bytes = serde_json::to_vec(&doc).map_err(|e| TargetError::Inventory {
            target: self.describe(),
            reason: e.to_string(),
        })?;
        Ok(self.store.set_inventory(&self.key(), &bytes)?)
    }

    fn observe(&self, name: &str) -> Result<Observed, TargetError> {
        let p = self.dir.join(name);
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Observed::Missing),
            Err(e) => return Err(Self::io(&p)(e)),
        };
        if !meta.is_file() || meta.len() > MAX_OBSERVED_BYTES {
            return Ok(Observed::Other);
        }
        let bytes = std::fs::read(&p).map_err(Self::io(&p))?;
        Ok(Observed::Content(cairn_keys::sha256_address(&bytes)))
    }

    /// The blocking body of [`Target::apply`].
    pub fn apply_blocking(&self, desired: &DesiredState) -> Result<ApplyReport, TargetError> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let entries: Vec<_> = desired.objects.iter().map(|o| o.entry.clone()).collect();
        let names = plan::file_names(&entries);
        let mut bytes_by_name = BTreeMap::new();
        let mut want = Vec::with_capacity(names.len());
        for (name, obj) in names.iter().zip(&desired.objects) {
            want.push(DesiredFile {
                name: name.clone(),
                address: obj.entry.object.clone(),
            });
            bytes_by_name.insert(name.as_str(), obj.bytes.as_slice());
        }
        let inventory = self.load_inventory()?;
        let mut observed = BTreeMap::new();
        for name in want.iter().map(|d| &d.name).chain(inventory.keys()) {
            if !observed.contains_key(name) {
                observed.insert(name.clone(), self.observe(name)?);
            }
        }
        let p = plan::plan(&want, &inventory, &observed);
        let mut report = ApplyReport {
            unchanged: p.unchanged,
            ..ApplyReport::default()
        };
        if p.intent != inventory {
            self.save_inventory(&p.intent)?;
        }
        for action in &p.actions {
            match action {
                Action::Write { name, reason, .. } => {
                    let path = self.dir.join(name);
                    let bytes = bytes_by_name
                        .get(name.as_str())
                        .copied()
                        .unwrap_or_default();
                    cairn_keys::fs::write_atomic(&path, bytes, Some(0o644))
                        .map_err(Self::io(&path))?;
                    match reason {
                        WriteReason::Create => report.created += 1,
                        WriteReason::Update => report.updated += 1,
                        WriteReason::Drift => {
                            tracing::warn!(file = %path.display(), "drift: file was edited or deleted by hand; restored");
                            report.drift_corrected += 1
                        }
                    }
                }
                Action::Delete { name } => {
                    let path = self.dir.join(name);
                    match std::fs::remove_file(&path) {
                        Ok(()) => report.deleted += 1,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Self::io(&path)(e)),
                    }
                }
                Action::Conflict { name } => {
                    tracing::warn!(
                        file = %self.dir.join(name).display(),
                        "a file not written by cairn-agent occupies this object's name; left alone"
                    );
                    report.conflicts.push(name.clone());
                }
            }
        }
        if p.after != p.intent || p.intent != inventory {
            self.save_inventory(&p.after)?;
        }
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(report)
    }
}

impl Target for ManifestsDir {
    fn describe(&self) -> String {
        format!("manifests-dir {}", self.dir.display())
    }

    fn apply(&self, desired: Arc<DesiredState>) -> BoxFuture<'_, Result<ApplyReport, TargetError>> {
        let this = self.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || this.apply_blocking(&desired)).await {
                Ok(r) => r,
                Err(e) => Err(TargetError::Unsupported(format!("apply task failed: {e}"))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tests::object;
    use crate::target::DesiredObject;

    fn state(seq: u64, objs: &[(cairn_bundle::bundle::Entry, Vec<u8>)]) -> DesiredState {
        DesiredState {
            failed_release: None,
            channel: "stable".into(),
            sequence: seq,
            bundle: String::new(),
            objects: objs
                .iter()
                .map(|(e, b)| DesiredObject {
                    entry: e.clone(),
                    bytes: b.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn writes_prunes_restores_and_spares_foreign_files() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("data")).unwrap();
        let dir = d.path().join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("foreign.yaml"), b"mine").unwrap();
        let t = ManifestsDir::new(dir.clone(), store);
        let a = object("web", "a", "1");
        let b = object("web", "b", "1");
        let r = t
            .apply_blocking(&state(1, &[a.clone(), b.clone()]))
            .unwrap();
        assert_eq!(r.created, 2);
        let fa = dir.join("web__ConfigMap__a.yaml");
        assert_eq!(std::fs::read(&fa).unwrap(), a.1);
        // Second release: a changes, b goes.
        let a2 = object("web", "a", "2");
        let r = t
            .apply_blocking(&state(2, std::slice::from_ref(&a2)))
            .unwrap();
        assert_eq!((r.updated, r.deleted), (1, 1));
        assert!(!dir.join("web__ConfigMap__b.yaml").exists());
        // Hand edit and hand delete are restored.
        std::fs::write(&fa, b"edited").unwrap();
        let r = t
            .apply_blocking(&state(2, std::slice::from_ref(&a2)))
            .unwrap();
        assert_eq!(r.drift_corrected, 1);
        assert_eq!(std::fs::read(&fa).unwrap(), a2.1);
        std::fs::remove_file(&fa).unwrap();
        let r = t
            .apply_blocking(&state(2, std::slice::from_ref(&a2)))
            .unwrap();
        assert_eq!(r.drift_corrected, 1);
        let r = t
            .apply_blocking(&state(2, std::slice::from_ref(&a2)))
            .unwrap();
        assert_eq!((r.unchanged, r.created, r.drift_corrected), (1, 0, 0));
        // Pruning everything never touches the foreign file.
        t.apply_blocking(&state(3, &[])).unwrap();
        assert!(!fa.exists());
        assert_eq!(std::fs::read(dir.join("foreign.yaml")).unwrap(), b"mine");
    }

    #[test]
    fn foreign_file_with_a_desired_name_is_a_conflict() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("data")).unwrap();
        let dir = d.path().join("m");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web__ConfigMap__a.yaml"), b"someone else's").unwrap();
        let t = ManifestsDir::new(dir.clone(), store);
        let r = t
            .apply_blocking(&state(1, &[object("web", "a", "1")]))
            .unwrap();
        assert!(!r.in_sync());
        assert_eq!(
            std::fs::read(dir.join("web__ConfigMap__a.yaml")).unwrap(),
            b"someone else's"
        );
    }
}
