//! Comparing two bundle manifests by object identity
//! (`group/Kind/namespace/name`).
//!
//! **Architecture invariant:** pure.

use crate::bundle::{Entry, Manifest};
use std::collections::BTreeMap;

/// An object present in both bundles with different content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    /// The entry in the old bundle.
    pub old: Entry,
    /// The entry in the new bundle.
    pub new: Entry,
}

/// The difference between two bundles, each list sorted by object key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BundleDiff {
    /// Objects only in the new bundle.
    pub added: Vec<Entry>,
    /// Objects only in the old bundle.
    pub removed: Vec<Entry>,
    /// Objects in both whose content differs.
    pub changed: Vec<Changed>,
    /// Objects in both with identical content (possibly moved to another
    /// file).
    pub unchanged: usize,
}

impl BundleDiff {
    /// Whether the bundles hold the same objects with the same content.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Compares `old` and `new`.
pub fn diff(old: &Manifest, new: &Manifest) -> BundleDiff {
    let index = |m: &Manifest| -> BTreeMap<String, Entry> {
        m.entries.iter().map(|e| (e.key(), e.clone())).collect()
    };
    let (o, n) = (index(old), index(new));
    let mut d = BundleDiff::default();
    for (k, ne) in &n {
        match o.get(k) {
            None => d.added.push(ne.clone()),
            Some(oe) if oe.object != ne.object => d.changed.push(Changed {
                old: oe.clone(),
                new: ne.clone(),
            }),
            Some(_) => d.unchanged += 1,
        }
    }
    d.removed = o
        .iter()
        .filter(|(k, _)| !n.contains_key(*k))
        .map(|(_, e)| e.clone())
        .collect();
    d
}
