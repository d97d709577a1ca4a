//! Server-side printing: `meta.k8s.io/v1` `Table` responses for `kubectl get`.

use serde_json::{json, Value};

use crate::discovery::ResourceInfo;
use crate::util;

/// How rows carry their object (`includeObject` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    /// No object.
    None,
    /// `PartialObjectMetadata` (default).
    Metadata,
    /// The full object.
    Object,
}

impl IncludeObject {
    /// Parses the query parameter.
    pub fn parse(v: Option<&str>) -> Self {
        match v {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

fn columns(info: &ResourceInfo) -> Vec<(String, &'static str)> {
    let c = |names: &[(&str, &'static str)]| -> Vec<(String, &'static str)> {
        names.iter().map(|(n, t)| (n.to_string(), *t)).collect()
    };
    if !info.builtin {
        let mut v = vec![("Name".to_string(), "string")];
        let mut has_age = false;
        for pc in &info.printer_columns {
            has_age |= pc.name == "Age";
            let ty = match pc.type_.as_str() {
                "integer" => "integer",
                "number" => "number",
                "boolean" => "boolean",
                "date" => "date",
                _ => "string",
            };
            v.push((pc.name.clone(), ty));
        }
        if !has_age {
            v.push(("Age".into(), "date"));
        }
        return v;
    }
    match info.plural.as_str() {
        "namespaces" => c(&[("Name", "string"), ("Status", "string"), ("Age", "string")]),
        "configmaps" => c(&[("Name", "string"), ("Data", "string"), ("Age", "string")]),
        "secrets" => c(&[
            ("Name", "string"),
            ("Type", "string"),
            ("Data", "string"),
            ("Age", "string"),
        ]),
        "services" => c(&[
            ("Name", "string"),
            ("Type", "string"),
            ("Cluster-IP", "string"),
            ("External-IP", "string"),
            ("Port(s)", "string"),
            ("Age", "string"),
        ]),
        "serviceaccounts" => c(&[("Name", "string"), ("Secrets", "string"), ("Age", "string")]),
        "persistentvolumeclaims" => {
            c(&[("Name", "string"), ("Status", "string"), ("Age", "string")])
        }
        "deployments" => c(&[
            ("Name", "string"),
            ("Ready", "string"),
            ("Up-to-date", "string"),
            ("Available", "string"),
            ("Age", "string"),
        ]),
        "statefulsets" => c(&[("Name", "string"), ("Ready", "string"), ("Age", "string")]),
        "daemonsets" => c(&[
            ("Name", "string"),
            ("Desired", "integer"),
            ("Current", "integer"),
            ("Ready", "integer"),
            ("Up-to-date", "integer"),
            ("Available", "integer"),
            ("Node Selector", "string"),
            ("Age", "string"),
        ]),
        "jobs" => c(&[
            ("Name", "string"),
            ("Status", "string"),
            ("Completions", "string"),
            ("Age", "string"),
        ]),
        "customresourcedefinitions" | "roles" | "clusterroles" => {
            c(&[("Name", "string"), ("Created At", "date")])
        }
        "rolebindings" | "clusterrolebindings" => {
            c(&[("Name", "string"), ("Role", "string"), ("Age", "string")])
        }
        "networkpolicies" => c(&[
            ("Name", "string"),
            ("Pod-Selector", "string"),
            ("Age", "string"),
        ]),
        _ => c(&[("Name", "string"), ("Age", "string")]),
    }
}

fn int(o: &Value, ptr: &str) -> i64 {
    o.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn s<'a>(o: &'a Value, ptr: &str) -> &'a str {
    o.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn count(o: &Value, ptrs: &[&str]) -> usize {
    ptrs.iter()
        .map(|p| {
            o.pointer(p)
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
        })
        .sum()
}

fn json_path(o: &Value, path: &str) -> Value {
    let mut cur = Some(o);
    for seg in path
        .trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
    {
        cur = cur.and_then(|c| c.get(seg));
    }
    cur.cloned().unwrap_or(Value::Null)
}

fn cells(info: &ResourceInfo, o: &Value, now: i64) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let created = s(o, "/metadata/creationTimestamp");
    let age = json!(util::parse_rfc3339(created)
        .map(|t| util::human_age(now - t))
        .unwrap_or_else(|| "<unknown>".into()));
    if !info.builtin {
        let mut v = vec![name];
        let mut has_age = false;
        for pc in &info.printer_columns {
            has_age |= pc.name == "Age";
            let val = json_path(o, &pc.json_path);
            v.push(if pc.type_ == "date" {
                match val.as_str().and_then(util::parse_rfc3339) {
                    Some(t) => json!(util::human_age(now - t)),
                    None => json!("<unknown>"),
                }
            } else {
                val
            });
        }
        if !has_age {
            v.push(age);
        }
        return v;
    }
    match info.plural.as_str() {
        "namespaces" => vec![name, json!(s(o, "/status/phase")), age],
        "configmaps" => vec![name, json!(count(o, &["/data", "/binaryData"])), age],
        "secrets" => vec![name, json!(s(o, "/type")), json!(count(o, &["/data"])), age],
        "services" => {
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{}/{}",
                        p.get("port").map(|v| v.to_string()).unwrap_or_default(),
                        p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                    )
                })
                .collect();
            let ports = if ports.is_empty() {
                "<none>".into()
            } else {
                ports.join(",")
            };
            vec![
                name,
                json!(s(o, "/spec/type")),
                json!(match s(o, "/spec/clusterIP") {
                    "" => "<none>",
                    ip => ip,
                }),
                json!("<none>"),
                json!(ports),
                age,
            ]
        }
        "serviceaccounts" => vec![name, json!(0), age],
        "persistentvolumeclaims" => vec![
            name,
            json!(match s(o, "/status/phase") {
                "" => "Pending",
                p => p,
            }),
            age,
        ],
        "deployments" => vec![
            name,
            json!(format!(
                "{}/{}",
                int(o, "/status/readyReplicas"),
                int(o, "/spec/replicas")
            )),
            json!(int(o, "/status/updatedReplicas")),
            json!(int(o, "/status/availableReplicas")),
            age,
        ],
        "statefulsets" => vec![
            name,
            json!(format!(
                "{}/{}",
                int(o, "/status/readyReplicas"),
                int(o, "/spec/replicas")
            )),
            age,
        ],
        "daemonsets" => vec![
            name,
            json!(int(o, "/status/desiredNumberScheduled")),
            json!(int(o, "/status/currentNumberScheduled")),
            json!(int(o, "/status/numberReady")),
            json!(int(o, "/status/updatedNumberScheduled")),
            json!(int(o, "/status/numberAvailable")),
            json!("<none>"),
            age,
        ],
        "jobs" => {
            let conds = o.pointer("/status/conditions").and_then(Value::as_array);
            let has = |t: &str| {
                conds.is_some_and(|c| c.iter().any(|x| x["type"] == t && x["status"] == "True"))
            };
            let status = if has("Complete") {
                "Complete"
            } else if has("Failed") {
                "Failed"
            } else {
                "Running"
            };
            let completions = o
                .pointer("/spec/completions")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            vec![
                name,
                json!(status),
                json!(format!("{}/{}", int(o, "/status/succeeded"), completions)),
                age,
            ]
        }
        "customresourcedefinitions" | "roles" | "clusterroles" => vec![name, json!(created)],
        "rolebindings" | "clusterrolebindings" => vec![
            name,
            json!(format!(
                "{}/{}",
                s(o, "/roleRef/kind"),
                s(o, "/roleRef/name")
            )),
            age,
        ],
        "networkpolicies" => {
            let sel = o
                .pointer("/spec/podSelector/matchLabels")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|x| !x.is_empty())
                .unwrap_or_else(|| "<none>".into());
            vec![name, json!(sel), age]
        }
        _ => vec![name, age],
    }
}

/// Builds a Table of `objects`.
pub fn table(
    info: &ResourceInfo,
    objects: &[Value],
    rv: Option<String>,
    include: IncludeObject,
    with_columns: bool,
) -> Value {
    let now = util::now_secs();
    let cols: Vec<Value> = if with_columns {
        columns(info)
            .into_iter()
            .enumerate()
            .map(|(i, (n, t))| {
                json!({
                    "name": n,
                    "type": t,
                    "format": if i == 0 { "name" } else { "" },
                    "description": if i == 0 { "Name must be unique within a namespace." } else { "" },
                    "priority": 0
                })
            })
            .collect()
    } else {
        vec![]
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(info, o, now)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Object => row["object"] = o.clone(),
                IncludeObject::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
                    })
                }
            }
            row
        })
        .collect();
    let mut meta = json!({});
    if let Some(rv) = rv {
        meta["resourceVersion"] = json!(rv);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": cols,
        "rows": rows,
    })
}
