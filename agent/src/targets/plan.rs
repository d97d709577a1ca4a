//! Reconcile planning for file-based targets: desired objects + what the
//! target owns + what is observed → ordered actions. Pure.
//!
//! **Architecture invariant:** no file system, no clock. The shell
//! ([`super::manifests_dir`]) observes files, calls [`plan`] and carries out
//! the [`Plan`]. Ownership is the inventory: a file the inventory does not
//! list is foreign and is never overwritten or deleted.
//!
//! Ownership has two parts ([`Ownership`]): the files as the last completed
//! reconcile left them, and the writes a reconcile announced before it
//! started (its *pending* writes). A restart after a crash finds some of
//! those writes done and some not: a difference on a pending name is the
//! agent's own unfinished work (a create or update), never hand-made drift.
//!
//! Order matters on a nearly full file system: deletes come first (they
//! free space), then writes by growing size difference (shrinking updates
//! before growing ones, creates last), so the peak is as low as the switch
//! allows. Each action carries the address the file held before, so the
//! shell can undo a switch that fails half-way.

use cairn_core::bundle::Entry;
use std::collections::{BTreeMap, BTreeSet};

/// One object the target should hold, under its file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFile {
    /// File name (see [`file_names`]).
    pub name: String,
    /// The object's address (= SHA-256 of the file content).
    pub address: String,
    /// The object's size in bytes.
    pub size: u64,
}

/// What a file currently holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Absent.
    Missing,
    /// A regular file with content hashing to `address`, `size` bytes.
    Content {
        /// SHA-256 address of the content.
        address: String,
        /// Size in bytes.
        size: u64,
    },
    /// Present but not a regular file, or too large to be an object.
    Other,
}

impl Observed {
    fn address(&self) -> Option<&str> {
        match self {
            Observed::Content { address, .. } => Some(address),
            _ => None,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Observed::Content { size, .. } => *size,
            _ => 0,
        }
    }
}

/// The files the target owns: file name → address last written.
pub type Inventory = BTreeMap<String, String>;

/// Announced changes: file name → address being written, `None` for a
/// delete.
pub type Pending = BTreeMap<String, Option<String>>;

/// What the agent knows it owns before a reconcile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    /// The files as the last completed reconcile left them.
    pub files: Inventory,
    /// What an interrupted reconcile announced: name → address it was
    /// writing, or `None` for a delete. A pending name not in `files` is
    /// owned only while it holds exactly the announced content.
    pub pending: Pending,
}

/// Why a file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteReason {
    /// A new object.
    Create,
    /// The object changed in a new release (or an interrupted write of the
    /// agent's own is finished).
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
        /// What the file held before (to undo the write): `None` when it
        /// was missing or not a regular file.
        previous: Option<String>,
    },
    /// Delete an owned file whose object is no longer desired.
    Delete {
        /// File name.
        name: String,
        /// What the file held (to undo the delete), if a regular file.
        previous: Option<String>,
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
    /// Actions: deletes first (by name), then writes by ascending size
    /// difference (then name), then conflicts.
    pub actions: Vec<Action>,
    /// Owned files before acting (`Ownership::files` plus pending names
    /// whose write had completed): what an undone switch leaves owned.
    pub before: Inventory,
    /// The changes to announce before acting (writes with their address,
    /// deletes as `None`), so a crash mid-way is recognised as unfinished
    /// work and never orphans a file.
    pub pending: Pending,
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
/// `observed` must hold an entry for every desired, owned and pending name
/// (missing entries count as [`Observed::Missing`]). Takes the ownership
/// by value: its files become [`Plan::before`] without a copy (at 30,000
/// objects each such map is several MiB).
pub fn plan(
    desired: &[DesiredFile],
    owned: Ownership,
    observed: &BTreeMap<&str, Observed>,
) -> Plan {
    let mut p = Plan::default();
    let look = |name: &str| observed.get(name).unwrap_or(&Observed::Missing);
    let Ownership { files, pending } = owned;
    let owned_pending = pending;
    // Effective ownership before acting.
    p.before = files;
    for (name, address) in &owned_pending {
        if let Some(address) = address {
            if !p.before.contains_key(name) && look(name).address() == Some(address.as_str()) {
                p.before.insert(name.clone(), address.clone());
            }
        }
    }
    let mut writes: Vec<(i128, Action)> = Vec::new();
    let mut deletes = Vec::new();
    let mut conflicts = Vec::new();
    let desired_names: BTreeSet<&str> = desired.iter().map(|d| d.name.as_str()).collect();
    for d in desired {
        let obs = look(&d.name);
        if obs.address() == Some(d.address.as_str()) {
            // Already right (ours, or a foreign file with identical bytes,
            // which we now own).
            p.unchanged += 1;
            p.after.insert(d.name.clone(), d.address.clone());
            continue;
        }
        // A name an interrupted reconcile was writing or deleting: any
        // difference is that reconcile's unfinished work, not drift.
        let touched = owned_pending.contains_key(&d.name);
        let reason = match p.before.get(&d.name) {
            None if *obs != Observed::Missing => {
                conflicts.push(Action::Conflict {
                    name: d.name.clone(),
                });
                continue;
            }
            None => WriteReason::Create,
            Some(_) if touched && *obs == Observed::Missing => WriteReason::Create,
            Some(_) if touched => WriteReason::Update,
            Some(prev) if *prev == d.address => WriteReason::Drift,
            Some(_) => WriteReason::Update,
        };
        let delta = i128::from(d.size) - i128::from(obs.size());
        writes.push((
            delta,
            Action::Write {
                name: d.name.clone(),
                address: d.address.clone(),
                reason,
                previous: obs.address().map(str::to_owned),
            },
        ));
        p.pending.insert(d.name.clone(), Some(d.address.clone()));
        p.after.insert(d.name.clone(), d.address.clone());
    }
    for name in p.before.keys() {
        if desired_names.contains(name.as_str()) {
            continue;
        }
        match look(name) {
            Observed::Missing => {}
            obs => {
                p.pending.insert(name.clone(), None);
                deletes.push(Action::Delete {
                    name: name.clone(),
                    previous: obs.address().map(str::to_owned),
                })
            }
        }
    }
    // Stable: equal differences keep name order (desired order is by
    // manifest, so sort by name explicitly).
    writes.sort_by(|(da, a), (db, b)| da.cmp(db).then_with(|| action_name(a).cmp(action_name(b))));
    p.actions.extend(deletes);
    p.actions.extend(writes.into_iter().map(|(_, a)| a));
    p.actions.extend(conflicts);
    p
}

/// The file name an action is about.
pub fn action_name(a: &Action) -> &str {
    match a {
        Action::Write { name, .. } | Action::Delete { name, .. } | Action::Conflict { name } => {
            name
        }
    }
}

/// Whether `name` is a file name [`file_names`] can produce: 1–255 bytes
/// of `A-Za-z0-9._-`, not starting with `.`, ending in `.yaml`. Such a
/// name can never leave the directory, name a hidden file, or be `.`/`..`.
pub fn is_entry_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.ends_with(".yaml")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
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
mod tests;
