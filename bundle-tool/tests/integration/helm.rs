//! Helm charts rendered at build time: `cairn bundle build` run as a
//! process on a fixture repository (tests/fixtures/helm/repo: a chart with
//! a values file, a vendored subchart, a CRD and a cairn-helm.yaml; a
//! kustomization with helmCharts), compared with what the real `helm
//! template` and `kubectl kustomize --enable-helm` give on the same input.
//! Needs `helm` 3 on PATH (`bash .ci/install-helm`) and kubectl.

use cairn_bundle::bundle::read_bundle_file;
use cairn_bundle::limits::Limits;
use cairn_test_support::commit_files;
use cairn_test_support::fixture::{git_run, FIRST_DATE};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/helm/repo");

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .expect("run cairn")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    /// A Git repository holding the fixture, committed on `main`.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("edge");
        copy_dir(Path::new(FIXTURE), &repo);
        git_run(&repo, FIRST_DATE, &["init", "-q", "-b", "main"]).unwrap();
        commit_files(&repo, &[], "fixture", FIRST_DATE).unwrap();
        Self { dir }
    }
    fn repo(&self) -> PathBuf {
        self.dir.path().join("edge")
    }
    fn out(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    fn commit(&self, files: &[(&str, &str)]) {
        commit_files(&self.repo(), files, "change", "2026-02-01T00:00:00Z").unwrap();
    }
    fn remove(&self, path: &str) {
        git_run(&self.repo(), FIRST_DATE, &["rm", "-r", "-q", path]).unwrap();
        commit_files(&self.repo(), &[], "remove", "2026-02-02T00:00:00Z").unwrap();
    }
    fn args<'a>(&'a self, repo: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["bundle", "build", "--git", repo, "--out", out];
        a.extend_from_slice(extra);
        a
    }
    /// Builds; returns (id, bundle file).
    fn build(&self, name: &str, extra: &[&str]) -> (String, String) {
        let out = self.out(name);
        let repo = self.repo().display().to_string();
        let o = run(&self.args(&repo, &out, extra));
        assert!(
            o.status.success(),
            "build failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        (String::from_utf8(o.stdout).unwrap().trim().to_owned(), out)
    }
    /// A build that must fail with one `cairn: ` line and no bundle file.
    fn fails(&self, extra: &[&str]) -> String {
        self.fails_with(extra, |_| {})
    }
    fn fails_with(&self, extra: &[&str], env: impl FnOnce(&mut Command)) -> String {
        let out = self.out("failed.bundle");
        let repo = self.repo().display().to_string();
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.args(self.args(&repo, &out, extra));
        env(&mut c);
        let o = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(stderr.starts_with("cairn: "), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(!Path::new(&out).exists(), "no bundle file on failure");
        stderr
    }
}

/// (path, kind, namespace, name) -> object, from a bundle file.
fn bundle_objects(file: &str) -> BTreeMap<(String, String, String, String), Value> {
    let mut out = BTreeMap::new();
    read_bundle_file(Path::new(file), &Limits::default(), |e, bytes| {
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        out.insert(
            (
                e.path.clone(),
                e.kind.clone(),
                e.namespace.clone(),
                e.name.clone(),
            ),
            v,
        );
        Ok(())
    })
    .unwrap();
    out
}

fn source(file: &str) -> Value {
    let o = run(&["bundle", "inspect", file, "--json"]);
    assert!(o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["source"].clone()
}

/// Every object of a YAML stream, parsed with serde_norway (not cairn's
/// parser), keyed by (kind, namespace, name).
fn yaml_objects(text: &str) -> BTreeMap<(String, String, String), Value> {
    let mut out = BTreeMap::new();
    for doc in text.split("\n---") {
        let v: Value = serde_norway::from_str(doc).unwrap_or(Value::Null);
        if v.is_null() {
            continue;
        }
        let s = |p: &str| {
            v.pointer(p)
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_owned()
        };
        let key = (s("/kind"), s("/metadata/namespace"), s("/metadata/name"));
        assert!(out.insert(key, v).is_none(), "duplicate in {text}");
    }
    out
}

fn helm(args: &[&str], dir: &Path) -> String {
    let o = Command::new("helm")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("helm on PATH (bash .ci/install-helm)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

const HELM_ARGS: &[&str] = &[
    "template",
    "shop",
    ".",
    "--namespace",
    "web",
    "--values",
    "values-prod.yaml",
    "--set",
    "extraEnv.REGION=eu-west-1",
    "--kube-version",
    "1.30.0",
    "--api-versions",
    "policy/v1/PodDisruptionBudget",
    "--include-crds",
];

#[test]
fn chart_objects_equal_helm_template() {
    let r = Repo::new();
    let (id, file) = r.build("a.bundle", &[]);
    assert!(id.starts_with("sha256:"));
    let objects = bundle_objects(&file);

    let expected = yaml_objects(&helm(HELM_ARGS, &r.repo().join("apps/web")));
    assert_eq!(expected.len(), 6, "{expected:?}");
    let from_chart: BTreeMap<(String, String, String), Value> = objects
        .iter()
        .filter(|((p, ..), _)| p.starts_with("apps/web/"))
        .map(|((_, k, ns, n), v)| ((k.clone(), ns.clone(), n.clone()), v.clone()))
        .collect();
    assert_eq!(from_chart, expected);

    // Entry paths are the template files in the tree.
    let paths: Vec<(&str, &str)> = objects
        .keys()
        .filter(|(p, ..)| p.starts_with("apps/web/"))
        .map(|(p, k, ..)| (p.as_str(), k.as_str()))
        .collect();
    assert_eq!(
        paths,
        [
            (
                "apps/web/charts/cache/templates/configmap.yaml",
                "ConfigMap"
            ),
            ("apps/web/crds/widgets.yaml", "CustomResourceDefinition"),
            ("apps/web/templates/deployment.yaml", "Deployment"),
            ("apps/web/templates/lookup.yaml", "ConfigMap"),
            ("apps/web/templates/service.yaml", "PodDisruptionBudget"),
            ("apps/web/templates/service.yaml", "Service"),
        ]
    );

    // The values reached the objects (checked without helm).
    let get = |k: &str, n: &str| {
        objects
            .iter()
            .find(|((_, kind, _, name), _)| kind == k && name == n)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let d = get("Deployment", "shop-web");
    assert_eq!(d["spec"]["replicas"], json!(3), "values-prod.yaml");
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["env"],
        json!([{"name": "REGION", "value": "eu-west-1"}]),
        "set"
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        json!("nginx:1.25.3")
    );
    assert_eq!(d["metadata"]["namespace"], json!("web"));
    let pdb = get("PodDisruptionBudget", "shop-web");
    assert_eq!(
        pdb["metadata"]["annotations"]["kube-version"],
        json!("v1.30.0"),
        "kubeVersion"
    );
    let lookup = get("ConfigMap", "shop-web-lookup");
    assert_eq!(
        lookup["data"]["existing"],
        json!("{}"),
        "lookup finds nothing"
    );
    let cache = get("ConfigMap", "shop-cache");
    assert_eq!(cache["data"]["maxmemory"], json!("64mb"), "subchart values");

    // The plain file and the kustomization still build beside the chart.
    assert!(objects.contains_key(&(
        "apps/plain/configmap.yaml".into(),
        "ConfigMap".into(),
        "web".into(),
        "plain".into()
    )));

    // Provenance: Helm version, values digests, settings.
    let src = source(&file);
    let rendered = src["rendered"].as_array().unwrap();
    assert_eq!(rendered.len(), 2, "{src}");
    let web = &rendered[0];
    assert_eq!(web["path"], json!("apps/web"));
    let version = helm(&["version", "--template", "{{.Version}}"], &r.repo());
    assert_eq!(web["tool"], json!(format!("helm {version}")));
    let prod = std::fs::read(r.repo().join("apps/web/values-prod.yaml")).unwrap();
    assert_eq!(
        web["values"],
        json!([{"file": "apps/web/values-prod.yaml", "digest": cairn_keys::sha256_address(&prod)}])
    );
    assert_eq!(
        web["settings"],
        json!([
            "release=shop",
            "namespace=web",
            "set=extraEnv.REGION=eu-west-1",
            "kube-version=1.30.0",
            "api-versions=policy/v1/PodDisruptionBudget",
            "include-crds=true"
        ])
    );
}

#[test]
fn kustomize_helm_charts_equal_kubectl_kustomize_enable_helm() {
    let r = Repo::new();
    let (_, file) = r.build("k.bundle", &["--path", "apps/kust"]);
    let got: BTreeMap<(String, String, String), Value> = bundle_objects(&file)
        .into_iter()
        .map(|((p, k, ns, n), v)| {
            assert_eq!(p, "apps/kust/kustomization.yaml");
            ((k, ns, n), v)
        })
        .collect();
    let o = Command::new("kubectl")
        .args(["kustomize", "--enable-helm", "apps/kust"])
        .current_dir(r.repo())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let expected = yaml_objects(&String::from_utf8(o.stdout).unwrap());
    assert_eq!(got.len(), 2);
    assert_eq!(got, expected);
    assert_eq!(
        got[&("ConfigMap".into(), "tools".into(), "lite-greeting".into())]["data"]["greeting"],
        json!("hello from kustomize")
    );
    let src = source(&file);
    assert_eq!(
        src["rendered"][0]["path"],
        json!("apps/kust/kustomization.yaml")
    );
    assert!(src["rendered"][0]["tool"]
        .as_str()
        .unwrap()
        .starts_with("helm v3."));
}

#[test]
fn id_follows_the_values_and_nothing_else() {
    let r = Repo::new();
    let (id1, _) = r.build("1.bundle", &["--path", "apps/web"]);
    let (id2, _) = r.build("2.bundle", &["--path", "apps/web"]);
    assert_eq!(id1, id2, "same inputs, same id");

    // A values file from the build machine: its bytes count, its path not.
    let a = r.dir.path().join("a.yaml");
    let b = r.dir.path().join("elsewhere-b.yaml");
    std::fs::write(&a, "replicaCount: 5\n").unwrap();
    std::fs::write(&b, "replicaCount: 5\n").unwrap();
    let va = format!("apps/web={}", a.display());
    let vb = format!("apps/web={}", b.display());
    let (id_a, file_a) = r.build("a.bundle", &["--path", "apps/web", "--helm-values", &va]);
    let (id_b, _) = r.build("b.bundle", &["--path", "apps/web", "--helm-values", &vb]);
    assert_ne!(id_a, id1, "a values file changes the id");
    assert_eq!(id_a, id_b, "same bytes at another path: same id");
    let d = bundle_objects(&file_a)
        .into_iter()
        .find(|((_, k, ..), _)| k == "Deployment")
        .unwrap()
        .1;
    assert_eq!(
        d["spec"]["replicas"],
        json!(5),
        "--helm-values applied last"
    );
    assert_eq!(
        source(&file_a)["rendered"][0]["values"][1],
        json!({"file": "--helm-values", "digest": cairn_keys::sha256_address(b"replicaCount: 5\n")})
    );
    std::fs::write(&b, "replicaCount: 6\n").unwrap();
    let (id_c, _) = r.build("c.bundle", &["--path", "apps/web", "--helm-values", &vb]);
    assert_ne!(id_c, id_a, "changed values file, changed id");

    // A values file in the commit: a new digest in the provenance.
    r.commit(&[("apps/web/values-prod.yaml", "replicaCount: 2\n")]);
    let (id_d, file_d) = r.build("d.bundle", &["--path", "apps/web"]);
    assert_ne!(id_d, id1);
    assert_eq!(
        source(&file_d)["rendered"][0]["values"][0]["digest"],
        json!(cairn_keys::sha256_address(b"replicaCount: 2\n"))
    );
}

#[test]
fn remote_dependency_that_is_not_vendored_is_refused() {
    let r = Repo::new();
    r.remove("apps/web/charts/cache");
    let e = r.fails(&[]);
    assert!(e.contains("apps/web/Chart.yaml"), "{e}");
    assert!(e.contains("dependency `cache`"), "{e}");
    assert!(e.contains("https://charts.example.com/stable"), "{e}");
    assert!(e.contains("helm dependency build apps/web"), "{e}");
}

#[test]
fn kustomize_remote_chart_needs_vendoring_or_allow_remote() {
    let r = Repo::new();
    r.remove("apps/kust/charts");
    let e = r.fails(&["--path", "apps/kust"]);
    assert!(e.contains("apps/kust/kustomization.yaml"), "{e}");
    assert!(e.contains("`lite`"), "{e}");
    assert!(e.contains("apps/kust/charts/lite-0.2.0/lite"), "{e}");
    assert!(e.contains("--allow-remote"), "{e}");
}

#[test]
fn missing_values_file_is_refused() {
    let r = Repo::new();
    r.commit(&[(
        "apps/web/cairn-helm.yaml",
        "valuesFiles: [values-prod.yaml, values-missing.yaml]\n",
    )]);
    let e = r.fails(&[]);
    assert!(e.contains("apps/web/cairn-helm.yaml"), "{e}");
    assert!(e.contains("values-missing.yaml"), "{e}");
    assert!(e.contains("not in the commit"), "{e}");

    r.commit(&[(
        "apps/web/cairn-helm.yaml",
        "valuesFiles: [../../../x.yaml]\n",
    )]);
    let e = r.fails(&[]);
    assert!(e.contains("leaves the repository"), "{e}");

    r.commit(&[(
        "apps/web/cairn-helm.yaml",
        "valueFiles: [values-prod.yaml]\n",
    )]);
    let e = r.fails(&[]);
    assert!(e.contains("apps/web/cairn-helm.yaml"), "{e}");
    assert!(e.contains("valueFiles"), "{e}");

    let r = Repo::new();
    let e = r.fails(&["--helm-values", "apps/web=/nonexistent/v.yaml"]);
    assert!(e.contains("/nonexistent/v.yaml"), "{e}");
    let e = r.fails(&["--helm-values", "apps/plain=/etc/hostname"]);
    assert!(e.contains("not a chart directory"), "{e}");
}

#[test]
fn helm_not_found_names_the_chart_and_the_fix() {
    let r = Repo::new();
    let e = r.fails(&["--path", "apps/web", "--helm", "/nonexistent/helm"]);
    assert!(e.contains("/nonexistent/helm"), "{e}");
    assert!(e.contains("apps/web/Chart.yaml"), "{e}");
    assert!(e.contains("install Helm"), "{e}");

    // No helm in PATH (kubectl and git stay reachable).
    let bin = tempfile::tempdir().unwrap();
    for tool in ["kubectl", "git"] {
        let o = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let p = String::from_utf8(o.stdout).unwrap();
        std::os::unix::fs::symlink(p.trim(), bin.path().join(tool)).unwrap();
    }
    let e = r.fails_with(&["--path", "apps/web"], |c| {
        c.env("PATH", bin.path()).env_remove("CAIRN_HELM");
    });
    assert!(e.contains("helm not found in PATH"), "{e}");
    assert!(e.contains("apps/web/Chart.yaml"), "{e}");

    let e = r.fails_with(&["--path", "apps/kust"], |c| {
        c.env("PATH", bin.path()).env_remove("CAIRN_HELM");
    });
    assert!(e.contains("helm not found in PATH"), "{e}");
    assert!(e.contains("apps/kust/kustomization.yaml"), "{e}");

    // Without charts, no Helm is needed.
    let (id, _) = {
        let out = r.out("plain.bundle");
        let repo = r.repo().display().to_string();
        let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(r.args(&repo, &out, &["--path", "apps/plain"]))
            .env("PATH", bin.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (String::from_utf8(o.stdout).unwrap(), out)
    };
    assert!(id.starts_with("sha256:"));
}

#[test]
fn template_errors_name_the_chart() {
    let r = Repo::new();
    r.commit(&[(
        "apps/web/templates/broken.yaml",
        "kind: ConfigMap\nmetadata:\n  name: {{ .Values.nope.deeper }}\n",
    )]);
    let e = r.fails(&[]);
    assert!(
        e.contains("helm template failed for the chart apps/web/Chart.yaml"),
        "{e}"
    );
    assert!(e.contains("broken.yaml"), "{e}");

    // Rendered output that is not a valid object names the template.
    r.commit(&[(
        "apps/web/templates/broken.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  labels: {a: b}\n",
    )]);
    let e = r.fails(&[]);
    assert!(
        e.contains("apps/web/templates/broken.yaml (rendered by helm)"),
        "{e}"
    );
}

#[test]
fn library_charts_render_nothing() {
    let r = Repo::new();
    // The fixture's apps/lib-common is `type: library`: helm template
    // refuses such charts; the build skips it and parses none of its files.
    let (_, file) = r.build("lib.bundle", &[]);
    assert!(!bundle_objects(&file)
        .keys()
        .any(|(p, ..)| p.starts_with("apps/lib-common/")));
    let src = source(&file);
    assert!(!src["rendered"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["path"] == json!("apps/lib-common")));
}

/// A stand-in `helm` that reports what it was run with as a ConfigMap:
/// its environment and the network interfaces it can see.
const SPY_HELM: &str = r#"#!/bin/sh
if [ "$1" = version ]; then printf v3.99.0; exit 0; fi
ifaces=$(awk -F: 'NR>2 {gsub(/ /,"",$1); printf "%s ", $1}' /proc/net/dev)
repos=absent
[ -e "$HELM_REPOSITORY_CONFIG" ] && repos=present
homefiles=$(ls -A "$HOME" | tr '\n' ' ')
cat <<YAML
---
# Source: web/templates/spy.yaml
apiVersion: v1
kind: ConfigMap
metadata:
  name: spy
data:
  env: "$(env | cut -d= -f1 | sort | tr '\n' ' ')"
  ifaces: "$ifaces"
  repos: "$repos"
  home: "$homefiles"
  args: "$(echo "$@" | sed "s|$PWD/||g")"
YAML
"#;

#[test]
fn helm_runs_without_environment_repositories_or_network() {
    use std::os::unix::fs::PermissionsExt;
    let r = Repo::new();
    let spy = r.dir.path().join("spy-helm");
    std::fs::write(&spy, SPY_HELM).unwrap();
    std::fs::set_permissions(&spy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spy_s = spy.display().to_string();
    let (_, file) = r.build(
        "spy.bundle",
        &["--path", "apps/web", "--helm", spy_s.as_str()],
    );
    let cm = bundle_objects(&file)
        .into_iter()
        .find(|((_, k, ..), _)| k == "ConfigMap")
        .unwrap()
        .1;
    let data = &cm["data"];
    let env: Vec<&str> = data["env"].as_str().unwrap().split_whitespace().collect();
    for var in env.iter().copied() {
        assert!(
            var == "PATH"
                || var == "HOME"
                || var == "TMPDIR"
                || var == "PWD"
                || var == "SHLVL"
                || var == "OLDPWD"
                || var == "_"
                || var.starts_with("XDG_")
                || var.starts_with("HELM_"),
            "unexpected variable {var} in {env:?}"
        );
    }
    assert!(env.contains(&"HELM_REPOSITORY_CONFIG"), "{env:?}");
    assert_eq!(data["repos"], json!("absent"), "no repositories configured");
    assert_eq!(data["home"], json!(""), "an empty HOME");
    assert_eq!(
        data["args"],
        json!(
            "template --values=apps/web/values-prod.yaml --namespace=web \
             --set=extraEnv.REGION=eu-west-1 --kube-version=1.30.0 \
             --api-versions=policy/v1/PodDisruptionBudget --include-crds -- shop apps/web"
        )
    );
    assert_eq!(source(&file)["rendered"][0]["tool"], json!("helm v3.99.0"));
    // Where this machine allows network namespaces (root, or unprivileged
    // user namespaces), Helm sees only a loopback interface.
    let netns = Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success())
        || Command::new("unshare")
            .args(["-r", "-n", "true"])
            .status()
            .is_ok_and(|s| s.success());
    if netns {
        assert_eq!(data["ifaces"], json!("lo "), "own network namespace");
    }
}

#[test]
fn cluster_capabilities_come_from_flags_or_the_chart_config() {
    let r = Repo::new();
    r.commit(&[(
        "apps/web/cairn-helm.yaml",
        "releaseName: shop\nnamespace: web\n",
    )]);
    let (id_plain, plain) = r.build("plain.bundle", &["--path", "apps/web"]);
    let kinds = |f: &str| -> Vec<String> {
        bundle_objects(f)
            .keys()
            .map(|(_, k, _, n)| format!("{k}/{n}"))
            .collect()
    };
    assert!(!kinds(&plain).contains(&"PodDisruptionBudget/shop-web".to_owned()));

    let args = [
        "--path",
        "apps/web",
        "--kube-version",
        "1.29.4",
        "--api-versions",
        "policy/v1/PodDisruptionBudget",
    ];
    let (id_caps, caps) = r.build("caps.bundle", &args);
    assert_ne!(id_caps, id_plain, "capabilities are inputs of the id");
    let pdb = bundle_objects(&caps)
        .into_iter()
        .find(|((_, k, ..), _)| k == "PodDisruptionBudget")
        .expect("--api-versions reached .Capabilities.APIVersions.Has")
        .1;
    assert_eq!(
        pdb["metadata"]["annotations"]["kube-version"],
        json!("v1.29.4")
    );
    let settings = source(&caps)["rendered"][0]["settings"].clone();
    assert_eq!(
        settings,
        json!([
            "release=shop",
            "namespace=web",
            "kube-version=1.29.4",
            "api-versions=policy/v1/PodDisruptionBudget",
            "include-crds=true"
        ])
    );
    // The same as helm template with the same flags.
    let expected = yaml_objects(&helm(
        &[
            "template",
            "shop",
            ".",
            "--namespace",
            "web",
            "--kube-version",
            "1.29.4",
            "--api-versions",
            "policy/v1/PodDisruptionBudget",
            "--include-crds",
        ],
        &r.repo().join("apps/web"),
    ));
    let got: BTreeMap<(String, String, String), Value> = bundle_objects(&caps)
        .into_iter()
        .map(|((_, k, ns, n), v)| ((k, ns, n), v))
        .collect();
    assert_eq!(got, expected);

    // A chart's own kubeVersion wins over the flag.
    r.commit(&[(
        "apps/web/cairn-helm.yaml",
        "releaseName: shop\nnamespace: web\nkubeVersion: \"1.31.0\"\n",
    )]);
    let (_, own) = r.build("own.bundle", &args);
    let pdb = bundle_objects(&own)
        .into_iter()
        .find(|((_, k, ..), _)| k == "PodDisruptionBudget")
        .unwrap()
        .1;
    assert_eq!(
        pdb["metadata"]["annotations"]["kube-version"],
        json!("v1.31.0")
    );
}

#[test]
fn names_from_the_commit_cannot_become_helm_flags() {
    let r = Repo::new();
    r.commit(&[(
        "apps/web/cairn-helm.yaml",
        "releaseName: --post-renderer=/bin/sh\n",
    )]);
    let e = r.fails(&["--path", "apps/web"]);
    assert!(e.contains("apps/web/cairn-helm.yaml"), "{e}");
    assert!(e.contains("`releaseName`"), "{e}");
    assert!(e.contains("not a valid name"), "{e}");

    r.commit(&[(
        "apps/web/cairn-helm.yaml",
        "namespace: --post-renderer=/bin/sh\n",
    )]);
    let e = r.fails(&["--path", "apps/web"]);
    assert!(e.contains("`namespace`"), "{e}");

    // A `set` entry that looks like a flag stays a --set value: helm sets
    // a (meaningless) value and runs no post-renderer.
    let marker = r.dir.path().join("ran");
    let script = r.dir.path().join("post.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ntouch {}\ncat\n", marker.display()),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    r.commit(&[(
        "apps/web/cairn-helm.yaml",
        &format!("set: [\"--post-renderer={}\"]\n", script.display()),
    )]);
    let _ = run(&[
        "bundle",
        "build",
        "--git",
        &r.repo().display().to_string(),
        "--out",
        &r.out("x.bundle"),
        "--path",
        "apps/web",
    ]);
    assert!(!marker.exists(), "no post-renderer ran");
}

#[test]
fn kustomize_helm_chart_fields_cannot_become_helm_flags() {
    let r = Repo::new();
    let k = std::fs::read_to_string(r.repo().join("apps/kust/kustomization.yaml")).unwrap();
    let k = k.replace("releaseName: lite", "releaseName: --post-renderer=/bin/sh");
    r.commit(&[("apps/kust/kustomization.yaml", &k)]);
    let e = r.fails(&["--path", "apps/kust"]);
    assert!(e.contains("apps/kust/kustomization.yaml"), "{e}");
    assert!(e.contains("`releaseName`"), "{e}");
    assert!(e.contains("as a flag"), "{e}");
}

#[test]
fn values_files_elsewhere_in_the_commit_are_exported() {
    let r = Repo::new();
    r.commit(&[
        ("envs/prod/web.yaml", "replicaCount: 7\n"),
        (
            "apps/web/cairn-helm.yaml",
            "releaseName: shop\nvaluesFiles: [values-prod.yaml, ../../envs/prod/web.yaml]\n",
        ),
    ]);
    let (_, file) = r.build("env.bundle", &["--path", "apps/web"]);
    // Built from the whole tree, the values file is a chart input, not a
    // manifest (it has no kind).
    let (_, whole) = r.build("whole.bundle", &[]);
    assert!(!bundle_objects(&whole)
        .keys()
        .any(|(p, ..)| p.starts_with("envs/")));
    let d = bundle_objects(&file)
        .into_iter()
        .find(|((_, k, ..), _)| k == "Deployment")
        .unwrap()
        .1;
    assert_eq!(d["spec"]["replicas"], json!(7), "later values file wins");
    assert_eq!(
        source(&file)["rendered"][0]["values"][1],
        json!({"file": "envs/prod/web.yaml", "digest": cairn_keys::sha256_address(b"replicaCount: 7\n")})
    );
}

#[test]
fn a_helm_run_that_never_ends_is_stopped() {
    use std::os::unix::fs::PermissionsExt;
    let r = Repo::new();
    let slow = r.dir.path().join("slow-helm");
    std::fs::write(
        &slow,
        "#!/bin/sh\nif [ \"$1\" = version ]; then printf v3.99.0; exit 0; fi\nexec sleep 600\n",
    )
    .unwrap();
    std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
    let slow_s = slow.display().to_string();
    let e = r.fails(&[
        "--path",
        "apps/web",
        "--helm",
        slow_s.as_str(),
        "--helm-timeout",
        "1",
    ]);
    assert!(e.contains("apps/web/Chart.yaml"), "{e}");
    assert!(e.contains("--helm-timeout"), "{e}");
}
