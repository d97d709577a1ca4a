//! Pure planning for the Kubernetes target: which objects to apply in which
//! order, which to prune, whether a live object drifted, whether it is
//! healthy.
//!
//! **Architecture invariant:** this module knows JSON objects and nothing
//! else: no kube client, no clock, no IO. The shell in
//! [`super::cluster`] carries out what it decides.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::cmp::Ordering;

/// Label put on every object Cairn applies.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`], also the server-side apply field manager.
pub const MANAGER: &str = "cairn";
/// Label carrying the channel whose release put the object there.
pub const CHANNEL_LABEL: &str = "cairn.dev/channel";
/// Annotation that keeps an object when a later release drops it:
/// `cairn.dev/prune: "disabled"`.
pub const PRUNE_ANNOTATION: &str = "cairn.dev/prune";

/// Identifies one Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    /// API group, `""` for core.
    pub group: String,
    /// API version within the group (`v1`).
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Namespace, `""` for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// Reads apiVersion, kind, metadata.namespace and metadata.name.
    pub fn from_object(obj: &Value) -> Result<Self, String> {
        let s = |ptr: &str| obj.pointer(ptr).and_then(Value::as_str).unwrap_or("");
        let api_version = s("/apiVersion");
        let kind = s("/kind");
        let name = s("/metadata/name");
        if api_version.is_empty() || kind.is_empty() || name.is_empty() {
            return Err("object lacks apiVersion, kind or metadata.name".into());
        }
        let (group, version) = match api_version.rsplit_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (String::new(), api_version.to_owned()),
        };
        Ok(Self {
            group,
            version,
            kind: kind.to_owned(),
            namespace: s("/metadata/namespace").to_owned(),
            name: name.to_owned(),
        })
    }

    /// `apiVersion` as written in objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `Kind ns/name` or `Kind name`, for messages.
    pub fn display(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }

    /// Apply phase: namespaces, then CRDs, then other cluster-scoped
    /// objects, then namespaced objects. Deletes run in reverse.
    pub fn phase(&self) -> u8 {
        match (self.group.as_str(), self.kind.as_str()) {
            ("", "Namespace") => 0,
            ("apiextensions.k8s.io", "CustomResourceDefinition") => 1,
            _ if self.namespace.is_empty() => 2,
            _ => 3,
        }
    }

    fn order(&self, other: &Self) -> Ordering {
        (self.phase(), self).cmp(&(other.phase(), other))
    }
}

/// One object the release wants, with whether a later release may prune it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryItem {
    /// The object.
    pub object: ObjectRef,
    /// False when the object carries `cairn.dev/prune: disabled`.
    pub prunable: bool,
    /// Address of the desired bytes last applied (tells a release's update
    /// from drift).
    #[serde(default)]
    pub address: String,
}

/// Adds Cairn's labels to a desired object (in place).
pub fn decorate(obj: &mut Value, channel: &str) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let labels = meta
        .entry("labels")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(l) = labels.as_object_mut() {
        l.insert(MANAGED_BY_LABEL.into(), Value::String(MANAGER.into()));
        l.insert(CHANNEL_LABEL.into(), Value::String(channel.into()));
    }
}

/// Whether the object opts out of pruning.
pub fn prunable(obj: &Value) -> bool {
    obj.pointer("/metadata/annotations")
        .and_then(|a| a.get(PRUNE_ANNOTATION))
        .and_then(Value::as_str)
        != Some("disabled")
}

/// Indices of `objects` in apply order.
pub fn apply_order(objects: &[ObjectRef]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..objects.len()).collect();
    idx.sort_by(|a, b| objects[*a].order(&objects[*b]));
    idx
}

/// Objects of the previous inventory that the new release no longer has and
/// that may be pruned, in delete order (the reverse of apply order).
pub fn prune_set(previous: &[InventoryItem], desired: &[ObjectRef]) -> Vec<ObjectRef> {
    let keep: std::collections::BTreeSet<(&str, &str, &str, &str)> = desired
        .iter()
        .map(|o| {
            (
                o.group.as_str(),
                o.kind.as_str(),
                o.namespace.as_str(),
                o.name.as_str(),
            )
        })
        .collect();
    let mut out: Vec<ObjectRef> = previous
        .iter()
        .filter(|i| i.prunable)
        .map(|i| &i.object)
        .filter(|o| {
            !keep.contains(&(
                o.group.as_str(),
                o.kind.as_str(),
                o.namespace.as_str(),
                o.name.as_str(),
            ))
        })
        .cloned()
        .collect();
    out.sort_by(|a, b| b.order(a));
    out.dedup();
    out
}

/// Fields of `desired` whose live value differs, as JSON pointers. Only
/// fields Cairn sends are compared (the ones its field manager owns);
/// fields the server or other managers add are not drift. Lists compare as
/// a whole, as server-side apply treats atomic lists.
pub fn drift(desired: &Value, live: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_into(desired, live, &mut String::new(), &mut out);
    out
}

fn diff_into(desired: &Value, live: &Value, path: &mut String, out: &mut Vec<String>) {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => {
            for (k, dv) in d {
                let len = path.len();
                path.push('/');
                path.push_str(&k.replace('~', "~0").replace('/', "~1"));
                match l.get(k) {
                    Some(lv) => diff_into(dv, lv, path, out),
                    None if dv.is_null() => {}
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(d), Value::Array(l)) => {
            // Compare element-wise on the fields Cairn sends: the server
            // fills defaults inside list items (e.g. container ports'
            // protocol), which is not drift.
            if d.len() != l.len() {
                out.push(path.clone());
                return;
            }
            for (i, (dv, lv)) in d.iter().zip(l).enumerate() {
                let len = path.len();
                path.push_str(&format!("/{i}"));
                diff_into(dv, lv, path, out);
                path.truncate(len);
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            if a.as_f64() != b.as_f64() {
                out.push(path.clone());
            }
        }
        (d, l) => {
            if d != l {
                out.push(path.clone());
            }
        }
    }
}

/// How healthy an applied object is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    /// Ready.
    Healthy,
    /// Not yet; may still become ready.
    Progressing(String),
    /// Will not become ready without a change.
    Failed(String),
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

fn condition_is(obj: &Value, kind: &str, status: &str) -> bool {
    condition(obj, kind)
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some(status)
}

fn int(obj: &Value, ptr: &str) -> i64 {
    obj.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

/// Health of a live object: workload rollouts complete, Job complete, CRD
/// established, or a generic `Ready` condition; anything else is healthy
/// once it exists.
pub fn health(r: &ObjectRef, live: &Value) -> Health {
    let generation = int(live, "/metadata/generation");
    let observed = int(live, "/status/observedGeneration");
    let stale = observed < generation;
    let wanted = live
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let progressing = |what: String| Health::Progressing(what);
    match (r.group.as_str(), r.kind.as_str()) {
        ("apps", "Deployment") => {
            if condition(live, "Progressing")
                .and_then(|c| c.get("reason"))
                .and_then(Value::as_str)
                == Some("ProgressDeadlineExceeded")
            {
                return Health::Failed("progress deadline exceeded".into());
            }
            let available = int(live, "/status/availableReplicas");
            let updated = int(live, "/status/updatedReplicas");
            if stale {
                progressing("waiting for the controller to observe the new generation".into())
            } else if updated < wanted || available < wanted {
                progressing(format!(
                    "{available}/{wanted} replicas available, {updated} updated"
                ))
            } else {
                Health::Healthy
            }
        }
        ("apps", "StatefulSet") => {
            let ready = int(live, "/status/readyReplicas");
            let updated = int(live, "/status/updatedReplicas");
            if stale || ready < wanted || updated < wanted {
                progressing(format!(
                    "{ready}/{wanted} replicas ready, {updated} updated"
                ))
            } else {
                Health::Healthy
            }
        }
        ("apps", "DaemonSet") => {
            let desired = int(live, "/status/desiredNumberScheduled");
            let ready = int(live, "/status/numberReady");
            let updated = int(live, "/status/updatedNumberScheduled");
            if stale || ready < desired || updated < desired {
                progressing(format!("{ready}/{desired} pods ready, {updated} updated"))
            } else {
                Health::Healthy
            }
        }
        ("batch", "Job") => {
            if condition_is(live, "Complete", "True") {
                Health::Healthy
            } else if condition_is(live, "Failed", "True") {
                Health::Failed("job failed".into())
            } else {
                progressing("job not complete".into())
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if condition_is(live, "Established", "True") {
                Health::Healthy
            } else {
                progressing("not established".into())
            }
        }
        _ => match condition(live, "Ready") {
            Some(_) if condition_is(live, "Ready", "True") => Health::Healthy,
            Some(c) => progressing(format!(
                "Ready is {}",
                c.get("status").and_then(Value::as_str).unwrap_or("unknown")
            )),
            None => Health::Healthy,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn r(api: &str, kind: &str, ns: &str, name: &str) -> ObjectRef {
        ObjectRef::from_object(&json!({"apiVersion": api, "kind": kind,
            "metadata": {"name": name, "namespace": ns}}))
        .unwrap()
    }

    #[test]
    fn apply_order_puts_namespaces_and_crds_first() {
        let objs = vec![
            r("v1", "ConfigMap", "a", "c"),
            r("edge.example.com/v1", "Sensor", "a", "s"),
            r("rbac.authorization.k8s.io/v1", "ClusterRole", "", "cr"),
            r(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "",
                "sensors.edge.example.com",
            ),
            r("v1", "Namespace", "", "a"),
        ];
        let order: Vec<&str> = apply_order(&objs)
            .into_iter()
            .map(|i| objs[i].kind.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "Namespace",
                "CustomResourceDefinition",
                "ClusterRole",
                "ConfigMap",
                "Sensor"
            ]
        );
    }

    #[test]
    fn prune_keeps_desired_and_opted_out_and_deletes_in_reverse() {
        let ns = r("v1", "Namespace", "", "old");
        let cm = r("v1", "ConfigMap", "old", "c");
        let kept = r("v1", "ConfigMap", "a", "keep");
        let pinned = r("v1", "Secret", "a", "pinned");
        let prev = vec![
            InventoryItem {
                object: ns.clone(),
                prunable: true,
                address: String::new(),
            },
            InventoryItem {
                object: cm.clone(),
                prunable: true,
                address: String::new(),
            },
            InventoryItem {
                object: kept.clone(),
                prunable: true,
                address: String::new(),
            },
            InventoryItem {
                object: pinned,
                prunable: false,
                address: String::new(),
            },
        ];
        assert_eq!(prune_set(&prev, &[kept]), vec![cm, ns]);
    }

    #[test]
    fn drift_ignores_server_fields_and_catches_changes() {
        let desired = json!({"metadata": {"name": "x", "labels": {"a": "1"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c", "image": "i:1"}]}}}});
        let mut live = desired.clone();
        live["metadata"]["uid"] = json!("u");
        live["metadata"]["labels"]["other"] = json!("z");
        live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] =
            json!("IfNotPresent");
        live["status"] = json!({"ready": 1});
        assert!(drift(&desired, &live).is_empty());
        live["spec"]["replicas"] = json!(5);
        live["spec"]["template"]["spec"]["containers"][0]["image"] = json!("i:2");
        assert_eq!(
            drift(&desired, &live),
            vec!["/spec/replicas", "/spec/template/spec/containers/0/image"]
        );
        live["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("a");
        assert!(drift(&desired, &live).contains(&"/metadata/labels/a".to_string()));
    }

    #[test]
    fn health_rules() {
        let d = r("apps/v1", "Deployment", "a", "d");
        let mut live = json!({"metadata": {"generation": 2}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, "availableReplicas": 2, "updatedReplicas": 2}});
        assert!(matches!(health(&d, &live), Health::Progressing(_)));
        live["status"]["observedGeneration"] = json!(2);
        assert_eq!(health(&d, &live), Health::Healthy);
        live["status"]["availableReplicas"] = json!(1);
        assert!(matches!(health(&d, &live), Health::Progressing(_)));
        let job = r("batch/v1", "Job", "a", "j");
        let failed = json!({"status": {"conditions": [{"type": "Failed", "status": "True"}]}});
        assert!(matches!(health(&job, &failed), Health::Failed(_)));
        let crd = r(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            "",
            "x.y",
        );
        let est = json!({"status": {"conditions": [{"type": "Established", "status": "True"}]}});
        assert_eq!(health(&crd, &est), Health::Healthy);
        let other = r("edge.example.com/v1", "Sensor", "a", "s");
        let not_ready = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
        assert!(matches!(health(&other, &not_ready), Health::Progressing(_)));
        assert_eq!(health(&other, &json!({})), Health::Healthy);
    }

    #[test]
    fn decorate_and_prune_annotation() {
        let mut o =
            json!({"metadata": {"name": "x", "annotations": {PRUNE_ANNOTATION: "disabled"}}});
        decorate(&mut o, "stable");
        assert_eq!(o["metadata"]["labels"][MANAGED_BY_LABEL], "cairn");
        assert_eq!(o["metadata"]["labels"][CHANNEL_LABEL], "stable");
        assert!(!prunable(&o));
        assert!(prunable(&json!({"metadata": {}})));
    }
}
