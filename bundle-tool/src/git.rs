//! Reading a Git tree with gix: resolve a ref, list the files under a
//! directory, read blobs. No checkout, no `git` subprocess, no network.
//!
//! Repositories are opened isolated (no system, global or environment
//! configuration), so a build reads only the repository itself.

use crate::{Error, Result};
use gix::bstr::ByteSlice;
use gix::ObjectId;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Shows an untrusted tree entry name safely in a terminal or log: the
/// project's one escaping rule.
pub use cairn_keys::text::escape_untrusted as escape_name;

/// Most entries (files, directories, links) a build walks in one tree.
/// Git stores a subtree once however often it is referenced, so a small
/// repository can name millions of paths; the walk stops here.
pub const MAX_TREE_ENTRIES: usize = 1_000_000;

/// Deepest directory nesting a build walks.
pub const MAX_TREE_DEPTH: usize = 256;

/// Largest symbolic link target read (Linux's PATH_MAX).
pub const MAX_LINK_TARGET_BYTES: u64 = 4096;

/// Bytes of decoded pack objects the delta-base cache keeps per
/// repository handle.
const DELTA_BASE_CACHE_BYTES: usize = 16 << 20;

/// Largest object the delta-base cache keeps.
const DELTA_BASE_CACHE_MAX_OBJECT: usize = 1 << 20;

/// A bounded cache of decoded pack objects by (pack, offset), so that
/// reading thousands of similar trees from a pack does not resolve every
/// delta chain from its base again (gix is built without its own LRU
/// caches). Oldest entries leave first; the total is capped at
/// [`DELTA_BASE_CACHE_BYTES`]. Content comes from the pack only, keyed by
/// position, so it changes no result, only the time.
#[derive(Default)]
struct DeltaBaseCache {
    map: std::collections::HashMap<(u32, u64), (gix::objs::Kind, usize, Vec<u8>)>,
    order: std::collections::VecDeque<(u32, u64)>,
    bytes: usize,
}

impl gix::odb::pack::cache::DecodeEntry for DeltaBaseCache {
    fn put(
        &mut self,
        pack_id: u32,
        offset: u64,
        data: &[u8],
        kind: gix::objs::Kind,
        compressed_size: usize,
    ) {
        if data.len() > DELTA_BASE_CACHE_MAX_OBJECT || self.map.contains_key(&(pack_id, offset)) {
            return;
        }
        while self.bytes + data.len() > DELTA_BASE_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, _, d)) = self.map.remove(&old) {
                self.bytes -= d.len();
            }
        }
        self.bytes += data.len();
        self.order.push_back((pack_id, offset));
        self.map
            .insert((pack_id, offset), (kind, compressed_size, data.to_vec()));
    }

    fn get(
        &mut self,
        pack_id: u32,
        offset: u64,
        out: &mut Vec<u8>,
    ) -> Option<(gix::objs::Kind, usize)> {
        let (kind, size, data) = self.map.get(&(pack_id, offset))?;
        out.clear();
        out.extend_from_slice(data);
        Some((*kind, *size))
    }
}

/// Gives `repo` a delta-base cache (see [`DeltaBaseCache`]).
fn with_delta_cache(mut repo: gix::Repository) -> gix::Repository {
    repo.objects
        .set_pack_cache(|| Box::<DeltaBaseCache>::default());
    repo
}

/// A file (blob) in a Git tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeFile {
    /// Path relative to the repository root, `/`-separated.
    pub path: String,
    /// The blob id.
    pub oid: ObjectId,
}

/// What a tree entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (executable or not).
    File,
    /// A symbolic link; its blob holds the target.
    Link,
    /// A directory (subtree).
    Dir,
    /// A submodule (a commit of another repository).
    Submodule,
}

/// One entry of the walked tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeNode {
    /// The object id (blob, tree or commit).
    pub oid: ObjectId,
    /// What it is.
    pub kind: EntryKind,
}

/// A resolved commit of an opened repository, its whole tree walked and
/// every entry name checked (see [`check_entry_name`]).
pub struct GitTree {
    repo: gix::Repository,
    /// The commit id (hex).
    pub commit: String,
    /// Every entry of the commit's tree by `/`-separated path.
    entries: BTreeMap<String, TreeNode>,
}

fn git_err(what: impl std::fmt::Display) -> Error {
    Error::Git(what.to_string())
}

/// Checks that a tree entry name is one normal path component: not empty,
/// not `.` or `..`, no `/` or NUL, not `.git` in any case (a checkout
/// would write into the Git directory), and no control characters. Returns
/// why not.
pub fn check_entry_name(name: &[u8]) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        Err("an empty name")
    } else if name == b"." || name == b".." {
        Err("a relative path component")
    } else if name.contains(&b'/') {
        Err("a name containing `/` (more than one path component, or an absolute path)")
    } else if name.contains(&0) {
        Err("a name containing NUL")
    } else if name.eq_ignore_ascii_case(b".git") {
        Err("a `.git` directory name")
    } else if std::str::from_utf8(name).is_ok_and(|n| n.chars().any(char::is_control)) {
        // Terminal escape sequences hidden in file names would reach the
        // release engineer's terminal in every message naming the file.
        Err("a name containing a control character")
    } else {
        Ok(())
    }
}

/// Normalises a path inside the tree: strips `./`, leading and trailing
/// `/`; `""` and `.` mean the whole tree. Refuses `..`.
pub fn normalize_tree_path(p: &str) -> Result<String> {
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(Error::Git(format!(
                    "path `{}`: `..` is not allowed; give a directory inside the repository",
                    escape_name(p)
                )))
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Joins a `/`-separated relative `reference` onto the tree directory
/// `base` lexically (`.` dropped, `..` pops). `None` when the result would
/// leave the repository root or `reference` is absolute.
pub fn join_inside(base: &str, reference: &str) -> Option<String> {
    if reference.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = base.split('/').filter(|c| !c.is_empty()).collect();
    for c in reference.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Whether `path` is `dir` itself or inside it (`""` is the root).
pub fn is_within(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

impl GitTree {
    /// Opens the repository at `repo_path` (a work tree or a bare
    /// repository), resolves `reference` (a branch, tag, commit id or any
    /// revision gix understands; `HEAD` when `None`) to a commit, and walks
    /// its whole tree, refusing entry names that are not one normal path
    /// component and trees over [`MAX_TREE_ENTRIES`] or [`MAX_TREE_DEPTH`].
    pub fn open(repo_path: &Path, reference: Option<&str>) -> Result<Self> {
        let repo = gix::open_opts(repo_path, gix::open::Options::isolated()).map_err(|e| {
            git_err(format!(
                "{}: not a Git repository ({e})",
                repo_path.display()
            ))
        })?;
        let repo = with_delta_cache(repo);
        let spec = reference.unwrap_or("HEAD");
        let shown = escape_name(spec);
        let not_found = |e: &dyn std::fmt::Display| {
            git_err(format!(
                "ref `{shown}` not found in {}: not a branch, tag or commit of this repository ({e})",
                repo_path.display()
            ))
        };
        let id = repo
            .rev_parse_single(spec)
            .map_err(|e| not_found(&e))?
            .detach();
        let (commit, tree) = {
            let commit = repo
                .find_object(id)
                .map_err(|e| not_found(&e))?
                .peel_to_commit()
                .map_err(|e| git_err(format!("ref `{shown}` does not name a commit: {e}")))?;
            let tree = commit
                .tree_id()
                .map_err(|e| git_err(format!("commit {}: {e}", commit.id)))?
                .detach();
            (commit.id.to_hex().to_string(), tree)
        };
        let entries = walk_tree(&repo, &commit, tree)?;
        Ok(Self {
            commit,
            repo,
            entries,
        })
    }

    /// The underlying repository (for reading blobs from other threads via
    /// [`gix::Repository::into_sync`]).
    pub fn repository(&self) -> &gix::Repository {
        &self.repo
    }

    /// The entry at `path` (normalised, `/`-separated), if any. The root
    /// (`""`) is not an entry.
    pub fn entry(&self, path: &str) -> Option<TreeNode> {
        self.entries.get(path).copied()
    }

    /// Every entry strictly below directory `dir` (`""` for the whole
    /// tree), in path order.
    pub fn entries_under<'a>(
        &'a self,
        dir: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a TreeNode)> + 'a {
        let start = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        self.entries
            .range(start.clone()..)
            .take_while(move |(p, _)| p.starts_with(&start))
    }

    /// Every regular file (blob, executable or not) at or under `dir` (a
    /// normalised tree path, `""` for the whole tree), sorted by path.
    /// Symbolic links and submodules are skipped. Fails if `dir` is not in
    /// the tree.
    pub fn files(&self, dir: &str) -> Result<Vec<TreeFile>> {
        if !dir.is_empty() {
            match self.entry(dir) {
                None => {
                    return Err(git_err(format!(
                        "path `{}` not found in the tree of commit {}",
                        escape_name(dir),
                        self.commit
                    )))
                }
                Some(TreeNode {
                    kind: EntryKind::File,
                    oid,
                }) => {
                    return Ok(vec![TreeFile {
                        path: dir.to_owned(),
                        oid,
                    }])
                }
                Some(TreeNode {
                    kind: EntryKind::Dir,
                    ..
                }) => {}
                Some(_) => {
                    return Err(git_err(format!(
                        "path `{}` in commit {} is neither a directory nor a file",
                        escape_name(dir),
                        self.commit
                    )))
                }
            }
        }
        Ok(self
            .entries_under(dir)
            .filter(|(_, n)| n.kind == EntryKind::File)
            .map(|(p, n)| TreeFile {
                path: p.clone(),
                oid: n.oid,
            })
            .collect())
    }

    /// Reads a blob, refusing blobs over `limit` bytes before reading them.
    pub fn read_blob(&self, file: &TreeFile, limit: u64) -> Result<Vec<u8>> {
        read_blob(&self.repo, file, limit)
    }

    /// The size of a blob, from its header (nothing is decompressed).
    pub fn blob_size(&self, file: &TreeFile) -> Result<u64> {
        Ok(self
            .repo
            .find_header(file.oid)
            .map_err(|e| git_err(format!("{}: {e}", escape_name(&file.path))))?
            .size())
    }
}

/// Fewest trees in one level of the walk before it is read on more than
/// one thread (below this, opening the extra repository handles costs
/// more than it saves).
const PARALLEL_MIN_TREES: usize = 64;

/// Most threads the walk reads trees on.
const MAX_WALK_THREADS: usize = 4;

/// One checked entry of a tree listing: name, id, kind.
type Listing = Vec<(String, ObjectId, EntryKind)>;

fn shown_dir(prefix: &str) -> String {
    if prefix.is_empty() {
        "the root".to_owned()
    } else {
        format!("`{}`", escape_name(prefix))
    }
}

fn too_many_entries(commit: &str) -> Error {
    git_err(format!(
        "commit {commit}: the tree has more than {MAX_TREE_ENTRIES} entries \
         (counting every path of repeated subtrees); refused"
    ))
}

/// Reads one tree and checks every entry name in it (see
/// [`check_entry_name`]). `budget` counts the entries read so far by every
/// thread of the walk; the read stops once it passes [`MAX_TREE_ENTRIES`].
fn read_listing(
    repo: &gix::Repository,
    commit: &str,
    tree: ObjectId,
    prefix: &str,
    budget: &AtomicUsize,
) -> Result<Listing> {
    let t = repo.find_tree(tree).map_err(|e| {
        git_err(format!(
            "commit {commit}: tree {tree} at {}: {e}",
            shown_dir(prefix)
        ))
    })?;
    let mut out = Vec::new();
    for entry in t.iter() {
        let entry = entry.map_err(|e| {
            git_err(format!(
                "commit {commit}: tree {tree} at {} is malformed: {e}",
                shown_dir(prefix)
            ))
        })?;
        let raw: &[u8] = entry.inner.filename.as_ref();
        // The escaped name is only made for a message (most entries never
        // need one).
        let lossy = || escape_name(&entry.inner.filename.to_str_lossy());
        if let Err(why) = check_entry_name(raw) {
            return Err(git_err(format!(
                "commit {commit}: tree entry `{}` in {} is {why}; \
                 every entry must be one normal file name, so this commit is refused",
                lossy(),
                shown_dir(prefix)
            )));
        }
        let name = entry.inner.filename.to_str().map_err(|_| {
            git_err(format!(
                "commit {commit}: tree entry `{}` in {}: file name is not UTF-8",
                lossy(),
                shown_dir(prefix)
            ))
        })?;
        let mode = entry.inner.mode;
        let kind = if mode.is_tree() {
            EntryKind::Dir
        } else if mode.is_link() {
            EntryKind::Link
        } else if mode.is_blob() {
            EntryKind::File
        } else {
            EntryKind::Submodule
        };
        out.push((name.to_owned(), entry.inner.oid.to_owned(), kind));
    }
    if budget.fetch_add(out.len(), Ordering::Relaxed) + out.len() > MAX_TREE_ENTRIES {
        return Err(too_many_entries(commit));
    }
    Ok(out)
}

/// Reads the trees of one level of the walk, in order, on up to
/// [`MAX_WALK_THREADS`] threads when the level is large. Each thread opens
/// its own handle on the Git directory (gix repositories are not `Sync`
/// without gix's `parallel` feature). A thread stops at its first error;
/// the caller takes results in order, so the error reported is the first
/// in walk order whatever the scheduling.
fn read_level(
    repo: &gix::Repository,
    commit: &str,
    level: &[(ObjectId, String, usize)],
    budget: &AtomicUsize,
) -> Vec<Result<Listing>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WALK_THREADS);
    if threads < 2 || level.len() < PARALLEL_MIN_TREES {
        let mut out = Vec::with_capacity(level.len());
        for (tree, prefix, _) in level {
            let r = read_listing(repo, commit, *tree, prefix, budget);
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        return out;
    }
    let git_dir = repo.git_dir().to_path_buf();
    let chunk = level.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = level
            .chunks(chunk)
            .enumerate()
            .map(|(i, part)| {
                let git_dir = &git_dir;
                s.spawn(move || {
                    let mut out = Vec::with_capacity(part.len());
                    let repo = match gix::open_opts(git_dir, gix::open::Options::isolated()) {
                        Ok(r) => with_delta_cache(r),
                        Err(e) => {
                            out.push(Err(git_err(format!(
                                "{}: {e} (walk thread {i})",
                                git_dir.display()
                            ))));
                            return out;
                        }
                    };
                    for (tree, prefix, _) in part {
                        let r = read_listing(&repo, commit, *tree, prefix, budget);
                        let failed = r.is_err();
                        out.push(r);
                        if failed {
                            break;
                        }
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::with_capacity(level.len());
        for h in handles {
            match h.join() {
                Ok(part) => {
                    let complete = part.iter().all(Result::is_ok);
                    all.extend(part);
                    if !complete {
                        break;
                    }
                }
                Err(_) => {
                    all.push(Err(git_err("a tree walk thread panicked")));
                    break;
                }
            }
        }
        all
    })
}

/// Walks the tree `root` of `commit` level by level, checking every entry
/// name and the entry and depth caps. Large levels (a directory of
/// thousands of application directories) are read on several threads;
/// entries are merged in level order, so the result and the error
/// reported do not depend on the scheduling.
fn walk_tree(
    repo: &gix::Repository,
    commit: &str,
    root: ObjectId,
) -> Result<BTreeMap<String, TreeNode>> {
    let mut entries = BTreeMap::new();
    let budget = AtomicUsize::new(0);
    let mut level: Vec<(ObjectId, String, usize)> = vec![(root, String::new(), 0)];
    while !level.is_empty() {
        let listings = read_level(repo, commit, &level, &budget);
        let mut next = Vec::new();
        for ((_, prefix, depth), listing) in level.iter().zip(listings) {
            for (name, oid, kind) in listing? {
                let path = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                if entries.len() >= MAX_TREE_ENTRIES {
                    return Err(too_many_entries(commit));
                }
                if kind == EntryKind::Dir {
                    if depth + 1 > MAX_TREE_DEPTH {
                        return Err(git_err(format!(
                            "commit {commit}: `{}` is nested deeper than {MAX_TREE_DEPTH} directories; refused",
                            escape_name(&path)
                        )));
                    }
                    next.push((oid, path.clone(), depth + 1));
                }
                if entries
                    .insert(path.clone(), TreeNode { oid, kind })
                    .is_some()
                {
                    return Err(git_err(format!(
                        "commit {commit}: tree entry `{}` appears twice; refused",
                        escape_name(&path)
                    )));
                }
            }
        }
        level = next;
    }
    Ok(entries)
}

/// Reads a blob of `repo`, refusing blobs over `limit` bytes before
/// reading them.
pub fn read_blob(repo: &gix::Repository, file: &TreeFile, limit: u64) -> Result<Vec<u8>> {
    let header = repo
        .find_header(file.oid)
        .map_err(|e| git_err(format!("{}: {e}", file.path)))?;
    if header.size() > limit {
        return Err(Error::TooLarge {
            what: file.path.clone(),
            limit,
            actual: header.size(),
        });
    }
    let mut blob = repo
        .find_blob(file.oid)
        .map_err(|e| git_err(format!("{}: {e}", file.path)))?;
    Ok(blob.take_data())
}

/// A repository handle for reading blobs of at most `limit` bytes in one
/// pass. gix is given the limit as its object allocation limit
/// (`gitoxide.objects.allocLimit`), so it refuses a larger loose or packed
/// object (and any larger delta base) from the header *before*
/// allocating, and a blob is opened and inflated once instead of twice
/// (header, then body: [`read_blob`] on a loose object costs two opens and
/// two inflates). Every failure is answered by [`read_blob`] on a handle
/// without gix's limit (opened on the first failure), so results and
/// errors are exactly its own (`TooLarge` naming the file and the blob's
/// size; a small blob stored as a delta of a base over the limit still
/// reads).
pub struct LimitedRepo {
    repo: gix::Repository,
    git_dir: std::path::PathBuf,
    checked: std::cell::OnceCell<gix::Repository>,
    limit: u64,
}

impl LimitedRepo {
    /// Opens the Git directory `git_dir` (isolated from user and system
    /// configuration) for blobs of at most `limit` bytes.
    pub fn open(git_dir: &Path, limit: u64) -> Result<Self> {
        let alloc_limit = format!("gitoxide.objects.allocLimit={}", limit.max(1));
        let repo = gix::open_opts(
            git_dir,
            gix::open::Options::isolated().config_overrides([alloc_limit]),
        )
        .map_err(|e| git_err(format!("{}: {e}", git_dir.display())))?;
        Ok(Self {
            repo: with_delta_cache(repo),
            git_dir: git_dir.to_path_buf(),
            checked: std::cell::OnceCell::new(),
            limit,
        })
    }

    /// Reads a blob, refusing blobs over the limit before reading them.
    pub fn read_blob(&self, file: &TreeFile) -> Result<Vec<u8>> {
        match self.repo.find_blob(file.oid) {
            Ok(mut blob) if blob.data.len() as u64 <= self.limit => Ok(blob.take_data()),
            // Over the limit (gix refused it) or any other failure: the
            // header-first path decides, as it always did.
            _ => {
                let repo = match self.checked.get() {
                    Some(r) => r,
                    None => {
                        let r = gix::open_opts(&self.git_dir, gix::open::Options::isolated())
                            .map_err(|e| git_err(format!("{}: {e}", self.git_dir.display())))?;
                        self.checked.get_or_init(|| with_delta_cache(r))
                    }
                };
                read_blob(repo, file, self.limit)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limited_reads_refuse_large_blobs_before_allocating_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let run = |args: &[&str]| {
            let st = std::process::Command::new("git")
                .args(args)
                .current_dir(dir)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .output()
                .unwrap();
            assert!(st.status.success(), "{st:?}");
            String::from_utf8(st.stdout).unwrap().trim().to_owned()
        };
        run(&["init", "-q"]);
        std::fs::write(dir.join("small"), "x".repeat(100)).unwrap();
        std::fs::write(dir.join("large"), "y".repeat(1000)).unwrap();
        let small = run(&["hash-object", "-w", "small"]);
        let large = run(&["hash-object", "-w", "large"]);
        let file = |oid: &str, path: &str| TreeFile {
            path: path.into(),
            oid: ObjectId::from_hex(oid.as_bytes()).unwrap(),
        };
        for packed in [false, true] {
            if packed {
                run(&["add", "small", "large"]);
                run(&[
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@t",
                    "commit",
                    "-qm",
                    "m",
                ]);
                run(&["repack", "-adq"]);
            }
            let r = LimitedRepo::open(&dir.join(".git"), 500).unwrap();
            // gix itself refuses the large blob (the limit took effect) ...
            assert!(
                r.repo.find_blob(file(&large, "l").oid).is_err(),
                "packed {packed}"
            );
            // ... and the error is read_blob's, naming the file and size.
            match r.read_blob(&file(&large, "dir/large")) {
                Err(Error::TooLarge {
                    what,
                    limit: 500,
                    actual: 1000,
                }) => assert_eq!(what, "dir/large"),
                other => panic!("packed {packed}: {other:?}"),
            }
            assert_eq!(
                r.read_blob(&file(&small, "small")).unwrap(),
                "x".repeat(100).into_bytes()
            );
            let missing = "0123456789012345678901234567890123456789";
            assert!(r.read_blob(&file(missing, "gone")).is_err());
        }
    }

    #[test]
    fn only_normal_single_components_are_entry_names() {
        for ok in [
            &b"a"[..],
            b"kustomization.yaml",
            b"...",
            b".gitignore",
            b"git",
            b"a b",
        ] {
            assert_eq!(check_entry_name(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"a/b",
            b"/etc",
            b"a\0b",
            b".git",
            b".GIT",
            b".Git",
            b"a\x1b[31m",
            b"tab\there",
            "c1\u{9b}x".as_bytes(),
        ] {
            assert!(check_entry_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_are_escaped_for_terminals() {
        assert_eq!(escape_name("a\x1b[31mb\n"), "a\\x1b[31mb\\n");
        assert_eq!(escape_name("plain/ü"), "plain/ü");
    }

    #[test]
    fn within() {
        assert!(is_within("a/b", "a"));
        assert!(is_within("a", "a"));
        assert!(is_within("a", ""));
        assert!(!is_within("ab", "a"));
    }
}
