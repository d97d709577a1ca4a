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

/// Whether `path` names a file the builder parses (`.yaml` or `.yml`).
pub fn is_manifest_file(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml")
}

/// Parses every document of a YAML file at `path` (used in messages) into
/// validated canonical objects. Empty documents are skipped. Objects over
/// `max_object_bytes` are refused. Hostile YAML (deep nesting, alias
/// bombs, non-core tags) is refused before parsing, in time linear in the
/// input (see [`crate::yaml`]). Never panics, whatever the bytes.
pub fn parse_file(path: &str, bytes: &[u8], max_object_bytes: u64) -> Result<Vec<ParsedObject>> {
    let err = |reason: String| Error::Manifest {
        file: path.to_owned(),
        reason,
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(err("not UTF-8 text".into()));
    };
    let documents = yaml::parse_documents(text).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for doc in documents {
        let index = doc.index;
        let Some(json) = doc.value else {
            continue;
        };
        let doc_err = |reason: String| err(format!("document {index}: {reason}"));
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
        out.push(ParsedObject {
            document: index,
            bytes: canonical,
            ..obj
        });
    }
    Ok(out)
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
        let e = fail("apiVersion: v1\nkind: List\nmetadata: {name: a}\nitems: []\n");
        assert!(e.contains("lists are not supported"), "{e}");
    }
}
