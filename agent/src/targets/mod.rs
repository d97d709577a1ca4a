//! Targets: where the adopted release's objects are applied.
//!
//! A [`Target`] receives the complete desired state (every object's entry
//! of the adopted bundle, and a reader for their verified bodies, which it
//! reads in bounded batches) and makes the target match it: create, update,
//! prune what it owns and no longer wants, and restore drift. Implemented
//! here: [`ManifestsDir`] (files in a directory, e.g. the k3s auto-deploy
//! folder). The Kubernetes target (server-side apply) plugs in behind the
//! same trait.
//!
//! Planning is pure ([`plan`]); targets are the thin IO shell around it.

mod local_file;
pub mod manifests_dir;
pub mod owner;
pub mod plan;

pub use manifests_dir::ManifestsDir;

use crate::config::TargetConfig;
use crate::store::{Store, StoreError};
use crate::BoxFuture;
use cairn_core::bundle::Entry;
use plan::Digest;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One object to apply, with its verified bytes (canonical JSON).
#[derive(Clone, Debug)]
pub struct DesiredObject {
    /// The manifest entry (kind, namespace, name, address, size).
    pub entry: Entry,
    /// The object's bytes.
    pub bytes: Vec<u8>,
}

/// Most object bodies a target reads at once ([`DesiredState::read`]):
/// targets plan with entries (names and addresses) only, and read bodies
/// in batches of at most this many when they write them, so a reconcile's
/// memory does not grow with the bundle's bytes.
pub const READ_BATCH: usize = 64;

/// Where a target reads the bodies of the desired objects from (the
/// agent: its store, rendered for the site). Blocking: call it on a
/// blocking thread.
pub trait ObjectReader: Send + Sync {
    /// The bytes of the objects `indices` (into [`DesiredState::entries`]),
    /// in that order, each checked against its entry's address.
    fn read(
        &self,
        entries: &DesiredEntries,
        indices: &[usize],
    ) -> Result<Vec<Vec<u8>>, TargetError>;
}

/// The entries of the desired objects, compact (issue 17): per object
/// its API version, kind, namespace and name in one shared text buffer,
/// its 32-byte address and its size — what targets plan with. (A
/// manifest [`Entry`] holds six separately allocated strings, among them
/// the file path, which no target needs.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredEntries {
    text: String,
    items: Vec<CompactEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CompactEntry {
    /// Ends of API version, kind, namespace and name in `text`.
    ends: [u32; 4],
    address: Digest,
    size: u64,
}

/// One desired entry, borrowed from [`DesiredEntries`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRef<'a> {
    /// `apiVersion`.
    pub api_version: &'a str,
    /// `kind`.
    pub kind: &'a str,
    /// `metadata.namespace`, empty for cluster-scoped objects.
    pub namespace: &'a str,
    /// `metadata.name`.
    pub name: &'a str,
    /// Address of the object's bytes (as rendered for the site).
    pub address: Digest,
    /// Size of the object's bytes.
    pub size: u64,
}

impl EntryRef<'_> {
    /// The API group (`""` for core), as [`Entry::group`].
    pub fn group(&self) -> &str {
        self.api_version
            .rsplit_once('/')
            .map(|(g, _)| g)
            .unwrap_or("")
    }
}

impl DesiredEntries {
    /// Adds `e`.
    pub fn push(&mut self, e: &Entry) {
        let mut ends = [0u32; 4];
        for (end, part) in ends
            .iter_mut()
            .zip([&e.api_version, &e.kind, &e.namespace, &e.name])
        {
            self.text.push_str(part);
            *end = u32::try_from(self.text.len()).unwrap_or(u32::MAX);
        }
        self.items.push(CompactEntry {
            ends,
            address: Digest::of_address(&e.object),
            size: e.size,
        });
    }

    /// Releases spare capacity (after the last [`DesiredEntries::push`]).
    pub fn shrink_to_fit(&mut self) {
        self.text.shrink_to_fit();
        self.items.shrink_to_fit();
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The `i`-th entry.
    pub fn get(&self, i: usize) -> Option<EntryRef<'_>> {
        let item = self.items.get(i)?;
        let start = match i.checked_sub(1).and_then(|p| self.items.get(p)) {
            Some(prev) => prev.ends[3],
            None => 0,
        };
        let part = |from: u32, to: u32| self.text.get(from as usize..to as usize).unwrap_or("");
        let [v, k, ns, n] = item.ends;
        Some(EntryRef {
            api_version: part(start, v),
            kind: part(v, k),
            namespace: part(k, ns),
            name: part(ns, n),
            address: item.address,
            size: item.size,
        })
    }

    /// Every entry, in order.
    pub fn iter(&self) -> impl Iterator<Item = EntryRef<'_>> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

impl<'e> FromIterator<&'e Entry> for DesiredEntries {
    fn from_iter<I: IntoIterator<Item = &'e Entry>>(iter: I) -> Self {
        let mut out = Self::default();
        for e in iter {
            out.push(e);
        }
        out.shrink_to_fit();
        out
    }
}

/// Object bodies held in memory (tests, `cairn-agent plan`).
struct InMemory(Vec<Vec<u8>>);

impl ObjectReader for InMemory {
    fn read(&self, _: &DesiredEntries, indices: &[usize]) -> Result<Vec<Vec<u8>>, TargetError> {
        indices
            .iter()
            .map(|&i| {
                self.0.get(i).cloned().ok_or_else(|| {
                    TargetError::Unsupported(format!("object {i} is not in the desired state"))
                })
            })
            .collect()
    }
}

/// How many object bodies are held at once (read and not yet dropped):
/// what keeps a reconcile's memory flat. Counted for every read batch.
#[derive(Debug, Default)]
pub struct Held {
    now: AtomicUsize,
    peak: AtomicUsize,
    total: AtomicUsize,
}

impl Held {
    fn add(&self, n: usize) {
        let now = self.now.fetch_add(n, Ordering::SeqCst) + n;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.total.fetch_add(n, Ordering::SeqCst);
    }

    /// Most bodies held at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Bodies read so far.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }
}

/// Object bodies read by [`DesiredState::read`]; counted as held until
/// dropped.
pub struct Batch {
    bodies: Vec<Vec<u8>>,
    held: Arc<Held>,
}

impl Batch {
    /// The bytes of the `k`-th object asked for.
    pub fn get(&self, k: usize) -> &[u8] {
        self.bodies.get(k).map_or(&[], Vec::as_slice)
    }

    /// How many bodies.
    pub fn len(&self) -> usize {
        self.bodies.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.bodies.is_empty()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.held.now.fetch_sub(self.bodies.len(), Ordering::SeqCst);
    }
}

/// Everything the adopted release wants applied: the entries of every
/// object (small: kind, names, address, size) and a reader for their
/// bodies, which targets read in bounded batches.
#[derive(Clone)]
pub struct DesiredState {
    /// The channel.
    pub channel: String,
    /// The release's sequence.
    pub sequence: u64,
    /// The bundle id.
    pub bundle: String,
    /// Every object's entry, in manifest order (as rendered for the site:
    /// the address and size are those of the bytes the reader returns).
    pub entries: DesiredEntries,
    /// A newer release that failed its health checks and was rolled back
    /// from (sequence, reason), for targets that publish status.
    pub failed_release: Option<(u64, String)>,
    reader: Arc<dyn ObjectReader>,
    held: Arc<Held>,
}

impl std::fmt::Debug for DesiredState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesiredState")
            .field("channel", &self.channel)
            .field("sequence", &self.sequence)
            .field("bundle", &self.bundle)
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl DesiredState {
    /// A desired state whose bodies come from `reader`.
    pub fn new(
        channel: String,
        sequence: u64,
        bundle: String,
        entries: DesiredEntries,
        reader: Arc<dyn ObjectReader>,
    ) -> Self {
        Self {
            channel,
            sequence,
            bundle,
            entries,
            failed_release: None,
            reader,
            held: Arc::default(),
        }
    }

    /// A desired state holding its bodies in memory (tests, `plan`).
    pub fn in_memory(
        channel: String,
        sequence: u64,
        bundle: String,
        objects: Vec<DesiredObject>,
    ) -> Self {
        let entries = objects.iter().map(|o| &o.entry).collect();
        let bodies = objects.into_iter().map(|o| o.bytes).collect();
        Self::new(
            channel,
            sequence,
            bundle,
            entries,
            Arc::new(InMemory(bodies)),
        )
    }

    /// Reads the bodies of `indices` (at most [`READ_BATCH`] at a time
    /// keeps memory flat). Blocking.
    pub fn read(&self, indices: &[usize]) -> Result<Batch, TargetError> {
        let bodies = self.reader.read(&self.entries, indices)?;
        self.held.add(bodies.len());
        Ok(Batch {
            bodies,
            held: self.held.clone(),
        })
    }

    /// How many bodies were held at once, and read in all.
    pub fn held(&self) -> &Held {
        &self.held
    }
}

/// What one apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReport {
    /// Objects created.
    pub created: usize,
    /// Objects changed by the new release.
    pub updated: usize,
    /// Objects pruned (owned, no longer desired).
    pub deleted: usize,
    /// Objects restored after a hand edit or deletion.
    pub drift_corrected: usize,
    /// Objects already as desired.
    pub unchanged: usize,
    /// Desired objects that could not be applied because something foreign
    /// occupies their place, or that the target refused (per object).
    pub conflicts: Vec<String>,
    /// Set when the applied objects did not become healthy (a workload that
    /// never rolls out, a failed Job): the release is failed and the agent
    /// rolls back to the last-good release.
    #[serde(default)]
    pub unhealthy: Option<String>,
    /// Set while the target is still converging on a new release (its
    /// waves or workloads not healthy yet, within its health timeout):
    /// the reconcile loop runs again after this delay instead of the
    /// interval, as kube-runtime's `Action::requeue`. A report with it is
    /// not in sync (a conflict says what is not healthy yet). Not stored.
    #[serde(skip)]
    pub requeue_after: Option<std::time::Duration>,
}

impl ApplyReport {
    /// Whether the target now matches the desired state.
    pub fn in_sync(&self) -> bool {
        self.conflicts.is_empty() && self.unhealthy.is_none()
    }
}

/// Why an apply failed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store (inventory) failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored inventory is unreadable.
    #[error("inventory of {target}: {reason}")]
    Inventory {
        /// The target.
        target: String,
        /// Why.
        reason: String,
    },
    /// The target's ownership record is unusable or names another agent.
    #[error("ownership record {}: {reason}", path.display())]
    Owner {
        /// The record.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// A switch failed part-way and every change it made was undone: the
    /// target holds what it held before the reconcile.
    #[error("switching to release {sequence} failed: {cause}; every change was undone, the target holds what it held before")]
    SwitchUndone {
        /// The release being applied.
        sequence: u64,
        /// The failure.
        cause: Box<TargetError>,
    },
    /// A switch failed part-way and undoing it failed too: the target is
    /// mixed until a later reconcile finishes or undoes it.
    #[error("switching to release {sequence} failed: {cause}; undoing it failed too ({undo}): the target is mixed until a later reconcile succeeds")]
    SwitchStuck {
        /// The release being applied.
        sequence: u64,
        /// The failure.
        cause: Box<TargetError>,
        /// Why undoing failed.
        undo: Box<TargetError>,
    },
    /// The configured target kind is not available in this build.
    #[error("{0}")]
    Unsupported(String),
    /// A desired object's body could not be read.
    #[error("object {address}: {reason}")]
    Object {
        /// Its address.
        address: String,
        /// Why.
        reason: String,
    },
}

/// Something the agent reconciles. Object-safe so targets can be chosen at
/// run time; futures are boxed.
pub trait Target: Send + Sync {
    /// A short description for logs and status (e.g. `manifests-dir /x`).
    fn describe(&self) -> String;

    /// Makes the target match `desired`: apply every object, prune owned
    /// objects no longer desired, restore drift. Never touches what the
    /// target does not own.
    fn apply(&self, desired: Arc<DesiredState>) -> BoxFuture<'_, Result<ApplyReport, TargetError>>;
}

/// Builds the configured target.
pub fn from_config(
    cfg: &TargetConfig,
    store: Store,
    agent_id: &cairn_core::AgentId,
) -> Result<Arc<dyn Target>, TargetError> {
    match cfg {
        TargetConfig::ManifestsDir(dir) => Ok(Arc::new(ManifestsDir::new(
            dir.clone(),
            store,
            agent_id.clone(),
        ))),
        TargetConfig::Kubernetes(k) => Ok(Arc::new(crate::kubernetes::KubernetesTarget::new(
            k.clone(),
            store,
            agent_id.clone(),
        ))),
    }
}

/// The agent id named by the configured target's ownership record, if it
/// has a valid one (manifests-dir only). Lets an agent whose data directory
/// was lost, and whose config sets no `agentId`, take back its identity and
/// with it the ownership of its files. Blocking (reads a file).
pub fn recorded_agent_id(cfg: &TargetConfig) -> Option<cairn_core::AgentId> {
    match cfg {
        TargetConfig::ManifestsDir(dir) => owner::read(dir).ok().flatten().map(|r| r.agent),
        TargetConfig::Kubernetes(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(api_version: &str, kind: &str, namespace: &str, name: &str, body: &[u8]) -> Entry {
        Entry {
            path: "apps/x.yaml".into(),
            document: 3,
            api_version: api_version.into(),
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            object: cairn_core::Address::of(body),
            size: body.len() as u64,
        }
    }

    /// The compact entries give back every part the targets use, for
    /// empty parts and non-ASCII names too, in order.
    #[test]
    fn desired_entries_keep_what_targets_need() {
        let es = [
            entry("v1", "Namespace", "", "web", b"a"),
            entry("apps/v1", "Deployment", "web", "ünï", b"bb"),
            entry("", "", "", "", b""),
            entry("networking.k8s.io/v1", "Ingress", "web", "x", b"ccc"),
        ];
        let d: DesiredEntries = es.iter().collect();
        assert_eq!(d.len(), es.len());
        for (e, c) in es.iter().zip(d.iter()) {
            assert_eq!(c.api_version, e.api_version);
            assert_eq!(c.kind, e.kind);
            assert_eq!(c.namespace, e.namespace);
            assert_eq!(c.name, e.name);
            assert_eq!(c.group(), e.group());
            assert_eq!(c.address.to_string(), e.object.to_string());
            assert_eq!(c.size, e.size);
        }
        assert!(d.get(es.len()).is_none());
        // The file names from compact entries are those of the entries.
        let names = plan::FileNames::of(&d);
        let direct = plan::file_names(&es);
        assert_eq!(
            (0..names.len()).map(|i| names.get(i)).collect::<Vec<_>>(),
            direct
        );
        assert_eq!(direct[3], "web__Ingress__x.yaml");
    }
}
