//! One reconcile pass against a cluster: apply in order what is missing or
//! drifted, prune what the release dropped, and read back health.

use super::cluster::{Cluster, ObjectError};
use super::plan::{self, Health, InventoryItem, ObjectRef};
use serde_json::Value;
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

/// One object to apply.
#[derive(Clone, Debug)]
pub struct KubeObject {
    /// Which object.
    pub object: ObjectRef,
    /// Its desired state, with Cairn's labels.
    pub value: Value,
    /// Address of its canonical bytes in the bundle.
    pub address: String,
}

/// Parses canonical object bytes (with their addresses) into decorated
/// desired objects.
pub fn desired_objects(raw: &[(&[u8], &str)], channel: &str) -> Result<Vec<KubeObject>, String> {
    raw.iter()
        .enumerate()
        .map(|(i, (bytes, address))| {
            let mut v: Value =
                serde_json::from_slice(bytes).map_err(|e| format!("object {i}: not JSON: {e}"))?;
            let r = ObjectRef::from_object(&v).map_err(|e| format!("object {i}: {e}"))?;
            plan::decorate(&mut v, channel);
            Ok(KubeObject {
                object: r,
                value: v,
                address: (*address).to_owned(),
            })
        })
        .collect()
}

/// Applies `desired` (in apply order) where missing or drifted, then prunes.
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
    for i in plan::apply_order(&refs) {
        let KubeObject {
            object: r,
            value: obj,
            address,
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
