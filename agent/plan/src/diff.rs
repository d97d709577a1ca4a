//! What applying a bundle would change on a live cluster, without changing
//! it: the objects to create, the fields a server-side apply would change
//! (from a `dryRun=All` apply with field manager `cairn`), and the objects
//! to prune. `cairn diff` and `cairn-agent plan` both print a
//! [`PlanReport`].

use crate::cluster::{Cluster, ObjectError};
use crate::plan::{self, InventoryItem, ObjectRef};
use serde_json::Value;

/// One object to apply.
#[derive(Clone, Debug)]
pub struct KubeObject {
    /// Which object.
    pub object: ObjectRef,
    /// Its desired state, with Cairn's labels.
    pub value: Value,
    /// Address of its canonical bytes in the bundle.
    pub address: String,
    /// Its `cairn.dev/wave`.
    pub wave: i32,
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
            let wave = plan::wave_of(&r, &v)?;
            plan::decorate(&mut v, channel);
            Ok(KubeObject {
                object: r,
                value: v,
                address: (*address).to_owned(),
                wave,
            })
        })
        .collect()
}

/// What applying a bundle would do (`cairn-agent plan`).
#[derive(Clone, Debug, Default)]
pub struct PlanReport {
    /// Objects that do not exist yet.
    pub create: Vec<ObjectRef>,
    /// Objects an apply would change, with the fields.
    pub change: Vec<(ObjectRef, Vec<plan::FieldChange>)>,
    /// Objects of the inventory the bundle no longer has.
    pub prune: Vec<ObjectRef>,
    /// Secrets the bundle carries as `AgeSecret`s: decrypted only at each
    /// site, so not compared (and never pruned here). Not a change.
    pub not_compared: Vec<ObjectRef>,
}

impl PlanReport {
    /// Whether applying would change anything.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.change.is_empty() && self.prune.is_empty()
    }

    /// Stable text: one line per object (`create`, `change`, `prune`, in
    /// apply order), changed fields indented below. Values from the
    /// cluster and the bundle are escaped.
    pub fn render(&self) -> String {
        use cairn_keys::text::escape_untrusted as esc;
        let show = |v: &Option<Value>| match v {
            None => "(absent)".to_owned(),
            Some(v) => esc(&v.to_string()),
        };
        let mut out = String::new();
        for r in &self.create {
            out.push_str(&format!("create {}\n", esc(&r.display())));
        }
        for (r, fields) in &self.change {
            out.push_str(&format!("change {}\n", esc(&r.display())));
            for f in fields {
                out.push_str(&format!(
                    "  {}: {} -> {}\n",
                    esc(&f.path),
                    show(&f.before),
                    show(&f.after)
                ));
            }
        }
        for r in &self.prune {
            out.push_str(&format!("prune {}\n", esc(&r.display())));
        }
        // Only alongside changes: an empty report stays empty.
        if !out.is_empty() {
            for r in &self.not_compared {
                out.push_str(&format!(
                    "not compared {} (an AgeSecret, decrypted at each site)\n",
                    esc(&r.display())
                ));
            }
        }
        out
    }
}

/// Compares `desired` with the live cluster without changing it: missing
/// objects are created, existing ones are compared with a server-side
/// apply dry run (both minus server-maintained fields), and `previous`
/// objects the bundle dropped are pruned. The first API error stops it.
pub async fn plan(
    cluster: &mut Cluster,
    desired: &[KubeObject],
    previous: &[InventoryItem],
    force: bool,
) -> Result<PlanReport, ObjectError> {
    let mut report = PlanReport::default();
    let refs: Vec<ObjectRef> = desired.iter().map(|d| d.object.clone()).collect();
    let numbers: Vec<i32> = desired.iter().map(|d| d.wave).collect();
    for wave in plan::waves(&refs, &numbers) {
        for i in wave.objects {
            let d = &desired[i];
            let live = match cluster.get(&d.object).await {
                Ok(l) => l,
                // The kind does not exist yet (its CRD is in this bundle).
                Err(e) if e.code == 404 => None,
                Err(e) => return Err(e),
            };
            let Some(mut live) = live else {
                report.create.push(d.object.clone());
                continue;
            };
            let mut after = cluster.apply_dry_run(&d.object, &d.value, force).await?;
            plan::strip_server_fields(&mut live);
            plan::strip_server_fields(&mut after);
            let fields = plan::changes(&live, &after);
            if !fields.is_empty() {
                report.change.push((d.object.clone(), fields));
            }
        }
    }
    report.prune = plan::prune_set(previous, &refs);
    Ok(report)
}

/// The label selector of the objects a channel's releases put on a
/// cluster: `app.kubernetes.io/managed-by=cairn,cairn.dev/channel=CHANNEL`.
pub fn channel_selector(channel: &str) -> String {
    format!(
        "{}={},{}={channel}",
        plan::MANAGED_BY_LABEL,
        plan::MANAGER,
        plan::CHANNEL_LABEL
    )
}

/// The inventory of a channel read from the cluster itself, for callers
/// without the agent's store (`cairn diff`): every object labelled by
/// [`channel_selector`], prunable unless it carries
/// `cairn.dev/prune: disabled`. The second value names kinds that could
/// not be listed (see [`Cluster::list_labelled`]).
pub async fn cluster_inventory(
    cluster: &mut Cluster,
    channel: &str,
) -> Result<(Vec<InventoryItem>, Vec<String>), ObjectError> {
    let (objects, skipped) = cluster.list_labelled(&channel_selector(channel)).await?;
    let mut items: Vec<InventoryItem> = objects
        .iter()
        .filter_map(|o| {
            ObjectRef::from_object(o).ok().map(|r| InventoryItem {
                object: r,
                prunable: plan::prunable(o),
                address: String::new(),
            })
        })
        .collect();
    items.sort_by(|a, b| a.object.cmp(&b.object));
    items.dedup_by(|a, b| a.object == b.object);
    Ok((items, skipped))
}

/// Splits Cairn's own documents (`apiVersion: cairn.dev/...`:
/// `CairnValues`, `AgeSecret`) from the Kubernetes objects of a bundle's
/// canonical objects. The agent renders them per site (docs/SITES.md) and
/// never applies them as they are, so a diff must not either. Returns the
/// Kubernetes objects, and the Secrets the `AgeSecret`s become (an
/// `AgeSecret`'s plaintext is a Secret of its own name and namespace):
/// those cannot be compared without the site's key, and must not be
/// reported as pruned. Objects that do not parse stay in the first list,
/// so [`desired_objects`] reports them.
pub fn split_site_documents<'a>(
    raw: &[(&'a [u8], &'a str)],
) -> (Vec<(&'a [u8], &'a str)>, Vec<ObjectRef>) {
    let mut objects = Vec::with_capacity(raw.len());
    let mut secrets = Vec::new();
    for &(bytes, address) in raw {
        let v: Option<Value> = serde_json::from_slice(bytes).ok();
        let api = v
            .as_ref()
            .and_then(|v| v.pointer("/apiVersion"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if !api.starts_with("cairn.dev/") {
            objects.push((bytes, address));
            continue;
        }
        let s = |ptr: &str| {
            v.as_ref()
                .and_then(|v| v.pointer(ptr))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        if s("/kind") == "AgeSecret" {
            let ns = s("/metadata/namespace");
            secrets.push(ObjectRef {
                group: String::new(),
                version: "v1".into(),
                kind: "Secret".into(),
                namespace: if ns.is_empty() { "default".into() } else { ns },
                name: s("/metadata/name"),
            });
        }
    }
    (objects, secrets)
}

/// [`plan()`] for a whole bundle: Cairn's own documents split off first
/// ([`split_site_documents`]); the Secrets of `AgeSecret`s are reported
/// as not compared and never as pruned.
pub async fn plan_bundle(
    cluster: &mut Cluster,
    raw: &[(&[u8], &str)],
    channel: &str,
    previous: &[InventoryItem],
    force: bool,
) -> Result<PlanReport, String> {
    let (objects, secrets) = split_site_documents(raw);
    let desired = desired_objects(&objects, channel)?;
    let mut report = plan(cluster, &desired, previous, force)
        .await
        .map_err(|e| e.to_string())?;
    let same = |a: &ObjectRef, b: &ObjectRef| {
        let ns = |r: &ObjectRef| {
            if r.namespace.is_empty() {
                "default".to_owned()
            } else {
                r.namespace.clone()
            }
        };
        a.group == b.group && a.kind == b.kind && a.name == b.name && ns(a) == ns(b)
    };
    report.prune.retain(|p| !secrets.iter().any(|s| same(p, s)));
    report.not_compared = secrets;
    Ok(report)
}
