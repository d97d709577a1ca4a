//! Deterministic fixture Git repositories of Kubernetes manifests.
//!
//! A Rust port of the project's `make-manifest-repo` script: the same
//! options give the same files and the same commit ids on every machine
//! (fixed author, committer and dates; no user or system Git config).
//!
//! Layout of the first commit:
//!
//! ```text
//! README.md
//! clusters/edge/namespace.yaml          Namespace edge-apps
//! clusters/edge/crd.yaml                CRD sensors.edge.example.com + Sensor thermometer
//! clusters/edge/app-NNNN/deployment.yaml
//! clusters/edge/app-NNNN/service.yaml
//! clusters/edge/app-NNNN/configmap.yaml (about `configmap_kb` KiB)
//! ```
//!
//! Commit `k` (k >= 2) changes the `version` of one ConfigMap (app number
//! `(k - 2) % apps`), so consecutive commits differ by one small object.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

/// What to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixtureOptions {
    /// Number of apps (each a Deployment, a Service and a ConfigMap).
    pub apps: usize,
    /// Approximate size of each ConfigMap payload in KiB (at least 1).
    pub configmap_kb: usize,
    /// Number of commits (at least 1).
    pub commits: usize,
}

impl Default for FixtureOptions {
    /// The script's defaults: 20 apps, 1 KiB ConfigMaps, 2 commits.
    fn default() -> Self {
        Self {
            apps: 20,
            configmap_kb: 1,
            commits: 2,
        }
    }
}

/// The CRD in `clusters/edge/crd.yaml` (first document).
pub const CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: sensors.edge.example.com
spec:
  group: edge.example.com
  names:
    kind: Sensor
    plural: sensors
    singular: sensor
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
";

/// The custom object in `clusters/edge/crd.yaml` (second document).
pub const SENSOR: &str = "apiVersion: edge.example.com/v1
kind: Sensor
metadata:
  name: thermometer
  namespace: edge-apps
spec:
  unit: celsius
  intervalSeconds: 30
";

/// `app-0000`, `app-0001`, ...
pub fn app_name(i: usize) -> String {
    format!("app-{i:04}")
}

/// The ConfigMap of `app` with `version` and a payload of about `kb` KiB.
pub fn configmap(app: &str, kb: usize, version: usize) -> String {
    let line = format!("    {}\n", "x".repeat(63));
    let body = line.repeat((kb * 16).max(1));
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {app}-config\n  namespace: edge-apps\n\
         data:\n  version: \"{version}\"\n  payload: |\n{body}"
    )
}

/// The Deployment of `app`.
pub fn deployment(app: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {app}\n  namespace: edge-apps\n  labels:\n    app: {app}\n\
         spec:\n  replicas: 2\n  selector:\n    matchLabels:\n      app: {app}\n  template:\n    metadata:\n      labels:\n        app: {app}\n\
         \x20   spec:\n      containers:\n        - name: {app}\n          image: registry.local/edge/{app}:1.0.0\n\
         \x20         ports:\n            - containerPort: 8080\n          envFrom:\n            - configMapRef:\n                name: {app}-config\n"
    )
}

/// The Service of `app`.
pub fn service(app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {app}\n  namespace: edge-apps\n\
         spec:\n  selector:\n    app: {app}\n  ports:\n    - port: 80\n      targetPort: 8080\n"
    )
}

/// A `git` command for the fixture repository at `dir`: fixed identity and
/// dates, no system or user configuration, no hooks, no signing, no
/// automatic garbage collection.
pub fn git(dir: &Path, date: &str) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir);
    for who in ["AUTHOR", "COMMITTER"] {
        c.env(format!("GIT_{who}_NAME"), "Fixture");
        c.env(format!("GIT_{who}_EMAIL"), "fixture@example.com");
        c.env(format!("GIT_{who}_DATE"), date);
    }
    c.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", dir)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .args(["-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false"])
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.autocrlf=false",
            // No automatic `git gc`: a commit of thousands of files would
            // start one in the background (gc.autoDetach), packing and
            // pruning loose objects while the test's build reads them
            // (seen once: "object ... could not be found" at 9,003 objects).
            "-c",
            "gc.auto=0",
        ]);
    c
}

/// Runs a fixture `git` command and returns its trimmed stdout.
pub fn git_run(dir: &Path, date: &str, args: &[&str]) -> Result<String> {
    let out = git(dir, date)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running git {} (is git installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "git {} in {} failed: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The date of the first fixture commit.
pub const FIRST_DATE: &str = "2026-01-01T00:00:00Z";

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).with_context(|| p.display().to_string())?;
    }
    fs::write(path, text).with_context(|| path.display().to_string())
}

/// Creates the fixture repository at `dest` (which must be missing or
/// empty) and returns the head commit id (branch `main`).
pub fn make_manifest_repo(dest: &Path, opts: &FixtureOptions) -> Result<String> {
    if opts.apps == 0 {
        bail!("--apps must be at least 1");
    }
    if opts.commits == 0 {
        bail!("--commits must be at least 1");
    }
    if dest.exists() && fs::read_dir(dest)?.next().is_some() {
        bail!("{}: exists and is not empty", dest.display());
    }
    fs::create_dir_all(dest).with_context(|| dest.display().to_string())?;
    git_run(dest, FIRST_DATE, &["init", "-q", "-b", "main", "."])?;
    let base = dest.join("clusters/edge");
    write(
        &base.join("namespace.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: edge-apps\n",
    )?;
    write(&base.join("crd.yaml"), &format!("{CRD}---\n{SENSOR}"))?;
    let apps: Vec<String> = (0..opts.apps).map(app_name).collect();
    for app in &apps {
        let d = base.join(app);
        write(&d.join("deployment.yaml"), &deployment(app))?;
        write(&d.join("service.yaml"), &service(app))?;
        write(
            &d.join("configmap.yaml"),
            &configmap(app, opts.configmap_kb, 1),
        )?;
    }
    write(
        &dest.join("README.md"),
        "Fixture repository of edge manifests.\n",
    )?;
    git_run(dest, FIRST_DATE, &["add", "-A"])?;
    git_run(
        dest,
        FIRST_DATE,
        &["commit", "-q", "-m", "edge: initial manifests"],
    )?;
    for c in 2..=opts.commits {
        let app = &apps[(c - 2) % apps.len()];
        write(
            &base.join(app).join("configmap.yaml"),
            &configmap(app, opts.configmap_kb, c),
        )?;
        let date = format!("2026-01-{:02}T00:00:00Z", c.min(28));
        git_run(
            dest,
            &date,
            &[
                "commit",
                "-q",
                "-am",
                &format!("edge: bump {app} config to {c}"),
            ],
        )?;
    }
    git_run(dest, FIRST_DATE, &["rev-parse", "HEAD"])
}

/// Adds a commit to the fixture repository at `repo` with a Kustomize
/// directory `clusters/kustomized/`: a `kustomization.yaml` with
/// `namePrefix: kz-` and `commonLabels: {tier: edge}` over `configmap.yaml`
/// and `deployment.yaml`, plus a `notes.yaml` that is not a Kubernetes
/// object (inside a Kustomize directory only the render counts). Returns
/// the new head commit id.
///
/// Rendered objects: `ConfigMap edge-apps/kz-settings` and
/// `Deployment edge-apps/kz-web`, both labelled `tier: edge`.
pub fn add_kustomize_overlay(repo: &Path) -> Result<String> {
    let dir = repo.join("clusters/kustomized");
    write(
        &dir.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         namespace: edge-apps\nnamePrefix: kz-\ncommonLabels:\n  tier: edge\n\
         resources:\n  - configmap.yaml\n  - deployment.yaml\n",
    )?;
    write(
        &dir.join("configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: edge\n",
    )?;
    write(&dir.join("deployment.yaml"), &deployment("web"))?;
    write(&dir.join("notes.yaml"), "not: a kubernetes object\n")?;
    let date = "2026-02-01T00:00:00Z";
    git_run(repo, date, &["add", "-A"])?;
    git_run(
        repo,
        date,
        &["commit", "-q", "-m", "kustomized: add overlay"],
    )?;
    git_run(repo, date, &["rev-parse", "HEAD"])
}

/// Writes `files` (path relative to `repo`, contents) and commits them
/// with a fixed identity and `date`. Returns the new head commit id.
pub fn commit_files(
    repo: &Path,
    files: &[(&str, &str)],
    message: &str,
    date: &str,
) -> Result<String> {
    for (rel, text) in files {
        write(&repo.join(rel), text)?;
    }
    git_run(repo, date, &["add", "-A"])?;
    git_run(
        repo,
        date,
        &["commit", "-q", "--allow-empty", "-m", message],
    )?;
    git_run(repo, date, &["rev-parse", "HEAD"])
}

/// Removes `path` (a file or a directory) with `git rm -rq` and commits
/// with a fixed identity and `date`. Returns the new head commit id.
pub fn remove_and_commit(repo: &Path, path: &str, message: &str, date: &str) -> Result<String> {
    git_run(repo, date, &["rm", "-rq", path])?;
    git_run(repo, date, &["commit", "-qm", message])?;
    git_run(repo, date, &["rev-parse", "HEAD"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_options_same_commit_ids_as_the_original_script() {
        let d = tempfile::tempdir().unwrap();
        let opts = FixtureOptions {
            apps: 3,
            configmap_kb: 1,
            commits: 3,
        };
        let a = make_manifest_repo(&d.path().join("a"), &opts).unwrap();
        let b = make_manifest_repo(&d.path().join("b"), &opts).unwrap();
        assert_eq!(a, b);
        // The head the Python `make-manifest-repo` prints for these options.
        assert_eq!(a, "0aa184d8f84805a858091d373994062ced55463f");
        let log = git_run(&d.path().join("a"), FIRST_DATE, &["log", "--format=%s"]).unwrap();
        assert_eq!(
            log,
            "edge: bump app-0001 config to 3\nedge: bump app-0000 config to 2\nedge: initial manifests"
        );
        assert!(make_manifest_repo(&d.path().join("a"), &opts)
            .unwrap_err()
            .to_string()
            .contains("not empty"));
        let k = add_kustomize_overlay(&d.path().join("a")).unwrap();
        assert_ne!(k, a);
    }
}
