//! Kubernetes manifests: multi-document YAML in, validated canonical
//! objects out.
//!
//! Each non-empty YAML document becomes one object: the document converted
//! to JSON (YAML merge keys applied) and serialised compactly with sorted
//! keys. That canonical form is what the bundle stores and what agents
//! apply, so agents need no YAML parser and the same YAML always gives the
//! same bytes.
//!
//! **Architecture invariant:** pure — bytes in, objects out; no file
//! system, no Git, no clock.

use crate::{yaml, Error, Result};

/// One Kubernetes object parsed from a YAML document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedObject {
    /// Index of the document in its file (0-based, counting empty ones).
    pub document: u32,
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace`, empty when not set.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// Canonical bytes: compact JSON with sorted keys.
    pub bytes: Vec<u8>,
}

/// Kinds that are cluster-scoped, as (API group, kind). They must not set
/// `metadata.namespace`. Kinds not listed here are treated as namespaced
/// (an empty namespace then means the agent's default namespace).
pub const CLUSTER_SCOPED: &[(&str, &str)] = &[
    ("", "Namespace"),
    ("", "Node"),
    ("", "PersistentVolume"),
    ("apiextensions.k8s.io", "CustomResourceDefinition"),
    ("apiregistration.k8s.io", "APIService"),
    ("rbac.authorization.k8s.io", "ClusterRole"),
    ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
    ("storage.k8s.io", "StorageClass"),
    ("storage.k8s.io", "CSIDriver"),
    ("storage.k8s.io", "CSINode"),
    ("storage.k8s.io", "VolumeAttachment"),
    ("scheduling.k8s.io", "PriorityClass"),
    ("node.k8s.io", "RuntimeClass"),
    ("networking.k8s.io", "IngressClass"),
    (
        "admissionregistration.k8s.io",
        "MutatingWebhookConfiguration",
    ),
    (
        "admissionregistration.k8s.io",
        "ValidatingWebhookConfiguration",
    ),
    ("admissionregistration.k8s.io", "ValidatingAdmissionPolicy"),
    (
        "admissionregistration.k8s.io",
        "ValidatingAdmissionPolicyBinding",
    ),
    ("flowcontrol.apiserver.k8s.io", "FlowSchema"),
    ("flowcontrol.apiserver.k8s.io", "PriorityLevelConfiguration"),
];

/// Whether objects of `kind` in API `group` are cluster-scoped.
pub fn is_cluster_scoped(group: &str, kind: &str) -> bool {
    CLUSTER_SCOPED
        .iter()
        .any(|(g, k)| *g == group && *k == kind)
}

/// Whether `path` names a file the builder parses (`.yaml`, `.yml` or
/// `.json`, as `kubectl apply -f DIR` reads them).
pub fn is_manifest_file(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml") || path.ends_with(".json")
}

/// A parsed file: its objects, its warnings, and the documents that are
/// not Kubernetes objects at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedFile {
    /// The objects, in file order.
    pub objects: Vec<ParsedObject>,
    /// Warnings, each starting with the file's path.
    pub warnings: Vec<String>,
    /// (document index, line) of mapping documents with neither
    /// `apiVersion` nor `kind` (a workflow, a values file, a config): not
    /// manifests. [`parse_file`] refuses them; the builder lists them all
    /// in one error that says how to exclude them.
    pub not_objects: Vec<(u32, usize)>,
}

/// Parses every document of a YAML or JSON file at `path` (used in
/// messages) into validated canonical objects, refusing documents that are
/// not Kubernetes objects. See [`parse_file_full`].
pub fn parse_file(path: &str, bytes: &[u8], max_object_bytes: u64) -> Result<Vec<ParsedObject>> {
    let f = parse_file_full(path, bytes, max_object_bytes)?;
    if let Some((index, line)) = f.not_objects.first() {
        return Err(Error::Manifest {
            file: path.to_owned(),
            reason: format!(
                "document {index} (line {line}): not a Kubernetes object (no apiVersion or kind); exclude the file with a `.cairnignore` line"
            ),
        });
    }
    Ok(f.objects)
}

/// Parses every document of a file as `kubectl apply -f` reads it:
/// `.json` files as a stream of JSON values, other files as
/// multi-document YAML with YAML 1.1 scalars (see [`crate::yaml`]); a
/// leading UTF-8 byte order mark is skipped; numbers are normalised as
/// Kubernetes reads them (`1e1` is the integer 10); a `List` (any kind
/// ending in `List` with an `items` array, as `kubectl get -o yaml` writes)
/// stands for its items, which take consecutive document numbers (items
/// of a `FooList` without apiVersion and kind get the list's apiVersion
/// and kind `Foo`, as kubectl does). Empty documents are skipped. Objects
/// over `max_object_bytes` are refused. Hostile YAML (deep nesting, alias
/// bombs, non-core tags) is refused before parsing, in time linear in the
/// input. Never panics, whatever the bytes.
pub fn parse_file_full(path: &str, bytes: &[u8], max_object_bytes: u64) -> Result<ParsedFile> {
    let err = |reason: String| Error::Manifest {
        file: path.to_owned(),
        reason,
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(err("not UTF-8 text".into()));
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = ParsedFile::default();
    // (index, line, value)
    let mut documents: Vec<(u32, usize, serde_json::Value)> = Vec::new();
    if path.ends_with(".json") {
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
        let mut index = 0u32;
        loop {
            let offset = stream.byte_offset();
            let Some(r) = stream.next() else { break };
            let mut v = r.map_err(|e| {
                err(format!(
                    "invalid JSON at line {} column {}: {e}",
                    e.line(),
                    e.column()
                ))
            })?;
            yaml::kube_numbers(&mut v);
            let skipped = &text[offset..stream.byte_offset()];
            let lead = skipped.len() - skipped.trim_start().len();
            let line = 1 + text[..offset + lead].matches('\n').count();
            documents.push((index, line, v));
            index = index.saturating_add(1);
        }
    } else {
        for doc in yaml::parse_documents(text).map_err(|e| err(e.to_string()))? {
            out.warnings
                .extend(doc.warnings.iter().map(|w| format!("{path}: {w}")));
            if let Some(v) = doc.value {
                documents.push((doc.index, doc.line, v));
            }
        }
    }
    let mut offset = 0u32;
    for (index, line, json) in documents {
        let doc_err = |reason: String| err(format!("document {index}: {reason}"));
        if let serde_json::Value::Object(o) = &json {
            if !o.contains_key("apiVersion") && !o.contains_key("kind") {
                out.not_objects.push((index, line));
                continue;
            }
        }
        let items = list_items(&json).map_err(doc_err)?;
        let objects = match items {
            Some(items) => items,
            None => vec![json],
        };
        let count = u32::try_from(objects.len()).unwrap_or(u32::MAX);
        for (k, json) in objects.into_iter().enumerate() {
            let number = index
                .saturating_add(offset)
                .saturating_add(u32::try_from(k).unwrap_or(u32::MAX));
            let obj = validate_object(&json).map_err(doc_err)?;
            let canonical = serde_json::to_vec(&json).map_err(|e| doc_err(e.to_string()))?;
            if canonical.len() as u64 > max_object_bytes {
                return Err(Error::TooLarge {
                    what: format!(
                        "{path}: document {index} ({} {})",
                        obj.kind,
                        display(&obj.namespace, &obj.name)
                    ),
                    limit: max_object_bytes,
                    actual: canonical.len() as u64,
                });
            }
            out.objects.push(ParsedObject {
                document: number,
                bytes: canonical,
                ..obj
            });
        }
        offset = offset.saturating_add(count.saturating_sub(1));
    }
    Ok(out)
}

/// The items of a list document (`kind` ending in `List` with an `items`
/// array), with apiVersion and kind filled in as kubectl does; `None` for
/// any other document. Lists inside lists are refused.
fn list_items(
    json: &serde_json::Value,
) -> std::result::Result<Option<Vec<serde_json::Value>>, String> {
    use serde_json::Value as J;
    let J::Object(o) = json else { return Ok(None) };
    let (Some(J::String(kind)), Some(J::Array(items))) = (o.get("kind"), o.get("items")) else {
        return Ok(None);
    };
    let Some(item_kind) = kind.strip_suffix("List") else {
        return Ok(None);
    };
    let api_version = o.get("apiVersion").cloned().unwrap_or(J::Null);
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let mut item = item.clone();
        if let J::Object(m) = &mut item {
            if !item_kind.is_empty() && !m.contains_key("kind") && !m.contains_key("apiVersion") {
                m.insert("kind".into(), J::String(item_kind.to_owned()));
                m.insert("apiVersion".into(), api_version.clone());
            }
            if list_items(&J::Object(m.clone()))?.is_some() {
                return Err(format!(
                    "{kind} item {i}: lists are not supported inside lists; write each object as its own YAML document"
                ));
            }
        }
        out.push(item);
    }
    Ok(Some(out))
}

fn display(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}/{name}")
    }
}

fn field<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    name: &str,
    at: &str,
) -> std::result::Result<Option<&'a str>, String> {
    match obj.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{at}` must be a string")),
    }
}

/// Checks that `json` is a Kubernetes object and extracts its identity.
/// The returned object's `bytes` and `document` are left empty.
pub fn validate_object(json: &serde_json::Value) -> std::result::Result<ParsedObject, String> {
    let serde_json::Value::Object(obj) = json else {
        return Err(
            "not a mapping (a Kubernetes object needs apiVersion, kind and metadata.name)".into(),
        );
    };
    let required = |v: Option<&str>, name: &str| -> std::result::Result<String, String> {
        match v {
            Some(s) if !s.trim().is_empty() => Ok(s.to_owned()),
            Some(_) => Err(format!("`{name}` is empty")),
            None => Err(format!("missing `{name}`")),
        }
    };
    let api_version = required(field(obj, "apiVersion", "apiVersion")?, "apiVersion")?;
    let kind = required(field(obj, "kind", "kind")?, "kind")?;
    let meta = match obj.get("metadata") {
        Some(serde_json::Value::Object(m)) => m,
        None | Some(serde_json::Value::Null) => {
            return Err(format!("{kind}: missing `metadata.name`"))
        }
        Some(_) => return Err(format!("{kind}: `metadata` must be a mapping")),
    };
    if field(meta, "name", "metadata.name")?.is_none() {
        if let Some(g) = field(meta, "generateName", "metadata.generateName")? {
            return Err(format!(
                "{kind}: `metadata.generateName` (`{}`) cannot be in a bundle: each apply would create a new object, and the agent needs a stable name to diff and prune it; set `metadata.name` instead",
                cairn_keys::text::escape_untrusted(g)
            ));
        }
    }
    let name = required(field(meta, "name", "metadata.name")?, "metadata.name")
        .map_err(|e| format!("{kind}: {e}"))?;
    let namespace = field(meta, "namespace", "metadata.namespace")?
        .unwrap_or("")
        .to_owned();
    if api_version.matches('/').count() > 1 || api_version.contains(char::is_whitespace) {
        return Err(format!(
            "{kind} {name}: malformed apiVersion `{api_version}`"
        ));
    }
    if kind.contains(|c: char| !c.is_ascii_alphanumeric()) {
        return Err(format!("malformed kind `{kind}`"));
    }
    if kind == "List" || (kind.ends_with("List") && obj.contains_key("items")) {
        return Err(format!(
            "{kind} {name}: lists are not supported; write each object as its own YAML document"
        ));
    }
    if name.len() > 253 || name.contains(|c: char| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("{kind}: malformed metadata.name `{name}`"));
    }
    if !namespace.is_empty()
        && (namespace.len() > 63
            || !namespace
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    {
        return Err(format!(
            "{kind} {name}: malformed metadata.namespace `{namespace}`"
        ));
    }
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    if !namespace.is_empty() && is_cluster_scoped(group, &kind) {
        return Err(format!(
            "{kind} {name} is cluster-scoped and must not set metadata.namespace (found `{namespace}`)"
        ));
    }
    Ok(ParsedObject {
        document: 0,
        api_version,
        kind,
        namespace,
        name,
        bytes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 20;

    fn one(yaml: &str) -> ParsedObject {
        let mut v = parse_file("f.yaml", yaml.as_bytes(), MAX).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    fn fail(yaml: &str) -> String {
        parse_file("dir/f.yaml", yaml.as_bytes(), MAX)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn canonical_json_sorts_keys_and_is_compact() {
        let o = one("kind: ConfigMap\napiVersion: v1\nmetadata: {name: a, namespace: ns}\ndata:\n  z: \"1\"\n  a: '2'\n");
        assert_eq!(
            String::from_utf8(o.bytes).unwrap(),
            r#"{"apiVersion":"v1","data":{"a":"2","z":"1"},"kind":"ConfigMap","metadata":{"name":"a","namespace":"ns"}}"#
        );
        assert_eq!(
            (o.kind.as_str(), o.namespace.as_str(), o.name.as_str()),
            ("ConfigMap", "ns", "a")
        );
    }

    #[test]
    fn same_object_different_formatting_same_bytes() {
        let a = one("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata: {x: y}\n");
        let b = one("# comment\nkind: \"ConfigMap\"\nmetadata: {name: 'a'}\napiVersion: v1\ndata:\n  x: y\n");
        assert_eq!(a.bytes, b.bytes);
    }

    #[test]
    fn multi_document_indices_count_empty_documents() {
        let y = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n# only a comment\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n";
        let v = parse_file("f.yaml", y.as_bytes(), MAX).unwrap();
        assert_eq!(
            v.iter()
                .map(|o| (o.document, o.name.as_str()))
                .collect::<Vec<_>>(),
            [(0, "a"), (2, "b")]
        );
    }

    #[test]
    fn merge_keys_are_applied() {
        let o = one("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\nbase: &b {x: 1}\ndata:\n  <<: *b\n  y: 2\n");
        let s = String::from_utf8(o.bytes).unwrap();
        assert!(s.contains(r#""data":{"x":1,"y":2}"#), "{s}");
    }

    #[test]
    fn malformed_yaml_names_file_line_and_column() {
        let e = fail("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n");
        assert!(e.starts_with("dir/f.yaml: invalid YAML at line "), "{e}");
        assert!(e.contains("column"), "{e}");
    }

    #[test]
    fn missing_kind_or_name_names_document() {
        let e = fail("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nmetadata: {name: b}\n");
        assert_eq!(e, "dir/f.yaml: document 1: missing `kind`");
        let e = fail("apiVersion: v1\nkind: ConfigMap\nmetadata: {namespace: x}\n");
        assert_eq!(
            e,
            "dir/f.yaml: document 0: ConfigMap: missing `metadata.name`"
        );
        let e = fail("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ''}\n");
        assert!(e.contains("`metadata.name` is empty"), "{e}");
        let e = fail("- a\n- b\n");
        assert!(e.contains("document 0: not a mapping"), "{e}");
    }

    #[test]
    fn cluster_scoped_with_namespace_is_refused() {
        let e = fail("apiVersion: v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n");
        assert!(e.contains("Namespace a is cluster-scoped"), "{e}");
        let e = fail("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: a, namespace: b}\n");
        assert!(e.contains("cluster-scoped"), "{e}");
        // A namespaced kind may leave the namespace empty.
        assert_eq!(
            one("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n").namespace,
            ""
        );
    }

    #[test]
    fn non_json_yaml_is_refused() {
        let e = fail("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata:\n  1: x\n");
        assert!(e.contains("`data`: mapping key `1` is not a string"), "{e}");
        let e =
            fail("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: !custom {a: b}\n");
        assert_eq!(
            e,
            "dir/f.yaml: line 4 column 7: YAML tag `!custom` is not allowed; only the core schema's !!str, !!int, !!float, !!bool, !!null, !!map, !!seq are"
        );
        let e = fail("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\nx: .nan\n");
        assert!(e.contains("cannot be represented in JSON"), "{e}");
    }

    #[test]
    fn oversized_object_is_refused() {
        let big = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: a}}\ndata: {{x: {}}}\n",
            "y".repeat(200)
        );
        let e = parse_file("f.yaml", big.as_bytes(), 100).unwrap_err();
        assert!(matches!(e, Error::TooLarge { limit: 100, .. }), "{e}");
    }

    #[test]
    fn hostile_yaml_is_refused_before_parsing() {
        let e = fail(&"[".repeat(1 << 20));
        assert!(
            e.starts_with(
                "dir/f.yaml: line 1 column 100: collections nested deeper than 100 levels"
            ),
            "{e}"
        );
        let e = fail(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {x: !!binary aGk=}\n",
        );
        assert!(
            e.starts_with("dir/f.yaml: line 4 column 11: YAML tag `!!binary`"),
            "{e}"
        );
        let e = fail("a: !!python/object/apply:os.system [\"id\"]\n");
        assert!(
            e.contains("`!!python/object/apply:os.system` is not allowed"),
            "{e}"
        );
    }

    #[test]
    fn garbage_never_panics() {
        for bytes in [
            &b"\xff\xfe"[..],
            b"*a",
            b"&a [*a]",
            b"- &a\n- *a\n- *b",
            b"\"unterminated",
            b"{{{{}}}}]]]]",
            b"---\n...\n%YAML 1.2\n---\n|\n  x\n",
            b"? [a]\n: b\n",
        ] {
            let _ = parse_file("f.yaml", bytes, MAX);
        }
    }

    #[test]
    fn lists_are_refused() {
        // A List stands for its items (as kubectl reads it); a list inside
        // a list is refused.
        let e = fail("apiVersion: v1\nkind: List\nmetadata: {name: a}\nitems:\n- {apiVersion: v1, kind: List, items: []}\n");
        assert!(e.contains("lists are not supported"), "{e}");
    }

    #[test]
    fn lists_expand_to_their_items() {
        let y = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n- {apiVersion: v1, kind: Secret, metadata: {name: b}}\n---\napiVersion: v1\nkind: ConfigMapList\nitems:\n- metadata: {name: c}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: d}\n";
        let v = parse_file("f.yaml", y.as_bytes(), MAX).unwrap();
        let got: Vec<_> = v
            .iter()
            .map(|o| (o.document, o.kind.as_str(), o.name.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (0, "ConfigMap", "a"),
                (1, "Secret", "b"),
                (2, "ConfigMap", "c"),
                (3, "ConfigMap", "d")
            ]
        );
        assert_eq!(
            String::from_utf8(v[2].bytes.clone()).unwrap(),
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}"#
        );
    }

    #[test]
    fn yaml11_scalars_json_bom_and_generate_name() {
        let o = one("\u{feff}apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  tty: yes\n  stdin: on\n  mode: 0755\n  r: 1e1\n  q: '0755'\n  t: 2001-12-14\n");
        assert_eq!(
            String::from_utf8(o.bytes).unwrap(),
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"},"spec":{"mode":493,"q":"0755","r":10,"stdin":true,"t":"2001-12-14","tty":true}}"#
        );
        let f = parse_file_full(
            "d/p.yaml",
            b"apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  tty: yes\n",
            MAX,
        )
        .unwrap();
        assert_eq!(f.warnings.len(), 1);
        assert!(
            f.warnings[0].starts_with("d/p.yaml: line 5: `spec.tty`: `yes` is read as true"),
            "{:?}",
            f.warnings
        );
        let j = parse_file("a.json", "\u{feff}{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"j\"}, \"x\": 1.0}\n{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"k\"}}".as_bytes(), MAX).unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(
            String::from_utf8(j[0].bytes.clone()).unwrap(),
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"j"},"x":1}"#
        );
        let e = fail("apiVersion: v1\nkind: Pod\nmetadata: {generateName: job-}\n");
        assert!(
            e.contains("`metadata.generateName` (`job-`) cannot be in a bundle"),
            "{e}"
        );
        assert!(e.contains("set `metadata.name`"), "{e}");
    }

    #[test]
    fn non_objects_are_reported_not_parsed() {
        let f = parse_file_full("ci.yaml", b"on: push\njobs: {}\n", MAX).unwrap();
        assert_eq!(f.not_objects, [(0, 1)]);
        assert!(f.objects.is_empty());
        let e = fail("name: x\n");
        assert!(e.contains("not a Kubernetes object"), "{e}");
        assert!(e.contains(".cairnignore"), "{e}");
    }

    #[test]
    fn duplicate_keys_name_their_line() {
        let e = fail("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  x: \"1\"\n  y: \"2\"\n  x: \"3\"\n");
        assert_eq!(
            e,
            "dir/f.yaml: document 0: `data`: duplicate key `x` (first at line 6) (line 8 column 3)"
        );
    }
}
