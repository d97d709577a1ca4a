//! Server-side apply and `metadata.managedFields`.
//!
//! Simplified ownership model (see docs/TEST-APISERVER.md):
//! * A field set is a set of paths to *leaves* (scalars, empty maps, lists) plus
//!   markers for items of keyed lists.
//! * Lists are atomic leaves, except the well-known keyed lists of built-in kinds
//!   ([`crate::patch::list_keys`]: containers, env, volumes, ports, ...), whose
//!   items are addressed by key (`k:{"name":"nginx"}`).
//! * Apply: fields the manager owned before but no longer sends are removed unless
//!   another manager owns them; a sent leaf whose live value differs and that
//!   another manager owns is a conflict (409) unless `force=true`, which transfers
//!   ownership.
//! * Update (PUT/PATCH/POST): the manager takes ownership of the leaves it changed,
//!   which are removed from every other manager.
//! * After each write every entry is pruned to paths that still exist.

use std::collections::BTreeSet;
use std::ops::Bound;

use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::patch::{list_keys, same_key};

/// One element of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathElement {
    /// A map field (`f:name`).
    Field(String),
    /// An item of a keyed list, by its key as compact JSON (`k:{"name":"x"}`).
    Key(String),
    /// An item of a set list, by value as JSON (`v:"x"`).
    Value(String),
    /// An item by index (`i:0`).
    Index(usize),
}

/// A field path.
pub type Path = Vec<PathElement>;
/// A set of field paths.
pub type FieldSet = BTreeSet<Path>;

/// Which part of the object a request manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The main resource; `status` is excluded when the kind has a status subresource.
    Main {
        /// Exclude `.status`.
        strip_status: bool,
    },
    /// The `/status` subresource: only `.status`.
    Status,
}

impl Scope {
    /// The `subresource` recorded in managedFields.
    pub fn subresource(self) -> &'static str {
        match self {
            Scope::Main { .. } => "",
            Scope::Status => "status",
        }
    }
}

const IDENTITY_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generateName",
];

/// Renders a path like `.spec.template.spec.containers[name="nginx"].image`.
pub fn path_string(p: &Path) -> String {
    let mut s = String::new();
    for e in p {
        match e {
            PathElement::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            PathElement::Key(k) => {
                let parsed: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = parsed.iter().map(|(k, v)| format!("{k}={v}")).collect();
                s.push_str(&format!("[{}]", parts.join(",")));
            }
            PathElement::Value(v) => s.push_str(&format!("[={v}]")),
            PathElement::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Encodes a field set in the `FieldsV1` format (`{"f:metadata":{"f:labels":{"f:app":{}}}}`).
pub fn to_fields_v1(set: &FieldSet) -> Value {
    #[derive(Default)]
    struct Node {
        own: bool,
        children: std::collections::BTreeMap<String, Node>,
    }
    fn enc(n: &Node) -> Value {
        let mut m = Map::new();
        if n.own && !n.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, c) in &n.children {
            m.insert(k.clone(), enc(c));
        }
        Value::Object(m)
    }
    let mut root = Node::default();
    for p in set {
        let mut cur = &mut root;
        for e in p {
            let k = match e {
                PathElement::Field(f) => format!("f:{f}"),
                PathElement::Key(k) => format!("k:{k}"),
                PathElement::Value(v) => format!("v:{v}"),
                PathElement::Index(i) => format!("i:{i}"),
            };
            cur = cur.children.entry(k).or_default();
        }
        cur.own = true;
    }
    enc(&root)
}

/// Decodes a `FieldsV1` value (unknown keys are ignored).
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn dec(v: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        for (k, c) in m {
            if k == "." {
                out.insert(path.clone());
                continue;
            }
            let e = if let Some(f) = k.strip_prefix("f:") {
                PathElement::Field(f.to_string())
            } else if let Some(x) = k.strip_prefix("k:") {
                PathElement::Key(x.to_string())
            } else if let Some(x) = k.strip_prefix("v:") {
                PathElement::Value(x.to_string())
            } else if let Some(x) = k.strip_prefix("i:") {
                match x.parse() {
                    Ok(i) => PathElement::Index(i),
                    Err(_) => continue,
                }
            } else {
                continue;
            };
            path.push(e);
            if c.as_object().is_none_or(|o| o.is_empty()) {
                out.insert(path.clone());
            } else {
                dec(c, path, out);
            }
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    dec(v, &mut Vec::new(), &mut out);
    out
}

/// Computes the field set of an object (identity metadata excluded).
pub fn fields_of(obj: &Value, scope: Scope, keyed: bool) -> FieldSet {
    fn walk(v: &Value, path: &mut Path, out: &mut FieldSet, keyed: bool) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, c) in m {
                    if c.is_null() {
                        continue;
                    }
                    path.push(PathElement::Field(k.clone()));
                    walk(c, path, out, keyed);
                    path.pop();
                }
            }
            Value::Array(items) if keyed => {
                let field = match path.last() {
                    Some(PathElement::Field(f)) => f.clone(),
                    _ => String::new(),
                };
                match list_keys(&field, items) {
                    Some(keys) if !items.is_empty() => {
                        for item in items {
                            path.push(PathElement::Key(key_json(keys, item)));
                            out.insert(path.clone());
                            walk(item, path, out, keyed);
                            path.pop();
                        }
                    }
                    _ => {
                        out.insert(path.clone());
                    }
                }
            }
            _ => {
                out.insert(path.clone());
            }
        }
    }
    let mut out = FieldSet::new();
    let Some(m) = obj.as_object() else { return out };
    for (k, c) in m {
        if k == "apiVersion" || k == "kind" || c.is_null() {
            continue;
        }
        match scope {
            Scope::Status if k != "status" => continue,
            Scope::Main { strip_status: true } if k == "status" => continue,
            _ => {}
        }
        let mut path = vec![PathElement::Field(k.clone())];
        if k == "metadata" {
            if let Some(meta) = c.as_object() {
                for (mk, mv) in meta {
                    if IDENTITY_META.contains(&mk.as_str()) || mv.is_null() {
                        continue;
                    }
                    path.push(PathElement::Field(mk.clone()));
                    walk(mv, &mut path, &mut out, keyed);
                    path.pop();
                }
            }
            continue;
        }
        walk(c, &mut path, &mut out, keyed);
    }
    out
}

fn key_json(keys: &[&str], item: &Value) -> String {
    let mut m = Map::new();
    for k in keys {
        m.insert(
            (*k).to_string(),
            item.get(*k).cloned().unwrap_or(Value::Null),
        );
    }
    Value::Object(m).to_string()
}

fn item_matches(e: &PathElement, item: &Value, idx: usize) -> bool {
    match e {
        PathElement::Key(k) => match serde_json::from_str::<Map<String, Value>>(k) {
            Ok(m) => m.iter().all(|(f, v)| item.get(f) == Some(v)),
            Err(_) => false,
        },
        PathElement::Value(v) => serde_json::from_str::<Value>(v).is_ok_and(|v| v == *item),
        PathElement::Index(i) => *i == idx,
        PathElement::Field(_) => false,
    }
}

/// The value at a path, if present.
pub fn get_path<'a>(obj: &'a Value, path: &[PathElement]) -> Option<&'a Value> {
    let mut cur = obj;
    for e in path {
        cur = match (e, cur) {
            (PathElement::Field(f), Value::Object(m)) => m.get(f)?,
            (_, Value::Array(a)) => {
                a.iter()
                    .enumerate()
                    .find(|(i, it)| item_matches(e, it, *i))?
                    .1
            }
            _ => return None,
        };
    }
    Some(cur)
}

/// Removes the value at a path and prunes maps/lists left empty. Returns whether
/// something was removed.
pub fn remove_path(obj: &mut Value, path: &[PathElement]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    if rest.is_empty() {
        return match (first, obj) {
            (PathElement::Field(f), Value::Object(m)) => m.remove(f).is_some(),
            (e, Value::Array(a)) => {
                let pos = a
                    .iter()
                    .enumerate()
                    .position(|(i, it)| item_matches(e, it, i));
                pos.map(|p| a.remove(p)).is_some()
            }
            _ => false,
        };
    }
    let removed;
    let empty;
    match (first, obj) {
        (PathElement::Field(f), Value::Object(m)) => {
            let Some(child) = m.get_mut(f) else {
                return false;
            };
            removed = remove_path(child, rest);
            empty = is_empty_container(child);
            if removed && empty {
                m.remove(f);
            }
        }
        (e, Value::Array(a)) => {
            let Some(pos) = a
                .iter()
                .enumerate()
                .position(|(i, it)| item_matches(e, it, i))
            else {
                return false;
            };
            removed = remove_path(&mut a[pos], rest);
        }
        _ => return false,
    }
    removed
}

fn is_empty_container(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Merges an applied configuration into a live object (maps recursively, keyed
/// lists by key, everything else replaced; `null` removes).
pub fn merge_applied(target: &mut Value, applied: &Value, keyed: bool) {
    let Value::Object(am) = applied else {
        *target = applied.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(tm) = target else { return };
    for (k, av) in am {
        if av.is_null() {
            tm.remove(k);
            continue;
        }
        match (tm.get_mut(k), av) {
            (Some(tv @ Value::Object(_)), Value::Object(_)) => merge_applied(tv, av, keyed),
            (Some(Value::Array(tl)), Value::Array(al)) if keyed => {
                let keys = list_keys(k, al).filter(|_| list_keys(k, tl).is_some());
                match keys {
                    Some(keys) => {
                        for item in al {
                            match tl.iter().position(|t| same_key(keys, t, item)) {
                                Some(p) => merge_applied(&mut tl[p], item, keyed),
                                None => tl.push(item.clone()),
                            }
                        }
                    }
                    None => *tl = al.clone(),
                }
            }
            _ => {
                tm.insert(k.clone(), av.clone());
            }
        }
    }
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Manager name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// apiVersion used by the manager.
    pub api_version: String,
    /// Last time the entry changed.
    pub time: String,
    /// `""` or `status`.
    pub subresource: String,
    /// Owned fields.
    pub fields: FieldSet,
}

/// Reads `metadata.managedFields`.
pub fn read_entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return vec![];
    };
    list.iter()
        .map(|e| {
            let s = |f: &str| e.get(f).and_then(Value::as_str).unwrap_or("").to_string();
            Entry {
                manager: s("manager"),
                operation: s("operation"),
                api_version: s("apiVersion"),
                time: s("time"),
                subresource: s("subresource"),
                fields: from_fields_v1(e.get("fieldsV1").unwrap_or(&Value::Null)),
            }
        })
        .collect()
}

/// Writes `metadata.managedFields` (removing it when there are no entries).
pub fn write_entries(obj: &mut Value, entries: &[Entry]) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if entries.is_empty() {
        meta.remove("managedFields");
        return;
    }
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    meta.insert("managedFields".into(), Value::Array(list));
}

fn is_leaf(p: &Path) -> bool {
    !matches!(p.last(), Some(PathElement::Key(_)))
}

fn has_prefix(set: &FieldSet, prefix: &Path) -> bool {
    set.range::<Path, _>((Bound::Included(prefix), Bound::Unbounded))
        .next()
        .is_some_and(|p| p.starts_with(prefix))
}

fn prune(entries: &mut Vec<Entry>, obj: &Value) {
    for e in entries.iter_mut() {
        e.fields.retain(|p| get_path(obj, p).is_some());
    }
    entries.retain(|e| !e.fields.is_empty());
}

fn describe_manager(e: &Entry) -> String {
    let mut s = format!("{:?}", e.manager);
    if !e.subresource.is_empty() {
        s.push_str(&format!(" with subresource {:?}", e.subresource));
    }
    if e.operation == "Update" {
        s.push_str(&format!(" using {}", e.api_version));
        if !e.time.is_empty() {
            s.push_str(&format!(" at {}", e.time));
        }
    }
    s
}

/// Parameters of one apply request.
pub struct ApplyRequest<'a> {
    /// The field manager.
    pub manager: &'a str,
    /// apiVersion of the request (`apps/v1`).
    pub api_version: &'a str,
    /// `force=true`.
    pub force: bool,
    /// Main resource or status.
    pub scope: Scope,
    /// Whether well-known keyed lists are keyed (built-in kinds).
    pub keyed: bool,
    /// Current time (RFC 3339).
    pub now: &'a str,
}

/// Removes identity metadata and out-of-scope top-level fields from an applied
/// configuration, producing what gets merged into the live object.
fn strip_applied(applied: &Value, scope: Scope) -> Value {
    let mut a = applied.clone();
    if let Some(m) = a.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        match scope {
            Scope::Status => m.retain(|k, _| k == "status"),
            Scope::Main { strip_status: true } => {
                m.remove("status");
            }
            _ => {}
        }
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.retain(|k, _| !IDENTITY_META.contains(&k.as_str()));
        }
    }
    a
}

/// Performs server-side apply of `applied` onto `live` (which may be a skeleton
/// for creation). Returns the new object with updated managedFields, or a 409
/// conflict Status.
pub fn apply(live: &Value, applied: &Value, req: &ApplyRequest<'_>) -> Result<Value, ApiError> {
    let mut entries = read_entries(live);
    let f_new = fields_of(applied, req.scope, req.keyed);
    let sub = req.scope.subresource();
    let self_idx = entries
        .iter()
        .position(|e| e.manager == req.manager && e.operation == "Apply" && e.subresource == sub);

    // Conflicts.
    let mut conflicts: Vec<(Path, usize)> = Vec::new();
    for p in f_new.iter().filter(|p| is_leaf(p)) {
        let Some(lv) = get_path(live, p) else {
            continue;
        };
        if get_path(applied, p) == Some(lv) {
            continue;
        }
        for (i, e) in entries.iter().enumerate() {
            if Some(i) != self_idx && e.fields.contains(p) {
                conflicts.push((p.clone(), i));
            }
        }
    }
    if !conflicts.is_empty() {
        if !req.force {
            return Err(conflict_error(&entries, &conflicts));
        }
        for (p, i) in &conflicts {
            entries[*i].fields.remove(p);
        }
    }

    // Remove fields this manager no longer applies, unless someone else owns them.
    let mut obj = live.clone();
    if let Some(i) = self_idx {
        let old: Vec<Path> = entries[i].fields.difference(&f_new).cloned().collect();
        for p in old {
            let others = entries.iter().enumerate().any(|(j, e)| {
                j != i && (e.fields.contains(&p) || (!is_leaf(&p) && has_prefix(&e.fields, &p)))
            });
            if !others {
                remove_path(&mut obj, &p);
            }
        }
    }

    merge_applied(&mut obj, &strip_applied(applied, req.scope), req.keyed);

    match self_idx {
        Some(i) => {
            if entries[i].fields != f_new || entries[i].api_version != req.api_version {
                entries[i].time = req.now.to_string();
            }
            entries[i].fields = f_new;
            entries[i].api_version = req.api_version.to_string();
        }
        None => entries.push(Entry {
            manager: req.manager.to_string(),
            operation: "Apply".into(),
            api_version: req.api_version.to_string(),
            time: req.now.to_string(),
            subresource: sub.to_string(),
            fields: f_new,
        }),
    }
    prune(&mut entries, &obj);
    write_entries(&mut obj, &entries);
    Ok(obj)
}

fn conflict_error(entries: &[Entry], conflicts: &[(Path, usize)]) -> ApiError {
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(p, i)| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {}", describe_manager(&entries[*i])),
                "field": path_string(p),
            })
        })
        .collect();
    let detail = if conflicts.len() == 1 {
        let (p, i) = &conflicts[0];
        format!(
            "conflict with {}: {}",
            describe_manager(&entries[*i]),
            path_string(p)
        )
    } else {
        let mut by_manager: Vec<(usize, Vec<String>)> = Vec::new();
        for (p, i) in conflicts {
            match by_manager.iter_mut().find(|(m, _)| m == i) {
                Some((_, v)) => v.push(path_string(p)),
                None => by_manager.push((*i, vec![path_string(p)])),
            }
        }
        let mut lines = Vec::new();
        for (i, paths) in by_manager {
            lines.push(format!("conflicts with {}:", describe_manager(&entries[i])));
            lines.extend(paths.into_iter().map(|p| format!("- {p}")));
        }
        lines.join("\n")
    };
    let n = conflicts.len();
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Apply failed with {n} conflict{}: {detail}",
            if n == 1 { "" } else { "s" }
        ),
    )
    .with_details(json!({"causes": causes}))
}

/// Records an `Update` operation by `manager` that turned `old` into `new`
/// (`old` None for creations): the manager takes ownership of the leaves it
/// changed. Managed fields sent by the client in `new` are ignored.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    scope: Scope,
    keyed: bool,
    now: &str,
) {
    let mut entries = old.map(read_entries).unwrap_or_default();
    let sub = scope.subresource();
    let all = fields_of(new, scope, keyed);
    let changed: FieldSet = all
        .into_iter()
        .filter(|p| {
            let before = old.and_then(|o| get_path(o, p));
            if is_leaf(p) {
                before != get_path(new, p)
            } else {
                before.is_none()
            }
        })
        .collect();
    if !changed.is_empty() {
        for e in entries.iter_mut() {
            if !(e.manager == manager && e.operation == "Update" && e.subresource == sub) {
                e.fields.retain(|p| !changed.contains(p));
            }
        }
        match entries
            .iter_mut()
            .find(|e| e.manager == manager && e.operation == "Update" && e.subresource == sub)
        {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now.to_string();
                e.api_version = api_version.to_string();
            }
            None => entries.push(Entry {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                time: now.to_string(),
                subresource: sub.to_string(),
                fields: changed,
            }),
        }
    }
    prune(&mut entries, new);
    write_entries(new, &entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(m: &'a str, force: bool) -> ApplyRequest<'a> {
        ApplyRequest {
            manager: m,
            api_version: "v1",
            force,
            scope: Scope::Main {
                strip_status: false,
            },
            keyed: true,
            now: "2026-01-01T00:00:00Z",
        }
    }

    #[test]
    fn fields_v1_roundtrip() {
        let obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "labels": {"app": "a"}},
            "data": {"k": "v"},
            "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let f = fields_of(&obj, Scope::Main { strip_status: true }, true);
        let v = to_fields_v1(&f);
        assert_eq!(
            v,
            json!({"f:data": {"f:k": {}}, "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}, "f:image": {}, "f:name": {}}}}})
        );
        assert_eq!(from_fields_v1(&v), f);
    }

    #[test]
    fn apply_remove_and_conflict() {
        let skel = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
        let a1 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1", "b": "2"}});
        let o1 = apply(&skel, &a1, &req("m1", false)).expect("apply");
        assert_eq!(o1["data"], json!({"a": "1", "b": "2"}));
        let a2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1"}});
        let o2 = apply(&o1, &a2, &req("m1", false)).expect("apply");
        assert_eq!(o2["data"], json!({"a": "1"}));
        // Another manager changing a owned field conflicts.
        let a3 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "9"}});
        let err = apply(&o2, &a3, &req("m2", false)).expect_err("conflict");
        assert_eq!(err.code, 409);
        assert!(
            err.message.contains("conflict with \"m1\": .data.a"),
            "{}",
            err.message
        );
        let o3 = apply(&o2, &a3, &req("m2", true)).expect("forced");
        let entries = read_entries(&o3);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].manager, "m2");
        // Same value: shared ownership, no conflict.
        let o4 = apply(&o3, &a3, &req("m3", false)).expect("shared");
        assert_eq!(read_entries(&o4).len(), 2);
        // m2 drops the field; m3 still owns it so it stays.
        let a5 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
        let o5 = apply(&o4, &a5, &req("m2", false)).expect("apply");
        assert_eq!(o5["data"]["a"], "9");
    }

    #[test]
    fn update_takes_ownership() {
        let skel = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
        let a1 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1"}});
        let o1 = apply(&skel, &a1, &req("m1", false)).expect("apply");
        let mut o2 = o1.clone();
        o2["data"]["a"] = json!("2");
        record_update(
            Some(&o1),
            &mut o2,
            "kubectl-patch",
            "v1",
            Scope::Main {
                strip_status: false,
            },
            true,
            "t",
        );
        let e = read_entries(&o2);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].manager, "kubectl-patch");
        let err = apply(&o2, &a1, &req("m1", false)).expect_err("conflict");
        assert!(err.message.contains("kubectl-patch"), "{}", err.message);
    }
}
