//! Reading a Git tree with gix: resolve a ref, list the files under a
//! directory, read blobs. No checkout, no `git` subprocess, no network.
//!
//! Repositories are opened isolated (no system, global or environment
//! configuration), so a build reads only the repository itself.

use crate::{Error, Result};
use gix::bstr::ByteSlice;
use gix::ObjectId;
use std::path::Path;

/// A file (blob) in a Git tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeFile {
    /// Path relative to the repository root, `/`-separated.
    pub path: String,
    /// The blob id.
    pub oid: ObjectId,
}

/// A resolved commit of an opened repository.
pub struct GitTree {
    repo: gix::Repository,
    /// The commit id (hex).
    pub commit: String,
    tree: ObjectId,
}

fn git_err(what: impl std::fmt::Display) -> Error {
    Error::Git(what.to_string())
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
                    "path `{p}`: `..` is not allowed; give a directory inside the repository"
                )))
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

impl GitTree {
    /// Opens the repository at `repo_path` (a work tree or a bare
    /// repository) and resolves `reference` (a branch, tag, commit id or any
    /// revision gix understands; `HEAD` when `None`) to a commit.
    pub fn open(repo_path: &Path, reference: Option<&str>) -> Result<Self> {
        let repo = gix::open_opts(repo_path, gix::open::Options::isolated()).map_err(|e| {
            git_err(format!(
                "{}: not a Git repository ({e})",
                repo_path.display()
            ))
        })?;
        let spec = reference.unwrap_or("HEAD");
        let not_found = |e: &dyn std::fmt::Display| {
            git_err(format!(
                "ref `{spec}` not found in {}: not a branch, tag or commit of this repository ({e})",
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
                .map_err(|e| git_err(format!("ref `{spec}` does not name a commit: {e}")))?;
            let tree = commit
                .tree_id()
                .map_err(|e| git_err(format!("commit {}: {e}", commit.id)))?
                .detach();
            (commit.id.to_hex().to_string(), tree)
        };
        Ok(Self { commit, repo, tree })
    }

    /// The underlying repository (for reading blobs from other threads via
    /// [`gix::Repository::into_sync`]).
    pub fn repository(&self) -> &gix::Repository {
        &self.repo
    }

    /// Every regular file (blob, executable or not) at or under `dir` (a
    /// normalised tree path, `""` for the whole tree), sorted by path.
    /// Symbolic links and submodules are skipped. Fails if `dir` is not in
    /// the tree.
    pub fn files(&self, dir: &str) -> Result<Vec<TreeFile>> {
        let root = self
            .repo
            .find_tree(self.tree)
            .map_err(|e| git_err(format!("commit {}: {e}", self.commit)))?;
        let mut out = Vec::new();
        if dir.is_empty() {
            self.walk(self.tree, "", &mut out)?;
        } else {
            let entry = root
                .lookup_entry_by_path(dir)
                .map_err(|e| git_err(format!("looking up `{dir}`: {e}")))?
                .ok_or_else(|| {
                    git_err(format!(
                        "path `{dir}` not found in the tree of commit {}",
                        self.commit
                    ))
                })?;
            let mode = entry.mode();
            if mode.is_tree() {
                self.walk(entry.object_id(), dir, &mut out)?;
            } else if mode.is_blob() {
                out.push(TreeFile {
                    path: dir.to_owned(),
                    oid: entry.object_id(),
                });
            } else {
                return Err(git_err(format!(
                    "path `{dir}` in commit {} is neither a directory nor a file",
                    self.commit
                )));
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn walk(&self, tree: ObjectId, prefix: &str, out: &mut Vec<TreeFile>) -> Result<()> {
        let t = self
            .repo
            .find_tree(tree)
            .map_err(|e| git_err(format!("tree {tree}: {e}")))?;
        let mut subtrees = Vec::new();
        for entry in t.iter() {
            let entry = entry.map_err(|e| git_err(format!("tree {tree}: {e}")))?;
            let name = entry.inner.filename.to_str().map_err(|_| {
                git_err(format!(
                    "{prefix}/{}: file name is not UTF-8",
                    entry.inner.filename.to_str_lossy()
                ))
            })?;
            let path = if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}/{name}")
            };
            let mode = entry.inner.mode;
            if mode.is_tree() {
                subtrees.push((entry.inner.oid.to_owned(), path));
            } else if mode.is_blob() {
                out.push(TreeFile {
                    path,
                    oid: entry.inner.oid.to_owned(),
                });
            }
        }
        for (oid, path) in subtrees {
            self.walk(oid, &path, out)?;
        }
        Ok(())
    }

    /// Reads a blob, refusing blobs over `limit` bytes before reading them.
    pub fn read_blob(&self, file: &TreeFile, limit: u64) -> Result<Vec<u8>> {
        read_blob(&self.repo, file, limit)
    }
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
