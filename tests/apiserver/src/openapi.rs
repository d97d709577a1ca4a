//! A minimal OpenAPI v3 surface.
//!
//! kubectl (1.27+) validates objects client-side against OpenAPI unless the server
//! declares support for the `fieldValidation` query parameter, which it looks up
//! in `/openapi/v3`. Without any OpenAPI, `kubectl apply` fails with "failed to
//! download openapi". So `/openapi/v3` lists every served group/version and each
//! group/version document declares, per kind, a PATCH operation carrying
//! `x-kubernetes-group-version-kind` and the `fieldValidation` parameter. No
//! schemas are served (so `kubectl explain` does not work); `/openapi/v2` is 404.

use serde_json::{json, Map, Value};

use crate::discovery::{fnv, ResourceInfo};
use crate::error::{ApiError, ApiResult};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn group_versions(resources: &[ResourceInfo]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for r in resources {
        for v in &r.versions {
            let gv = (r.group.clone(), v.clone());
            if !out.contains(&gv) {
                out.push(gv);
            }
        }
    }
    out
}

/// The `/openapi/v3` discovery document.
pub fn root(resources: &[ResourceInfo]) -> Value {
    let mut paths = Map::new();
    for (g, v) in group_versions(resources) {
        let p = gv_path(&g, &v);
        let hash = format!("{:016X}", fnv(&gv_doc(resources, &g, &v).to_string()));
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hash}")}),
        );
    }
    json!({"paths": paths})
}

fn gv_doc(resources: &[ResourceInfo], group: &str, version: &str) -> Value {
    let mut paths = Map::new();
    for r in resources
        .iter()
        .filter(|r| r.group == group && r.serves(version))
    {
        let base = if r.namespaced {
            format!(
                "/{}/namespaces/{{namespace}}/{}/{{name}}",
                gv_path(group, version),
                r.plural
            )
        } else {
            format!("/{}/{}/{{name}}", gv_path(group, version), r.plural)
        };
        let op = json!({
            "operationId": format!("patch{}", r.kind),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": r.kind},
            "parameters": [
                {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}}
            ],
            "responses": {"200": {"description": "OK"}}
        });
        paths.insert(base, json!({"patch": op}));
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}}
    })
}

/// The document of one group/version (`/openapi/v3/apis/{group}/{version}`).
pub fn group_version(resources: &[ResourceInfo], rest: &[&str]) -> ApiResult<Value> {
    let (group, version) = match rest {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return Err(ApiError::no_route()),
    };
    if !resources
        .iter()
        .any(|r| r.group == group && r.serves(version))
    {
        return Err(ApiError::no_route());
    }
    Ok(gv_doc(resources, group, version))
}
