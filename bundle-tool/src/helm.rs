//! Helm charts rendered at build time, as Argo CD does.
//!
//! A directory of the commit holding a `Chart.yaml` (outside any Kustomize
//! directory, and not inside another chart) is a chart: it is rendered
//! with a real `helm template` and its output parsed like any manifest
//! file. Kustomize `helmCharts` are rendered by `kubectl kustomize
//! --enable-helm` with the same Helm (see [`kustomize_uses_helm`]).
//!
//! * **Inputs.** An optional `cairn-helm.yaml` beside `Chart.yaml` names
//!   the release, namespace, values files (paths inside the commit,
//!   relative to the chart directory), `--set` values, and the cluster
//!   facts Helm cannot see at build time (`kubeVersion`, `apiVersions`).
//!   `cairn bundle build --helm-values CHART_DIR=FILE` adds a values file
//!   from the build machine (applied last).
//! * **Never the network.** Charts come from the commit: subcharts must be
//!   vendored in `charts/` (a directory or a `.tgz`); a dependency with a
//!   remote `repository` that is not vendored is refused naming
//!   `Chart.yaml`. Helm runs with empty `HOME`/XDG/Helm directories, no
//!   repositories configured, no environment besides `PATH`, and in a
//!   network namespace of its own where the system allows one.
//! * **Same export rules as Kustomize.** The chart directory (and values
//!   files outside it) are written with [`crate::export::export_paths`]:
//!   no symbolic links created, caps on files and bytes.
//! * **Provenance.** The Helm version, the digest of every values file and
//!   every other setting are recorded in the manifest's
//!   [`Source::rendered`](crate::bundle::Source) list, so the bundle id
//!   stays a function of the inputs.
//!
//! Entry paths of rendered objects are the template files in the tree:
//! the chart directory joined with the `# Source:` line Helm prints, the
//! chart's own name dropped (`apps/web` + `web/templates/svc.yaml` gives
//! `apps/web/templates/svc.yaml`; subcharts give
//! `apps/web/charts/cache/templates/...`).

use crate::bundle::{Rendered, RenderedValues};
use crate::export::{self, ExportLimits};
use crate::git::{self, escape_name, GitTree};
use crate::manifests::{self, ParsedObject};
use crate::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The file that makes a directory a Helm chart.
pub const CHART_FILE: &str = "Chart.yaml";

/// The per-chart configuration file, beside `Chart.yaml`.
pub const CONFIG_FILE: &str = "cairn-helm.yaml";

/// Largest `Chart.yaml`, `cairn-helm.yaml` or values file read (4 MiB).
pub const MAX_CHART_INPUT_BYTES: u64 = 4 << 20;

/// Largest stderr kept from a failed Helm run (characters).
const MAX_ERROR_CHARS: usize = 600;

/// How charts are rendered.
#[derive(Clone, Debug)]
pub struct HelmOptions {
    /// The Helm program (`helm` from `PATH` by default).
    pub helm: OsString,
    /// Values files from the build machine, by chart directory (tree path),
    /// applied after the ones `cairn-helm.yaml` names, in this order.
    pub values: Vec<(String, PathBuf)>,
    /// `--kube-version` for charts whose `cairn-helm.yaml` sets none (the
    /// target clusters' version, for `.Capabilities.KubeVersion`).
    pub kube_version: Option<String>,
    /// `--api-versions` for every chart, before the ones its
    /// `cairn-helm.yaml` lists (for `.Capabilities.APIVersions.Has`).
    pub api_versions: Vec<String>,
    /// Longest one `helm template` may run.
    pub timeout: Duration,
}

/// Default for [`HelmOptions::timeout`].
pub const DEFAULT_HELM_TIMEOUT: Duration = Duration::from_secs(300);

impl Default for HelmOptions {
    fn default() -> Self {
        Self {
            helm: "helm".into(),
            values: Vec::new(),
            kube_version: None,
            api_versions: Vec::new(),
            timeout: DEFAULT_HELM_TIMEOUT,
        }
    }
}

/// Parses a `--helm-values CHART_DIR=FILE` argument.
pub fn parse_values_arg(arg: &str) -> std::result::Result<(String, PathBuf), String> {
    let (dir, file) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}`: expected CHART_DIR=FILE"))?;
    let dir = git::normalize_tree_path(dir).map_err(|e| e.to_string())?;
    if file.is_empty() {
        return Err(format!("`{arg}`: empty file name"));
    }
    Ok((dir, PathBuf::from(file)))
}

/// `cairn-helm.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ChartConfig {
    /// `helm template` release name [default: the chart directory's name].
    release_name: Option<String>,
    /// `--namespace`.
    namespace: Option<String>,
    /// Values files, relative to the chart directory, inside the commit.
    #[serde(default)]
    values_files: Vec<String>,
    /// `--set` entries (`key=value`).
    #[serde(default)]
    set: Vec<String>,
    /// `--kube-version` (what `.Capabilities.KubeVersion` says).
    kube_version: Option<String>,
    /// `--api-versions` (what `.Capabilities.APIVersions.Has` finds).
    #[serde(default)]
    api_versions: Vec<String>,
    /// `--include-crds` [default: true, as Argo CD].
    include_crds: Option<bool>,
}

/// A chart found in the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChartDir {
    /// The chart directory (tree path).
    pub dir: String,
}

impl ChartDir {
    fn chart_file(&self) -> String {
        join(&self.dir, CHART_FILE)
    }
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

fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map(|(_, f)| f).unwrap_or(path)
}

/// The chart directories among `paths` (tree paths of files): directories
/// holding a `Chart.yaml`, outermost only (subcharts belong to their
/// parent), leaving out those inside one of `skip_dirs` (Kustomize
/// directories: their charts are Kustomize's).
pub fn find_charts<'a>(
    paths: impl IntoIterator<Item = &'a str>,
    skip_dirs: &[String],
) -> Vec<ChartDir> {
    let mut dirs: Vec<String> = paths
        .into_iter()
        .filter(|p| file_name(p) == CHART_FILE)
        .map(|p| parent(p).to_owned())
        .filter(|d| !skip_dirs.iter().any(|k| git::is_within(d, k)))
        .collect();
    dirs.sort();
    dirs.dedup();
    let mut out: Vec<ChartDir> = Vec::new();
    for d in dirs {
        // Sorted order puts a directory before everything inside it.
        if !out.iter().any(|c| git::is_within(&d, &c.dir)) {
            out.push(ChartDir { dir: d });
        }
    }
    out
}

/// Whether `path` belongs to one of `charts` (and is not parsed as a
/// plain manifest file).
pub fn in_chart(path: &str, charts: &[ChartDir]) -> bool {
    charts.iter().any(|c| git::is_within(path, &c.dir))
}

fn read_yaml(tree: &GitTree, path: &str) -> Result<Option<serde_json::Value>> {
    let Some(node) = tree.entry(path) else {
        return Ok(None);
    };
    let bytes = tree.read_blob(
        &git::TreeFile {
            path: path.to_owned(),
            oid: node.oid,
        },
        MAX_CHART_INPUT_BYTES,
    )?;
    let shown = escape_name(path);
    let text = std::str::from_utf8(&bytes).map_err(|_| Error::Manifest {
        file: shown.clone(),
        reason: "not UTF-8 text".into(),
    })?;
    let docs = crate::yaml::parse_documents(text).map_err(|e| Error::Manifest {
        file: shown,
        reason: e.to_string(),
    })?;
    Ok(docs.into_iter().find_map(|d| d.value))
}

fn is_remote_repository(r: &str) -> bool {
    !r.is_empty() && !r.starts_with("file://")
}

/// Whether a dependency `name` is vendored in the chart's `charts/`: a
/// directory of that name, or a `.tgz` whose name starts with `name-`.
fn vendored(tree: &GitTree, chart_dir: &str, name: &str) -> bool {
    let charts = join(chart_dir, "charts");
    let found = tree.entries_under(&charts).any(|(p, node)| {
        let rest = &p[charts.len() + 1..];
        if rest.contains('/') {
            return false;
        }
        (rest == name && node.kind == git::EntryKind::Dir)
            || (rest.starts_with(&format!("{name}-")) && rest.ends_with(".tgz"))
    });
    found
}

/// What one chart needs: its checked configuration.
struct Plan {
    chart: ChartDir,
    config: ChartConfig,
    /// Values files in the tree (tree paths), in order.
    tree_values: Vec<String>,
    library: bool,
}

fn plan(tree: &GitTree, chart: &ChartDir, opts: &HelmOptions) -> Result<Plan> {
    let chart_file = chart.chart_file();
    let shown = escape_name(&chart_file);
    let meta = read_yaml(tree, &chart_file)?.unwrap_or(serde_json::Value::Null);
    let library = meta.get("type").and_then(|t| t.as_str()) == Some("library");
    let deps = meta
        .get("dependencies")
        .and_then(|d| d.as_array())
        .cloned()
        .unwrap_or_default();
    for dep in &deps {
        let name = dep.get("name").and_then(|n| n.as_str()).unwrap_or("");
        let repo = dep.get("repository").and_then(|r| r.as_str()).unwrap_or("");
        if name.is_empty() {
            return Err(Error::Build(format!(
                "{shown}: a dependency without a name; fix Chart.yaml"
            )));
        }
        if !vendored(tree, &chart.dir, name) {
            let why = if is_remote_repository(repo) {
                format!(
                    "comes from the remote repository `{}` and is not vendored in {}/charts/; \
                     the build never reaches the network",
                    escape_name(repo),
                    escape_name(&chart.dir)
                )
            } else {
                format!("is not vendored in {}/charts/", escape_name(&chart.dir))
            };
            return Err(Error::Build(format!(
                "{shown}: dependency `{}` {why}; run `helm dependency build {}` and commit \
                 the charts/ directory",
                escape_name(name),
                escape_name(&chart.dir)
            )));
        }
    }
    let config_file = join(&chart.dir, CONFIG_FILE);
    let config_shown = escape_name(&config_file);
    let config: ChartConfig = match read_yaml(tree, &config_file)? {
        None | Some(serde_json::Value::Null) => ChartConfig::default(),
        Some(v) => serde_json::from_value(v).map_err(|e| Error::Manifest {
            file: config_shown.clone(),
            reason: format!(
                "{e} (fields: releaseName, namespace, valuesFiles, set, kubeVersion, \
                 apiVersions, includeCrds)"
            ),
        })?,
    };
    let mut tree_values = Vec::new();
    for v in &config.values_files {
        let refuse = |why: &str| {
            Error::Build(format!(
                "{config_shown}: values file `{}` {why}; values files must be in the commit \
                 (or given with --helm-values {}=FILE)",
                escape_name(v),
                escape_name(&chart.dir)
            ))
        };
        if v.contains("://") {
            return Err(refuse("is remote"));
        }
        let p = git::join_inside(&chart.dir, v).ok_or_else(|| refuse("leaves the repository"))?;
        match tree.entry(&p).map(|n| n.kind) {
            Some(git::EntryKind::File | git::EntryKind::Link) => tree_values.push(p),
            Some(_) => return Err(refuse("is not a file")),
            None => return Err(refuse("is not in the commit")),
        }
    }
    for s in &config.set {
        if !s.contains('=') {
            return Err(Error::Manifest {
                file: config_shown.clone(),
                reason: format!("`set` entry `{}` is not key=value", escape_name(s)),
            });
        }
    }
    for (d, f) in &opts.values {
        if d == &chart.dir && !f.is_file() {
            return Err(Error::Build(format!(
                "--helm-values {}={}: no such file",
                escape_name(d),
                escape_name(&f.display().to_string())
            )));
        }
    }
    Ok(Plan {
        chart: chart.clone(),
        config,
        tree_values,
        library,
    })
}

/// The values files (tree paths) the charts' `cairn-helm.yaml` files name:
/// chart inputs, not manifests, wherever they lie in the tree.
pub fn values_files(tree: &GitTree, charts: &[ChartDir]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for c in charts {
        out.extend(plan(tree, c, &HelmOptions::default())?.tree_values);
    }
    Ok(out)
}

/// Refuses `--helm-values` for a directory that is not a chart of this
/// build.
pub fn check_values_targets(charts: &[ChartDir], opts: &HelmOptions) -> Result<()> {
    for (d, _) in &opts.values {
        if !charts.iter().any(|c| &c.dir == d) {
            return Err(Error::Build(format!(
                "--helm-values {}=...: `{}` is not a chart directory of this build \
                 (no {CHART_FILE} there, or it is inside a Kustomize directory)",
                escape_name(d),
                escape_name(d)
            )));
        }
    }
    Ok(())
}

/// Runs `helm version` once: `helm vX.Y.Z`. `needed_for` names what needs
/// it, for the error when Helm is missing.
pub fn helm_version(opts: &HelmOptions, needed_for: &str) -> Result<String> {
    let home = tempfile::Builder::new()
        .prefix("cairn-helm-")
        .tempdir()
        .map_err(|e| Error::Io {
            path: std::env::temp_dir(),
            source: e,
        })?;
    let mut cmd = Command::new(&opts.helm);
    cmd.arg("version").arg("--template").arg("{{.Version}}");
    sandbox(&mut cmd, home.path())?;
    let out = cmd
        .output()
        .map_err(|e| missing_helm(opts, needed_for, &e))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || !v.starts_with("v3.") || v.len() > 64 {
        return Err(Error::Build(format!(
            "`{}` is not Helm 3 (`helm version` said `{}`): needed to render {needed_for}; \
             install Helm 3 (.ci/install-helm) or pass --helm PROGRAM",
            escape_name(&opts.helm.to_string_lossy()),
            escape_name(&v)
        )));
    }
    Ok(format!("helm {v}"))
}

fn missing_helm(opts: &HelmOptions, needed_for: &str, e: &std::io::Error) -> Error {
    let prog = opts.helm.to_string_lossy();
    if e.kind() == std::io::ErrorKind::NotFound {
        let place = if prog == "helm" {
            "helm not found in PATH".to_owned()
        } else {
            format!("helm `{}` not found", escape_name(&prog))
        };
        Error::Build(format!(
            "{place}: needed to render {needed_for}; install Helm 3 (e.g. `bash .ci/install-helm`) \
             or pass --helm PROGRAM"
        ))
    } else {
        Error::Build(format!(
            "running helm `{}` for {needed_for}: {e}",
            escape_name(&prog)
        ))
    }
}

/// Clears the environment (only `PATH` kept), points every Helm and XDG
/// directory into an empty `HOME` (no repositories, no registry
/// credentials, no plugins) and isolates the network where possible.
///
/// `base` is a private temporary folder: `HOME` is `base/home`, `TMPDIR`
/// `base/tmp` (both created here, empty); files the caller puts directly
/// in `base` are not in either.
fn sandbox(cmd: &mut Command, base: &Path) -> Result<()> {
    for sub in ["home", "tmp"] {
        let d = base.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::Io { path: d, source: e })?;
    }
    let home = base.join("home");
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (var, sub) in [
        ("HOME", ""),
        ("XDG_CONFIG_HOME", "config"),
        ("XDG_CACHE_HOME", "cache"),
        ("XDG_DATA_HOME", "data"),
        ("HELM_CONFIG_HOME", "config/helm"),
        ("HELM_CACHE_HOME", "cache/helm"),
        ("HELM_DATA_HOME", "data/helm"),
        ("HELM_PLUGINS", "data/helm/plugins"),
        ("HELM_REPOSITORY_CONFIG", "config/helm/repositories.yaml"),
        ("HELM_REPOSITORY_CACHE", "cache/helm/repository"),
        ("HELM_REGISTRY_CONFIG", "config/helm/registry/config.json"),
    ] {
        cmd.env(var, home.join(sub));
    }
    cmd.env("TMPDIR", base.join("tmp"));
    cmd.stdin(Stdio::null());
    crate::build::isolate_network(cmd);
    Ok(())
}

/// Renders every chart in `charts`: the parsed objects by entry path (in
/// order), and the provenance records. Does nothing (and needs no Helm)
/// when `charts` is empty.
#[allow(clippy::type_complexity)]
pub fn render_charts(
    tree: &GitTree,
    charts: &[ChartDir],
    opts: &HelmOptions,
    export_limits: &ExportLimits,
    max_output_bytes: u64,
    max_object_bytes: u64,
) -> Result<(Vec<(String, Vec<ParsedObject>)>, Vec<Rendered>)> {
    check_values_targets(charts, opts)?;
    let mut plans = Vec::new();
    for c in charts {
        let p = plan(tree, c, opts)?;
        if !p.library {
            plans.push(p);
        }
    }
    if plans.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let first = plans[0].chart.chart_file();
    let version = helm_version(opts, &format!("the chart {}", escape_name(&first)))?;
    let mut objects = Vec::new();
    let mut rendered = Vec::new();
    for p in &plans {
        let (objs, r) = render_one(
            tree,
            p,
            opts,
            &version,
            export_limits,
            max_output_bytes,
            max_object_bytes,
        )?;
        objects.extend(objs);
        rendered.push(r);
    }
    Ok((objects, rendered))
}

#[allow(clippy::type_complexity)]
fn render_one(
    tree: &GitTree,
    p: &Plan,
    opts: &HelmOptions,
    version: &str,
    export_limits: &ExportLimits,
    max_output_bytes: u64,
    max_object_bytes: u64,
) -> Result<(Vec<(String, Vec<ParsedObject>)>, Rendered)> {
    let dir = &p.chart.dir;
    let chart_file = p.chart.chart_file();
    let shown_chart = escape_name(&chart_file);
    let export = export::export_paths(
        tree,
        vec![dir.clone()],
        &Default::default(),
        &p.tree_values,
        export_limits,
    )?;
    let root = export.path();
    let home = tempfile::Builder::new()
        .prefix("cairn-helm-")
        .tempdir()
        .map_err(|e| Error::Io {
            path: std::env::temp_dir(),
            source: e,
        })?;

    let mut values = Vec::new();
    let mut args: Vec<OsString> = Vec::new();
    for v in &p.tree_values {
        let node = tree
            .entry(v)
            .ok_or_else(|| Error::Git(format!("`{}` vanished from the tree", escape_name(v))))?;
        let bytes = tree.read_blob(
            &git::TreeFile {
                path: v.clone(),
                oid: node.oid,
            },
            MAX_CHART_INPUT_BYTES,
        );
        // A link: the export followed it; digest what was written.
        let bytes = match bytes {
            Ok(b) if node.kind == git::EntryKind::File => b,
            _ => read_capped(&root.join(v))?,
        };
        values.push(RenderedValues {
            file: v.clone(),
            digest: crate::Address::of(&bytes),
        });
        args.push(flag("--values", root.join(v)));
    }
    let mut n = 0;
    for (d, f) in &opts.values {
        if d != dir {
            continue;
        }
        let bytes = read_capped(f)?;
        // Helm reads a private copy: what was digested is what renders.
        n += 1;
        let copy = home.path().join(format!("values-{n}.yaml"));
        std::fs::write(&copy, &bytes).map_err(|e| Error::Io {
            path: copy.clone(),
            source: e,
        })?;
        values.push(RenderedValues {
            file: "--helm-values".into(),
            digest: crate::Address::of(&bytes),
        });
        args.push(flag("--values", copy));
    }

    let c = &p.config;
    let release = c
        .release_name
        .clone()
        .unwrap_or_else(|| file_name(dir).to_owned());
    check_name(&p.chart, "releaseName", &release, 53)?;
    if let Some(ns) = &c.namespace {
        check_name(&p.chart, "namespace", ns, 63)?;
    }
    let mut settings = vec![format!("release={release}")];
    if let Some(ns) = &c.namespace {
        settings.push(format!("namespace={ns}"));
        args.push(flag("--namespace", ns));
    }
    for s in &c.set {
        settings.push(format!("set={s}"));
        args.push(flag("--set", s));
    }
    if let Some(k) = c.kube_version.as_ref().or(opts.kube_version.as_ref()) {
        settings.push(format!("kube-version={k}"));
        args.push(flag("--kube-version", k));
    }
    for a in opts.api_versions.iter().chain(&c.api_versions) {
        settings.push(format!("api-versions={a}"));
        args.push(flag("--api-versions", a));
    }
    let include_crds = c.include_crds.unwrap_or(true);
    settings.push(format!("include-crds={include_crds}"));
    if include_crds {
        args.push("--include-crds".into());
    }

    let target = if dir.is_empty() {
        root.to_path_buf()
    } else {
        root.join(dir)
    };
    let mut cmd = Command::new(&opts.helm);
    // Every value goes in `--flag=value` form and the positional arguments
    // after `--`: nothing from the commit can be read as another flag.
    cmd.arg("template")
        .args(&args)
        .arg("--")
        .arg(&release)
        .arg(&target)
        .current_dir(root);
    sandbox(&mut cmd, home.path())?;
    let output = match run_capped(&mut cmd, max_output_bytes, opts.timeout)
        .map_err(|e| missing_helm(opts, &format!("the chart {shown_chart}"), &e))?
    {
        Run::Done(o) => o,
        Run::TooLarge => {
            return Err(Error::TooLarge {
                what: format!("helm template output of {shown_chart}"),
                limit: max_output_bytes,
                actual: max_output_bytes.saturating_add(1),
            })
        }
        Run::TimedOut => {
            return Err(Error::Build(format!(
                "helm template for the chart {shown_chart} ran over {} s and was stopped \
                 (a template that loops?); raise the limit with --helm-timeout",
                opts.timeout.as_secs()
            )))
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let msg = stderr
            .replace(&format!("{}/", root.display()), "")
            .replace(&format!("{}/", home.path().display()), "")
            .replace('\n', " ");
        let msg: String = msg.trim().chars().take(MAX_ERROR_CHARS).collect();
        return Err(Error::Build(format!(
            "helm template failed for the chart {shown_chart}: {}",
            escape_name(&msg)
        )));
    }
    let text = std::str::from_utf8(&output.stdout).map_err(|_| Error::Manifest {
        file: format!("{shown_chart} (helm template output)"),
        reason: "not UTF-8 text".into(),
    })?;
    let mut objects = Vec::new();
    for (source, docs) in split_by_source(text) {
        let path = entry_path(dir, &source);
        let shown = format!("{} (rendered by helm)", escape_name(&path));
        objects.push((
            path,
            manifests::parse_file(&shown, docs.as_bytes(), max_object_bytes)?,
        ));
    }
    Ok((
        objects,
        Rendered {
            path: dir.clone(),
            tool: version.to_owned(),
            values,
            settings,
        },
    ))
}

/// Largest stderr kept from a Helm run (bytes).
const MAX_STDERR_BYTES: u64 = 64 << 10;

/// How a capped run ended.
#[derive(Debug)]
enum Run {
    /// The child exited on its own.
    Done(std::process::Output),
    /// It wrote more than allowed; killed.
    TooLarge,
    /// It ran longer than allowed; killed.
    TimedOut,
}

/// Runs `cmd` reading at most `max_stdout` bytes of its output and for at
/// most `timeout`; past either the child is killed, so a template that
/// loops cannot fill memory or hold the build forever. Stderr is kept up
/// to [`MAX_STDERR_BYTES`].
fn run_capped(cmd: &mut Command, max_stdout: u64, timeout: Duration) -> std::io::Result<Run> {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(e) = stderr {
            let mut e = e;
            let _ = (&mut e).take(MAX_STDERR_BYTES).read_to_end(&mut buf);
            // Drain the rest so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut e, &mut std::io::sink());
        }
        buf
    });
    // The watchdog kills the child by pid; the child is not reaped before
    // the watchdog has stopped, so the pid cannot belong to another
    // process by then.
    let pid = child.id() as libc::pid_t;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let fired = std::sync::Arc::new(AtomicBool::new(false));
    let watchdog = {
        let fired = fired.clone();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(timeout) {
                fired.store(true, Ordering::SeqCst);
                // SAFETY: kill(2) on the unreaped child's pid.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        })
    };
    let mut stdout = Vec::new();
    let read = match child.stdout.take() {
        Some(out) => out
            .take(max_stdout.saturating_add(1))
            .read_to_end(&mut stdout)
            .map(|_| ()),
        None => Ok(()),
    };
    let too_large = stdout.len() as u64 > max_stdout;
    if too_large {
        let _ = child.kill();
    }
    let _ = stop.send(());
    let _ = watchdog.join();
    let status = child.wait();
    let stderr = err_reader.join().unwrap_or_default();
    read?;
    let status = status?;
    if fired.load(Ordering::SeqCst) {
        return Ok(Run::TimedOut);
    }
    if too_large {
        return Ok(Run::TooLarge);
    }
    Ok(Run::Done(std::process::Output {
        status,
        stdout,
        stderr,
    }))
}

/// `--flag=value` as one argument.
fn flag(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut f = OsString::from(name);
    f.push("=");
    f.push(value);
    f
}

/// Helm's rule for release names (and Kubernetes' for namespaces): lower
/// case letters, digits, `-` and `.`, starting and ending with a letter
/// or digit, at most `max` characters.
fn check_name(chart: &ChartDir, field: &str, name: &str, max: usize) -> Result<()> {
    let b = name.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = !b.is_empty()
        && b.len() <= max
        && b.iter().all(|c| ok_char(c) || *c == b'-' || *c == b'.')
        && b.first().is_some_and(ok_char)
        && b.last().is_some_and(ok_char);
    if ok {
        return Ok(());
    }
    let source = if field == "releaseName" && !name.is_empty() {
        "(from cairn-helm.yaml or the chart directory's name)"
    } else {
        ""
    };
    Err(Error::Build(format!(
        "{}: `{field}` `{}` {source} is not a valid name: lower-case letters, digits, `-` \
         and `.`, starting and ending with a letter or digit, at most {max} characters; \
         set `{field}` in {}",
        escape_name(&join(&chart.dir, CONFIG_FILE)),
        escape_name(name),
        escape_name(&join(&chart.dir, CONFIG_FILE))
    )))
}

fn read_capped(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut bytes = Vec::new();
    f.take(MAX_CHART_INPUT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
    if bytes.len() as u64 > MAX_CHART_INPUT_BYTES {
        return Err(Error::TooLarge {
            what: format!("values file {}", escape_name(&path.display().to_string())),
            limit: MAX_CHART_INPUT_BYTES,
            actual: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// Splits `helm template` output into its documents grouped by their
/// `# Source:` file, in order of first appearance; each group is one YAML
/// stream (documents in output order). Documents without a `# Source:`
/// line are grouped under `""`.
pub fn split_by_source(text: &str) -> Vec<(String, String)> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, String> = BTreeMap::new();
    let mut flush = |doc: &mut String| {
        if doc.trim().is_empty() {
            doc.clear();
            return;
        }
        let source = doc
            .lines()
            .find_map(|l| l.strip_prefix("# Source: "))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let g = groups.entry(source.clone()).or_insert_with(|| {
            order.push(source);
            String::new()
        });
        g.push_str("---\n");
        g.push_str(doc);
        doc.clear();
    };
    let mut doc = String::new();
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            flush(&mut doc);
        } else {
            doc.push_str(line);
        }
    }
    flush(&mut doc);
    order
        .into_iter()
        .map(|s| {
            let g = groups.remove(&s).unwrap_or_default();
            (s, g)
        })
        .collect()
}

/// The entry path of a `# Source:` file of the chart in `dir`: the chart
/// directory joined with the source, without the chart's own name.
pub fn entry_path(dir: &str, source: &str) -> String {
    let rel = source.split_once('/').map(|(_, r)| r).unwrap_or(source);
    let rel = if rel.is_empty() { "(helm output)" } else { rel };
    join(dir, rel)
}

/// Checks the kustomizations under the export `roots` for `helmCharts`:
/// a chart with a remote `repo` that is not in the chart home is refused
/// unless remote resources are allowed. Returns the kustomization files
/// that use Helm (the render then needs `--enable-helm`).
pub fn kustomize_uses_helm(
    tree: &GitTree,
    roots: &[String],
    allow_remote: bool,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for root in roots {
        let mut kfiles: Vec<String> = Vec::new();
        for name in export::KUSTOMIZATION_FILES {
            let p = join(root, name);
            if tree.entry(&p).is_some() {
                kfiles.push(p);
            }
        }
        for (p, _) in tree.entries_under(root) {
            if export::KUSTOMIZATION_FILES.contains(&file_name(p)) {
                kfiles.push(p.clone());
            }
        }
        for kfile in kfiles {
            if out.contains(&kfile) {
                continue;
            }
            let Some(k) = read_yaml(tree, &kfile)? else {
                continue;
            };
            let Some(charts) = k.get("helmCharts").and_then(|c| c.as_array()) else {
                continue;
            };
            let kdir = parent(&kfile);
            let home = k
                .get("helmGlobals")
                .and_then(|g| g.get("chartHome"))
                .and_then(|h| h.as_str())
                .unwrap_or("charts");
            let home = git::join_inside(kdir, home).unwrap_or_default();
            for c in charts {
                check_kustomize_chart(&kfile, c)?;
                let name = c.get("name").and_then(|n| n.as_str()).unwrap_or("");
                let repo = c.get("repo").and_then(|r| r.as_str()).unwrap_or("");
                let version = c.get("version").and_then(|r| r.as_str()).unwrap_or("");
                // Where kustomize (5.x) looks before it would pull.
                let local_dir = if !version.is_empty() && !repo.is_empty() {
                    join(&join(&home, &format!("{name}-{version}")), name)
                } else {
                    join(&home, name)
                };
                let local = tree.entry(&join(&local_dir, CHART_FILE)).is_some();
                if !local && !repo.is_empty() && !allow_remote {
                    return Err(Error::Build(format!(
                        "{}: `helmCharts` chart `{}` comes from the repository `{}` and is not \
                         vendored at `{}`; refused: a bundle must be a function of its commit \
                         (vendor it with `helm pull --untar --untardir {} --repo {} {}{}` and \
                         commit it, or pass --allow-remote)",
                        escape_name(&kfile),
                        escape_name(name),
                        escape_name(repo),
                        escape_name(&local_dir),
                        escape_name(parent(&local_dir)),
                        escape_name(repo),
                        escape_name(name),
                        if version.is_empty() {
                            String::new()
                        } else {
                            format!(" --version {}", escape_name(version))
                        }
                    )));
                }
            }
            out.push(kfile);
        }
    }
    Ok(out)
}

/// Kustomize passes `helmCharts` fields to Helm as arguments of its own
/// making: a value starting with `-` would be read as a flag (say
/// `releaseName: --post-renderer=/bin/sh`). Refused, naming the field.
fn check_kustomize_chart(kfile: &str, chart: &serde_json::Value) -> Result<()> {
    let Some(fields) = chart.as_object() else {
        return Ok(());
    };
    for (field, v) in fields {
        if field == "valuesInline" {
            continue; // written to a values file by kustomize
        }
        let values: Vec<&str> = match v {
            serde_json::Value::String(s) => vec![s.as_str()],
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
            _ => Vec::new(),
        };
        if let Some(bad) = values.iter().find(|s| s.trim_start().starts_with('-')) {
            return Err(Error::Build(format!(
                "{}: `helmCharts` field `{}` value `{}` starts with `-` and would reach Helm \
                 as a flag; refused",
                escape_name(kfile),
                escape_name(field),
                escape_name(bad)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_outermost_and_outside_kustomize() {
        let files = [
            "apps/web/Chart.yaml",
            "apps/web/charts/cache/Chart.yaml",
            "apps/web/templates/a.yaml",
            "k/charts/lite/Chart.yaml",
            "Chart.yamlx",
            "other/Chart.yaml",
        ];
        let found = find_charts(files.iter().copied(), &["k".to_owned()]);
        let dirs: Vec<&str> = found.iter().map(|c| c.dir.as_str()).collect();
        assert_eq!(dirs, ["apps/web", "other"]);
        assert!(in_chart("apps/web/values.yaml", &found));
        assert!(!in_chart("apps/webx/a.yaml", &found));
    }

    #[test]
    fn output_is_grouped_by_source() {
        let out = "---\n# Source: web/templates/a.yaml\nkind: A\n---\n# Source: web/charts/c/templates/b.yaml\nkind: B\n---\n# Source: web/templates/a.yaml\nkind: A2\n";
        let groups = split_by_source(out);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0, "web/templates/a.yaml");
        assert_eq!(groups[0].1.matches("---\n").count(), 2);
        assert!(groups[0].1.contains("kind: A2"));
        assert_eq!(groups[1].0, "web/charts/c/templates/b.yaml");
        assert_eq!(
            entry_path("apps/web", &groups[1].0),
            "apps/web/charts/c/templates/b.yaml"
        );
        assert_eq!(entry_path("", "web/templates/a.yaml"), "templates/a.yaml");
    }

    #[test]
    fn output_is_capped_and_endless_output_stopped() {
        let long = Duration::from_secs(600);
        let out = run_capped(Command::new("yes").stdin(Stdio::null()), 1000, long).unwrap();
        assert!(matches!(out, Run::TooLarge), "endless output is cut off");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "head -c 5000 /dev/zero; echo oops >&2; exit 3"]);
        let Run::Done(out) = run_capped(&mut cmd, 5000, long).unwrap() else {
            panic!("ran to the end")
        };
        assert_eq!(out.stdout.len(), 5000);
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.status.code(), Some(3));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "head -c 5001 /dev/zero"]);
        assert!(matches!(
            run_capped(&mut cmd, 5000, long).unwrap(),
            Run::TooLarge
        ));
        // A child that neither writes nor ends is stopped.
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        assert!(matches!(
            run_capped(&mut cmd, 5000, Duration::from_millis(200)).unwrap(),
            Run::TimedOut
        ));
    }

    #[test]
    fn values_arguments() {
        assert_eq!(
            parse_values_arg("apps/web=/tmp/v.yaml").unwrap(),
            ("apps/web".to_owned(), PathBuf::from("/tmp/v.yaml"))
        );
        assert!(parse_values_arg("apps/web").is_err());
        assert!(parse_values_arg("apps/web=").is_err());
        assert!(parse_values_arg("../x=/tmp/v").is_err());
    }
}
