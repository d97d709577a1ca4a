//! Targets: where the adopted release's objects are applied.
//!
//! A [`Target`] receives the complete desired state (every object of the
//! adopted bundle, verified) and makes the target match it: create, update,
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
use std::path::PathBuf;
use std::sync::Arc;

/// One object to apply, with its verified bytes (canonical JSON).
#[derive(Clone, Debug)]
pub struct DesiredObject {
    /// The manifest entry (kind, namespace, name, address, size).
    pub entry: Entry,
    /// The object's bytes.
    pub bytes: Vec<u8>,
}

/// Everything the adopted release wants applied.
#[derive(Clone, Debug)]
pub struct DesiredState {
    /// The channel.
    pub channel: String,
    /// The release's sequence.
    pub sequence: u64,
    /// The bundle id.
    pub bundle: String,
    /// Every object, in manifest order.
    pub objects: Vec<DesiredObject>,
    /// A newer release that failed its health checks and was rolled back
    /// from (sequence, reason), for targets that publish status.
    pub failed_release: Option<(u64, String)>,
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
    agent_id: &str,
) -> Result<Arc<dyn Target>, TargetError> {
    match cfg {
        TargetConfig::ManifestsDir(dir) => Ok(Arc::new(ManifestsDir::new(
            dir.clone(),
            store,
            agent_id.to_owned(),
        ))),
        TargetConfig::Kubernetes(k) => Ok(Arc::new(crate::kubernetes::KubernetesTarget::new(
            k.clone(),
            store,
            agent_id.to_owned(),
        ))),
    }
}

/// The agent id named by the configured target's ownership record, if it
/// has a valid one (manifests-dir only). Lets an agent whose data directory
/// was lost, and whose config sets no `agentId`, take back its identity and
/// with it the ownership of its files. Blocking (reads a file).
pub fn recorded_agent_id(cfg: &TargetConfig) -> Option<String> {
    match cfg {
        TargetConfig::ManifestsDir(dir) => owner::read(dir).ok().flatten().map(|r| r.agent),
        TargetConfig::Kubernetes(_) => None,
    }
}
