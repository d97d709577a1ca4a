//! The Kustomize export: the part of a commit's tree that
//! `kubectl kustomize` needs, written into a private temporary folder.
//!
//! A commit is hostile input on the machine that holds the release keys,
//! so the export:
//!
//! * writes only the Kustomize directories being rendered and the
//!   directories their kustomizations reference (`resources`, `bases`,
//!   `components`, `generators`, `transformers`, `validators`), followed
//!   recursively, each with everything below it (Kustomize's default load
//!   restrictor confines file references such as patches and generator
//!   files to that subtree);
//! * refuses references that leave the repository root or are absolute,
//!   in any field that names a file or directory, naming the kustomization
//!   file and the field; refuses remote references (URLs, `git@...`,
//!   `github.com/...`) unless remote resources are allowed;
//! * never creates a symbolic link: a link in an exported directory whose
//!   target (resolved inside the tree) is a file is written as a copy of
//!   that file; a link that leaves the repository or is absolute is
//!   refused; a link to a directory is refused; a link to nothing in the
//!   tree is left out;
//! * creates every file new (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600) under
//!   directories it created itself, from names [`crate::git`] already
//!   checked to be single normal path components;
//! * caps the files and bytes written, checked from blob headers before a
//!   blob is read, so a small repository whose entries all point at one big
//!   blob cannot fill the disk.

use crate::git::{self, escape_name, EntryKind, GitTree, TreeFile};
use crate::yaml;
use crate::{Error, Result};
use std::collections::{BTreeSet, VecDeque};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// File names that make a directory a Kustomize directory.
pub const KUSTOMIZATION_FILES: &[&str] =
    &["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Default cap on the bytes of one export (256 MiB).
pub const DEFAULT_MAX_EXPORT_BYTES: u64 = 256 << 20;

/// Default cap on the files of one export.
pub const DEFAULT_MAX_EXPORT_FILES: usize = 20_000;

/// Largest kustomization file read (1 MiB).
pub const MAX_KUSTOMIZATION_BYTES: u64 = 1 << 20;

/// Most symbolic links followed to reach a file.
pub const MAX_LINK_HOPS: usize = 8;

/// How much an export may write and read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportLimits {
    /// Allow remote references (URLs, `git@...`, `github.com/...`).
    pub allow_remote: bool,
    /// Most bytes written.
    pub max_bytes: u64,
    /// Most files written.
    pub max_files: usize,
    /// Largest single file.
    pub max_file_bytes: u64,
}

impl Default for ExportLimits {
    fn default() -> Self {
        Self {
            allow_remote: false,
            max_bytes: DEFAULT_MAX_EXPORT_BYTES,
            max_files: DEFAULT_MAX_EXPORT_FILES,
            max_file_bytes: 64 << 20,
        }
    }
}

/// A written export; the folder is removed when this is dropped.
pub struct Export {
    dir: tempfile::TempDir,
    /// Files written.
    pub files: usize,
    /// Bytes written.
    pub bytes: u64,
    /// The exported directories (paths as Kustomize sees them; `""` is
    /// the root).
    pub roots: Vec<String>,
    /// Files left out (missing blob, over the file cap), for messages.
    pub left_out: Vec<String>,
}

impl Export {
    /// The export's root folder (the repository root).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Fields whose entries may be Kustomize directories (exported, and
/// followed) or files.
const DIR_FIELDS: &[&str] = &[
    "resources",
    "bases",
    "components",
    "generators",
    "transformers",
    "validators",
];

/// Fields whose entries (strings) are file paths or inline YAML.
const FILE_LIST_FIELDS: &[&str] = &["patchesStrategicMerge", "crds", "configurations"];

/// Fields that are lists of objects with a `path`.
const PATH_OBJECT_FIELDS: &[&str] = &["patches", "patchesJson6902", "replacements"];

/// Whether a reference is remote (Kustomize would fetch it), judged before
/// looking in the tree.
fn clearly_remote(r: &str) -> bool {
    r.contains("://") || r.starts_with("git@") || r.contains("?ref=")
}

/// Whether a reference not found in the tree looks like `host.tld/path`,
/// which Kustomize would try to fetch.
fn host_like(r: &str) -> bool {
    r.split_once('/').is_some_and(|(host, rest)| {
        host.contains('.') && !host.starts_with('.') && !rest.is_empty()
    })
}

/// Where a reference points.
enum Target {
    /// A path inside the tree (it may not exist).
    Inside(String),
    /// A remote reference, allowed by the caller.
    Remote,
}

struct Refs<'a> {
    tree: &'a GitTree,
    limits: &'a ExportLimits,
    kfile: &'a str,
    dir: &'a str,
}

impl Refs<'_> {
    fn refuse(&self, field: &str, value: &str, why: &str) -> Error {
        Error::Build(format!(
            "{}: `{field}` entry `{}` {why}; a bundle is built only from its commit's tree",
            escape_name(self.kfile),
            escape_name(value)
        ))
    }

    fn check(&self, field: &str, value: &str) -> Result<Target> {
        let remote = || {
            if self.limits.allow_remote {
                Ok(Target::Remote)
            } else {
                Err(self.refuse(
                    field,
                    value,
                    "is a remote reference, refused: a bundle must be a function of its commit \
                     (pass --allow-remote to allow remote resources)",
                ))
            }
        };
        if value.starts_with('/') {
            return Err(self.refuse(field, value, "is an absolute path"));
        }
        if clearly_remote(value) {
            return remote();
        }
        let Some(path) = git::join_inside(self.dir, value) else {
            return Err(self.refuse(field, value, "leaves the repository"));
        };
        if real_path(self.tree, &path)?.is_none() && host_like(value) {
            return remote();
        }
        Ok(Target::Inside(path))
    }
}

fn strings(v: &serde_json::Value) -> Vec<&str> {
    match v {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(items) => items.iter().filter_map(|i| i.as_str()).collect(),
        _ => Vec::new(),
    }
}

/// Reads the kustomization file of `dir` and returns the directories it
/// references inside the tree, checking every reference.
fn references(tree: &GitTree, dir: &str, limits: &ExportLimits) -> Result<Vec<String>> {
    let mut found = None;
    for f in KUSTOMIZATION_FILES {
        let p = join(dir, f);
        if let Some((EntryKind::File, real)) = real_path(tree, &p)? {
            found = Some((p, real));
            break;
        }
    }
    let Some((kfile, real)) = found else {
        // Kustomize reports the missing kustomization itself.
        return Ok(Vec::new());
    };
    let Some(file) = resolve_file(tree, &real)? else {
        return Ok(Vec::new());
    };
    let bytes = tree.read_blob(&file, MAX_KUSTOMIZATION_BYTES)?;
    let shown = escape_name(&kfile);
    let text = std::str::from_utf8(&bytes).map_err(|_| Error::Manifest {
        file: shown.clone(),
        reason: "not UTF-8 text".into(),
    })?;
    let docs = yaml::parse_documents(text).map_err(|e| Error::Manifest {
        file: shown.clone(),
        reason: e.to_string(),
    })?;
    let refs = Refs {
        tree,
        limits,
        kfile: &kfile,
        dir,
    };
    let mut dirs = Vec::new();
    for doc in docs.iter().filter_map(|d| d.value.as_ref()) {
        let Some(k) = doc.as_object() else { continue };
        for field in DIR_FIELDS {
            for v in k.get(*field).map(strings).unwrap_or_default() {
                if v.contains('\n') {
                    continue; // inline generator or transformer configuration
                }
                if let Target::Inside(p) = refs.check(field, v)? {
                    // `p` is the path Kustomize sees in the export; a
                    // symbolic link to a directory inside the repository
                    // is exported as a copy at the link's path.
                    if let Some((EntryKind::Dir, _)) = real_path(tree, &p)? {
                        dirs.push(p);
                    }
                }
            }
        }
        for field in FILE_LIST_FIELDS {
            for v in k.get(*field).map(strings).unwrap_or_default() {
                if !v.contains('\n') && !v.trim_start().starts_with('{') {
                    refs.check(field, v)?;
                }
            }
        }
        for field in PATH_OBJECT_FIELDS {
            if let Some(items) = k.get(*field).and_then(|v| v.as_array()) {
                for item in items {
                    if let Some(p) = item.get("path").and_then(|p| p.as_str()) {
                        refs.check(&format!("{field}.path"), p)?;
                    }
                }
            }
        }
        if let Some(p) = k
            .get("openapi")
            .and_then(|o| o.get("path"))
            .and_then(|p| p.as_str())
        {
            refs.check("openapi.path", p)?;
        }
        for field in ["configMapGenerator", "secretGenerator"] {
            let Some(items) = k.get(field).and_then(|v| v.as_array()) else {
                continue;
            };
            for item in items {
                for sub in ["files", "envs", "env"] {
                    for v in item.get(sub).map(strings).unwrap_or_default() {
                        // `files` entries may be `key=path`.
                        let p = v.split_once('=').map(|(_, p)| p).unwrap_or(v);
                        refs.check(&format!("{field}.{sub}"), p)?;
                    }
                }
            }
        }
        if let Some(items) = k.get("helmCharts").and_then(|v| v.as_array()) {
            for item in items {
                for sub in ["valuesFile", "additionalValuesFiles"] {
                    for v in item.get(sub).map(strings).unwrap_or_default() {
                        refs.check(&format!("helmCharts.{sub}"), v)?;
                    }
                }
            }
        }
        if let Some(g) = k.get("helmGlobals") {
            for sub in ["chartHome", "configHome"] {
                for v in g.get(sub).map(strings).unwrap_or_default() {
                    refs.check(&format!("helmGlobals.{sub}"), v)?;
                }
            }
        }
    }
    Ok(dirs)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

/// Follows symbolic links from `path` inside the tree: the final entry's
/// kind and path, `None` when nothing in the tree is there. Refuses links
/// that are absolute or leave the repository, and chains over
/// [`MAX_LINK_HOPS`].
fn resolve_kind(tree: &GitTree, path: &str) -> Result<Option<(EntryKind, String)>> {
    let mut at = path.to_owned();
    for _ in 0..=MAX_LINK_HOPS {
        let Some(node) = tree.entry(&at) else {
            return Ok(None);
        };
        if node.kind != EntryKind::Link {
            return Ok(Some((node.kind, at)));
        }
        let link = TreeFile {
            path: at.clone(),
            oid: node.oid,
        };
        let target = tree.read_blob(&link, git::MAX_LINK_TARGET_BYTES)?;
        let target = String::from_utf8_lossy(&target).into_owned();
        let refuse = |why: &str| {
            Error::Build(format!(
                "symbolic link `{}` -> `{}` {why}; refused (links are resolved inside the repository only)",
                escape_name(&link.path),
                escape_name(&target)
            ))
        };
        if target.starts_with('/') {
            return Err(refuse("is absolute"));
        }
        if target.contains('\0') {
            return Err(refuse("contains NUL"));
        }
        at = git::join_inside(parent(&link.path), &target)
            .ok_or_else(|| refuse("leaves the repository"))?;
    }
    Err(Error::Build(format!(
        "symbolic link `{}`: more than {MAX_LINK_HOPS} links in a chain; refused",
        escape_name(path)
    )))
}

/// Resolves symbolic links in every component of `path` (a path as
/// Kustomize sees it in the export, where linked directories are copies),
/// inside the tree: the final entry's kind and tree path, `None` when
/// nothing is there. The same refusals as [`resolve_kind`], and at most
/// [`MAX_LINK_HOPS`] directory links along the way.
fn real_path(tree: &GitTree, path: &str) -> Result<Option<(EntryKind, String)>> {
    if path.is_empty() {
        return Ok(Some((EntryKind::Dir, String::new())));
    }
    let mut at = String::new();
    let mut hops = 0usize;
    let comps: Vec<&str> = path.split('/').collect();
    for (i, c) in comps.iter().enumerate() {
        let next = join(&at, c);
        let Some((kind, real)) = resolve_kind(tree, &next)? else {
            return Ok(None);
        };
        if real != next {
            hops += 1;
            if hops > MAX_LINK_HOPS {
                return Err(Error::Build(format!(
                    "`{}`: more than {MAX_LINK_HOPS} symbolic links along the path; refused",
                    escape_name(path)
                )));
            }
        }
        if i + 1 < comps.len() && kind != EntryKind::Dir {
            return Ok(None);
        }
        if i + 1 == comps.len() {
            return Ok(Some((kind, real)));
        }
        at = real;
    }
    Ok(None)
}

/// The file a path names, following links; `None` when nothing is there.
/// Refuses a link to a directory.
fn resolve_file(tree: &GitTree, path: &str) -> Result<Option<TreeFile>> {
    match resolve_kind(tree, path)? {
        Some((EntryKind::File, p)) => {
            let node = tree.entry(&p).ok_or_else(|| {
                Error::Git(format!("`{}` vanished from the tree", escape_name(&p)))
            })?;
            Ok(Some(TreeFile { path: p, oid: node.oid }))
        }
        Some((EntryKind::Dir, p)) if p != path => Err(Error::Build(format!(
            "symbolic link `{}` points to the directory `{}`; links to directories are not exported, refused",
            escape_name(path),
            escape_name(&p)
        ))),
        _ => Ok(None),
    }
}

/// The Kustomize directories `start` (tree paths) and every directory their
/// kustomizations reference, recursively; outermost first, nested ones
/// dropped.
pub fn closure(tree: &GitTree, start: &[String], limits: &ExportLimits) -> Result<Vec<String>> {
    Ok(closure_sets(tree, start, limits)?.0)
}

/// [`closure`], and every directory referenced (nested ones included).
fn closure_sets(
    tree: &GitTree,
    start: &[String],
    limits: &ExportLimits,
) -> Result<(Vec<String>, BTreeSet<String>)> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut queue: VecDeque<String> = start.iter().cloned().collect();
    while let Some(d) = queue.pop_front() {
        if !seen.insert(d.clone()) {
            continue;
        }
        for r in references(tree, &d, limits)? {
            if !seen.contains(&r) {
                queue.push_back(r);
            }
        }
    }
    let mut roots: Vec<String> = Vec::new();
    for d in &seen {
        // BTreeSet order puts a directory before everything inside it.
        if !roots.iter().any(|r| git::is_within(d, r)) {
            roots.push(d.clone());
        }
    }
    Ok((roots, seen))
}

/// Writes the export for rendering the Kustomize directories `start`.
pub fn export(tree: &GitTree, start: &[String], limits: &ExportLimits) -> Result<Export> {
    let (roots, referenced) = closure_sets(tree, start, limits)?;
    export_paths(tree, roots, &referenced, &[], limits)
}

/// Writes the directories `roots` (tree paths, none inside another) with
/// everything below them (directory links copied when in `referenced`),
/// and the single files `files` (tree paths, links followed inside the
/// tree) that are not inside one of them, under the rules in the module
/// documentation. Kustomize directories come through [`export`]; Helm
/// charts (see [`crate::helm`]) call it with a chart directory and its
/// values files.
pub fn export_paths(
    tree: &GitTree,
    roots: Vec<String>,
    referenced: &BTreeSet<String>,
    files: &[String],
    limits: &ExportLimits,
) -> Result<Export> {
    let tmp = tempfile::Builder::new()
        .prefix("cairn-kustomize-")
        .tempdir()
        .map_err(|e| Error::Io {
            path: std::env::temp_dir(),
            source: e,
        })?;
    let mut w = Writer {
        base: tmp.path(),
        made: BTreeSet::new(),
        files: 0,
        bytes: 0,
        limits,
        left_out: Vec::new(),
    };
    for root in &roots {
        let Some((EntryKind::Dir, real)) = real_path(tree, root)? else {
            // Kustomize reports the missing directory itself.
            continue;
        };
        write_tree(&mut w, tree, &real, root, referenced, 0)?;
    }
    for path in files {
        if roots.iter().any(|r| git::is_within(path, r)) {
            continue;
        }
        match resolve_file(tree, path)? {
            Some(f) => w.file(tree, path, &f)?,
            None => {
                return Err(Error::Build(format!(
                    "`{}` is not a file in the commit",
                    escape_name(path)
                )))
            }
        }
    }
    let (files, bytes, left_out) = (w.files, w.bytes, w.left_out);
    Ok(Export {
        dir: tmp,
        files,
        bytes,
        roots,
        left_out,
    })
}

/// Writes the tree directory `real` at `at` in the export. A symbolic link
/// to a file is written as a copy; a link to a directory is copied the
/// same way when a kustomization references it (at most
/// [`MAX_LINK_HOPS`] deep), and left out otherwise.
fn write_tree(
    w: &mut Writer<'_>,
    tree: &GitTree,
    real: &str,
    at: &str,
    referenced: &BTreeSet<String>,
    depth: usize,
) -> Result<()> {
    w.dir(at)?;
    let rebase = |path: &str| -> String {
        let rel = if real.is_empty() {
            path
        } else {
            path.strip_prefix(real)
                .and_then(|r| r.strip_prefix('/'))
                .unwrap_or(path)
        };
        join(at, rel)
    };
    for (path, node) in tree.entries_under(real) {
        let vpath = rebase(path);
        match node.kind {
            EntryKind::Dir => w.dir(&vpath)?,
            EntryKind::File => w.file(
                tree,
                &vpath,
                &TreeFile {
                    path: path.clone(),
                    oid: node.oid,
                },
            )?,
            EntryKind::Link => match resolve_kind(tree, path)? {
                Some((EntryKind::File, p)) => {
                    let f = resolve_file(tree, &p)?;
                    if let Some(f) = f {
                        w.file(tree, &vpath, &f)?;
                    }
                }
                Some((EntryKind::Dir, target)) if referenced.contains(&vpath) => {
                    if depth >= MAX_LINK_HOPS {
                        return Err(Error::Build(format!(
                            "symbolic link `{}`: directory links nested more than {MAX_LINK_HOPS} deep; refused",
                            escape_name(path)
                        )));
                    }
                    write_tree(w, tree, &target, &vpath, referenced, depth + 1)?;
                }
                _ => {}
            },
            EntryKind::Submodule => {}
        }
    }
    Ok(())
}

struct Writer<'a> {
    base: &'a Path,
    made: BTreeSet<String>,
    files: usize,
    bytes: u64,
    limits: &'a ExportLimits,
    left_out: Vec<String>,
}

impl Writer<'_> {
    /// Creates directory `path` and its parents (all inside the export,
    /// all made by this writer).
    fn dir(&mut self, path: &str) -> Result<()> {
        if path.is_empty() || self.made.contains(path) {
            return Ok(());
        }
        self.dir(parent(path))?;
        let p = self.base.join(path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(|e| Error::Io { path: p, source: e })?;
        self.made.insert(path.to_owned());
        Ok(())
    }

    /// Writes the blob `from` at `path`, within the caps.
    fn file(&mut self, tree: &GitTree, path: &str, from: &TreeFile) -> Result<()> {
        // A blob missing from the object store (a partial clone) or over
        // the single-file cap is left out rather than failing every
        // render: a kustomization that needs it fails naming it, and the
        // build adds why it is missing.
        let size = match tree.blob_size(from) {
            Ok(s) => s,
            Err(_) => {
                self.left_out.push(format!(
                    "`{}` (its blob is not in the repository: a partial or shallow clone?)",
                    escape_name(path)
                ));
                return Ok(());
            }
        };
        if size > self.limits.max_file_bytes {
            self.left_out.push(format!(
                "`{}` ({size} bytes, over the {}-byte file cap)",
                escape_name(path),
                self.limits.max_file_bytes
            ));
            return Ok(());
        }
        if self.files + 1 > self.limits.max_files {
            return Err(Error::Build(format!(
                "kustomize export: more than {} files (at `{}`); refused \
                 (raise the cap with --max-export-files)",
                self.limits.max_files,
                escape_name(path)
            )));
        }
        if self.bytes.saturating_add(size) > self.limits.max_bytes {
            return Err(Error::Build(format!(
                "kustomize export: more than {} bytes (at `{}`, {size} bytes); refused \
                 (raise the cap with --max-export-bytes)",
                self.limits.max_bytes,
                escape_name(path)
            )));
        }
        let bytes = tree.read_blob(from, self.limits.max_file_bytes)?;
        self.dir(parent(path))?;
        let p = self.base.join(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&p)
            .map_err(|e| Error::Io {
                path: p.clone(),
                source: e,
            })?;
        std::io::Write::write_all(&mut f, &bytes).map_err(|e| Error::Io { path: p, source: e })?;
        self.files += 1;
        self.bytes += bytes.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_references_are_recognised() {
        for r in [
            "https://github.com/org/repo//base?ref=v1",
            "git@github.com:org/repo.git",
            "ssh://git@example.com/repo",
            "github.com/org/repo/base?ref=main",
            "github.com//org/repo",
        ] {
            assert!(clearly_remote(r) || host_like(r), "{r}");
        }
        assert!(host_like("github.com/kubernetes-sigs/kustomize/examples"));
        for r in ["base", "../base", "./x.yaml", "v1.2/dir", ".hidden/x"] {
            assert!(!clearly_remote(r), "{r}");
        }
        assert!(!host_like(".hidden/x"));
        assert!(!host_like("x.yaml"));
    }

    #[test]
    fn joins_stay_inside() {
        assert_eq!(git::join_inside("a/b", "../c").as_deref(), Some("a/c"));
        assert_eq!(git::join_inside("a/b", "../../c").as_deref(), Some("c"));
        assert_eq!(git::join_inside("a/b", "../../../c"), None);
        assert_eq!(git::join_inside("", ".."), None);
        assert_eq!(git::join_inside("a", "/etc"), None);
        assert_eq!(git::join_inside("a", "./x/./y").as_deref(), Some("a/x/y"));
    }
}
