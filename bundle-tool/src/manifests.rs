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
    parse_file_with(path, bytes, max_object_bytes, true)
}

/// [`parse_file_full`], with the transcoder tried first for YAML when
/// `transcode` (tests compare both paths).
fn parse_file_with(
    path: &str,
    bytes: &[u8],
    max_object_bytes: u64,
    transcode: bool,
) -> Result<ParsedFile> {
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
        if let Some(f) = transcode
            .then(|| parse_yaml_transcoded(path, text, max_object_bytes))
            .flatten()
        {
            return Ok(f);
        }
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

/// [`parse_file_full`] of a YAML text through
/// [`yaml::transcode_documents`]: canonical bytes written straight from
/// the parser's events, identity from the few fields
/// [`validate_object`] reads. `None` wherever that path does not apply
/// or anything is wrong (a `List`, an object over the size limit, a
/// document that does not validate, and whatever the transcoder leaves
/// to the composer); the composer's path then gives the result or the
/// error, so both paths give the same bytes, warnings and errors
/// (`tests::transcoder_and_composer_agree`).
fn parse_yaml_transcoded(path: &str, text: &str, max_object_bytes: u64) -> Option<ParsedFile> {
    let docs = yaml::transcode_documents(text)?;
    let mut out = ParsedFile::default();
    for doc in docs {
        out.warnings
            .extend(doc.warnings.iter().map(|w| format!("{path}: {w}")));
        let Some(bytes) = doc.bytes else { continue };
        let serde_json::Value::Object(id) = &doc.identity else {
            return None;
        };
        if !id.contains_key("apiVersion") && !id.contains_key("kind") {
            out.not_objects.push((doc.index, doc.line));
            continue;
        }
        if let Some(serde_json::Value::String(kind)) = id.get("kind") {
            if kind.ends_with("List") {
                return None;
            }
        }
        let obj = validate_object(&doc.identity).ok()?;
        if bytes.len() as u64 > max_object_bytes {
            return None;
        }
        out.objects.push(ParsedObject {
            document: doc.index,
            bytes,
            ..obj
        });
    }
    Some(out)
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

/// The transcoder ([`parse_yaml_transcoded`]) against the composer: same
/// objects, bytes, warnings, non-objects and errors, on the fixtures and a
/// generated corpus.
#[cfg(test)]
mod transcoder_tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    const MAX: u64 = 1 << 20;

    /// Both paths on one text; whether the transcoder took it.
    fn agree(path: &str, text: &str, max: u64) -> std::result::Result<bool, String> {
        let show = |r: Result<ParsedFile>| r.map_err(|e| e.to_string());
        let fast = show(parse_file_with(path, text.as_bytes(), max, true));
        let composed = show(parse_file_with(path, text.as_bytes(), max, false));
        if fast != composed {
            return Err(format!(
                "{text:?}\ntranscoded: {fast:?}\ncomposed:   {composed:?}"
            ));
        }
        Ok(parse_yaml_transcoded(path, text, max).is_some())
    }

    #[test]
    fn transcoder_and_composer_agree_on_the_fixtures() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut texts: Vec<(String, String)> = Vec::new();
        for dir in [
            "tests/fuzz/corpus/yaml_objects",
            "deploy/kubernetes",
            "bundle-tool/tests/fixtures/helm/repo/apps/plain",
        ] {
            let dir = format!("{root}/{dir}");
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                    let t = std::fs::read_to_string(&p).unwrap();
                    texts.push((p.display().to_string(), t));
                }
            }
        }
        use cairn_test_support::fixture as fx;
        let app = fx::app_name(7);
        for t in [
            fx::CRD.to_owned(),
            format!("{}---\n{}", fx::CRD, fx::SENSOR),
            fx::configmap(&app, 3, 2),
            fx::deployment(&app),
            fx::service(&app),
        ] {
            texts.push(("fixture.yaml".into(), t));
        }
        assert!(texts.len() >= 10, "{}", texts.len());
        let mut fast = 0;
        for (path, text) in &texts {
            if agree(path, text, MAX).unwrap_or_else(|e| panic!("{e}")) {
                fast += 1;
            }
        }
        // The bench fixture's files all take the transcoder.
        for (_, text) in texts.iter().rev().take(5) {
            assert!(
                parse_yaml_transcoded("f.yaml", text, MAX).is_some(),
                "{text}"
            );
        }
        assert!(fast >= texts.len() / 2, "{fast} of {}", texts.len());
        // What the transcoder leaves to the composer, each once.
        for text in [
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\nbase: &b {x: 1}\ndata:\n  <<: *b\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {x: !!str 1}\n",
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {x: 1, x: 2}\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {1: x}\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ''}\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: [a]}\n",
            "- a\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\nx: .nan\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a\n",
        ] {
            assert!(!agree("f.yaml", text, MAX).unwrap_or_else(|e| panic!("{e}")), "{text}");
        }
        // Over the size limit: the composer's error.
        let text = fx::configmap(&app, 1, 1);
        assert!(!agree("f.yaml", &text, 100).unwrap_or_else(|e| panic!("{e}")));
    }

    /// A generated YAML node.
    #[derive(Clone, Debug)]
    enum Node {
        Scalar(&'static str),
        Seq(Vec<Node>),
        Map(Vec<(&'static str, Node)>),
    }

    /// Scalars: YAML 1.1 and 1.2 numbers, booleans and nulls, quoted text
    /// with escapes, Unicode.
    const SCALARS: &[&str] = &[
        "x",
        "hello world",
        "yes",
        "No",
        "on",
        "OFF",
        "y",
        "~",
        "null",
        "",
        "true",
        "0755",
        "0o17",
        "0x1F",
        "-0x10",
        "0b101",
        "1e1",
        "1.5",
        ".5",
        "-.5e3",
        "+12",
        "-0",
        "1_000",
        "09",
        "1e400",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551616",
        "2001-12-14",
        "1:20",
        "tRUE",
        "-",
        "\"quoted \\\" é \\n\"",
        "'single ''q'''",
        "\"\\t\\u00e9\\x41\\U0001F600\"",
        "héllo wörld",
        "\"😀\"",
        "'0755'",
        "\"\"",
        "'yes'",
        "\"line\\u2028sep\"",
        "\"\\u0000\\u001f\\u007f\"",
        "a\\b",
        "\"</script>\"",
        "12.0",
        "1e-7",
        "3.14159265358979323846",
        "0.1",
        "-1",
        "1_2.5",
        "0x_1",
        "+.5",
        "1.",
        "0b2",
        "08",
        "0o8",
        "-9223372036854775808",
        ".e1",
    ];

    /// Scalars the transcoder leaves to the composer (tags, anchors,
    /// aliases, values JSON cannot hold).
    const ODD_SCALARS: &[&str] = &["!!str 1", "!!int 7", "&a x", "*a", ".nan", "-.inf"];

    /// Keys: YAML 1.1 booleans (kept as text, warned), quoted and Unicode
    /// keys, identity field names in other places.
    const KEYS: &[&str] = &[
        "a",
        "b",
        "z",
        "A",
        "_",
        "é",
        "ü",
        "a b",
        "yes",
        "on",
        "N",
        "\"1\"",
        "'x y'",
        "\"k\\u00e9\"",
        "name",
        "namespace",
        "items",
        "data",
        "\"\"",
        "aa",
        "a.b",
        "'~'",
        "\"\\u0000\"",
        "Z",
        "ab",
    ];

    /// Keys the transcoder leaves to the composer (not strings, merge
    /// keys) or that clash with the identity fields.
    const ODD_KEYS: &[&str] = &["1", "~", "<<", "kind", "apiVersion", "metadata", "true"];

    fn scalar() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            300 => prop::sample::select(SCALARS),
            1 => prop::sample::select(ODD_SCALARS),
        ]
    }

    fn key() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            300 => prop::sample::select(KEYS),
            1 => prop::sample::select(ODD_KEYS),
        ]
    }

    fn node() -> impl Strategy<Value = Node> {
        let leaf = scalar().prop_map(Node::Scalar);
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Node::Seq),
                (prop::collection::vec((key(), inner), 0..5), 0..8u8)
                    .prop_map(|(m, dup)| Node::Map(distinct(m, dup))),
            ]
        })
    }

    /// The members with each key once, except now and then (`dup` 0), so
    /// that duplicate keys are tested but do not dominate.
    fn distinct(mut m: Vec<(&'static str, Node)>, dup: u8) -> Vec<(&'static str, Node)> {
        if dup != 0 {
            let mut seen = std::collections::BTreeSet::new();
            m.retain(|(k, _)| seen.insert(*k));
        }
        m
    }

    fn flow(n: &Node, out: &mut String) {
        match n {
            Node::Scalar(s) => out.push_str(s),
            Node::Seq(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    flow(v, out);
                }
                out.push(']');
            }
            Node::Map(members) => {
                out.push('{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(k);
                    out.push_str(": ");
                    flow(v, out);
                }
                out.push('}');
            }
        }
    }

    fn block(members: &[(&str, Node)], indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        for (k, v) in members {
            out.push_str(&pad);
            out.push_str(k);
            out.push(':');
            match v {
                Node::Map(m) if !m.is_empty() => {
                    out.push('\n');
                    block(m, indent + 2, out);
                }
                Node::Seq(items) if !items.is_empty() => {
                    out.push('\n');
                    for item in items {
                        out.push_str(&pad);
                        out.push_str("  - ");
                        flow(item, out);
                        out.push('\n');
                    }
                }
                other => {
                    out.push(' ');
                    flow(other, out);
                    out.push('\n');
                }
            }
        }
    }

    /// A stream: documents that are mostly objects (identity fields first,
    /// then random members, block or flow style), empty documents and
    /// the odd bare node.
    fn stream() -> impl Strategy<Value = String> {
        // Mostly valid identities, sometimes not.
        fn pick(
            good: &'static [&'static str],
            bad: &'static [&'static str],
        ) -> impl Strategy<Value = &'static str> {
            prop_oneof![8 => prop::sample::select(good), 1 => prop::sample::select(bad)]
        }
        let doc = (
            pick(&["v1", "apps/v1", "'v1'"], &["~", "1", "a/b/c"]),
            pick(
                &["ConfigMap", "Deployment", "Service", "\"Secret\""],
                &["FooList", "x y", "''", "Namespace", "ClusterRole"],
            ),
            pick(
                &["a", "'b'", "\"c-1\"", "'yes'", "x.y"],
                &["~", "''", "yes", "0755"],
            ),
            pick(&["", "edge", "default", "''"], &["Bad", "~"]),
            prop::collection::vec((key(), node()), 0..6),
            0..10u8,
            0..8u8,
        );
        prop::collection::vec(doc, 0..4).prop_map(|docs| {
            let mut out = String::new();
            for (i, (api, kind, name, ns, members, shape, dup)) in docs.into_iter().enumerate() {
                let members = distinct(members, dup);
                if i > 0 || shape == 1 {
                    out.push_str("---\n");
                }
                match shape {
                    // An empty document.
                    0 => continue,
                    // A bare node.
                    2 => {
                        flow(
                            &members
                                .first()
                                .map(|m| m.1.clone())
                                .unwrap_or(Node::Scalar("x")),
                            &mut out,
                        );
                        out.push('\n');
                        continue;
                    }
                    // Flow style throughout.
                    3 => {
                        let mut m = vec![
                            ("apiVersion", Node::Scalar(api)),
                            ("kind", Node::Scalar(kind)),
                        ];
                        m.extend(members);
                        flow(&Node::Map(m), &mut out);
                        out.push('\n');
                        continue;
                    }
                    _ => {}
                }
                if shape != 4 {
                    out.push_str(&format!("apiVersion: {api}\nkind: {kind}\n"));
                }
                let mut meta = vec![("name", Node::Scalar(name))];
                if !ns.is_empty() {
                    meta.push(("namespace", Node::Scalar(ns)));
                }
                if shape == 5 {
                    meta.push(("labels", Node::Map(vec![("app", Node::Scalar("x"))])));
                }
                block(&[("metadata", Node::Map(meta))], 0, &mut out);
                block(&members, 0, &mut out);
            }
            out
        })
    }

    #[test]
    fn transcoder_and_composer_agree_on_a_generated_corpus() {
        let mut runner = TestRunner::new(Config {
            cases: 3000,
            failure_persistence: None,
            ..Config::default()
        });
        let fast = std::cell::Cell::new(0usize);
        let objects = std::cell::Cell::new(0usize);
        runner
            .run(&stream(), |text| {
                let took = agree("f.yaml", &text, MAX).map_err(TestCaseError::fail)?;
                if took {
                    fast.set(fast.get() + 1);
                    if let Some(f) = parse_yaml_transcoded("f.yaml", &text, MAX) {
                        objects.set(objects.get() + f.objects.len());
                    }
                }
                Ok(())
            })
            .unwrap();
        // The corpus exercises the transcoder, not only the fallback.
        eprintln!(
            "transcoder took {} of 3000 streams, {} objects",
            fast.get(),
            objects.get()
        );
        assert!(fast.get() >= 600, "transcoder took {} streams", fast.get());
        assert!(objects.get() >= 600, "{} objects transcoded", objects.get());
    }
}
