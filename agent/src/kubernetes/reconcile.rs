//! One reconcile pass against a cluster: apply in order what is missing or
//! drifted, prune what the release dropped, and read back health.

use super::cluster::{Cluster, ObjectError};
use super::plan::{self, Health, InventoryItem, ObjectRef};
use std::time::Duration;

/// What one pass did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct KubeReport {
    /// Objects created (not in the previous inventory).
    pub created: usize,
    /// Objects the new release changed.
    pub updated: usize,
    /// Objects of the previous inventory that were changed or deleted by
    /// someone else and were put back.
    pub drift_corrected: usize,
    /// Objects whose live state already matched.
    pub unchanged: usize,
    /// Objects deleted because the release no longer has them.
    pub pruned: usize,
    /// Per-object failures; the pass carries on past each.
    pub errors: Vec<ObjectError>,
    /// The inventory to persist: every desired object, plus earlier objects
    /// whose pruning failed (so it is retried).
    pub inventory: Vec<InventoryItem>,
    /// Set when a wave did not become healthy (or had apply errors) and
    /// the later waves were not applied: the wave's number and health.
    /// Nothing is pruned then.
    pub stopped: Option<(i32, Health)>,
}

/// Options for a pass.
#[derive(Clone, Debug)]
pub struct PassOptions {
    /// Channel label value.
    pub channel: String,
    /// Take over fields other managers own (server-side apply `force`).
    pub force: bool,
    /// How long to wait for a CRD to be established.
    pub crd_timeout: Duration,
    /// Until when a wave may take to become healthy before the next one
    /// starts (waves after it are not applied if it does not).
    pub wave_deadline: tokio::time::Instant,
}

pub use cairn_plan::diff::{desired_objects, plan, KubeObject, PlanReport};

/// Applies `desired` wave by wave (each in apply order) where missing or
/// drifted, then prunes. Every wave but the last must become healthy
/// (Jobs: complete) by `opts.wave_deadline` before the next is applied;
/// otherwise the pass stops there ([`KubeReport::stopped`]).
pub async fn reconcile(
    cluster: &mut Cluster,
    desired: &[KubeObject],
    previous: &[InventoryItem],
    opts: &PassOptions,
) -> KubeReport {
    let mut report = KubeReport::default();
    let refs: Vec<ObjectRef> = desired.iter().map(|d| d.object.clone()).collect();
    let known: std::collections::BTreeMap<&ObjectRef, &str> = previous
        .iter()
        .map(|i| (&i.object, i.address.as_str()))
        .collect();
    let numbers: Vec<i32> = desired.iter().map(|d| d.wave).collect();
    let waves = plan::waves(&refs, &numbers);
    let last = waves.len().saturating_sub(1);
    for (n, wave) in waves.iter().enumerate() {
        let errors_before = report.errors.len();
        apply_wave(cluster, desired, &wave.objects, &known, opts, &mut report).await;
        if n == last {
            break;
        }
        let health = if report.errors.len() > errors_before {
            Health::Progressing(format!(
                "wave {} had apply errors; later waves wait",
                wave.number
            ))
        } else {
            wait_wave(cluster, desired, &wave.objects, opts.wave_deadline).await
        };
        if health != Health::Healthy {
            tracing::warn!(
                wave = wave.number,
                ?health,
                "wave not healthy: later waves not applied"
            );
            // Keep owning everything: the earlier inventory (not pruned)
            // and every desired object (some applied).
            let mut inventory = previous.to_vec();
            for d in desired {
                if !inventory.iter().any(|i| i.object == d.object) {
                    inventory.push(InventoryItem {
                        object: d.object.clone(),
                        prunable: plan::prunable(&d.value),
                        address: String::new(),
                    });
                }
            }
            report.inventory = inventory;
            report.stopped = Some((wave.number, health));
            return report;
        }
    }
    report.inventory = desired
        .iter()
        .map(|d| InventoryItem {
            object: d.object.clone(),
            prunable: plan::prunable(&d.value),
            address: d.address.clone(),
        })
        .collect();
    for r in plan::prune_set(previous, &refs) {
        match cluster.delete(&r).await {
            Ok(true) => report.pruned += 1,
            Ok(false) => {}
            Err(e) => {
                report.errors.push(e);
                report.inventory.push(InventoryItem {
                    object: r,
                    prunable: true,
                    address: String::new(),
                });
            }
        }
    }
    report
}

/// Polls the health of one wave's objects until all are healthy, one
/// failed, or `deadline` passes (then: the first still progressing).
async fn wait_wave(
    cluster: &mut Cluster,
    desired: &[KubeObject],
    wave: &[usize],
    deadline: tokio::time::Instant,
) -> Health {
    let objects: Vec<KubeObject> = wave.iter().map(|i| desired[*i].clone()).collect();
    loop {
        let h = overall(&health(cluster, &objects).await);
        match h {
            Health::Progressing(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            h => return h,
        }
    }
}

/// Applies the objects `wave` (indices into `desired`, in apply order).
async fn apply_wave(
    cluster: &mut Cluster,
    desired: &[KubeObject],
    wave: &[usize],
    known: &std::collections::BTreeMap<&ObjectRef, &str>,
    opts: &PassOptions,
    report: &mut KubeReport,
) {
    for &i in wave {
        let KubeObject {
            object: r,
            value: obj,
            address,
            ..
        } = &desired[i];
        // An unknown kind (CRD not yet there) or a read error: try the
        // apply, which reports the definitive error.
        let live = cluster.get(r).await.unwrap_or_default();
        let needs_apply = match &live {
            None => true,
            Some(l) => !plan::drift(obj, l).is_empty(),
        };
        if !needs_apply {
            report.unchanged += 1;
        } else {
            match cluster.apply(r, obj, opts.force).await {
                Ok(_) => match known.get(r) {
                    None => report.created += 1,
                    Some(a) if a == address => report.drift_corrected += 1,
                    Some(_) => report.updated += 1,
                },
                Err(e) => {
                    tracing::warn!(object = %e.object, code = e.code, "apply failed: {}", e.message);
                    report.errors.push(e);
                    continue;
                }
            }
        }
        if r.phase() == 1 {
            if let Err(e) = cluster.wait_established(r, opts.crd_timeout).await {
                report.errors.push(e);
            }
        }
    }
}

/// Reads the health of every object of `desired`. Objects that cannot be
/// read count as progressing, with the error as the reason.
pub async fn health(cluster: &mut Cluster, desired: &[KubeObject]) -> Vec<(ObjectRef, Health)> {
    let mut out = Vec::with_capacity(desired.len());
    for KubeObject { object: r, .. } in desired {
        let h = match cluster.get(r).await {
            Ok(Some(live)) => plan::health(r, &live),
            Ok(None) => Health::Progressing("not found".into()),
            Err(e) => Health::Progressing(e.to_string()),
        };
        out.push((r.clone(), h));
    }
    out
}

/// Summarises health: `Healthy` only if every object is; the first failure
/// otherwise, else the first object still progressing.
pub fn overall(health: &[(ObjectRef, Health)]) -> Health {
    if let Some((r, Health::Failed(m))) =
        health.iter().find(|(_, h)| matches!(h, Health::Failed(_)))
    {
        return Health::Failed(format!("{}: {m}", r.display()));
    }
    if let Some((r, Health::Progressing(m))) = health
        .iter()
        .find(|(_, h)| matches!(h, Health::Progressing(_)))
    {
        return Health::Progressing(format!("{}: {m}", r.display()));
    }
    Health::Healthy
}
