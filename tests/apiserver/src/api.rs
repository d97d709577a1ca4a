//! Resource operations (get, list, create, update, patch, apply, delete) on the
//! store, independent of HTTP. Every function runs under the store lock.

use serde_json::{json, Map, Value};

use crate::apply::{self, ApplyRequest, Scope};
use crate::discovery::ResourceInfo;
use crate::error::{group_resource, ApiError, ApiResult};
use crate::patch;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{ObjKey, StoreInner};
use crate::util;

/// Query parameters of a request.
#[derive(Debug, Clone, Default)]
pub struct Params(pub Vec<(String, String)>);

impl Params {
    /// The last value of a parameter.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a boolean parameter is set (`1`/`true`).
    pub fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("1") | Some("true") | Some("True"))
    }

    /// Whether `dryRun=All` was requested.
    pub fn dry_run(&self) -> bool {
        self.0.iter().any(|(k, v)| k == "dryRun" && !v.is_empty())
    }
}

/// The resource a request addresses.
#[derive(Debug, Clone)]
pub struct Target {
    /// Resource type.
    pub info: ResourceInfo,
    /// Requested version.
    pub version: String,
    /// Namespace from the URL (namespaced resources only).
    pub namespace: Option<String>,
    /// Object name from the URL.
    pub name: Option<String>,
    /// Subresource (`status`).
    pub sub: Option<String>,
}

impl Target {
    /// The store key of object `name`.
    pub fn key(&self, name: &str) -> ObjKey {
        ObjKey {
            group: self.info.group.clone(),
            resource: self.info.plural.clone(),
            namespace: self.namespace.clone().unwrap_or_default(),
            name: name.to_string(),
        }
    }

    /// `group/version` of the request.
    pub fn api_version(&self) -> String {
        self.info.api_version(&self.version)
    }

    fn scope(&self) -> Scope {
        if self.sub.as_deref() == Some("status") {
            Scope::Status
        } else {
            Scope::Main {
                strip_status: self.info.status_subresource,
            }
        }
    }

    fn not_found(&self, name: &str) -> ApiError {
        ApiError::not_found(&self.info.group, &self.info.plural, name)
    }
}

/// How a write records managedFields.
pub enum Managed<'a> {
    /// Record an `Update` by this manager.
    Update(&'a str),
    /// Already computed (server-side apply).
    Done,
}

/// Returns an object as the client should see it (apiVersion of the request).
pub fn output(t: &Target, obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.insert("apiVersion".into(), json!(t.api_version()));
        m.insert("kind".into(), json!(t.info.kind));
    }
    o
}

fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn meta_str<'a>(obj: &'a Value, f: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(f))
        .and_then(Value::as_str)
}

fn metadata_mut(obj: &mut Value) -> ApiResult<&mut Map<String, Value>> {
    let m = obj
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the object must be a JSON/YAML object"))?;
    let meta = m.entry("metadata").or_insert_with(|| json!({}));
    if meta.is_null() {
        *meta = json!({});
    }
    meta.as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))
}

/// GET one object.
pub fn get(s: &StoreInner, t: &Target) -> ApiResult<Value> {
    let name = t.name.as_deref().unwrap_or("");
    s.objects
        .get(&t.key(name))
        .map(|o| output(t, o))
        .ok_or_else(|| t.not_found(name))
}

/// Objects matching a LIST request (already rendered for the client).
pub fn select(
    s: &StoreInner,
    t: &Target,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Vec<Value> {
    s.list(&t.info.group, &t.info.plural, t.namespace.as_deref())
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .map(|o| output(t, o))
        .collect()
}

/// LIST as a `<Kind>List`.
pub fn list(s: &StoreInner, t: &Target, labels: &LabelSelector, fields: &FieldSelector) -> Value {
    json!({
        "kind": format!("{}List", t.info.kind),
        "apiVersion": t.api_version(),
        "metadata": {"resourceVersion": s.rv.to_string()},
        "items": select(s, t, labels, fields),
    })
}

fn check_type(t: &Target, obj: &Value) -> ApiResult<()> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the object provided is not a JSON/YAML object",
        ));
    }
    if let Some(kind) = obj.get("kind").and_then(Value::as_str) {
        if !kind.is_empty() && kind != t.info.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({kind}) does not match the expected kind ({})",
                t.info.kind
            )));
        }
    }
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str) {
        let group = av.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        if !av.is_empty() && group != t.info.group {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                t.api_version()
            )));
        }
    }
    Ok(())
}

fn valid_name(name: &str, label: bool) -> Option<&'static str> {
    let max = if label { 63 } else { 253 };
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (!label && c == '.'));
    let ends_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > max || !ok_chars || !ends_ok {
        Some(if label {
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        } else {
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        })
    } else {
        None
    }
}

fn validate(t: &Target, obj: &Value) -> ApiResult<()> {
    let name = name_of(obj);
    let label = t.info.plural == "namespaces" || t.info.plural == "services";
    if let Some(msg) = valid_name(name, label) {
        return Err(ApiError::invalid(
            &t.info.group,
            &t.info.kind,
            name,
            "metadata.name",
            &format!("Invalid value: {name:?}: {msg}"),
        ));
    }
    for field in ["labels", "annotations"] {
        if let Some(m) = obj.get("metadata").and_then(|m| m.get(field)) {
            let ok = m.is_null()
                || m.as_object()
                    .is_some_and(|m| m.values().all(|v| v.is_string()));
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "metadata.{field}: values must be strings"
                )));
            }
        }
    }
    if t.info.plural == "customresourcedefinitions" {
        crate::discovery::crd_resource(obj).map_err(|(field, msg)| {
            ApiError::invalid(&t.info.group, &t.info.kind, name, &field, &msg)
        })?;
    }
    if t.info.kind == "Deployment"
        || t.info.kind == "StatefulSet"
        || t.info.kind == "DaemonSet"
        || t.info.kind == "Job"
    {
        let containers = obj
            .pointer("/spec/template/spec/containers")
            .and_then(Value::as_array);
        if containers.is_none_or(|c| c.is_empty()) {
            return Err(ApiError::invalid(
                &t.info.group,
                &t.info.kind,
                name,
                "spec.template.spec.containers",
                "Required value",
            ));
        }
    }
    Ok(())
}

/// Server-side defaulting and derived fields for a few kinds.
fn normalize(s: &mut StoreInner, t: &Target, obj: &mut Value, old: Option<&Value>) {
    let name = name_of(obj).to_string();
    let Some(m) = obj.as_object_mut() else { return };
    match (t.info.group.as_str(), t.info.plural.as_str()) {
        ("", "namespaces") => {
            if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
                let labels = meta.entry("labels").or_insert_with(|| json!({}));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
            }
            let spec = m.entry("spec").or_insert_with(|| json!({}));
            if let Some(spec) = spec.as_object_mut() {
                spec.entry("finalizers")
                    .or_insert_with(|| json!(["kubernetes"]));
            }
            m.insert("status".into(), json!({"phase": "Active"}));
        }
        ("", "secrets") => {
            if let Some(Value::Object(sd)) = m.remove("stringData") {
                let data = m.entry("data").or_insert_with(|| json!({}));
                if !data.is_object() {
                    *data = json!({});
                }
                if let Some(data) = data.as_object_mut() {
                    for (k, v) in sd {
                        let text = v.as_str().unwrap_or_default();
                        data.insert(k, json!(util::base64_encode(text.as_bytes())));
                    }
                }
            }
            m.entry("type").or_insert_with(|| json!("Opaque"));
        }
        ("", "services") => {
            let spec = m.entry("spec").or_insert_with(|| json!({}));
            if let Some(spec) = spec.as_object_mut() {
                let ty = spec
                    .entry("type")
                    .or_insert_with(|| json!("ClusterIP"))
                    .as_str()
                    .unwrap_or("ClusterIP")
                    .to_string();
                if ty != "ExternalName" {
                    let ip = old
                        .and_then(|o| o.pointer("/spec/clusterIP"))
                        .and_then(Value::as_str)
                        .map(String::from)
                        .or_else(|| {
                            spec.get("clusterIP")
                                .and_then(Value::as_str)
                                .map(String::from)
                        })
                        .filter(|ip| !ip.is_empty())
                        .unwrap_or_else(|| s.allocate_ip());
                    spec.insert("clusterIPs".into(), json!([ip]));
                    spec.insert("clusterIP".into(), json!(ip));
                }
                spec.entry("sessionAffinity")
                    .or_insert_with(|| json!("None"));
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        p.entry("protocol").or_insert_with(|| json!("TCP"));
                        if let Some(port) = p.get("port").cloned() {
                            p.entry("targetPort").or_insert(port);
                        }
                    }
                }
            }
            if !m.contains_key("status") {
                m.insert("status".into(), json!({"loadBalancer": {}}));
            }
        }
        ("apps", "deployments") | ("apps", "statefulsets") => {
            let spec = m.entry("spec").or_insert_with(|| json!({}));
            if let Some(spec) = spec.as_object_mut() {
                spec.entry("replicas").or_insert_with(|| json!(1));
            }
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            let spec = m.get("spec").cloned().unwrap_or(json!({}));
            let mut names = spec.get("names").cloned().unwrap_or(json!({}));
            if let Some(kind) = names.get("kind").and_then(Value::as_str).map(String::from) {
                if let Some(n) = names.as_object_mut() {
                    n.entry("singular")
                        .or_insert_with(|| json!(kind.to_lowercase()));
                    n.entry("listKind")
                        .or_insert_with(|| json!(format!("{kind}List")));
                }
            }
            let storage: Vec<Value> = spec
                .get("versions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect();
            let now = util::now_rfc3339();
            let cond = |ty: &str, reason: &str, msg: &str| json!({"type": ty, "status": "True", "lastTransitionTime": now, "reason": reason, "message": msg});
            m.insert(
                "status".into(),
                json!({
                    "conditions": [
                        cond("NamesAccepted", "NoConflicts", "no conflicts found"),
                        cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    ],
                    "acceptedNames": names,
                    "storedVersions": storage,
                }),
            );
        }
        _ => {}
    }
}

fn without(obj: &Value, keys: &[&str]) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        for k in keys {
            m.remove(*k);
        }
    }
    o
}

fn strip_mf_times(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        if let Some(list) = meta.get_mut("managedFields").and_then(Value::as_array_mut) {
            for e in list.iter_mut().filter_map(Value::as_object_mut) {
                e.remove("time");
            }
        }
    }
    o
}

/// Creates an object (POST, or apply/PUT creating). `obj` is the client's object
/// whose namespace/name have been checked against the URL.
pub fn create(
    s: &mut StoreInner,
    t: &Target,
    mut obj: Value,
    managed: Managed<'_>,
    dry_run: bool,
) -> ApiResult<Value> {
    check_type(t, &obj)?;
    let ns = t.namespace.clone();
    {
        let meta = metadata_mut(&mut obj)?;
        if let Some(body_ns) = meta.get("namespace").and_then(Value::as_str) {
            if !body_ns.is_empty() && Some(body_ns) != ns.as_deref() && t.info.namespaced {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        let has_name = meta
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        if !has_name {
            match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let n = format!("{prefix}{}", util::random_suffix(5));
                    meta.insert("name".into(), json!(n));
                }
                _ => {
                    return Err(ApiError::invalid(
                        &t.info.group,
                        &t.info.kind,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    ))
                }
            }
        }
        match &ns {
            Some(n) => {
                meta.insert("namespace".into(), json!(n));
            }
            None => {
                meta.remove("namespace");
            }
        }
        for k in [
            "uid",
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ] {
            meta.remove(k);
        }
        meta.insert("uid".into(), json!(util::uuid()));
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!(util::now_rfc3339()));
    }
    if let Some(m) = obj.as_object_mut() {
        m.insert("apiVersion".into(), json!(t.api_version()));
        m.insert("kind".into(), json!(t.info.kind));
    }
    let name = name_of(&obj).to_string();
    validate(t, &obj)?;
    if let Some(n) = &ns {
        if !s.namespace_exists(n) {
            return Err(ApiError::not_found("", "namespaces", n));
        }
    }
    let key = t.key(&name);
    if s.objects.contains_key(&key) {
        return Err(ApiError::already_exists(
            &t.info.group,
            &t.info.plural,
            &name,
        ));
    }
    if t.info.status_subresource && t.info.plural != "namespaces" {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    normalize(s, t, &mut obj, None);
    match managed {
        Managed::Update(manager) => apply::record_update(
            None,
            &mut obj,
            manager,
            &t.api_version(),
            Scope::Main {
                strip_status: false,
            },
            t.info.builtin,
            &util::now_rfc3339(),
        ),
        Managed::Done => {
            // Keep only the managedFields computed by apply (removed above).
        }
    }
    if dry_run {
        return Ok(output(t, &obj));
    }
    Ok(output(t, &s.put(key, obj, None)))
}

/// Finishes an update of an existing object: checks, status-subresource semantics,
/// metadata preservation, generation, defaulting, managedFields, commit.
pub fn update_existing(
    s: &mut StoreInner,
    t: &Target,
    old: &Value,
    mut new: Value,
    managed: Managed<'_>,
    dry_run: bool,
) -> ApiResult<(u16, Value)> {
    check_type(t, &new)?;
    let name = name_of(old).to_string();
    {
        let meta = metadata_mut(&mut new)?;
        let body_name = meta.get("name").and_then(Value::as_str).unwrap_or("");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(body_ns) = meta.get("namespace").and_then(Value::as_str) {
            if !body_ns.is_empty() && t.info.namespaced && Some(body_ns) != t.namespace.as_deref() {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        if let Some(rv) = meta.get("resourceVersion").and_then(Value::as_str) {
            if !rv.is_empty() && Some(rv) != meta_str(old, "resourceVersion") {
                return Err(ApiError::conflict(&t.info.group, &t.info.plural, &name));
            }
        }
    }
    // Status subresource semantics.
    let scope = t.scope();
    if scope == Scope::Status {
        let mut merged = old.clone();
        match new.get("status") {
            Some(st) => merged["status"] = st.clone(),
            None => {
                if let Some(m) = merged.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        if let Some(mf) = new.pointer("/metadata/managedFields") {
            merged["metadata"]["managedFields"] = mf.clone();
        }
        new = merged;
    } else if t.info.status_subresource {
        match old.get("status") {
            Some(st) => new["status"] = st.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    // Server-owned metadata.
    {
        let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
        let meta = metadata_mut(&mut new)?;
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ] {
            match old_meta.get(k) {
                Some(v) => meta.insert(k.into(), v.clone()),
                None => meta.remove(k),
            };
        }
        meta.insert("name".into(), json!(name));
        match &t.namespace {
            Some(n) => meta.insert("namespace".into(), json!(n)),
            None => meta.remove("namespace"),
        };
        if matches!(managed, Managed::Update(_)) {
            match old_meta.get("managedFields") {
                Some(v) => meta.insert("managedFields".into(), v.clone()),
                None => meta.remove("managedFields"),
            };
        }
    }
    if let Some(m) = new.as_object_mut() {
        m.insert("apiVersion".into(), json!(t.api_version()));
        m.insert("kind".into(), json!(t.info.kind));
    }
    validate(t, &new)?;
    normalize(s, t, &mut new, Some(old));
    // Generation: bumps when anything outside metadata (and status) changes.
    let ignore: &[&str] = &["metadata", "status", "apiVersion", "kind"];
    if without(&new, ignore) != without(old, ignore) {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        new["metadata"]["generation"] = json!(g + 1);
    }
    if let Managed::Update(manager) = managed {
        apply::record_update(
            Some(old),
            &mut new,
            manager,
            &t.api_version(),
            scope,
            t.info.builtin,
            &util::now_rfc3339(),
        );
    }
    let key = t.key(&name);
    // Finalizers: an object being deleted goes away when its finalizers are gone.
    let finalizers_empty = new
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_none_or(|f| f.is_empty());
    if old.pointer("/metadata/deletionTimestamp").is_some() && finalizers_empty {
        if dry_run {
            return Ok((200, output(t, &new)));
        }
        s.objects.insert(key.clone(), new.clone());
        let gone = s.remove(&key).unwrap_or(new);
        return Ok((200, output(t, &gone)));
    }
    if strip_mf_times(&new) == strip_mf_times(old) || dry_run {
        let mut out = if dry_run { new } else { old.clone() };
        if dry_run {
            out["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        }
        return Ok((200, output(t, &out)));
    }
    Ok((200, output(t, &s.put(key, new, Some(old.clone())))))
}

/// PUT.
pub fn update(
    s: &mut StoreInner,
    t: &Target,
    body: Value,
    manager: &str,
    dry_run: bool,
) -> ApiResult<(u16, Value)> {
    let name = t.name.clone().unwrap_or_default();
    let Some(old) = s.objects.get(&t.key(&name)).cloned() else {
        return Err(t.not_found(&name));
    };
    update_existing(s, t, &old, body, Managed::Update(manager), dry_run)
}

/// The PATCH content types (in the order real servers list them).
pub const PATCH_TYPES: &[&str] = &[
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
];

/// Parses a JSON or YAML body into a JSON value.
pub fn parse_body(body: &[u8], yaml_ok: bool) -> ApiResult<Value> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(e) if !yaml_ok => Err(ApiError::bad_request(format!(
            "couldn't get version/kind; json parse error: {e}"
        ))),
        Err(_) => {
            let text = std::str::from_utf8(body).map_err(|_| {
                ApiError::bad_request("error decoding YAML: body is not valid UTF-8")
            })?;
            serde_norway::from_str::<Value>(text)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        }
    }
}

/// PATCH with any supported content type.
pub fn patch(
    s: &mut StoreInner,
    t: &Target,
    content_type: &str,
    body: &[u8],
    params: &Params,
    default_manager: &str,
) -> ApiResult<(u16, Value)> {
    let name = t.name.clone().unwrap_or_default();
    let key = t.key(&name);
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let dry_run = params.dry_run();
    if ct == "application/apply-patch+yaml" {
        return server_side_apply(s, t, body, params);
    }
    if !PATCH_TYPES.contains(&ct) {
        return Err(ApiError::unsupported_media_type(ct, PATCH_TYPES));
    }
    if ct == "application/strategic-merge-patch+json" && !t.info.builtin {
        return Err(ApiError::unsupported_media_type(
            ct,
            &[
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/apply-patch+yaml",
            ],
        ));
    }
    let p = parse_body(body, false)?;
    let Some(old) = s.objects.get(&key).cloned() else {
        return Err(t.not_found(&name));
    };
    let mut doc = output(t, &old);
    match ct {
        "application/json-patch+json" => patch::json_patch(&mut doc, &p)?,
        "application/merge-patch+json" => {
            if !p.is_object() {
                return Err(ApiError::bad_request("merge patch must be a JSON object"));
            }
            patch::merge_patch(&mut doc, &p)
        }
        _ => {
            if !p.is_object() {
                return Err(ApiError::bad_request(
                    "strategic merge patch must be a JSON object",
                ));
            }
            patch::strategic_merge_patch(&mut doc, &p)
        }
    }
    let manager = params.get("fieldManager").unwrap_or(default_manager);
    update_existing(s, t, &old, doc, Managed::Update(manager), dry_run)
}

/// Server-side apply (`application/apply-patch+yaml`).
pub fn server_side_apply(
    s: &mut StoreInner,
    t: &Target,
    body: &[u8],
    params: &Params,
) -> ApiResult<(u16, Value)> {
    let name = t.name.clone().unwrap_or_default();
    let manager = params
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("PATCH: fieldManager is required for apply requests"))?
        .to_string();
    if manager.len() > 128 {
        return Err(ApiError::invalid(
            &t.info.group,
            &t.info.kind,
            &name,
            "fieldManager",
            "Too long: may not be more than 128 bytes",
        ));
    }
    let applied = parse_body(body, true)?;
    if !applied.is_object() {
        return Err(ApiError::bad_request(
            "the applied configuration must be an object",
        ));
    }
    for f in ["apiVersion", "kind"] {
        if applied
            .get(f)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(format!(
                "{f} must be set in the applied configuration"
            )));
        }
    }
    check_type(t, &applied)?;
    if let Some(v) = applied.get("apiVersion").and_then(Value::as_str) {
        if v != t.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                t.api_version()
            )));
        }
    }
    let body_name = meta_str(&applied, "name").unwrap_or("");
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if let Some(body_ns) = meta_str(&applied, "namespace") {
        if !body_ns.is_empty() && t.info.namespaced && Some(body_ns) != t.namespace.as_deref() {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    let now = util::now_rfc3339();
    let api_version = t.api_version();
    let req = ApplyRequest {
        manager: &manager,
        api_version: &api_version,
        force: params.flag("force"),
        scope: t.scope(),
        keyed: t.info.builtin,
        now: &now,
    };
    let dry_run = params.dry_run();
    let key = t.key(&name);
    match s.objects.get(&key).cloned() {
        None => {
            if t.sub.is_some() {
                return Err(t.not_found(&name));
            }
            let mut skeleton =
                json!({"apiVersion": api_version, "kind": t.info.kind, "metadata": {"name": name}});
            if let Some(ns) = &t.namespace {
                skeleton["metadata"]["namespace"] = json!(ns);
            }
            let obj = apply::apply(&skeleton, &applied, &req)?;
            let mf = obj.pointer("/metadata/managedFields").cloned();
            let mut created = create(s, t, obj, Managed::Done, true)?;
            // Re-attach the apply managedFields that create() strips.
            if let Some(mf) = mf {
                created["metadata"]["managedFields"] = mf;
            }
            // Drop ownership of fields create() removed (e.g. status).
            let mut entries = apply::read_entries(&created);
            for e in entries.iter_mut() {
                e.fields.retain(|p| apply::get_path(&created, p).is_some());
            }
            entries.retain(|e| !e.fields.is_empty());
            apply::write_entries(&mut created, &entries);
            if dry_run {
                return Ok((201, created));
            }
            let stored = s.put(key, created, None);
            Ok((201, output(t, &stored)))
        }
        Some(old) => {
            if let Some(rv) = meta_str(&applied, "resourceVersion") {
                if !rv.is_empty() && Some(rv) != meta_str(&old, "resourceVersion") {
                    return Err(ApiError::conflict(&t.info.group, &t.info.plural, &name));
                }
            }
            let live = output(t, &old);
            let new = apply::apply(&live, &applied, &req)?;
            update_existing(s, t, &old, new, Managed::Done, dry_run)
        }
    }
}

/// A `Status` of kind Success for deletions.
fn success_status(t: &Target, obj: &Value) -> Value {
    let mut details = json!({"name": name_of(obj), "kind": t.info.plural});
    if !t.info.group.is_empty() {
        details["group"] = json!(t.info.group);
    }
    if let Some(uid) = meta_str(obj, "uid") {
        details["uid"] = json!(uid);
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})
}

/// DELETE one object. Honours `preconditions` in DeleteOptions and finalizers
/// (an object with finalizers gets a deletionTimestamp and is returned with 202).
pub fn delete(
    s: &mut StoreInner,
    t: &Target,
    options: &Value,
    dry_run: bool,
) -> ApiResult<(u16, Value)> {
    let name = t.name.clone().unwrap_or_default();
    let key = t.key(&name);
    let Some(obj) = s.objects.get(&key).cloned() else {
        return Err(t.not_found(&name));
    };
    if let Some(pre) = options.get("preconditions") {
        let uid_ok = pre
            .get("uid")
            .and_then(Value::as_str)
            .is_none_or(|u| Some(u) == meta_str(&obj, "uid"));
        let rv_ok = pre
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_none_or(|r| Some(r) == meta_str(&obj, "resourceVersion"));
        if !uid_ok || !rv_ok {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed",
                    group_resource(&t.info.group, &t.info.plural)
                ),
            ));
        }
    }
    if dry_run {
        return Ok((200, success_status(t, &obj)));
    }
    let has_finalizers = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    if has_finalizers {
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok((202, output(t, &obj)));
        }
        let mut new = obj.clone();
        new["metadata"]["deletionTimestamp"] = json!(util::now_rfc3339());
        new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        let stored = s.put(key, new, Some(obj));
        return Ok((202, output(t, &stored)));
    }
    let gone = s.remove(&key).unwrap_or(obj);
    Ok((200, success_status(t, &gone)))
}

/// DELETE on a collection: deletes every matching object and returns them as a list.
pub fn delete_collection(
    s: &mut StoreInner,
    t: &Target,
    labels: &LabelSelector,
    fields: &FieldSelector,
    dry_run: bool,
) -> ApiResult<(u16, Value)> {
    let victims = select(s, t, labels, fields);
    let mut items = Vec::new();
    for v in victims {
        let mut tt = t.clone();
        tt.name = Some(name_of(&v).to_string());
        if tt.namespace.is_none() && t.info.namespaced {
            tt.namespace = meta_str(&v, "namespace").map(String::from);
        }
        if delete(s, &tt, &Value::Null, dry_run).is_ok() {
            items.push(v);
        }
    }
    Ok((
        200,
        json!({
            "kind": format!("{}List", t.info.kind),
            "apiVersion": t.api_version(),
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        }),
    ))
}

/// Writes only `.status` of an existing object as a controller would (no-op if
/// unchanged or if the object's generation moved on). Used by the built-in
/// controller.
pub fn controller_status_update(
    s: &mut StoreInner,
    key: &ObjKey,
    uid: &str,
    generation: i64,
    status: Value,
) {
    let Some(info) = s.resource_by_name(&key.group, &key.resource) else {
        return;
    };
    let Some(old) = s.objects.get(key).cloned() else {
        return;
    };
    if meta_str(&old, "uid") != Some(uid)
        || old.pointer("/metadata/generation").and_then(Value::as_i64) != Some(generation)
        || old.get("status") == Some(&status)
    {
        return;
    }
    let t = Target {
        version: info.preferred_version().to_string(),
        info,
        namespace: (!key.namespace.is_empty()).then(|| key.namespace.clone()),
        name: Some(key.name.clone()),
        sub: Some("status".into()),
    };
    let mut new = old.clone();
    new["status"] = status;
    let _ = update_existing(
        s,
        &t,
        &old,
        new,
        Managed::Update("kube-controller-manager"),
        false,
    );
}

/// Whether a kind has the `scale` subresource.
pub fn has_scale(info: &ResourceInfo) -> bool {
    info.builtin && (info.kind == "Deployment" || info.kind == "StatefulSet")
}

/// The `autoscaling/v1` Scale view of a Deployment or StatefulSet.
pub fn scale_of(obj: &Value) -> Value {
    let selector = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    let pick = |k: &str| meta.get(k).cloned().unwrap_or(Value::Null);
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": pick("name"),
            "namespace": pick("namespace"),
            "uid": pick("uid"),
            "resourceVersion": pick("resourceVersion"),
            "creationTimestamp": pick("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector,
        }
    })
}

/// GET/PUT/PATCH on the `scale` subresource. `change` turns the current Scale
/// into the desired one (None for GET).
pub fn scale(
    s: &mut StoreInner,
    t: &Target,
    change: Option<&dyn Fn(Value) -> ApiResult<Value>>,
    manager: &str,
    dry_run: bool,
) -> ApiResult<(u16, Value)> {
    let name = t.name.clone().unwrap_or_default();
    let Some(old) = s.objects.get(&t.key(&name)).cloned() else {
        return Err(t.not_found(&name));
    };
    let current = scale_of(&old);
    let Some(change) = change else {
        return Ok((200, current));
    };
    let desired = change(current)?;
    if let Some(rv) = desired
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        if !rv.is_empty() && Some(rv) != meta_str(&old, "resourceVersion") {
            return Err(ApiError::conflict(&t.info.group, &t.info.plural, &name));
        }
    }
    let replicas = desired
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .filter(|r| *r >= 0)
        .ok_or_else(|| {
            ApiError::invalid(
                "autoscaling",
                "Scale",
                &name,
                "spec.replicas",
                "Invalid value: must be greater than or equal to 0",
            )
        })?;
    let mut main = t.clone();
    main.sub = None;
    let mut new = output(&main, &old);
    new["spec"]["replicas"] = json!(replicas);
    let (code, obj) = update_existing(s, &main, &old, new, Managed::Update(manager), dry_run)?;
    Ok((code, scale_of(&obj)))
}
