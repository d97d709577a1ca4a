//! The manifests-directory target: one file per object, e.g. in the k3s
//! auto-deploy folder (`/var/lib/rancher/k3s/server/manifests/cairn`).
//!
//! File names come from [`super::plan::file_names`]; content is the
//! object's canonical JSON, byte for byte (valid YAML, and its SHA-256 is
//! the object's address, so drift is detected by hashing). Writes are
//! atomic (temporary file, fsync, rename).
//!
//! Ownership lives in the target itself, in the ownership record
//! ([`super::owner`]), so it survives the loss of the data directory; the
//! store keeps a copy (used when the record is missing, e.g. after an
//! upgrade, or unusable). Files the agent did not write are never modified
//! or deleted. A reconcile that changes anything:
//!
//! 1. removes temporary files an interrupted write left behind;
//! 2. announces its changes in the record (durably) before the first one,
//!    so a crash mid-way is recognised at restart as unfinished work, not
//!    drift, and never leaves an unowned file;
//! 3. deletes first, then writes in the order that keeps the peak disk use
//!    lowest ([`super::plan`]);
//! 4. if any step fails (a full disk), undoes every step it made — old
//!    contents come from the store, or from a copy read before the step —
//!    so the target holds what it held before, and reports the error;
//! 5. records the new inventory.

use super::local_file::{read_regular, LocalFile};
use super::owner::{self, RecordOut, SwitchOut};
use super::plan::{
    self, Action, DesiredFile, DesiredFiles, Digest, FileNames, Inventory, Observations, Observed,
    Ownership, Plan, WriteReason,
};
use super::{ApplyReport, DesiredState, Target, TargetError, READ_BATCH};
use crate::store::Store;
use crate::BoxFuture;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Files larger than this are never read back (they cannot be objects).
const MAX_OBSERVED_BYTES: u64 = 64 << 20;

/// Memory for copies of replaced or deleted files whose content the store
/// does not hold (only after the data directory was lost), kept to undo a
/// failed switch. Beyond it such files cannot be restored by an undo.
const MAX_UNDO_COPY_BYTES: u64 = 256 << 20;

/// A directory of manifests.
#[derive(Clone, Debug)]
pub struct ManifestsDir {
    dir: PathBuf,
    store: Store,
    agent_id: cairn_core::AgentId,
}

/// The store's copy of the inventory, as read (`format` and `dir` must be
/// present; only `files` is used).
#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct StoredInventory {
    format: u32,
    dir: PathBuf,
    /// Checked like the record's files (names the agent writes, object
    /// addresses).
    #[serde(deserialize_with = "owner::files_field")]
    files: Inventory,
}

/// [`StoredInventory`] as written, from a view of the plan (no map of
/// every object is built).
#[derive(serde::Serialize)]
struct StoredInventoryRef<'a, F: serde::Serialize> {
    format: u32,
    dir: &'a Path,
    files: F,
}

/// What a reconcile needs of the valid record of this agent besides the
/// files, which move into [`Loaded::owned`] (no second copy).
struct RecordSummary {
    sequence: Option<u64>,
    /// The record says nothing but its files, sequence, agent and format
    /// would: it names this target and announces no switch.
    plain: bool,
}

/// Ownership as loaded at the start of a reconcile.
struct Loaded {
    owned: Ownership,
    /// The valid record of this agent, if there was one.
    record: Option<RecordSummary>,
    /// The SHA-256 of the store's copy of the inventory, as stored:
    /// enough to tell whether it needs rewriting.
    stored: Option<Digest>,
}

/// Copies of old contents the store lacks, for undoing.
#[derive(Default)]
struct UndoCopies {
    by_address: BTreeMap<Digest, Vec<u8>>,
    bytes: u64,
}

impl ManifestsDir {
    /// A target writing into `dir` (created if missing) for the agent
    /// `agent_id`, keeping a copy of its inventory in `store`.
    pub fn new(dir: PathBuf, store: Store, agent_id: cairn_core::AgentId) -> Self {
        Self {
            dir,
            store,
            agent_id,
        }
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

    fn parse_stored(&self, bytes: &[u8]) -> Result<Inventory, TargetError> {
        serde_json::from_slice::<StoredInventory>(bytes)
            .map(|s| s.files)
            .map_err(|e| TargetError::Inventory {
                target: self.describe(),
                reason: e.to_string(),
            })
    }

    fn stored_bytes<F: serde::Serialize>(&self, files: F) -> Result<Vec<u8>, TargetError> {
        let doc = StoredInventoryRef {
            format: 1,
            dir: &self.dir,
            files,
        };
        serde_json::to_vec(&doc).map_err(|e| TargetError::Inventory {
            target: self.describe(),
            reason: e.to_string(),
        })
    }

    /// What this agent owns: the record in the directory if it is this
    /// agent's; else the store's copy; a record of another agent, or an
    /// unusable record with no copy in the store, is an error (nothing is
    /// changed: the agent cannot tell its files from foreign ones).
    fn load(&self) -> Result<Loaded, TargetError> {
        let stored_bytes = self.store.inventory(&self.key())?;
        let stored = stored_bytes.as_deref().map(Digest::of);
        let path = owner::record_path(&self.dir);
        match owner::read(&self.dir) {
            Ok(Some(rec)) if rec.agent == self.agent_id => Ok(Loaded {
                record: Some(RecordSummary {
                    sequence: rec.sequence,
                    plain: rec.switch.is_none() && rec.target == self.describe(),
                }),
                owned: Ownership {
                    files: rec.files,
                    pending: rec.switch.map(|s| s.changes).unwrap_or_default(),
                },
                stored,
            }),
            // Agent ids in a record are validated (safe to print).
            Ok(Some(rec)) => Err(TargetError::Owner {
                path,
                reason: format!(
                    "the directory is managed by agent `{}`, not by this agent (`{}`); nothing was changed. \
                     Give each agent its own manifests directory, or, if this is agent `{}` with a new data \
                     directory, set `agentId: {}` in its config",
                    rec.agent, self.agent_id, rec.agent, rec.agent
                ),
            }),
            Ok(None) => Ok(Loaded {
                owned: Ownership {
                    files: match &stored_bytes {
                        Some(b) => self.parse_stored(b)?,
                        None => Inventory::new(),
                    },
                    pending: Default::default(),
                },
                record: None,
                stored,
            }),
            Err(reason) => match &stored_bytes {
                Some(b) => {
                    let files = self.parse_stored(b)?;
                    tracing::warn!(
                        record = %path.display(),
                        %reason,
                        "the ownership record is unusable; using the inventory in the data directory and rewriting the record"
                    );
                    Ok(Loaded {
                        owned: Ownership {
                            files,
                            pending: Default::default(),
                        },
                        record: None,
                        stored,
                    })
                }
                None => Err(TargetError::Owner {
                    path,
                    reason: format!(
                        "{reason}; the agent cannot tell its own files from foreign ones and changed nothing. \
                         Restore the record, or remove it (every existing file then counts as foreign)"
                    ),
                }),
            },
        }
    }

    /// Writes the record of `files` and the announced switch (its
    /// sequence and changes), streaming both maps (views of the plan or
    /// the owned inventory): no map of every object is copied.
    fn write_record<F: serde::Serialize, C: serde::Serialize>(
        &self,
        files: F,
        sequence: Option<u64>,
        switch: Option<(u64, C)>,
    ) -> Result<(), TargetError> {
        let target = self.describe();
        let rec = RecordOut {
            format: owner::RECORD_FORMAT,
            agent: &self.agent_id,
            target: &target,
            sequence,
            files,
            switch: switch.map(|(sequence, changes)| SwitchOut { sequence, changes }),
        };
        let path = owner::record_path(&self.dir);
        owner::write(&self.dir, &rec).map_err(Self::io(&path))
    }

    /// Removes temporary files an interrupted atomic write left behind
    /// (only names of this agent's own temporary pattern). Runs under the
    /// reconcile lock, so no write of this process is in flight.
    fn remove_stale_temp_files(&self) -> Result<(), TargetError> {
        let mut removed = 0usize;
        for e in std::fs::read_dir(&self.dir).map_err(Self::io(&self.dir))? {
            let e = e.map_err(Self::io(&self.dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if !owner::is_own_temp_file(name) {
                continue;
            }
            let path = e.path();
            if e.file_type().map_err(Self::io(&path))?.is_dir() {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Self::io(&path)(e)),
            }
        }
        if removed > 0 {
            tracing::info!(dir = %self.dir.display(), removed, "removed temporary files left by an interrupted write");
        }
        Ok(())
    }

    fn observe(&self, name: &str) -> Result<Observed, TargetError> {
        let p = self.dir.join(name);
        Ok(
            match read_regular(&p, MAX_OBSERVED_BYTES).map_err(Self::io(&p))? {
                LocalFile::Missing => Observed::Missing,
                LocalFile::Bytes(b) => Observed::Content {
                    address: Digest::of(&b),
                    size: b.len() as u64,
                },
                LocalFile::NotRegular | LocalFile::TooLarge(_) => Observed::Other,
            },
        )
    }

    /// Before a file holding `address` is replaced or deleted: keep a copy
    /// in memory if the store cannot provide the content for an undo.
    fn keep_copy(&self, name: &str, address: Digest, copies: &mut UndoCopies) {
        if copies.by_address.contains_key(&address)
            || self.store.has_object(&address.to_string()).unwrap_or(false)
        {
            return;
        }
        let path = self.dir.join(name);
        if let Ok(LocalFile::Bytes(b)) = read_regular(&path, MAX_OBSERVED_BYTES) {
            if copies.bytes + b.len() as u64 <= MAX_UNDO_COPY_BYTES && Digest::of(&b) == address {
                copies.bytes += b.len() as u64;
                copies.by_address.insert(address, b);
            }
        }
    }

    /// Carries out one action; `bytes` is the object's body for a write.
    fn carry_out(
        &self,
        action: &Action,
        want: &DesiredFiles<'_>,
        bytes: &[u8],
        copies: &mut UndoCopies,
        report: &mut ApplyReport,
    ) -> Result<(), TargetError> {
        match action {
            Action::Write {
                index,
                reason,
                previous,
            } => {
                let name = want.name(*index);
                if let Some(old) = previous {
                    self.keep_copy(name, *old, copies);
                }
                let path = self.dir.join(name);
                cairn_keys::fs::write_atomic(&path, bytes, Some(0o644)).map_err(Self::io(&path))?;
                match reason {
                    WriteReason::Create => report.created += 1,
                    WriteReason::Update => report.updated += 1,
                    WriteReason::Drift => {
                        tracing::warn!(file = %path.display(), "drift: file was edited or deleted by hand; restored");
                        report.drift_corrected += 1
                    }
                }
            }
            Action::Delete { name, previous } => {
                if let Some(old) = previous {
                    self.keep_copy(name, *old, copies);
                }
                let path = self.dir.join(name);
                match std::fs::remove_file(&path) {
                    Ok(()) => report.deleted += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Self::io(&path)(e)),
                }
            }
            Action::Conflict { .. } => {}
        }
        Ok(())
    }

    /// Carries out `changes` in order, reading the bodies of the writes
    /// in batches of at most [`READ_BATCH`]. On failure: how many were done
    /// and why.
    fn carry_out_all(
        &self,
        desired: &DesiredState,
        changes: &[&Action],
        want: &DesiredFiles<'_>,
        copies: &mut UndoCopies,
        report: &mut ApplyReport,
    ) -> Result<(), (usize, TargetError)> {
        let mut done = 0;
        for chunk in changes.chunks(READ_BATCH) {
            let wanted: Vec<usize> = chunk
                .iter()
                .filter_map(|a| match a {
                    Action::Write { index, .. } => Some(*index),
                    _ => None,
                })
                .collect();
            let batch = desired.read(&wanted).map_err(|e| (done, e))?;
            let mut next = 0;
            for action in chunk {
                let bytes = match action {
                    Action::Write { .. } => {
                        next += 1;
                        batch.get(next - 1)
                    }
                    _ => &[],
                };
                self.carry_out(action, want, bytes, copies, report)
                    .map_err(|e| (done, e))?;
                done += 1;
            }
        }
        Ok(())
    }

    /// Puts back the content `address` under `name`.
    fn restore(&self, name: &str, address: Digest, copies: &UndoCopies) -> Result<(), TargetError> {
        let path = self.dir.join(name);
        let bytes = match copies.by_address.get(&address) {
            Some(b) => b.clone(),
            None => self
                .store
                .get_object(&address.to_string())?
                .ok_or_else(|| TargetError::Io {
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no copy of its previous content {address} to restore"),
                    ),
                })?,
        };
        cairn_keys::fs::write_atomic(&path, &bytes, Some(0o644)).map_err(Self::io(&path))
    }

    /// Undoes `done` (in reverse: removing what was created frees space
    /// before old contents come back). Returns the first failure; keeps
    /// going past it so as much as possible is undone.
    fn undo(
        &self,
        done: &[&Action],
        want: &DesiredFiles<'_>,
        copies: &UndoCopies,
    ) -> Result<(), TargetError> {
        let mut first = None;
        for a in done.iter().rev() {
            let r = match a {
                // A restored hand edit: the content is right for both
                // releases; nothing to undo.
                Action::Write {
                    reason: WriteReason::Drift,
                    ..
                } => Ok(()),
                Action::Write {
                    index,
                    previous: None,
                    ..
                } => {
                    let path = self.dir.join(want.name(*index));
                    match std::fs::remove_file(&path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            Err(Self::io(&path)(e))
                        }
                        _ => Ok(()),
                    }
                }
                Action::Write {
                    index,
                    previous: Some(old),
                    ..
                } => self.restore(want.name(*index), *old, copies),
                Action::Delete {
                    name,
                    previous: Some(old),
                } => self.restore(name, *old, copies),
                Action::Delete { previous: None, .. } | Action::Conflict { .. } => Ok(()),
            };
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn sync_dir(&self) {
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
    }

    /// The blocking body of [`Target::apply`].
    pub fn apply_blocking(&self, desired: &DesiredState) -> Result<ApplyReport, TargetError> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let loaded = self.load()?;
        self.remove_stale_temp_files()?;
        // Plan with entries only (names, addresses, sizes); bodies are
        // read in bounded batches when written. Every structure below is
        // O(objects) (MiB at 30,000): the names live in one buffer, the
        // plan refers to them by index, addresses are 32-byte digests.
        let names = FileNames::of(&desired.entries);
        let want = DesiredFiles::new(
            desired
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| DesiredFile {
                    name: names.get(i),
                    address: e.address,
                    size: e.size,
                })
                .collect(),
        );
        let Loaded {
            owned,
            record,
            stored,
        } = loaded;
        let mut observed = Observations {
            desired: Vec::with_capacity(want.files().len()),
            other: BTreeMap::new(),
        };
        for (i, f) in want.files().iter().enumerate() {
            // Of files sharing a name only the one that counts is looked at.
            observed.desired.push(if want.counts(i) {
                self.observe(f.name)?
            } else {
                Observed::Missing
            });
        }
        // Owned names no longer desired (files to delete; usually few).
        for name in owned.files.keys().chain(owned.pending.keys()) {
            if want.index_of(name).is_none() && !observed.other.contains_key(name) {
                observed.other.insert(name.clone(), self.observe(name)?);
            }
        }
        let p = plan::plan(&want, owned, &observed);
        drop(observed);
        self.carry_out_plan(desired, &want, p, record, stored)
    }

    /// Announces, carries out and records `p`.
    fn carry_out_plan(
        &self,
        desired: &DesiredState,
        want: &DesiredFiles<'_>,
        p: Plan,
        record: Option<RecordSummary>,
        stored: Option<Digest>,
    ) -> Result<ApplyReport, TargetError> {
        let mut report = ApplyReport {
            unchanged: p.unchanged,
            ..ApplyReport::default()
        };
        let changes: Vec<&Action> = p
            .actions
            .iter()
            .filter(|a| !matches!(a, Action::Conflict { .. }))
            .collect();
        let before_sequence = record.as_ref().and_then(|r| r.sequence);
        if !changes.is_empty() {
            self.write_record(
                &p.before,
                before_sequence,
                Some((desired.sequence, p.pending(want))),
            )?;
        }
        let mut copies = UndoCopies::default();
        if let Err((i, cause)) =
            self.carry_out_all(desired, &changes, want, &mut copies, &mut report)
        {
            let undone = self.undo(&changes[..i], want, &copies);
            self.sync_dir();
            let cause = Box::new(cause);
            return Err(match undone {
                Ok(()) => {
                    // The announced switch is void; if this write fails
                    // the record still owns exactly the right files.
                    if let Err(e) = self.write_record(&p.before, before_sequence, None::<(u64, ())>)
                    {
                        tracing::warn!(error = %e, "cannot clear the announced switch from the ownership record");
                    }
                    TargetError::SwitchUndone {
                        sequence: desired.sequence,
                        cause,
                    }
                }
                Err(undo) => TargetError::SwitchStuck {
                    sequence: desired.sequence,
                    cause,
                    undo: Box::new(undo),
                },
            });
        }
        for action in &p.actions {
            if let Action::Conflict { index } = action {
                let name = want.name(*index);
                tracing::warn!(
                    file = %self.dir.join(name).display(),
                    "a file not written by cairn-agent occupies this object's name; left alone"
                );
                report.conflicts.push(name.to_owned());
            }
        }
        // The record as it should be now: this release's files, no switch.
        // A valid record of this agent with no switch owns exactly
        // `p.before`.
        let after = p.after(want);
        let current = record.is_some_and(|r| {
            r.plain && r.sequence == Some(desired.sequence) && after.same_as(&p.before)
        });
        // Always after an announced switch (it must be cleared); else only
        // when the record is missing, stale, or was unusable.
        if !changes.is_empty() || !current {
            self.write_record(&after, Some(desired.sequence), None::<(u64, ())>)?;
        }
        let bytes = self.stored_bytes(&after)?;
        if stored != Some(Digest::of(&bytes)) {
            self.store.set_inventory(&self.key(), &bytes)?;
        }
        if !changes.is_empty() {
            self.sync_dir();
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
mod tests;
