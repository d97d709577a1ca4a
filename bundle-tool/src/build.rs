//! Building a bundle from a Git commit.
//!
//! Reads the tree with gix (see [`crate::git`]), skips hidden paths, Helm
//! chart directories and what `.cairnignore` files exclude (see
//! [`crate::cairnignore`]), parses every `.yaml` / `.yml` / `.json` file
//! under the chosen directory into canonical objects as kubectl reads them
//! (see [`crate::manifests`]), renders Kustomize directories with
//! `kubectl kustomize`, refuses duplicates, and returns the manifest, the
//! object bytes and the build's warnings.
//!
//! **Determinism rule:** the bundle id depends only on the commit's tree
//! under the path, the commit id, the path and the source name (empty
//! unless given; never the checkout folder's name). Same
//! inputs, same id, byte for byte — whichever clone or folder it is built
//! from, however many threads parse it. Kustomize output is deterministic
//! as long as the kustomization uses no remote resources. Helm charts
//! render with `helm template` (see [`crate::helm`]); the Helm version and
//! the values used are recorded in `source.rendered`, so the id also
//! follows them.

use crate::bundle::{write_bundle_file, Entry, Manifest, Source, BUNDLE_FORMAT};
use crate::cairnignore::{self, CairnIgnore};
use crate::export::{self, ExportLimits};
use crate::git::{self, escape_name, GitTree, TreeFile};
use crate::helm;
use crate::limits::Limits;
use crate::manifests::{self, ParsedFile, ParsedObject};
use crate::{BundleId, Error, Result};
use cairn_keys::text::escape_untrusted;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Largest source file read from the tree (64 MiB).
pub const MAX_SOURCE_FILE_BYTES: u64 = 64 << 20;

/// Most warnings reported by one build (the rest are counted).
pub const MAX_WARNINGS: usize = 100;

/// Show a progress bar (if asked for) only from this many files on.
pub const PROGRESS_MIN_FILES: usize = 200;

pub use crate::export::KUSTOMIZATION_FILES;

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The Git repository (work tree or bare).
    pub repository: PathBuf,
    /// Branch, tag or commit; `HEAD` when `None`.
    pub reference: Option<String>,
    /// Directory (or single file) inside the tree; `""` for all of it.
    pub path: String,
    /// Recorded as `source.repository` (part of the bundle id); empty
    /// unless given, so that the id does not depend on the folder the
    /// repository is checked out in.
    pub source_name: String,
    /// Allow a bundle with no objects.
    pub allow_empty: bool,
    /// The kubectl program used to render Kustomize directories.
    pub kubectl: OsString,
    /// Size limits.
    pub limits: Limits,
    /// The bundle format written: 2 (default) or 1, for agents that do
    /// not read format 2 yet (`cairn bundle build --format 1`).
    pub format: u32,
    /// Parser threads (at least 1).
    pub threads: usize,
    /// Draw a progress bar on stderr for large trees.
    pub progress: bool,
    /// What the Kustomize export may write, and whether kustomizations may
    /// reference remote resources.
    pub export: ExportLimits,
    /// How Helm charts are rendered (see [`crate::helm`]).
    pub helm: crate::helm::HelmOptions,
}

impl BuildOptions {
    /// Options with the defaults: `HEAD`, the whole tree, no source name,
    /// `kubectl` from `PATH`, two threads.
    pub fn new(repository: impl Into<PathBuf>) -> Self {
        let repository = repository.into();
        Self {
            source_name: String::new(),
            repository,
            reference: None,
            path: String::new(),
            allow_empty: false,
            kubectl: "kubectl".into(),
            limits: Limits::default(),
            format: BUNDLE_FORMAT,
            threads: 2,
            progress: false,
            export: ExportLimits::default(),
            helm: crate::helm::HelmOptions::default(),
        }
    }
}

/// The repository folder's name: the last component of the repository's
/// absolute path, without a `.git` suffix (`/src/edge`, `/mnt/edge/.git`
/// and `/srv/edge.git` all give `edge`). Used only in messages: the
/// bundle records a source name only when one is given (`--source-name`),
/// so the same commit built in two differently named folders gets the
/// same bundle id.
pub fn default_source_name(repository: &Path) -> String {
    let abs = std::fs::canonicalize(repository).unwrap_or_else(|_| repository.to_path_buf());
    let mut name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name == ".git" {
        name = abs
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    name.strip_suffix(".git").map(str::to_owned).unwrap_or(name)
}

/// A built bundle: its manifest and every object's bytes by address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltBundle {
    /// The manifest.
    pub manifest: Manifest,
    /// Object bytes by address.
    pub objects: BTreeMap<String, Vec<u8>>,
    /// Warnings for the build output (YAML 1.1 scalars, files skipped),
    /// each naming its file. Not part of the bundle.
    pub warnings: Vec<String>,
}

impl BuiltBundle {
    /// The bundle id.
    pub fn id(&self) -> String {
        self.manifest.id().to_string()
    }

    /// Writes the bundle file (atomically) and returns the bundle id (of
    /// the same encoding of the manifest that was written).
    pub fn write_file(&self, path: &Path) -> Result<BundleId> {
        write_bundle_file(path, &self.manifest, |e| {
            self.objects
                .get(e.object.as_str())
                .map(Vec::as_slice)
                .ok_or_else(|| Error::ObjectMissing {
                    address: e.object.to_string(),
                    what: format!("{} in {}", e.display_name(), e.path),
                })
        })
    }
}

fn is_under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map(|(_, f)| f).unwrap_or(path)
}

/// Reads the `.cairnignore` files that apply to `dir`: those at or below
/// it and those in its parent directories.
fn read_ignore_files(tree: &GitTree, dir: &str, files: &[TreeFile]) -> Result<CairnIgnore> {
    let mut found: Vec<TreeFile> = files
        .iter()
        .filter(|f| file_name(&f.path) == cairnignore::FILE_NAME)
        .cloned()
        .collect();
    let mut anc = dir;
    while !anc.is_empty() {
        anc = parent(anc);
        let p = if anc.is_empty() {
            cairnignore::FILE_NAME.to_owned()
        } else {
            format!("{anc}/{}", cairnignore::FILE_NAME)
        };
        if let Some(git::TreeNode {
            kind: git::EntryKind::File,
            oid,
        }) = tree.entry(&p)
        {
            found.push(TreeFile { path: p, oid });
        }
    }
    let mut texts = Vec::with_capacity(found.len());
    for f in found {
        let bytes = tree.read_blob(&f, cairnignore::MAX_IGNORE_FILE_BYTES)?;
        texts.push((f.path, bytes));
    }
    CairnIgnore::new(&texts)
}

/// Directories holding a `Chart.yaml`: Helm charts, not plain manifests.
/// Their files are skipped by the plain-YAML parser.
// Helm rendering (H5, `crate::helm`) hooks in where `charts` is used in
// `build`: render each chart directory there and push its objects onto
// `parsed`.
fn chart_dirs(files: &[TreeFile]) -> Vec<String> {
    let mut dirs: Vec<String> = files
        .iter()
        .filter(|f| file_name(&f.path) == "Chart.yaml")
        .map(|f| parent(&f.path).to_owned())
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

fn is_at_or_under(path: &str, dir: &str) -> bool {
    path == dir || is_under(path, dir)
}

/// The identity used for duplicate detection: an empty namespace and
/// `default` are the same (an empty namespace means the agent's default
/// namespace, which is `default` unless configured otherwise).
fn duplicate_key(e: &Entry) -> String {
    if e.namespace == "default" {
        let mut e = e.clone();
        e.namespace.clear();
        e.key()
    } else {
        e.key()
    }
}

/// Builds a bundle. See the module documentation for the rules.
pub fn build(opts: &BuildOptions) -> Result<BuiltBundle> {
    let tree = GitTree::open(&opts.repository, opts.reference.as_deref())?;
    let dir = git::normalize_tree_path(&opts.path)?;
    let files = tree.files(&dir)?;
    let ignore = read_ignore_files(&tree, &dir, &files)?;
    // Built-in skips: hidden files and directories (`.github/`,
    // `.codecov.yml`), and what `.cairnignore` files exclude. An explicit
    // `--path` naming a hidden directory is still built.
    let hidden_base = if cairnignore::is_hidden(&dir) {
        dir.as_str()
    } else {
        ""
    };
    let files: Vec<TreeFile> = files
        .into_iter()
        .filter(|f| {
            let rel = if hidden_base.is_empty() {
                f.path.as_str()
            } else {
                f.path.strip_prefix(hidden_base).unwrap_or(&f.path)
            };
            !cairnignore::is_hidden(rel) && !ignore.is_ignored(&f.path)
        })
        .collect();
    // Every directory with a Chart.yaml: never parsed as plain YAML, and a
    // kustomization inside one is the chart's business. Which of them
    // render (not library charts, not subcharts on their own, not charts
    // inside a Kustomize directory) is `helm::find_charts`' decision below.
    let chart_trees = chart_dirs(&files);

    // Kustomize directories: the outermost ones win; everything below one
    // belongs to its render and is not parsed on its own (that covers the
    // patches, configurations and transformer files a kustomization uses:
    // Kustomize's load restrictor keeps them inside its directory).
    let mut kdirs: Vec<(String, String)> = Vec::new(); // (dir, kustomization file path)
    for f in &files {
        if KUSTOMIZATION_FILES.contains(&file_name(&f.path)) {
            let d = parent(&f.path).to_owned();
            if chart_trees.iter().any(|c| is_at_or_under(&d, c)) {
                continue;
            }
            if !kdirs.iter().any(|(k, _)| k == &d) {
                kdirs.push((d, f.path.clone()));
            }
        }
    }
    kdirs.sort();
    let mut outer: Vec<(String, String)> = Vec::new();
    for (d, p) in kdirs {
        if !outer.iter().any(|(o, _)| o == &d || is_under(&d, o)) {
            outer.push((d, p));
        }
    }
    // Helm charts (outside Kustomize directories) render with helm.
    let kustomize_dirs: Vec<String> = outer.iter().map(|(d, _)| d.clone()).collect();
    let charts = helm::find_charts(files.iter().map(|f| f.path.as_str()), &kustomize_dirs);
    let chart_values = helm::values_files(&tree, &charts)?;
    let plain: Vec<TreeFile> = files
        .into_iter()
        .filter(|f| manifests::is_manifest_file(&f.path))
        .filter(|f| !outer.iter().any(|(o, _)| is_under(&f.path, o)))
        .filter(|f| !chart_trees.iter().any(|c| is_under(&f.path, c)))
        .filter(|f| !helm::in_chart(&f.path, &charts) && !chart_values.contains(&f.path))
        .collect();

    let mut warnings = Vec::new();
    let parsed_files = parse_parallel(&tree, &plain, opts)?;
    let mut not_objects: Vec<(String, u32, usize)> = Vec::new();
    let mut parsed: Vec<(String, Vec<ParsedObject>)> = Vec::with_capacity(parsed_files.len());
    for (path, f) in parsed_files {
        warnings.extend(f.warnings);
        if let Some((index, line)) = f.not_objects.first() {
            not_objects.push((path, *index, *line));
            continue;
        }
        parsed.push((path, f.objects));
    }
    if !not_objects.is_empty() {
        let shown: Vec<String> = not_objects
            .iter()
            .take(10)
            .map(|(p, index, line)| {
                format!("{} (document {index}, line {line})", escape_untrusted(p))
            })
            .collect();
        let more = not_objects.len().saturating_sub(shown.len());
        let lines: Vec<String> = not_objects
            .iter()
            .take(10)
            .map(|(p, _, _)| escape_untrusted(&cairnignore::pattern_for(p)))
            .collect();
        return Err(Error::Build(format!(
            "{} file(s) are not Kubernetes manifests (a YAML or JSON document with neither apiVersion nor kind): {}{}; \
             exclude them with these lines in .cairnignore at the repository root: {}",
            not_objects.len(),
            shown.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() },
            lines.join(" ")
        )));
    }
    let (objects, mut rendered) = helm::render_charts(
        &tree,
        &charts,
        &opts.helm,
        &opts.export,
        opts.limits.max_bundle_bytes,
        opts.limits.max_object_bytes,
    )?;
    parsed.extend(objects);
    if !outer.is_empty() {
        let start: Vec<String> = outer.iter().map(|(d, _)| d.clone()).collect();
        let export = export::export(&tree, &start, &opts.export)?;
        let helm_kfiles =
            helm::kustomize_uses_helm(&tree, &export.roots, opts.export.allow_remote)?;
        let helm = match helm_kfiles.first() {
            Some(k) => Some(helm::helm_version(&opts.helm, &escape_name(k))?),
            None => None,
        };
        for (d, kfile) in &outer {
            let f = render_kustomization(export.path(), d, kfile, opts, helm.is_some()).map_err(
                |e| match e {
                    Error::Build(msg) if !export.left_out.is_empty() => {
                        let shown: Vec<&str> =
                            export.left_out.iter().take(5).map(String::as_str).collect();
                        Error::Build(format!(
                            "{msg} (left out of the kustomize export: {})",
                            shown.join(", ")
                        ))
                    }
                    other => other,
                },
            )?;
            warnings.extend(f.warnings);
            parsed.push((kfile.clone(), f.objects));
        }
        if let Some(version) = helm {
            rendered.extend(helm_kfiles.into_iter().map(|k| crate::bundle::Rendered {
                path: k,
                tool: version.clone(),
                values: Vec::new(),
                settings: vec!["kustomize-enable-helm".into()],
            }));
        }
    }

    let mut entries = Vec::new();
    let mut objects = BTreeMap::new();
    for (path, objs) in parsed {
        for o in objs {
            let address = crate::Address::of(&o.bytes);
            entries.push(Entry {
                path: path.clone(),
                document: o.document,
                api_version: o.api_version,
                kind: o.kind,
                namespace: o.namespace,
                name: o.name,
                object: address.clone(),
                size: o.bytes.len() as u64,
            });
            objects.insert(address.into_string(), o.bytes);
        }
    }
    entries.sort_by(|a, b| (&a.path, a.document).cmp(&(&b.path, b.document)));
    let mut seen: BTreeMap<String, &Entry> = BTreeMap::new();
    for e in &entries {
        if let Some(first) = seen.insert(duplicate_key(e), e) {
            let note = if first.namespace != e.namespace {
                " (an empty namespace and `default` are the same namespace)"
            } else {
                ""
            };
            return Err(Error::Build(format!(
                "duplicate object {}: defined in {} (document {}) and in {} (document {}){note}",
                e.display_name(),
                escape_untrusted(&first.path),
                first.document,
                escape_untrusted(&e.path),
                e.document
            )));
        }
    }
    if entries.is_empty() && !opts.allow_empty {
        let at = if dir.is_empty() {
            "the tree".to_owned()
        } else {
            format!("`{dir}`")
        };
        return Err(Error::Build(format!(
            "empty bundle: no Kubernetes objects in {at} of commit {}; pass --allow-empty to build it anyway",
            tree.commit
        )));
    }
    if warnings.len() > MAX_WARNINGS {
        let more = warnings.len() - MAX_WARNINGS;
        warnings.truncate(MAX_WARNINGS);
        warnings.push(format!("... and {more} more warnings"));
    }
    let manifest = Manifest {
        format: opts.format,
        source: Source {
            repository: opts.source_name.clone(),
            commit: tree.commit.clone(),
            path: dir,
            rendered,
        },
        entries,
        images: None,
    };
    manifest.validate(&opts.limits)?;
    if manifest.format != crate::bundle::FORMAT_1 {
        // The top document's own limits (chunk count and sizes).
        crate::bundle::Head::decode(&manifest.encode(), None, &opts.limits)?;
    }
    Ok(BuiltBundle {
        manifest,
        objects,
        warnings,
    })
}

/// Reads and parses `files` on `opts.threads` threads. The result is in
/// the order of `files` whatever the scheduling; on failure the error of
/// the first failing file (in that order) is returned.
fn parse_parallel(
    tree: &GitTree,
    files: &[TreeFile],
    opts: &BuildOptions,
) -> Result<Vec<(String, ParsedFile)>> {
    let threads = opts.threads.clamp(1, 64).min(files.len().max(1));
    let bar = (opts.progress && files.len() >= PROGRESS_MIN_FILES).then(|| {
        let b = indicatif::ProgressBar::new(files.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("parsing {bar:40} {pos}/{len} files ({eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    // gix repositories are not Sync without gix's `parallel` feature: each
    // thread opens its own handle on the same Git directory.
    let git_dir = tree.repository().git_dir().to_path_buf();
    let max_object = opts.limits.max_object_bytes;
    let mut results: Vec<(usize, Result<ParsedFile>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let git_dir = &git_dir;
                let bar = bar.clone();
                s.spawn(move || {
                    let mut out = Vec::new();
                    let repo = match git::LimitedRepo::open(git_dir, MAX_SOURCE_FILE_BYTES) {
                        Ok(r) => r,
                        Err(e) => {
                            out.push((t, Err(e)));
                            return out;
                        }
                    };
                    for (i, f) in files.iter().enumerate().skip(t).step_by(threads) {
                        let r = repo
                            .read_blob(f)
                            .and_then(|bytes| {
                                manifests::parse_file_full(&f.path, &bytes, max_object)
                            })
                            .map_err(exclusion_hint);
                        let failed = r.is_err();
                        out.push((i, r));
                        if let Some(b) = &bar {
                            b.inc(1);
                        }
                        if failed {
                            break;
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![(0, Err(Error::Build("a parser thread panicked".into())))]
                })
            })
            .collect()
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    results.sort_by_key(|(i, _)| *i);
    let mut out = Vec::with_capacity(results.len());
    for (i, r) in results {
        out.push((files[i].path.clone(), r?));
    }
    Ok(out)
}

/// Adds the way out to a file's parse error: fix it, or exclude it.
fn exclusion_hint(e: Error) -> Error {
    match e {
        // Object errors ("document 1: missing `kind`") are about a
        // manifest; syntax errors may be a file that is not one.
        Error::Manifest { file, reason } if !reason.starts_with("document ") => {
            let reason = format!(
                "{reason} (if this file is not a Kubernetes manifest, add `/{}` to .cairnignore)",
                escape_untrusted(&file)
            );
            Error::Manifest { file, reason }
        }
        other => other,
    }
}

/// Runs the command in a network namespace of its own (only a loopback
/// interface, down) where the system allows it: as root, or with
/// unprivileged user namespaces. Elsewhere it runs as it is; the export
/// already refused every remote reference.
pub(crate) fn isolate_network(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only
    // makes the unshare system call, which is async-signal-safe; it
    // touches no memory shared with other threads.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                // Not privileged: a user namespace grants the right to
                // make a network namespace inside it. Failure is fine.
                let _ = libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET);
            }
            Ok(())
        });
    }
}

fn render_kustomization(
    root: &Path,
    dir: &str,
    kfile: &str,
    opts: &BuildOptions,
    enable_helm: bool,
) -> Result<ParsedFile> {
    let target = if dir.is_empty() {
        root.to_path_buf()
    } else {
        root.join(dir)
    };
    let mut cmd = std::process::Command::new(&opts.kubectl);
    // Kustomize's root-only load restrictor (its default, made explicit):
    // files a kustomization loads stay inside its own directory. No
    // plugins, no Helm, no exec functions (none of their flags is given).
    cmd.arg("kustomize")
        .arg("--load-restrictor")
        .arg("LoadRestrictionsRootOnly")
        .arg(&target)
        .current_dir(root)
        .stdin(std::process::Stdio::null());
    if enable_helm {
        // helmCharts (checked by helm::kustomize_uses_helm): charts from
        // the commit, rendered by the same Helm as chart directories.
        cmd.arg("--enable-helm")
            .arg("--helm-command")
            .arg(&opts.helm.helm);
    }
    if !opts.export.allow_remote {
        // Nothing remote is referenced (the export refused it); give
        // kubectl no proxies, credentials or configuration either.
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.env("HOME", root).env("TMPDIR", root);
        isolate_network(&mut cmd);
    }
    let output = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            let prog = opts.kubectl.to_string_lossy();
            let place = if prog == "kubectl" {
                "kubectl not found in PATH".to_owned()
            } else {
                format!("kubectl `{prog}` not found")
            };
            Error::Build(format!(
                "{place}: needed to render {kfile}; install kubectl 1.27+"
            ))
        } else {
            Error::Build(format!("running kubectl kustomize for {kfile}: {e}"))
        }
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let root_s = format!("{}/", root.display());
        let msg = stderr.replace(&root_s, "").replace('\n', " ");
        let msg = msg.trim();
        let msg: String = msg.chars().take(600).collect();
        return Err(Error::Build(format!(
            "kubectl kustomize failed for {kfile}: {msg}"
        )));
    }
    if output.stdout.len() as u64 > opts.limits.max_bundle_bytes {
        return Err(Error::TooLarge {
            what: format!("kustomize output of {kfile}"),
            limit: opts.limits.max_bundle_bytes,
            actual: output.stdout.len() as u64,
        });
    }
    let f = manifests::parse_file_full(
        &format!("{kfile} (kustomize output)"),
        &output.stdout,
        opts.limits.max_object_bytes,
    )?;
    if let Some((index, line)) = f.not_objects.first() {
        return Err(Error::Build(format!(
            "kubectl kustomize output of {kfile}: document {index} (line {line}) is not a Kubernetes object"
        )));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names() {
        assert_eq!(
            default_source_name(Path::new("/nonexistent/x/edge")),
            "edge"
        );
        assert_eq!(
            default_source_name(Path::new("/nonexistent/edge.git")),
            "edge"
        );
        assert_eq!(
            default_source_name(Path::new("/nonexistent/edge/.git")),
            "edge"
        );
    }

    #[test]
    fn under() {
        assert!(is_under("a/b", ""));
        assert!(is_under("a/b", "a"));
        assert!(!is_under("ab/c", "a"));
        assert!(!is_under("a", "a"));
    }
}
