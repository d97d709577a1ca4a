//! One reconcile pass against a cluster: apply in order what is missing or
//! drifted, prune what the release dropped, and read back health.

use super::cluster::{Cluster, ObjectError};
use super::plan::{self, Health, InventoryItem, ObjectRef};
use crate::targets::{DesiredState, READ_BATCH};
use serde_json::Value;
use std::sync::Arc;
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
}

/// One object to apply: what a pass needs of it. Its body is read from
/// the desired state (in bounded batches) only when it is applied.
#[derive(Clone, Debug)]
pub struct KubeObject {
    /// Which object.
    pub object: ObjectRef,
    /// Whether it may be pruned (no `cairn.dev/prune: disabled`).
    pub prunable: bool,
    /// Address of its canonical bytes in the bundle.
    pub address: String,
    /// Its `cairn.dev/wave`.
    pub wave: i32,
}

/// Parses canonical object bytes into a desired object with Cairn's labels.
fn decorated(bytes: &[u8], i: usize, channel: &str) -> Result<(ObjectRef, Value), String> {
    let mut v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("object {i}: not JSON: {e}"))?;
    let r = ObjectRef::from_object(&v).map_err(|e| format!("object {i}: {e}"))?;
    plan::decorate(&mut v, channel);
    Ok((r, v))
}

/// Reads the desired objects in batches of [`READ_BATCH`] (blocking) and
/// keeps what a pass needs of each ([`KubeObject`], in entry order); no
/// more than one batch of bodies is held at once.
pub fn desired_objects(desired: &DesiredState) -> Result<Vec<KubeObject>, String> {
    let all: Vec<usize> = (0..desired.entries.len()).collect();
    let mut out = Vec::with_capacity(all.len());
    for chunk in all.chunks(READ_BATCH) {
        let batch = desired.read(chunk).map_err(|e| e.to_string())?;
        for (k, &i) in chunk.iter().enumerate() {
            let (r, v) = decorated(batch.get(k), i, &desired.channel)?;
            let wave = plan::wave_of(&r, &v)?;
            out.push(KubeObject {
                object: r,
                prunable: plan::prunable(&v),
                address: desired
                    .entries
                    .get(i)
                    .map(|e| e.address.to_string())
                    .unwrap_or_default(),
                wave,
            });
        }
    }
    Ok(out)
}

/// The decorated bodies of the desired objects `indices` (at most a batch),
/// read on a blocking thread.
async fn bodies(desired: &Arc<DesiredState>, indices: &[usize]) -> Result<Vec<Value>, String> {
    let (d, idx) = (desired.clone(), indices.to_vec());
    tokio::task::spawn_blocking(move || {
        let batch = d.read(&idx).map_err(|e| e.to_string())?;
        idx.iter()
            .enumerate()
            .map(|(k, &i)| decorated(batch.get(k), i, &d.channel).map(|(_, v)| v))
            .collect()
    })
    .await
    .map_err(|e| format!("reading objects: {e}"))?
}

/// Applies `desired` wave by wave (each in apply order) where missing or
/// drifted, then prunes. Every wave but the last must be healthy (Jobs:
/// complete) before the next is applied; the pass does not wait for it:
/// it stops at the first wave that is not ([`KubeReport::stopped`]), and
/// the next pass, finding the earlier waves unchanged and healthy, goes on
/// from there (`progress::decide` says when).
pub async fn reconcile(
    cluster: &mut Cluster,
    state: &Arc<DesiredState>,
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
        apply_wave(
            cluster,
            state,
            desired,
            &wave.objects,
            &known,
            opts,
            &mut report,
        )
        .await;
        if n == last {
            break;
        }
        let health = if report.errors.len() > errors_before {
            Health::Progressing(format!(
                "wave {} had apply errors; later waves wait",
                wave.number
            ))
        } else {
            wave_health(cluster, desired, &wave.objects).await
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
                        prunable: d.prunable,
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
            prunable: d.prunable,
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

/// The health of one wave's objects, read once.
async fn wave_health(cluster: &mut Cluster, desired: &[KubeObject], wave: &[usize]) -> Health {
    let objects: Vec<KubeObject> = wave.iter().map(|i| desired[*i].clone()).collect();
    overall(&health(cluster, &objects).await)
}

/// Applies the objects `wave` (indices into `desired`, in apply order),
/// reading their bodies one batch at a time.
async fn apply_wave(
    cluster: &mut Cluster,
    state: &Arc<DesiredState>,
    desired: &[KubeObject],
    wave: &[usize],
    known: &std::collections::BTreeMap<&ObjectRef, &str>,
    opts: &PassOptions,
    report: &mut KubeReport,
) {
    for chunk in wave.chunks(READ_BATCH) {
        let values = match bodies(state, chunk).await {
            Ok(v) => v,
            Err(message) => {
                for &i in chunk {
                    report.errors.push(ObjectError {
                        object: desired[i].object.display(),
                        code: 0,
                        message: message.clone(),
                    });
                }
                continue;
            }
        };
        for (&i, obj) in chunk.iter().zip(&values) {
            let KubeObject {
                object: r, address, ..
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
