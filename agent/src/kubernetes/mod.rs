//! The Kubernetes target: server-side apply with field manager `cairn`,
//! ordered apply (namespaces, CRDs, cluster-scoped, namespaced), pruning of
//! what a release dropped, drift correction, health checks, and a status
//! ConfigMap in the agent's namespace.
//!
//! [`plan`] is pure (ordering, pruning, drift, health rules); [`cluster`] is
//! the kube-rs shell (both in the `cairn-plan` crate, which `cairn diff`
//! shares); [`reconcile`] runs one pass, which never waits for health;
//! [`progress`] (pure) decides what the pass's health means: healthy,
//! progressing (run again after a delay) or failed. [`KubernetesTarget`]
//! plugs them into the agent's [`Target`] trait.

pub mod progress;
pub mod reconcile;
/// Re-exported from `cairn-plan` (shared with `cairn diff`).
pub use cairn_plan::{cluster, plan};

use crate::config::KubernetesTarget as KubernetesConfig;
use crate::store::{Store, StoreHandle};
use crate::targets::{ApplyReport, DesiredState, Target, TargetError};
use crate::BoxFuture;
use cluster::Cluster;
use plan::{Health, InventoryItem};
use progress::Outcome;
use reconcile::{KubeReport, PassOptions};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Name of the status ConfigMap in the agent's namespace.
pub const STATUS_CONFIGMAP: &str = "cairn-status";

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredInventory {
    format: u32,
    items: Vec<InventoryItem>,
}

/// The store key of the inventory of the cluster reached through
/// `kubeconfig` (`None`: in-cluster).
pub fn inventory_key(kubeconfig: Option<&std::path::Path>) -> String {
    format!(
        "kubernetes:{}",
        kubeconfig.map_or("in-cluster".into(), |p| p.display().to_string())
    )
}

/// Decodes a stored inventory.
pub fn decode_inventory(bytes: &[u8]) -> Result<Vec<InventoryItem>, String> {
    serde_json::from_slice::<StoredInventory>(bytes)
        .map(|s| s.items)
        .map_err(|e| e.to_string())
}

/// The outcome of the last pass, kept for status and health decisions.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LastPass {
    /// The sequence applied.
    pub sequence: u64,
    /// Overall health after the pass.
    pub health: Option<Health>,
    /// Drift corrections since the agent started.
    pub drift_total: u64,
}

/// Applies releases to a Kubernetes cluster.
pub struct KubernetesTarget {
    config: KubernetesConfig,
    /// Inventory reads and writes run on blocking threads.
    store: StoreHandle,
    cluster: Mutex<Option<Cluster>>,
    last: std::sync::Mutex<LastPass>,
    /// The release rolling out (sequence) and when its first pass ran:
    /// open until a pass finds it healthy or fails it.
    rollout: std::sync::Mutex<Option<(u64, tokio::time::Instant)>>,
    /// How long a new release may take to become healthy.
    pub health_timeout: Duration,
    /// Server-side apply `force`.
    pub force: bool,
    agent_id: cairn_core::AgentId,
}

impl KubernetesTarget {
    /// A target for the configured cluster. Connects lazily, so the agent
    /// starts (and keeps its last-good state) while the API server is down.
    pub fn new(config: KubernetesConfig, store: Store, agent_id: cairn_core::AgentId) -> Self {
        Self {
            health_timeout: config.health_timeout,
            force: config.force,
            config,
            store: StoreHandle::new(store),
            cluster: Mutex::new(None),
            last: std::sync::Mutex::new(LastPass::default()),
            rollout: std::sync::Mutex::new(None),
            agent_id,
        }
    }

    fn key(&self) -> String {
        inventory_key(self.config.kubeconfig.as_deref())
    }

    async fn load_inventory(&self) -> Result<Vec<InventoryItem>, TargetError> {
        let key = self.key();
        match self.store.call(move |s| s.inventory(&key)).await? {
            None => Ok(Vec::new()),
            Some(bytes) => serde_json::from_slice::<StoredInventory>(&bytes)
                .map(|s| s.items)
                .map_err(|e| TargetError::Inventory {
                    target: self.describe(),
                    reason: e.to_string(),
                }),
        }
    }

    async fn save_inventory(&self, items: &[InventoryItem]) -> Result<(), TargetError> {
        let bytes = serde_json::to_vec(&StoredInventory {
            format: 1,
            items: items.to_vec(),
        })
        .map_err(|e| TargetError::Inventory {
            target: self.describe(),
            reason: e.to_string(),
        })?;
        let key = self.key();
        Ok(self
            .store
            .call(move |s| s.set_inventory(&key, &bytes))
            .await?)
    }

    /// The last pass's outcome.
    pub fn last_pass(&self) -> LastPass {
        self.last.lock().map(|l| l.clone()).unwrap_or_default()
    }

    async fn pass(
        &self,
        desired: &Arc<DesiredState>,
    ) -> Result<(KubeReport, Outcome), TargetError> {
        let mut guard = self.cluster.lock().await;
        if guard.is_none() {
            let c = Cluster::connect(self.config.kubeconfig.as_deref())
                .await
                .map_err(TargetError::Unsupported)?;
            *guard = Some(c);
        }
        let Some(cluster) = guard.as_mut() else {
            return Err(TargetError::Unsupported("no cluster connection".into()));
        };
        let objects = {
            let d = desired.clone();
            tokio::task::spawn_blocking(move || reconcile::desired_objects(&d))
                .await
                .map_err(|e| TargetError::Unsupported(format!("reading objects failed: {e}")))?
        }
        .map_err(|reason| TargetError::Inventory {
            target: self.describe(),
            reason,
        })?;
        let previous = self.load_inventory().await?;
        // Own everything we are about to create before creating it, so a
        // crash mid-pass never leaves objects no inventory knows of.
        let mut intended = previous.clone();
        for d in &objects {
            if !intended.iter().any(|i| i.object == d.object) {
                intended.push(InventoryItem {
                    object: d.object.clone(),
                    prunable: d.prunable,
                    address: String::new(),
                });
            }
        }
        self.save_inventory(&intended).await?;
        // The rollout window: opened by the first pass of a release new to
        // this target, kept while its passes progress.
        let now = tokio::time::Instant::now();
        let since = {
            let mut r = self
                .rollout
                .lock()
                .map_err(|_| TargetError::Unsupported("poisoned".into()))?;
            match *r {
                Some((seq, since)) if seq == desired.sequence => Some(since),
                _ if self.last_pass().sequence != desired.sequence => {
                    *r = Some((desired.sequence, now));
                    Some(now)
                }
                _ => {
                    *r = None;
                    None
                }
            }
        };
        let opts = PassOptions {
            channel: desired.channel.clone(),
            force: self.force,
            crd_timeout: Duration::from_secs(30),
        };
        let report = reconcile::reconcile(cluster, desired, &objects, &previous, &opts).await;
        self.save_inventory(&report.inventory).await?;
        // A connection-level failure on every object means the API server is
        // unreachable: drop the client so the next pass reconnects, and
        // reopen the rollout window then (an outage is not the release's).
        if !report.errors.is_empty() && report.errors.iter().all(|e| e.code == 0) {
            *guard = None;
            if let Ok(mut r) = self.rollout.lock() {
                *r = None;
            }
            let outcome = Outcome::Progressing {
                reason: "API server unreachable".into(),
                requeue_after: None,
            };
            return Ok((report, outcome));
        }
        let (health, stopped) = match report.stopped.clone() {
            Some((wave, h)) => (h, Some(wave)),
            None => (
                reconcile::overall(&reconcile::health(cluster, &objects).await),
                None,
            ),
        };
        let rolling_out = since.map(|t| tokio::time::Instant::now().saturating_duration_since(t));
        let outcome = progress::decide(health, stopped, rolling_out, self.health_timeout);
        if outcome.settles() {
            if let Ok(mut r) = self.rollout.lock() {
                *r = None;
            }
        }
        let health = outcome.health();
        let drift_total = {
            let mut last = self
                .last
                .lock()
                .map_err(|_| TargetError::Unsupported("poisoned".into()))?;
            last.sequence = desired.sequence;
            last.health = Some(health.clone());
            last.drift_total += report.drift_corrected as u64;
            last.drift_total
        };
        if let Err(e) = write_status(
            cluster,
            &self.config.namespace,
            &self.agent_id,
            desired,
            &report,
            &health,
            drift_total,
        )
        .await
        {
            tracing::warn!(error = %e, "cannot write the status ConfigMap");
        }
        Ok((report, outcome))
    }
}

async fn write_status(
    cluster: &mut Cluster,
    namespace: &str,
    agent_id: &cairn_core::AgentId,
    desired: &DesiredState,
    report: &KubeReport,
    health: &Health,
    drift_total: u64,
) -> Result<(), cluster::ObjectError> {
    let (health_word, detail) = match health {
        Health::Healthy => ("Healthy", String::new()),
        Health::Progressing(m) => ("Progressing", m.clone()),
        Health::Failed(m) => ("Failed", m.clone()),
    };
    let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    let cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": STATUS_CONFIGMAP,
            "namespace": namespace,
            "labels": {plan::MANAGED_BY_LABEL: plan::MANAGER, "app.kubernetes.io/name": "cairn-agent"},
        },
        "data": {
            "agentId": agent_id.as_str(),
            "channel": desired.channel,
            "appliedSequence": desired.sequence.to_string(),
            "bundle": desired.bundle,
            "health": health_word,
            "healthDetail": detail,
            "lastReconcile": crate::unix_now().to_string(),
            "objects": desired.entries.len().to_string(),
            "driftCorrections": drift_total.to_string(),
            "errors": errors.join("\n"),
            "failedRelease": desired
                .failed_release
                .as_ref()
                .map(|(seq, why)| format!("{seq}: {why}"))
                .unwrap_or_default(),
        },
    });
    let r = plan::ObjectRef::from_object(&cm).map_err(|m| cluster::ObjectError {
        object: STATUS_CONFIGMAP.into(),
        code: 0,
        message: m,
    })?;
    cluster.apply(&r, &cm, true).await.map(|_| ())
}

impl Target for KubernetesTarget {
    fn describe(&self) -> String {
        match &self.config.kubeconfig {
            Some(p) => format!("kubernetes ({})", p.display()),
            None => "kubernetes (in-cluster)".into(),
        }
    }

    fn apply(&self, desired: Arc<DesiredState>) -> BoxFuture<'_, Result<ApplyReport, TargetError>> {
        Box::pin(async move {
            let (report, outcome) = self.pass(&desired).await?;
            let mut conflicts: Vec<String> =
                report.errors.iter().map(ToString::to_string).collect();
            let (mut unhealthy, mut requeue_after) = (None, None);
            match outcome {
                Outcome::Healthy => {}
                Outcome::Progressing {
                    reason,
                    requeue_after: after,
                } => {
                    conflicts.push(format!("not yet healthy: {reason}"));
                    requeue_after = after;
                }
                Outcome::Failed(m) => unhealthy = Some(m),
            }
            Ok(ApplyReport {
                created: report.created,
                updated: report.updated,
                deleted: report.pruned,
                drift_corrected: report.drift_corrected,
                unchanged: report.unchanged,
                conflicts,
                unhealthy,
                requeue_after,
            })
        })
    }
}
