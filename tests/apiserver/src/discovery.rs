//! The resource registry (built-in kinds plus kinds served from CRDs) and the
//! discovery documents (`/version`, `/api`, `/apis`, `/api/v1`, `/apis/{g}/{v}`).

use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};

/// The verbs every served resource supports.
pub const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// An additional printer column of a CRD (`kubectl get` table output).
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// OpenAPI type (`string`, `integer`, `date`...).
    pub type_: String,
    /// Simple JSONPath like `.spec.size` (only dotted paths are evaluated).
    pub json_path: String,
}

/// One served resource type.
#[derive(Debug, Clone)]
pub struct ResourceInfo {
    /// API group (`""` for core).
    pub group: String,
    /// Served versions; the first is the preferred (storage) version.
    pub versions: Vec<String>,
    /// Plural resource name (`deployments`).
    pub plural: String,
    /// Singular name (`deployment`).
    pub singular: String,
    /// Kind (`Deployment`).
    pub kind: String,
    /// Whether the resource lives in namespaces.
    pub namespaced: bool,
    /// Short names (`deploy`).
    pub short_names: Vec<String>,
    /// Categories (`all`).
    pub categories: Vec<String>,
    /// Whether a `/status` subresource exists.
    pub status_subresource: bool,
    /// True for compiled-in kinds (false for CRD-defined kinds).
    pub builtin: bool,
    /// CRD additional printer columns.
    pub printer_columns: Vec<PrinterColumn>,
}

impl ResourceInfo {
    /// `group/version` (or just `version` for core).
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    /// Whether `version` is served.
    pub fn serves(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }

    /// The preferred version.
    pub fn preferred_version(&self) -> &str {
        self.versions.first().map(String::as_str).unwrap_or("v1")
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    plural: &str,
    singular: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
    all: bool,
) -> ResourceInfo {
    ResourceInfo {
        group: group.into(),
        versions: vec!["v1".into()],
        plural: plural.into(),
        singular: singular.into(),
        kind: kind.into(),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: if all { vec!["all".into()] } else { vec![] },
        status_subresource: status,
        builtin: true,
        printer_columns: vec![],
    }
}

/// The compiled-in resource types.
pub fn builtins() -> Vec<ResourceInfo> {
    vec![
        builtin(
            "",
            "namespaces",
            "namespace",
            "Namespace",
            false,
            &["ns"],
            true,
            false,
        ),
        builtin(
            "",
            "configmaps",
            "configmap",
            "ConfigMap",
            true,
            &["cm"],
            false,
            false,
        ),
        builtin("", "secrets", "secret", "Secret", true, &[], false, false),
        builtin(
            "",
            "services",
            "service",
            "Service",
            true,
            &["svc"],
            true,
            true,
        ),
        builtin(
            "",
            "serviceaccounts",
            "serviceaccount",
            "ServiceAccount",
            true,
            &["sa"],
            false,
            false,
        ),
        builtin(
            "",
            "persistentvolumeclaims",
            "persistentvolumeclaim",
            "PersistentVolumeClaim",
            true,
            &["pvc"],
            true,
            false,
        ),
        builtin("", "events", "event", "Event", true, &["ev"], false, false),
        builtin(
            "apps",
            "deployments",
            "deployment",
            "Deployment",
            true,
            &["deploy"],
            true,
            true,
        ),
        builtin(
            "apps",
            "statefulsets",
            "statefulset",
            "StatefulSet",
            true,
            &["sts"],
            true,
            true,
        ),
        builtin(
            "apps",
            "daemonsets",
            "daemonset",
            "DaemonSet",
            true,
            &["ds"],
            true,
            true,
        ),
        builtin("batch", "jobs", "job", "Job", true, &[], true, true),
        builtin(
            "rbac.authorization.k8s.io",
            "roles",
            "role",
            "Role",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "rolebindings",
            "rolebinding",
            "RoleBinding",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "clusterroles",
            "clusterrole",
            "ClusterRole",
            false,
            &[],
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            "clusterrolebinding",
            "ClusterRoleBinding",
            false,
            &[],
            false,
            false,
        ),
        builtin(
            "networking.k8s.io",
            "networkpolicies",
            "networkpolicy",
            "NetworkPolicy",
            true,
            &["netpol"],
            false,
            false,
        ),
        builtin(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "customresourcedefinition",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
            false,
        ),
    ]
}

/// Builds the [`ResourceInfo`] a CRD object defines, or an error message
/// describing why the CRD is invalid (`(field, message)`).
pub fn crd_resource(crd: &Value) -> Result<ResourceInfo, (String, String)> {
    let spec = crd
        .get("spec")
        .ok_or(("spec".to_string(), "Required value".to_string()))?;
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let group = s(spec.get("group"));
    let names = spec.get("names").cloned().unwrap_or(json!({}));
    let plural = s(names.get("plural"));
    let kind = s(names.get("kind"));
    if group.is_empty() {
        return Err(("spec.group".into(), "Required value".into()));
    }
    if plural.is_empty() {
        return Err(("spec.names.plural".into(), "Required value".into()));
    }
    if kind.is_empty() {
        return Err(("spec.names.kind".into(), "Required value".into()));
    }
    let name = s(crd.pointer("/metadata/name"));
    if name != format!("{plural}.{group}") {
        return Err((
            "metadata.name".into(),
            format!("Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    let scope = s(spec.get("scope"));
    let namespaced = match scope.as_str() {
        "Namespaced" => true,
        "Cluster" => false,
        _ => {
            return Err((
                "spec.scope".into(),
                format!(
                    "Unsupported value: \"{scope}\": supported values: \"Cluster\", \"Namespaced\""
                ),
            ))
        }
    };
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        return Err((
            "spec.versions".into(),
            "Required value: must have exactly one version marked as storage version".into(),
        ));
    }
    let storage: Vec<&Value> = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .collect();
    if storage.len() != 1 {
        return Err((
            "spec.versions".into(),
            "Invalid value: must have exactly one version marked as storage version".into(),
        ));
    }
    let mut served: Vec<String> = Vec::new();
    let mut status_subresource = false;
    let mut printer_columns = Vec::new();
    // Storage version first (preferred), then the other served ones.
    let mut ordered: Vec<&Value> = storage.clone();
    ordered.extend(
        versions
            .iter()
            .filter(|v| v.get("storage").and_then(Value::as_bool) != Some(true)),
    );
    for v in ordered {
        let vname = s(v.get("name"));
        if vname.is_empty() {
            return Err(("spec.versions[].name".into(), "Required value".into()));
        }
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        if v.pointer("/subresources/status").is_some() {
            status_subresource = true;
        }
        if printer_columns.is_empty() {
            for c in v
                .get("additionalPrinterColumns")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                printer_columns.push(PrinterColumn {
                    name: s(c.get("name")),
                    type_: s(c.get("type")),
                    json_path: s(c.get("jsonPath")),
                });
            }
        }
        served.push(vname);
    }
    let strs = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let singular = match s(names.get("singular")) {
        x if x.is_empty() => kind.to_lowercase(),
        x => x,
    };
    Ok(ResourceInfo {
        group,
        versions: served,
        plural,
        singular,
        kind,
        namespaced,
        short_names: strs(names.get("shortNames")),
        categories: strs(names.get("categories")),
        status_subresource,
        builtin: false,
        printer_columns,
    })
}

/// The `/version` document.
pub fn version_doc() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-cairn-test",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// The `/api` document (`APIVersions`).
pub fn core_versions(addr: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]
    })
}

/// Groups (name → served versions, preferred first) in stable order.
fn groups(resources: &[ResourceInfo]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for r in resources.iter().filter(|r| !r.group.is_empty()) {
        let entry = match out.iter_mut().position(|(g, _)| *g == r.group) {
            Some(i) => &mut out[i].1,
            None => {
                out.push((r.group.clone(), Vec::new()));
                let last = out.len() - 1;
                &mut out[last].1
            }
        };
        for v in &r.versions {
            if !entry.contains(v) {
                entry.push(v.clone());
            }
        }
    }
    out
}

/// The `/apis` document (`APIGroupList`).
pub fn group_list(resources: &[ResourceInfo]) -> Value {
    let groups: Vec<Value> = groups(resources)
        .into_iter()
        .map(|(g, versions)| {
            let vs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            let pref = vs.first().cloned().unwrap_or(json!({}));
            json!({"name": g, "versions": vs, "preferredVersion": pref})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The `/apis/{group}` document (`APIGroup`).
pub fn group_doc(resources: &[ResourceInfo], group: &str) -> ApiResult<Value> {
    let (g, versions) = groups(resources)
        .into_iter()
        .find(|(g, _)| g == group)
        .ok_or_else(ApiError::no_route)?;
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    let pref = vs.first().cloned().unwrap_or(json!({}));
    Ok(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": vs, "preferredVersion": pref}),
    )
}

/// The `APIResourceList` for one group/version, or 404 if nothing is served there.
pub fn resource_list(resources: &[ResourceInfo], group: &str, version: &str) -> ApiResult<Value> {
    let mut list = Vec::new();
    for r in resources
        .iter()
        .filter(|r| r.group == group && r.serves(version))
    {
        let mut e = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
            "storageVersionHash": format!("{:x}", fnv(&format!("{}/{}", r.group, r.plural))),
        });
        if !r.short_names.is_empty() {
            e["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            e["categories"] = json!(r.categories);
        }
        list.push(e);
        if r.builtin && (r.kind == "Deployment" || r.kind == "StatefulSet") {
            list.push(json!({
                "name": format!("{}/scale", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        if r.status_subresource {
            list.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if list.is_empty() {
        return Err(ApiError::no_route());
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Ok(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
    )
}

/// A tiny FNV-1a hash (for stable fake hashes).
pub fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_parse() {
        let crd = json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}}}]}
        });
        let r = crd_resource(&crd).expect("valid");
        assert_eq!(r.plural, "widgets");
        assert_eq!(r.singular, "widget");
        assert!(r.namespaced && r.status_subresource);
        let mut all = builtins();
        all.push(r);
        let l = resource_list(&all, "example.com", "v1").expect("served");
        assert_eq!(l["resources"][0]["shortNames"][0], "wd");
        assert!(group_list(&all)["groups"]
            .as_array()
            .expect("array")
            .iter()
            .any(|g| g["name"] == "example.com"));
    }
}
