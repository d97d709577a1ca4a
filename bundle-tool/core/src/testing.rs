//! Builders for tests (feature `testing`): small, valid bundle entries and
//! manifests. Not part of the product's API.

use crate::bundle::{Entry, Manifest, Source, BUNDLE_FORMAT};

/// A ConfigMap `ns/name` with one data key `k = data`: its entry and its
/// canonical bytes.
pub fn object(ns: &str, name: &str, data: &str) -> (Entry, Vec<u8>) {
    let bytes = format!(
        r#"{{"apiVersion":"v1","data":{{"k":"{data}"}},"kind":"ConfigMap","metadata":{{"name":"{name}","namespace":"{ns}"}}}}"#
    )
    .into_bytes();
    let e = Entry {
        path: format!("{name}.yaml"),
        document: 0,
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        namespace: ns.into(),
        name: name.into(),
        object: crate::ids::Address::of(&bytes),
        size: bytes.len() as u64,
    };
    (e, bytes)
}

/// A manifest of `objs`, entries sorted by path and document.
pub fn manifest(objs: &[(Entry, Vec<u8>)]) -> Manifest {
    let mut entries: Vec<Entry> = objs.iter().map(|(e, _)| e.clone()).collect();
    entries.sort_by(|a, b| (&a.path, a.document).cmp(&(&b.path, b.document)));
    Manifest {
        format: BUNDLE_FORMAT,
        source: Source {
            repository: "fixture".into(),
            commit: "0".repeat(40),
            path: String::new(),
            rendered: Vec::new(),
        },
        entries,
        images: None,
    }
}
