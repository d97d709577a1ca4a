//! PATCH bodies: JSON merge patch (RFC 7386), a subset of strategic merge patch,
//! and JSON patch (RFC 6902).

use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};

/// The merge keys of well-known lists of built-in kinds (used by strategic merge
/// patch and by server-side apply). Returns `None` if the list is atomic, i.e. the
/// field is not a known keyed list or an item lacks its key.
pub fn list_keys(field: &str, items: &[Value]) -> Option<&'static [&'static str]> {
    let keys: &'static [&'static str] = match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => &["name"],
        "volumeMounts" => &["mountPath"],
        "ports" => {
            if items.iter().all(|i| i.get("containerPort").is_some()) {
                &["containerPort"]
            } else {
                &["port"]
            }
        }
        _ => return None,
    };
    let ok = items
        .iter()
        .all(|i| i.is_object() && keys.iter().all(|k| i.get(*k).is_some_and(|v| !v.is_null())));
    ok.then_some(keys)
}

/// Whether two list items have the same merge key values.
pub fn same_key(keys: &[&str], a: &Value, b: &Value) -> bool {
    keys.iter()
        .all(|k| a.get(*k).is_some() && a.get(*k) == b.get(*k))
}

/// Applies an RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(pm) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(tm) = target {
                for (k, pv) in pm {
                    if pv.is_null() {
                        tm.remove(k);
                    } else {
                        let entry = tm.entry(k.clone()).or_insert(Value::Null);
                        merge_patch(entry, pv);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Removes strategic-merge directive keys (`$patch`, `$setElementOrder/...`, ...).
fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// Applies a strategic merge patch, simplified: like a merge patch, except that the
/// well-known keyed lists of built-in kinds ([`list_keys`]) are merged by key, items
/// with `$patch: delete` are removed, `$patch: replace` on a map replaces it,
/// `$deleteFromPrimitiveList/<field>` removes values, and other directives are ignored.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(pm) = patch else {
        *target = patch.clone();
        return;
    };
    if pm.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(tm) = target else { return };
    for (k, pv) in pm {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(del)) = (tm.get_mut(field), pv) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if pv.is_null() {
            tm.remove(k);
            continue;
        }
        match (tm.get_mut(k), pv) {
            (Some(tv @ Value::Object(_)), Value::Object(_)) => strategic_merge_patch(tv, pv),
            (Some(Value::Array(tl)), Value::Array(pl)) => {
                let all: Vec<Value> = tl.iter().chain(pl.iter()).cloned().collect();
                let stripped: Vec<Value> = pl
                    .iter()
                    .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("delete"))
                    .cloned()
                    .collect();
                match list_keys(k, &all) {
                    Some(keys) => {
                        for item in pl {
                            let pos = tl.iter().position(|t| same_key(keys, t, item));
                            if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                                if let Some(p) = pos {
                                    tl.remove(p);
                                }
                                continue;
                            }
                            match pos {
                                Some(p) => strategic_merge_patch(&mut tl[p], item),
                                None => tl.push(strip_directives(item)),
                            }
                        }
                    }
                    None => *tl = stripped.iter().map(strip_directives).collect(),
                }
            }
            _ => {
                let mut fresh = Value::Null;
                if pv.is_object() {
                    strategic_merge_patch(&mut fresh, pv);
                } else {
                    fresh = strip_directives(pv);
                }
                tm.insert(k.clone(), fresh);
            }
        }
    }
}

fn parse_pointer(p: &str) -> ApiResult<Vec<String>> {
    if p.is_empty() {
        return Ok(vec![]);
    }
    let rest = p.strip_prefix('/').ok_or_else(|| {
        ApiError::new(
            422,
            "Invalid",
            format!("JSON pointer {p:?} must start with '/'"),
        )
    })?;
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn jp_err(msg: String) -> ApiError {
    ApiError::new(422, "Invalid", msg)
}

fn get_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path {
        cur = match cur {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn parent_mut<'a>(v: &'a mut Value, path: &[String], full: &str) -> ApiResult<&'a mut Value> {
    let mut cur = v;
    for seg in path {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(seg)
                .ok_or_else(|| jp_err(format!("doc is missing path: {full:?}")))?,
            Value::Array(a) => {
                let i: usize = seg
                    .parse()
                    .map_err(|_| jp_err(format!("invalid array index in path {full:?}")))?;
                a.get_mut(i)
                    .ok_or_else(|| jp_err(format!("doc is missing path: {full:?}")))?
            }
            _ => return Err(jp_err(format!("doc is missing path: {full:?}"))),
        };
    }
    Ok(cur)
}

fn add_at(doc: &mut Value, path: &[String], value: Value, full: &str) -> ApiResult<()> {
    let Some((last, parent)) = path.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parent, full)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
            } else {
                let i: usize = last
                    .parse()
                    .map_err(|_| jp_err(format!("invalid array index in path {full:?}")))?;
                if i > a.len() {
                    return Err(jp_err(format!("index out of bounds in path {full:?}")));
                }
                a.insert(i, value);
            }
        }
        _ => return Err(jp_err(format!("doc is missing path: {full:?}"))),
    }
    Ok(())
}

fn remove_at(doc: &mut Value, path: &[String], full: &str) -> ApiResult<Value> {
    let Some((last, parent)) = path.split_last() else {
        return Err(jp_err("cannot remove the document root".into()));
    };
    match parent_mut(doc, parent, full)? {
        Value::Object(m) => m.remove(last).ok_or_else(|| {
            jp_err(format!(
                "unable to remove nonexistent key: {last}: missing value"
            ))
        }),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| jp_err(format!("invalid array index in path {full:?}")))?;
            if i >= a.len() {
                return Err(jp_err(format!("index out of bounds in path {full:?}")));
            }
            Ok(a.remove(i))
        }
        _ => Err(jp_err(format!("doc is missing path: {full:?}"))),
    }
}

/// Applies an RFC 6902 JSON patch (add, remove, replace, test, move, copy).
pub fn json_patch(doc: &mut Value, patch: &Value) -> ApiResult<()> {
    let ops = patch
        .as_array()
        .ok_or_else(|| ApiError::bad_request("json patch must be a JSON array of operations"))?;
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("json patch operation is missing \"op\""))?;
        let path_s = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("json patch operation is missing \"path\""))?;
        let path = parse_pointer(path_s)?;
        let value = || {
            op.get("value").cloned().ok_or_else(|| {
                ApiError::bad_request(format!("json patch {kind} operation is missing \"value\""))
            })
        };
        let from = || -> ApiResult<(String, Vec<String>)> {
            let f = op.get("from").and_then(Value::as_str).ok_or_else(|| {
                ApiError::bad_request(format!("json patch {kind} operation is missing \"from\""))
            })?;
            Ok((f.to_string(), parse_pointer(f)?))
        };
        match kind {
            "add" => add_at(doc, &path, value()?, path_s)?,
            "remove" => {
                remove_at(doc, &path, path_s)?;
            }
            "replace" => {
                if get_at(doc, &path).is_none() {
                    return Err(jp_err(format!(
                        "replace operation does not apply: doc is missing key: {path_s}: missing value"
                    )));
                }
                if path.is_empty() {
                    *doc = value()?;
                } else {
                    remove_at(doc, &path, path_s)?;
                    add_at(doc, &path, value()?, path_s)?;
                }
            }
            "test" => {
                let expected = value()?;
                if get_at(doc, &path) != Some(&expected) {
                    return Err(jp_err(format!(
                        "testing value {path_s} failed: test failed"
                    )));
                }
            }
            "move" => {
                let (fs, fp) = from()?;
                let v = remove_at(doc, &fp, &fs)?;
                add_at(doc, &path, v, path_s)?;
            }
            "copy" => {
                let (fs, fp) = from()?;
                let v = get_at(doc, &fp)
                    .cloned()
                    .ok_or_else(|| jp_err(format!("doc is missing from path: {fs:?}")))?;
                add_at(doc, &path, v, path_s)?;
            }
            other => return Err(ApiError::bad_request(format!("Unexpected kind: {other}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": null, "b": {"c": 5}, "l": [3]}));
        assert_eq!(t, json!({"b": {"c": 5, "d": 3}, "l": [3]}));
    }

    #[test]
    fn strategic() {
        let mut t = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        strategic_merge_patch(
            &mut t,
            &json!({"spec": {"$setElementOrder/containers": [{"name": "a"}], "containers": [{"name": "a", "image": "z"}, {"name": "b", "$patch": "delete"}, {"name": "c", "image": "w"}]}}),
        );
        assert_eq!(
            t,
            json!({"spec": {"containers": [{"name": "a", "image": "z"}, {"name": "c", "image": "w"}]}})
        );
    }

    #[test]
    fn jsonpatch() {
        let mut d = json!({"a": {"b": [1, 2]}, "c": "x"});
        json_patch(
            &mut d,
            &json!([
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "replace", "path": "/c", "value": "y"},
                {"op": "test", "path": "/c", "value": "y"},
                {"op": "copy", "from": "/c", "path": "/d"},
                {"op": "move", "from": "/d", "path": "/e"},
                {"op": "remove", "path": "/a/b/0"}
            ]),
        )
        .expect("patch");
        assert_eq!(d, json!({"a": {"b": [2, 3]}, "c": "y", "e": "y"}));
        let err = json_patch(&mut d, &json!([{"op": "test", "path": "/c", "value": "n"}]))
            .expect_err("test fails");
        assert_eq!(err.code, 422);
        assert_eq!(
            json_patch(&mut d, &json!({"op": "x"}))
                .expect_err("not array")
                .code,
            400
        );
    }
}
