//! Pure planning for the Kubernetes target: which objects to apply in which
//! order, which to prune, whether a live object drifted, whether it is
//! healthy.
//!
//! **Architecture invariant:** this module knows JSON objects and nothing
//! else: no kube client, no clock, no IO. The shell in
//! [`crate::cluster`] carries out what it decides.

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
/// Annotation ordering apply and health gating in waves:
/// `cairn.dev/wave: "N"` (an integer, default 0, negative allowed).
pub const WAVE_ANNOTATION: &str = "cairn.dev/wave";

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

/// The wave of a desired object: its `cairn.dev/wave` annotation, 0
/// without one. A value that is not a decimal integer (optionally
/// signed, at most 9 digits) is an error naming the object.
pub fn wave_of(r: &ObjectRef, obj: &Value) -> Result<i32, String> {
    let Some(v) = obj
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(WAVE_ANNOTATION))
    else {
        return Ok(0);
    };
    let bad = |shown: &str| {
        format!(
            "{}: annotation {WAVE_ANNOTATION} must be an integer such as \"-1\" or \"2\", not {shown}",
            r.display()
        )
    };
    let Some(s) = v.as_str() else {
        return Err(bad(&v.to_string()));
    };
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(&format!("{s:?}")));
    }
    s.parse::<i32>().map_err(|_| bad(&format!("{s:?}")))
}

/// One wave: its number and the indices of its objects in apply order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wave {
    /// The `cairn.dev/wave` value shared by its objects.
    pub number: i32,
    /// Indices into the objects passed to [`waves`], in apply order.
    pub objects: Vec<usize>,
}

/// Groups objects into waves, lowest number first; inside a wave the
/// built-in kind order ([`apply_order`]) applies. `waves[i]` is the wave
/// of `objects[i]`. Without annotations there is one wave (0).
pub fn waves(objects: &[ObjectRef], waves: &[i32]) -> Vec<Wave> {
    let mut out: Vec<Wave> = Vec::new();
    let mut idx = apply_order(objects);
    // Stable: keeps the kind order inside each wave.
    idx.sort_by_key(|i| waves.get(*i).copied().unwrap_or(0));
    for i in idx {
        let n = waves.get(i).copied().unwrap_or(0);
        match out.last_mut() {
            Some(w) if w.number == n => w.objects.push(i),
            _ => out.push(Wave {
                number: n,
                objects: vec![i],
            }),
        }
    }
    out
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

/// Removes what the server maintains (`managedFields`, `resourceVersion`,
/// `generation`, `status`) so a live object and a dry-run result compare
/// on what an apply changes.
pub fn strip_server_fields(obj: &mut Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in ["managedFields", "resourceVersion", "generation"] {
            m.remove(k);
        }
    }
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
}

/// One field an apply would change: its JSON pointer and the values
/// before and after (`None`: absent).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldChange {
    /// JSON pointer.
    pub path: String,
    /// Live value.
    pub before: Option<Value>,
    /// Value after the apply.
    pub after: Option<Value>,
}

/// Every field that differs between `live` and `after` (both already
/// stripped), in a stable order (object keys sorted, list items by
/// index; lists of different length compare element-wise and report the
/// extra items).
pub fn changes(live: &Value, after: &Value) -> Vec<FieldChange> {
    let mut out = Vec::new();
    changes_into(Some(live), Some(after), &mut String::new(), &mut out);
    out
}

fn changes_into(
    before: Option<&Value>,
    after: Option<&Value>,
    path: &mut String,
    out: &mut Vec<FieldChange>,
) {
    match (before, after) {
        (Some(Value::Object(b)), Some(Value::Object(a))) => {
            let keys: std::collections::BTreeSet<&String> = b.keys().chain(a.keys()).collect();
            for k in keys {
                let len = path.len();
                path.push('/');
                path.push_str(&k.replace('~', "~0").replace('/', "~1"));
                changes_into(b.get(k), a.get(k), path, out);
                path.truncate(len);
            }
        }
        (Some(Value::Array(b)), Some(Value::Array(a))) => {
            for i in 0..b.len().max(a.len()) {
                let len = path.len();
                path.push_str(&format!("/{i}"));
                changes_into(b.get(i), a.get(i), path, out);
                path.truncate(len);
            }
        }
        (Some(Value::Number(b)), Some(Value::Number(a))) if b.as_f64() == a.as_f64() => {}
        (b, a) if b == a => {}
        (b, a) => out.push(FieldChange {
            path: path.clone(),
            before: b.cloned(),
            after: a.cloned(),
        }),
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

    fn waved(api: &str, kind: &str, name: &str, wave: Option<&str>) -> Value {
        let mut o = json!({"apiVersion": api, "kind": kind,
            "metadata": {"name": name, "namespace": "a"}});
        if let Some(w) = wave {
            o["metadata"]["annotations"] = json!({WAVE_ANNOTATION: w});
        }
        o
    }

    #[test]
    fn waves_order_by_number_then_kind() {
        let objs = [
            waved("v1", "ConfigMap", "after", Some("1")),
            waved("batch/v1", "Job", "migrate", None),
            waved("v1", "ConfigMap", "plain", None),
            waved("v1", "Namespace", "a", Some("-1")),
            waved("v1", "Secret", "late", Some("+1")),
        ];
        let refs: Vec<ObjectRef> = objs
            .iter()
            .map(|o| ObjectRef::from_object(o).unwrap())
            .collect();
        let nums: Vec<i32> = objs
            .iter()
            .zip(&refs)
            .map(|(o, r)| wave_of(r, o).unwrap())
            .collect();
        assert_eq!(nums, [1, 0, 0, -1, 1]);
        let w = waves(&refs, &nums);
        let names: Vec<(i32, Vec<&str>)> = w
            .iter()
            .map(|w| {
                (
                    w.number,
                    w.objects.iter().map(|i| refs[*i].name.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                (-1, vec!["a"]),
                (0, vec!["plain", "migrate"]),
                (1, vec!["after", "late"]),
            ]
        );
        // No annotations: one wave in the built-in order.
        assert_eq!(waves(&refs, &[0; 5]).len(), 1);
    }

    #[test]
    fn changes_are_field_level_and_ignore_server_fields() {
        let mut live = json!({"metadata": {"name": "x", "resourceVersion": "7", "generation": 2,
            "managedFields": [{"manager": "cairn"}], "labels": {"a": "1"}},
            "data": {"k": "v", "gone": "g"}, "status": {"x": 1}});
        let mut after = json!({"metadata": {"name": "x", "resourceVersion": "8", "generation": 3,
            "labels": {"a": "1", "b": "2"}}, "data": {"k": "w"}});
        strip_server_fields(&mut live);
        strip_server_fields(&mut after);
        let c = changes(&live, &after);
        let paths: Vec<&str> = c.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["/data/gone", "/data/k", "/metadata/labels/b"]);
        assert_eq!(c[0].after, None);
        assert_eq!(c[1].before, Some(json!("v")));
        assert_eq!(c[1].after, Some(json!("w")));
        assert!(changes(&live, &live.clone()).is_empty());
    }

    #[test]
    fn bad_wave_values_name_the_object() {
        for bad in [
            json!("1.5"),
            json!(""),
            json!("x"),
            json!(3),
            json!("9999999999"),
            json!("-"),
        ] {
            let mut o = waved("v1", "ConfigMap", "c", None);
            o["metadata"]["annotations"] = json!({WAVE_ANNOTATION: bad});
            let r = ObjectRef::from_object(&o).unwrap();
            let e = wave_of(&r, &o).unwrap_err();
            assert!(
                e.starts_with("ConfigMap a/c: annotation cairn.dev/wave"),
                "{e}"
            );
        }
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
