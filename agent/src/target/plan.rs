//! Reconcile planning for file-based targets: desired objects + what the
//! target owns + what is observed → actions. Pure.
//!
//! **Architecture invariant:** no file system, no clock. The shell
//! ([`super::manifests_dir`]) observes files, calls [`plan`] and carries out
//! the [`Plan`]. Ownership is the inventory: a file the inventory does not
//! list is foreign and is never overwritten or deleted.

use cairn_bundle::bundle::Entry;
use std::collections::{BTreeMap, BTreeSet};

/// One object the target should hold, under its file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFile {
    /// File name (see [`file_names`]).
    pub name: String,
    /// The object's address (= SHA-256 of the file content).
    pub address: String,
}

/// What a file currently holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Absent.
    Missing,
    /// Present with content hashing to this address.
    Content(String),
    /// Present but not a regular file, or too large to be an object.
    Other,
}

/// The files the target owns: file name → address last written.
pub type Inventory = BTreeMap<String, String>;

/// Why a file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteReason {
    /// A new object.
    Create,
    /// The object changed in a new release.
    Update,
    /// The file was edited or deleted by hand: restore it.
    Drift,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the object's bytes to the file.
    Write {
        /// File name.
        name: String,
        /// Object address.
        address: String,
        /// Why.
        reason: WriteReason,
    },
    /// Delete an owned file whose object is no longer desired.
    Delete {
        /// File name.
        name: String,
    },
    /// A foreign file occupies a desired name with other content: left
    /// alone and reported.
    Conflict {
        /// File name.
        name: String,
    },
}

/// The outcome of planning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Actions, writes before deletes, each group sorted by name.
    pub actions: Vec<Action>,
    /// Inventory to record *before* acting: everything owned now or about
    /// to be written, so a crash mid-way never orphans a written file.
    pub intent: Inventory,
    /// Inventory to record after every action succeeded.
    pub after: Inventory,
    /// Files already as desired.
    pub unchanged: usize,
}

impl Plan {
    /// Whether nothing needs doing.
    pub fn is_noop(&self) -> bool {
        self.actions.is_empty()
    }
}

/// Plans the actions that make the observed files equal the desired ones.
/// `observed` must hold an entry for every desired and every inventory
/// name (missing entries count as [`Observed::Missing`]).
pub fn plan(
    desired: &[DesiredFile],
    inventory: &Inventory,
    observed: &BTreeMap<String, Observed>,
) -> Plan {
    let mut p = Plan::default();
    let mut writes = Vec::new();
    let mut deletes = Vec::new();
    let desired_names: BTreeSet<&str> = desired.iter().map(|d| d.name.as_str()).collect();
    for d in desired {
        let obs = observed.get(&d.name).unwrap_or(&Observed::Missing);
        let owned = inventory.get(&d.name);
        if *obs == Observed::Content(d.address.clone()) {
            // Already right (ours, or a foreign file with identical bytes,
            // which we now own).
            p.unchanged += 1;
            p.after.insert(d.name.clone(), d.address.clone());
            continue;
        }
        match owned {
            None if *obs != Observed::Missing => {
                p.actions.push(Action::Conflict {
                    name: d.name.clone(),
                });
                continue;
            }
            None => writes.push(Action::Write {
                name: d.name.clone(),
                address: d.address.clone(),
                reason: WriteReason::Create,
            }),
            Some(prev) => writes.push(Action::Write {
                name: d.name.clone(),
                address: d.address.clone(),
                reason: if *prev == d.address {
                    WriteReason::Drift
                } else {
                    WriteReason::Update
                },
            }),
        }
        p.after.insert(d.name.clone(), d.address.clone());
    }
    for name in inventory.keys() {
        if desired_names.contains(name.as_str()) {
            continue;
        }
        match observed.get(name).unwrap_or(&Observed::Missing) {
            Observed::Missing => {}
            _ => deletes.push(Action::Delete { name: name.clone() }),
        }
    }
    p.intent = inventory.clone();
    for (k, v) in &p.after {
        p.intent.insert(k.clone(), v.clone());
    }
    p.actions.extend(writes);
    p.actions.extend(deletes);
    p
}

/// Stable file names for a bundle's entries:
/// `<namespace or _cluster>__<kind>__<name>.yaml`. When two entries would
/// share a name (same kind and name in different API groups), those get the
/// group in the kind part: `<ns>__<kind>.<group>__<name>.yaml`. Characters
/// outside `A-Za-z0-9._-` are replaced by `_` so a name can never leave the
/// directory. Returns names in entry order.
pub fn file_names(entries: &[Entry]) -> Vec<String> {
    let base = |e: &Entry, with_group: bool| {
        let ns = if e.namespace.is_empty() {
            "_cluster"
        } else {
            e.namespace.as_str()
        };
        let kind = if with_group && !e.group().is_empty() {
            format!("{}.{}", e.kind, e.group())
        } else {
            e.kind.clone()
        };
        format!(
            "{}__{}__{}.yaml",
            sanitize(ns),
            sanitize(&kind),
            sanitize(&e.name)
        )
    };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in entries {
        *counts.entry(base(e, false)).or_default() += 1;
    }
    entries
        .iter()
        .map(|e| {
            let b = base(e, false);
            if counts.get(&b).copied().unwrap_or(0) > 1 {
                base(e, true)
            } else {
                b
            }
        })
        .collect()
}

fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with('.') {
        out.replace_range(..1, "_");
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str, addr: &str) -> DesiredFile {
        DesiredFile {
            name: name.into(),
            address: addr.into(),
        }
    }

    fn obs(pairs: &[(&str, Observed)]) -> BTreeMap<String, Observed> {
        pairs
            .iter()
            .map(|(n, o)| (n.to_string(), o.clone()))
            .collect()
    }

    fn inv(pairs: &[(&str, &str)]) -> Inventory {
        pairs
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect()
    }

    fn c(a: &str) -> Observed {
        Observed::Content(a.into())
    }

    #[test]
    fn fresh_directory_creates_everything() {
        let p = plan(
            &[d("a", "1"), d("b", "2")],
            &Inventory::new(),
            &BTreeMap::new(),
        );
        assert_eq!(p.actions.len(), 2);
        assert!(p.actions.iter().all(|a| matches!(
            a,
            Action::Write {
                reason: WriteReason::Create,
                ..
            }
        )));
        assert_eq!(p.after, inv(&[("a", "1"), ("b", "2")]));
        assert_eq!(p.intent, p.after);
    }

    #[test]
    fn in_sync_is_noop() {
        let p = plan(&[d("a", "1")], &inv(&[("a", "1")]), &obs(&[("a", c("1"))]));
        assert!(p.is_noop());
        assert_eq!(p.unchanged, 1);
    }

    #[test]
    fn update_prune_and_drift() {
        let p = plan(
            &[d("a", "1"), d("b", "3"), d("e", "5")],
            &inv(&[
                ("a", "1"),
                ("b", "2"),
                ("c", "4"),
                ("gone", "9"),
                ("e", "5"),
            ]),
            &obs(&[
                ("a", c("x")),
                ("b", c("2")),
                ("c", c("4")),
                ("e", Observed::Missing),
            ]),
        );
        assert_eq!(
            p.actions,
            vec![
                Action::Write {
                    name: "a".into(),
                    address: "1".into(),
                    reason: WriteReason::Drift
                },
                Action::Write {
                    name: "b".into(),
                    address: "3".into(),
                    reason: WriteReason::Update
                },
                Action::Write {
                    name: "e".into(),
                    address: "5".into(),
                    reason: WriteReason::Drift
                },
                Action::Delete { name: "c".into() },
            ]
        );
        // The intent keeps the files still to delete; after drops them.
        assert!(p.intent.contains_key("c"));
        assert_eq!(p.after, inv(&[("a", "1"), ("b", "3"), ("e", "5")]));
    }

    #[test]
    fn foreign_files_are_never_touched() {
        let p = plan(
            &[d("a", "1"), d("same", "2")],
            &Inventory::new(),
            &obs(&[("a", c("other")), ("same", c("2")), ("foreign", c("f"))]),
        );
        assert_eq!(p.actions, vec![Action::Conflict { name: "a".into() }]);
        assert!(!p.after.contains_key("a"));
        assert!(
            p.after.contains_key("same"),
            "identical foreign file is adopted"
        );
        assert!(!p.intent.contains_key("foreign"));
    }

    #[test]
    fn changed_file_type_is_rewritten_only_if_owned() {
        let p = plan(
            &[d("a", "1")],
            &inv(&[("a", "1")]),
            &obs(&[("a", Observed::Other)]),
        );
        assert!(matches!(
            p.actions[0],
            Action::Write {
                reason: WriteReason::Drift,
                ..
            }
        ));
    }

    fn entry(group_version: &str, kind: &str, ns: &str, name: &str) -> Entry {
        Entry {
            path: "x".into(),
            document: 0,
            api_version: group_version.into(),
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
            object: String::new(),
            size: 0,
        }
    }

    #[test]
    fn file_names_are_stable_safe_and_unique() {
        let es = [
            entry("v1", "ConfigMap", "web", "conf"),
            entry("v1", "Namespace", "", "web"),
            entry("networking.k8s.io/v1", "Ingress", "web", "x"),
            entry("extensions/v1beta1", "Ingress", "web", "x"),
            entry("v1", "Secret", "../..", "a/b"),
        ];
        let n = file_names(&es);
        assert_eq!(n[0], "web__ConfigMap__conf.yaml");
        assert_eq!(n[1], "_cluster__Namespace__web.yaml");
        assert_eq!(n[2], "web__Ingress.networking.k8s.io__x.yaml");
        assert_eq!(n[3], "web__Ingress.extensions__x.yaml");
        assert_eq!(n[4], "_._..__Secret__a_b.yaml");
        assert!(n.iter().all(|x| !x.contains('/') && !x.starts_with('.')));
    }
}
