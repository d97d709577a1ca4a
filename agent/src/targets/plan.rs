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
//!
//! Memory (issue 17): a plan is O(objects), so it holds no copy of a
//! desired name or address. An action names a desired file by its index
//! into [`DesiredFiles`]; the announced changes ([`Plan::pending`]) and the
//! inventory after the switch ([`Plan::after`]) are views derived from the
//! plan and the desired files, serialized as JSON maps without building
//! them; addresses are 32-byte [`Digest`]s, written as `sha256:<hex>`.

use super::DesiredEntries;
use cairn_core::bundle::Entry;
use std::collections::BTreeMap;
use std::fmt;

/// A SHA-256 content address held as its 32 bytes. Reads and writes (and
/// displays) as `sha256:<64 lower-case hex>`, the form of
/// [`cairn_core::Address`], so JSON holding it is byte for byte what a
/// `String` address produced.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Parses `sha256:<64 lower-case hex>`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix("sha256:")?.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let nibble = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Self(out))
    }

    /// The digest of a (validated) address. Total: an [`cairn_core::Address`]
    /// is always `sha256:` and 64 lower-case hex digits.
    pub fn of_address(a: &cairn_core::Address) -> Self {
        Self::parse(a).unwrap_or(Self([0; 32]))
    }

    /// The SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(cairn_keys::sha256(bytes))
    }

    /// As an [`cairn_core::Address`] (for the store, and messages).
    pub fn to_address(&self) -> cairn_core::Address {
        // Always valid; `of` of nothing is never reached.
        cairn_core::Address::parse_owned(self.to_string())
            .unwrap_or_else(|_| cairn_core::Address::of(b""))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = [0u8; 7 + 64];
        s[..7].copy_from_slice(b"sha256:");
        for (i, b) in self.0.iter().enumerate() {
            s[7 + 2 * i] = HEX[usize::from(b >> 4)];
            s[8 + 2 * i] = HEX[usize::from(b & 15)];
        }
        // ASCII by construction.
        f.write_str(std::str::from_utf8(&s).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        Digest::parse(other) == Some(*self)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("{} is not an object address", shown(&s)))
        })
    }
}

/// An untrusted string for a message: escaped, at most 80 characters.
pub(crate) fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(80)
        .collect::<String>()
        .escape_debug()
        .collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    format!("\"{out}\"")
}

/// One object the target should hold, under its file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFile<'a> {
    /// File name (see [`file_names`]).
    pub name: &'a str,
    /// The object's address (= SHA-256 of the file content).
    pub address: Digest,
    /// The object's size in bytes.
    pub size: u64,
}

/// The desired files, with their indices sorted by name (one per name:
/// of files sharing a name, the last counts, as a map keyed by name
/// would keep it).
#[derive(Clone, Debug, Default)]
pub struct DesiredFiles<'a> {
    files: Vec<DesiredFile<'a>>,
    /// Indices into `files`, by name, one per name.
    by_name: Vec<u32>,
}

impl<'a> DesiredFiles<'a> {
    /// Indexes `files` by name.
    pub fn new(files: Vec<DesiredFile<'a>>) -> Self {
        let mut by_name: Vec<u32> = (0..files.len() as u32).collect();
        // Stable: equal names keep index order, and the last one stays.
        by_name.sort_by(|&a, &b| files[a as usize].name.cmp(files[b as usize].name));
        let mut kept: Vec<u32> = Vec::with_capacity(by_name.len());
        for i in by_name {
            match kept.last_mut() {
                Some(last) if files[*last as usize].name == files[i as usize].name => *last = i,
                _ => kept.push(i),
            }
        }
        Self {
            files,
            by_name: kept,
        }
    }

    /// Every desired file, in desired order.
    pub fn files(&self) -> &[DesiredFile<'a>] {
        &self.files
    }

    /// The file at `index`.
    pub fn get(&self, index: usize) -> Option<&DesiredFile<'a>> {
        self.files.get(index)
    }

    /// The name of the file at `index` (`""` out of range).
    pub fn name(&self, index: usize) -> &'a str {
        self.files.get(index).map_or("", |f| f.name)
    }

    /// The index of the file named `name` (the last of several).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name
            .binary_search_by(|&i| self.files[i as usize].name.cmp(name))
            .ok()
            .map(|k| self.by_name[k] as usize)
    }

    /// Whether `index` is the file that counts for its name.
    pub fn counts(&self, index: usize) -> bool {
        self.files.get(index).and_then(|f| self.index_of(f.name)) == Some(index)
    }
}

/// What a file currently holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Absent.
    Missing,
    /// A regular file with content hashing to `address`, `size` bytes.
    Content {
        /// SHA-256 of the content.
        address: Digest,
        /// Size in bytes.
        size: u64,
    },
    /// Present but not a regular file, or too large to be an object.
    Other,
}

impl Observed {
    fn address(&self) -> Option<Digest> {
        match self {
            Observed::Content { address, .. } => Some(*address),
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

/// What the files hold: one observation per desired file (by index) and
/// one for each other name the plan looks at (owned or pending names not
/// desired). Names without one count as [`Observed::Missing`].
#[derive(Clone, Debug, Default)]
pub struct Observations {
    /// By desired index.
    pub desired: Vec<Observed>,
    /// Names that are not desired, by name.
    pub other: BTreeMap<String, Observed>,
}

impl Observations {
    fn get(&self, desired: &DesiredFiles<'_>, name: &str) -> &Observed {
        match desired.index_of(name) {
            Some(i) => self.at(i),
            None => self.other.get(name).unwrap_or(&Observed::Missing),
        }
    }

    fn at(&self, index: usize) -> &Observed {
        self.desired.get(index).unwrap_or(&Observed::Missing)
    }
}

/// The files the target owns: file name → address last written.
pub type Inventory = BTreeMap<String, Digest>;

/// Announced changes: file name → address being written, `None` for a
/// delete.
pub type Pending = BTreeMap<String, Option<Digest>>;

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
    /// Write the desired file `index`'s object to its file.
    Write {
        /// Index into the [`DesiredFiles`] planned with.
        index: usize,
        /// Why.
        reason: WriteReason,
        /// What the file held before (to undo the write): `None` when it
        /// was missing or not a regular file.
        previous: Option<Digest>,
    },
    /// Delete an owned file whose object is no longer desired.
    Delete {
        /// File name.
        name: String,
        /// What the file held (to undo the delete), if a regular file.
        previous: Option<Digest>,
    },
    /// A foreign file occupies the name of the desired file `index` with
    /// other content: left alone and reported.
    Conflict {
        /// Index into the [`DesiredFiles`] planned with.
        index: usize,
    },
}

/// What a plan does with one desired file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Already right.
    Keep,
    /// Written.
    Write,
    /// Left alone: a foreign file holds the name.
    Conflict,
    /// Another desired file of the same name counts instead.
    Shadowed,
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
    /// Files already as desired.
    pub unchanged: usize,
    /// By desired index.
    fates: Vec<Fate>,
}

impl Plan {
    /// Whether nothing needs doing.
    pub fn is_noop(&self) -> bool {
        self.actions.is_empty()
    }

    /// The changes to announce before acting (writes with their address,
    /// deletes as `None`), so a crash mid-way is recognised as unfinished
    /// work and never orphans a file. `desired` must be what was planned
    /// with.
    pub fn pending<'p>(&'p self, desired: &'p DesiredFiles<'p>) -> PendingView<'p> {
        PendingView {
            plan: self,
            desired,
        }
    }

    /// The inventory to record after every action succeeded. `desired`
    /// must be what was planned with.
    pub fn after<'p>(&'p self, desired: &'p DesiredFiles<'p>) -> AfterView<'p> {
        AfterView {
            plan: self,
            desired,
        }
    }
}

/// [`Plan::pending`]: serializes as the map `Pending` would, in name order.
pub struct PendingView<'p> {
    plan: &'p Plan,
    desired: &'p DesiredFiles<'p>,
}

impl PendingView<'_> {
    /// Every announced change in name order (a write, or `None` for a
    /// delete).
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<Digest>)> + '_ {
        let writes = self
            .desired
            .by_name
            .iter()
            .map(|&i| i as usize)
            .filter(|&i| self.plan.fates.get(i) == Some(&Fate::Write))
            .filter_map(|i| self.desired.get(i))
            .map(|f| (f.name, Some(f.address)));
        // Deletes come first among the actions, by name (from `before`).
        let deletes = self.plan.actions.iter().map_while(|a| match a {
            Action::Delete { name, .. } => Some((name.as_str(), None)),
            _ => None,
        });
        merge_by_name(writes, deletes)
    }

    /// As a map (a copy; tests and messages).
    pub fn to_map(&self) -> Pending {
        self.iter().map(|(n, a)| (n.to_owned(), a)).collect()
    }
}

impl serde::Serialize for PendingView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// [`Plan::after`]: serializes as the map `Inventory` would, in name
/// order.
pub struct AfterView<'p> {
    plan: &'p Plan,
    desired: &'p DesiredFiles<'p>,
}

impl AfterView<'_> {
    /// Every file owned after the switch, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Digest)> + '_ {
        self.desired
            .by_name
            .iter()
            .map(|&i| i as usize)
            .filter(|&i| matches!(self.plan.fates.get(i), Some(Fate::Keep | Fate::Write)))
            .filter_map(|i| self.desired.get(i))
            .map(|f| (f.name, f.address))
    }

    /// Whether it lists exactly `inventory`.
    pub fn same_as(&self, inventory: &Inventory) -> bool {
        let mut theirs = inventory.iter();
        for (name, address) in self.iter() {
            match theirs.next() {
                Some((n, a)) if n == name && *a == address => {}
                _ => return false,
            }
        }
        theirs.next().is_none()
    }

    /// As a map (a copy; tests and messages).
    pub fn to_map(&self) -> Inventory {
        self.iter().map(|(n, a)| (n.to_owned(), a)).collect()
    }
}

impl serde::Serialize for AfterView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// Merges two name-sorted streams of disjoint names.
fn merge_by_name<'n, T>(
    a: impl Iterator<Item = (&'n str, T)>,
    b: impl Iterator<Item = (&'n str, T)>,
) -> impl Iterator<Item = (&'n str, T)> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.0 < x.0 => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

/// Plans the actions that make the observed files equal the desired ones.
/// `observed` should hold an entry for every desired, owned and pending
/// name (missing entries count as [`Observed::Missing`]). Takes the
/// ownership by value: its files become [`Plan::before`] without a copy.
pub fn plan(desired: &DesiredFiles<'_>, owned: Ownership, observed: &Observations) -> Plan {
    let mut p = Plan::default();
    let look = |name: &str| observed.get(desired, name);
    let Ownership { files, pending } = owned;
    let owned_pending = pending;
    // Effective ownership before acting.
    p.before = files;
    for (name, address) in &owned_pending {
        if let Some(address) = address {
            if !p.before.contains_key(name) && look(name).address() == Some(*address) {
                p.before.insert(name.clone(), *address);
            }
        }
    }
    let mut writes: Vec<Action> = Vec::new();
    let mut conflicts = Vec::new();
    p.fates = Vec::with_capacity(desired.files.len());
    for (i, d) in desired.files.iter().enumerate() {
        if !desired.counts(i) {
            p.fates.push(Fate::Shadowed);
            continue;
        }
        let obs = observed.at(i);
        if obs.address() == Some(d.address) {
            // Already right (ours, or a foreign file with identical bytes,
            // which we now own).
            p.unchanged += 1;
            p.fates.push(Fate::Keep);
            continue;
        }
        // A name an interrupted reconcile was writing or deleting: any
        // difference is that reconcile's unfinished work, not drift.
        let touched = owned_pending.contains_key(d.name);
        let reason = match p.before.get(d.name) {
            None if *obs != Observed::Missing => {
                conflicts.push(Action::Conflict { index: i });
                p.fates.push(Fate::Conflict);
                continue;
            }
            None => WriteReason::Create,
            Some(_) if touched && *obs == Observed::Missing => WriteReason::Create,
            Some(_) if touched => WriteReason::Update,
            Some(prev) if *prev == d.address => WriteReason::Drift,
            Some(_) => WriteReason::Update,
        };
        writes.push(Action::Write {
            index: i,
            reason,
            previous: obs.address(),
        });
        p.fates.push(Fate::Write);
    }
    for name in p.before.keys() {
        if desired.index_of(name).is_some() {
            continue;
        }
        match look(name) {
            Observed::Missing => {}
            obs => p.actions.push(Action::Delete {
                name: name.clone(),
                previous: obs.address(),
            }),
        }
    }
    // Stable: equal differences keep name order (desired order is by
    // manifest, so sort by name explicitly).
    let delta = |a: &Action| match a {
        Action::Write { index, .. } => {
            let size = desired.get(*index).map_or(0, |d| d.size);
            i128::from(size) - i128::from(observed.at(*index).size())
        }
        _ => 0,
    };
    writes.sort_by(|a, b| {
        delta(a)
            .cmp(&delta(b))
            .then_with(|| action_name(a, desired).cmp(action_name(b, desired)))
    });
    p.actions.extend(writes);
    p.actions.extend(conflicts);
    p
}

/// The file name an action is about (`desired`: what was planned with).
pub fn action_name<'a>(a: &'a Action, desired: &DesiredFiles<'a>) -> &'a str {
    match a {
        Action::Write { index, .. } | Action::Conflict { index } => desired.name(*index),
        Action::Delete { name, .. } => name,
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

/// The file names of a bundle's entries in one buffer (one allocation
/// for all names instead of one per name; see [`file_names`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileNames {
    buf: String,
    /// End of each name in `buf`.
    ends: Vec<u32>,
}

impl FileNames {
    /// The names of `entries`, in entry order (see [`file_names`]).
    pub fn of(entries: &DesiredEntries) -> Self {
        let plain = Self::build(entries, |_| false);
        // Names shared by several entries get the group.
        let mut order: Vec<u32> = (0..entries.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| plain.get(a as usize).cmp(plain.get(b as usize)));
        let mut shared = vec![false; entries.len()];
        for w in order.windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize);
            if plain.get(a) == plain.get(b) {
                shared[a] = true;
                shared[b] = true;
            }
        }
        if !shared.contains(&true) {
            return plain;
        }
        drop(plain);
        Self::build(entries, |i| shared[i])
    }

    fn build(entries: &DesiredEntries, with_group: impl Fn(usize) -> bool) -> Self {
        let mut out = Self {
            buf: String::new(),
            ends: Vec::with_capacity(entries.len()),
        };
        for (i, e) in entries.iter().enumerate() {
            let ns = if e.namespace.is_empty() {
                "_cluster"
            } else {
                e.namespace
            };
            push_sanitized(&mut out.buf, ns);
            out.buf.push_str("__");
            if with_group(i) && !e.group().is_empty() {
                push_sanitized(&mut out.buf, &format!("{}.{}", e.kind, e.group()));
            } else {
                push_sanitized(&mut out.buf, e.kind);
            }
            out.buf.push_str("__");
            push_sanitized(&mut out.buf, e.name);
            out.buf.push_str(".yaml");
            out.ends.push(out.buf.len() as u32);
        }
        out.buf.shrink_to_fit();
        out
    }

    /// The `i`-th name (`""` out of range).
    pub fn get(&self, i: usize) -> &str {
        let Some(&end) = self.ends.get(i) else {
            return "";
        };
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.buf.get(start as usize..end as usize).unwrap_or("")
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// Stable file names for a bundle's entries:
/// `<namespace or _cluster>__<kind>__<name>.yaml`. When two entries would
/// share a name (same kind and name in different API groups), those get the
/// group in the kind part: `<ns>__<kind>.<group>__<name>.yaml`. Characters
/// outside `A-Za-z0-9._-` are replaced by `_` so a name can never leave the
/// directory. Returns names in entry order.
pub fn file_names(entries: &[Entry]) -> Vec<String> {
    let names = FileNames::of(&entries.iter().collect());
    (0..names.len()).map(|i| names.get(i).to_owned()).collect()
}

/// Appends `s` with characters outside `A-Za-z0-9._-` replaced by `_`, a
/// leading `.` replaced by `_`, and `_` for an empty `s`.
fn push_sanitized(out: &mut String, s: &str) {
    if s.is_empty() {
        out.push('_');
        return;
    }
    for (k, c) in s.chars().enumerate() {
        let keep = c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
        out.push(if !keep || (k == 0 && c == '.') {
            '_'
        } else {
            c
        });
    }
}

#[cfg(test)]
mod tests;
