//! `cairn bundle build` on repositories shaped like real GitOps
//! repositories (podinfo's YAML 1.1 scalars, `.json` manifests, a byte
//! order mark, `kind: List`, `.github` workflows, non-manifest YAML,
//! kustomize with patches), run as a process. Every object must equal
//! what real kubectl reads from the same file:
//! `kubectl patch --local -f FILE --type merge -p '{}' -o json` (a no-op
//! patch: kubectl's own file reader, offline, with no API server — unlike
//! `kubectl create --dry-run=client`, which needs discovery), or
//! `kubectl kustomize DIR` read the same way.

use cairn_bundle::bundle::read_bundle_file;
use cairn_bundle::limits::Limits;
use cairn_test_support::commit_files;
use cairn_test_support::fixture::{git_run, FIRST_DATE};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A podinfo-like Deployment: YAML 1.1 scalars kubectl reads as numbers
/// and booleans (`0755`, `1e1`, `yes`, `on`, `1_000`, `0x1F`, `~`).
const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: database
  labels:
    app: database
spec:
  replicas: 1e1
  revisionHistoryLimit: 0x1F
  selector:
    matchLabels:
      app: database
  template:
    metadata:
      labels:
        app: database
    spec:
      terminationGracePeriodSeconds: 1_000
      containers:
      - name: redis
        image: redis:7.0.7
        tty: yes
        stdin: on
        stdinOnce: Off
        command: [redis-server, /redis-master/redis.conf]
        resources:
          limits:
            cpu: 1.0
            memory: 64Mi
        env:
        - name: QUOTED
          value: \"0755\"
        - name: EMPTY
          value: ~
      volumes:
      - name: config
        configMap:
          name: redis-master-config
          defaultMode: 0755
";

/// Numbers only (kubectl apply -f and kubectl kustomize agree on these).
const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: database
spec:
  ports:
  - port: 0x18EB
    targetPort: 6379
    nodePort: 3_0001
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 1e4
  selector:
    app: database
";

const CONFIGMAP_JSON: &str = "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"ConfigMap\",\n  \"metadata\": {\"name\": \"from-json\", \"namespace\": \"apps\"},\n  \"data\": {\"a\": \"1\"},\n  \"binaryData\": {},\n  \"immutable\": false\n}\n";

/// As `kubectl get -o yaml` writes several objects.
const LIST: &str = "\
apiVersion: v1
items:
- apiVersion: v1
  kind: ConfigMap
  metadata:
    name: listed-a
    namespace: apps
  data:
    mode: \"0644\"
- apiVersion: v1
  kind: Secret
  metadata:
    name: listed-b
    namespace: apps
  type: Opaque
kind: List
metadata:
  resourceVersion: \"\"
";

const WORKFLOW: &str = "\
name: ci
on:
  push:
    branches: [main]
jobs:
  test:
    runs-on: ubuntu-latest
    steps:
    - uses: actions/checkout@v4
";

fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cairn")
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut c = Command::new("kubectl")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl must be installed for these tests");
    if let Some(s) = stdin {
        c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The objects of a JSON stream as kubectl prints them, numbers as the
/// API server reads them: Go prints the float 2^63 as
/// `9223372036854776000`, which does not fit an int64, so the server
/// reads a float (serde_json would read a u64).
fn json_stream(bytes: &[u8]) -> Vec<Value> {
    fn server_numbers(v: &mut Value) {
        match v {
            Value::Number(n) if n.is_u64() && !n.is_i64() => {
                *v = serde_json::Number::from_f64(n.as_f64().unwrap())
                    .map(Value::Number)
                    .unwrap();
            }
            Value::Array(a) => a.iter_mut().for_each(server_numbers),
            Value::Object(o) => o.values_mut().for_each(server_numbers),
            _ => {}
        }
    }
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Value>()
        .map(|v| {
            let mut v = v.unwrap();
            server_numbers(&mut v);
            v
        })
        .collect()
}

/// What kubectl reads from a file: its objects as `kubectl apply -f`
/// would send them.
fn kubectl_reads(file: &Path) -> Vec<Value> {
    let out = kubectl(
        &[
            "patch",
            "--local",
            "-f",
            file.to_str().unwrap(),
            "--type",
            "merge",
            "-p",
            "{}",
            "-o",
            "json",
        ],
        None,
    );
    json_stream(&out.stdout)
}

/// What `kubectl apply -k` would send for a directory.
fn kubectl_kustomize(dir: &Path) -> Vec<Value> {
    let yaml = kubectl(&["kustomize", dir.to_str().unwrap()], None).stdout;
    let out = kubectl(
        &[
            "patch", "--local", "-f", "-", "--type", "merge", "-p", "{}", "-o", "json",
        ],
        Some(&String::from_utf8(yaml).unwrap()),
    );
    json_stream(&out.stdout)
}

struct Repo {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

fn repo(files: &[(&str, &str)]) -> Repo {
    repo_named("edge", files)
}

fn repo_named(name: &str, files: &[(&str, &str)]) -> Repo {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(name);
    std::fs::create_dir_all(&path).unwrap();
    git_run(&path, FIRST_DATE, &["init", "-q"]).unwrap();
    commit_files(&path, files, "fixture", FIRST_DATE).unwrap();
    Repo { _tmp: tmp, path }
}

/// A successful build: (bundle id, objects by (path, document), stderr).
struct Built {
    id: String,
    objects: BTreeMap<(String, u32), Value>,
    stderr: String,
}

fn build(repo: &Repo, extra: &[&str]) -> Built {
    let out_file = repo.path.parent().unwrap().join("out.bundle");
    let mut args = vec![
        "bundle",
        "build",
        "--git",
        repo.path.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = cairn(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "cairn {args:?}: {stderr}");
    let mut objects = BTreeMap::new();
    read_bundle_file(&out_file, &Limits::default(), |e, bytes| {
        objects.insert(
            (e.path.clone(), e.document),
            serde_json::from_slice(&bytes).unwrap(),
        );
        Ok(())
    })
    .unwrap();
    Built {
        id: String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        objects,
        stderr,
    }
}

/// A failing build's one-line error.
fn build_fails(repo: &Repo, extra: &[&str]) -> String {
    let out_file = repo.path.parent().unwrap().join("failed.bundle");
    let mut args = vec![
        "bundle",
        "build",
        "--git",
        repo.path.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = cairn(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("cairn: "), "{stderr}");
    assert!(!out_file.exists(), "no bundle on failure");
    stderr
}

fn objects_of(b: &Built, path: &str) -> Vec<Value> {
    b.objects
        .iter()
        .filter(|((p, _), _)| p == path)
        .map(|(_, v)| v.clone())
        .collect()
}

#[test]
fn plain_files_give_the_objects_kubectl_reads() {
    let bom = format!("\u{feff}{SERVICE}");
    let r = repo(&[
        ("deploy/database/deployment.yaml", DEPLOYMENT),
        ("deploy/database/service.yaml", &bom),
        ("deploy/configmap.json", CONFIGMAP_JSON),
        ("deploy/list.yaml", LIST),
        (".github/workflows/ci.yaml", WORKFLOW),
        (".codecov.yml", "coverage:\n  status: {project: off}\n"),
    ]);
    let b = build(&r, &[]);
    for file in [
        "deploy/database/deployment.yaml",
        "deploy/database/service.yaml",
        "deploy/configmap.json",
        "deploy/list.yaml",
    ] {
        let ours = objects_of(&b, file);
        let theirs = kubectl_reads(&r.path.join(file));
        assert!(!ours.is_empty(), "{file}: no objects");
        assert_eq!(ours, theirs, "{file}: cairn vs kubectl");
    }
    assert_eq!(b.objects.len(), 5, "{:?}", b.objects.keys());
    // Spot checks of the YAML 1.1 reading.
    let d = &objects_of(&b, "deploy/database/deployment.yaml")[0];
    assert_eq!(d["spec"]["replicas"], 10);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["configMap"]["defaultMode"], 493);
    assert_eq!(pod["containers"][0]["tty"], true);
    assert_eq!(pod["containers"][0]["stdin"], true);
    assert_eq!(pod["containers"][0]["env"][0]["value"], "0755");
    // Each ambiguous scalar is a warning naming file and line.
    assert!(
        b.stderr.contains(
            "warning: deploy/database/deployment.yaml: line 22: `spec.template.spec.containers.0.tty`: `yes` is read as true (YAML 1.1, as `kubectl apply -f` reads it) where YAML 1.2 (and so Kustomize) reads \"yes\""
        ),
        "{}",
        b.stderr
    );
    assert!(
        b.stderr
            .contains("warning: deploy/database/deployment.yaml: line 39: `spec.template.spec.volumes.0.configMap.defaultMode`: `0755` is read as 493"),
        "{}",
        b.stderr
    );
}

#[test]
fn a_file_gives_the_same_object_inside_a_kustomization() {
    let r = repo(&[
        ("plain/service.yaml", SERVICE),
        ("kust/service.yaml", SERVICE),
        ("kust/kustomization.yaml", "resources: [service.yaml]\nnamespace: kust\n"),
        // A patch file next to the kustomization is not a manifest of its
        // own.
        (
            "over/kustomization.yaml",
            "resources: [deployment.yaml]\npatches:\n- path: patch.yaml\n",
        ),
        ("over/deployment.yaml", DEPLOYMENT),
        (
            "over/patch.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: database}\nspec: {replicas: 2}\n",
        ),
    ]);
    let b = build(&r, &[]);
    let plain = &objects_of(&b, "plain/service.yaml")[0];
    let kust = &objects_of(&b, "kust/kustomization.yaml")[0];
    let mut expected = plain.clone();
    expected["metadata"]["namespace"] = "kust".into();
    assert_eq!(kust, &expected, "same file, with and without kustomize");
    // Both equal real kubectl.
    assert_eq!(
        objects_of(&b, "kust/kustomization.yaml"),
        kubectl_kustomize(&r.path.join("kust"))
    );
    assert_eq!(
        objects_of(&b, "plain/service.yaml"),
        kubectl_reads(&r.path.join("plain/service.yaml"))
    );
    let over = objects_of(&b, "over/kustomization.yaml");
    assert_eq!(over, kubectl_kustomize(&r.path.join("over")));
    assert_eq!(over[0]["spec"]["replicas"], 2);
    assert_eq!(b.objects.len(), 3);
}

#[test]
fn non_manifest_yaml_is_one_error_naming_the_files_and_the_way_out() {
    let mut files = vec![
        (
            "apps/cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
        ),
        ("fleet.yaml", "defaultNamespace: apps\nhelm: {chart: x}\n"),
        ("renovate.json", "{\"extends\": [\"config:base\"]}\n"),
    ];
    let r = repo(&files);
    let e = build_fails(&r, &[]);
    assert!(e.contains("2 file(s) are not Kubernetes manifests"), "{e}");
    assert!(e.contains("fleet.yaml (document 0, line 1)"), "{e}");
    assert!(e.contains("renovate.json (document 0, line 1)"), "{e}");
    assert!(e.contains(".cairnignore"), "{e}");
    assert!(e.contains("/fleet.yaml /renovate.json"), "{e}");
    // The way out works: a .cairnignore in the commit.
    files.push((".cairnignore", "/fleet.yaml\n/renovate.json\n"));
    let r = repo(&files);
    let b = build(&r, &[]);
    assert_eq!(b.objects.len(), 1);
}

#[test]
fn cairnignore_is_gitignore_syntax_and_nested() {
    let cm = |n: &str| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {n}}}\n");
    let (a, b_, c, d) = (cm("a"), cm("b"), cm("c"), cm("d"));
    let r = repo(&[
        (".cairnignore", "drafts/\n*.off.yaml\n"),
        ("apps/a.yaml", &a),
        ("apps/b.off.yaml", &b_),
        ("apps/drafts/c.yaml", &c),
        ("apps/keep/.cairnignore", "!d.off.yaml\n"),
        ("apps/keep/d.off.yaml", &d),
        // Helm chart directories are not plain YAML: they render with
        // helm (the template is not valid YAML before rendering).
        (
            "charts/db/Chart.yaml",
            "apiVersion: v2\nname: db\nversion: 0.1.0\n",
        ),
        ("charts/db/values.yaml", "replicas: 1\n"),
        (
            "charts/db/templates/d.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: db}\ndata:\n  replicas: {{ .Values.replicas | quote }}\n",
        ),
    ]);
    let b = build(&r, &[]);
    let names: Vec<&str> = b
        .objects
        .values()
        .map(|v| v["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "d", "db"]);
    let db = &b.objects[&("charts/db/templates/d.yaml".to_owned(), 0)];
    assert_eq!(db["data"]["replicas"], "1", "rendered by helm: {db}");
    // Built from a subdirectory, the root's .cairnignore still applies.
    let b = build(&r, &["--path", "apps"]);
    assert_eq!(b.objects.len(), 2);
}

#[test]
fn refusals_name_the_file_line_and_way_out() {
    let r = repo(&[(
        "apps/job.yaml",
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  generateName: migrate-\n",
    )]);
    let e = build_fails(&r, &[]);
    assert!(e.contains("apps/job.yaml: document 0: Job: `metadata.generateName` (`migrate-`) cannot be in a bundle"), "{e}");
    assert!(e.contains("set `metadata.name`"), "{e}");

    let r = repo(&[(
        "apps/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  x: \"1\"\n  y: \"2\"\n  x: \"3\"\n",
    )]);
    let e = build_fails(&r, &[]);
    assert!(
        e.contains(
            "apps/cm.yaml: document 0: `data`: duplicate key `x` (first at line 6) (line 8 column 3)"
        ),
        "{e}"
    );
    // A file that is not YAML at all says how to exclude it.
    let r = repo(&[("notes/todo.yaml", "- [unclosed\n")]);
    let e = build_fails(&r, &[]);
    assert!(e.contains("notes/todo.yaml: invalid YAML at line "), "{e}");
    assert!(e.contains("add `/notes/todo.yaml` to .cairnignore"), "{e}");

    let r = repo(&[(
        "apps/p.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata:\n  x: .inf\n",
    )]);
    let e = build_fails(&r, &[]);
    assert!(
        e.contains("apps/p.yaml: document 0: `data.x`: `.inf` cannot be represented in JSON"),
        "{e}"
    );
    assert!(e.contains("(line 5 column 6)"), "{e}");
}

#[test]
fn empty_namespace_and_default_are_one_namespace_for_duplicates() {
    let r = repo(&[
        (
            "a.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        ),
        (
            "b.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: default}\n",
        ),
    ]);
    let e = build_fails(&r, &[]);
    assert!(e.contains("duplicate object ConfigMap default/x: defined in a.yaml (document 0) and in b.yaml (document 0)"), "{e}");
    assert!(
        e.contains("empty namespace and `default` are the same"),
        "{e}"
    );
    // Cluster-scoped objects with the same name in different "namespaces"
    // cannot exist: a namespace on them is refused outright.
    let r = repo(&[(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, namespace: default}\n",
    )]);
    let e = build_fails(&r, &[]);
    assert!(e.contains("cluster-scoped"), "{e}");
}

#[test]
fn the_id_does_not_depend_on_the_folder_name() {
    let files = [(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
    )];
    let a = repo_named("edge", &files);
    let b = repo_named("ci-checkout-1234", &files);
    let (ba, bb) = (build(&a, &[]), build(&b, &[]));
    assert_eq!(ba.id, bb.id);
    assert!(ba.id.starts_with("sha256:"), "{}", ba.id);
    // A source name, when given, is recorded and changes the id.
    let named = build(&a, &["--source-name", "git.example.com/edge"]);
    assert_ne!(named.id, ba.id);
    assert_eq!(
        build(&b, &["--source-name", "git.example.com/edge"]).id,
        named.id
    );
}

fn repo_with_links(files: &[(&str, &str)], links: &[(&str, &str)]) -> Repo {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("edge");
    std::fs::create_dir_all(&path).unwrap();
    git_run(&path, FIRST_DATE, &["init", "-q"]).unwrap();
    for (link, target) in links {
        let p = path.join(link);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, &p).unwrap();
    }
    commit_files(&path, files, "fixture", FIRST_DATE).unwrap();
    Repo { _tmp: tmp, path }
}

#[test]
fn symlinked_bases_inside_the_repository_are_followed() {
    let r = repo_with_links(
        &[
            (
                "bases/app/kustomization.yaml",
                "resources: [service.yaml]\n",
            ),
            ("bases/app/service.yaml", SERVICE),
            (
                "overlays/prod/kustomization.yaml",
                "resources: [../../shared/app]\nnamePrefix: prod-\n",
            ),
        ],
        // `shared` is a link to `bases`: the overlay names the base
        // through it, as a vendored or renamed base would be.
        &[("shared", "bases")],
    );
    let b = build(&r, &["--path", "overlays/prod"]);
    let ours = objects_of(&b, "overlays/prod/kustomization.yaml");
    assert_eq!(ours, kubectl_kustomize(&r.path.join("overlays/prod")));
    assert_eq!(ours[0]["metadata"]["name"], "prod-database");
}

#[test]
fn a_missing_blob_breaks_only_the_render_that_needs_it() {
    let r = repo(&[
        ("k/kustomization.yaml", "resources: [service.yaml]\n"),
        ("k/service.yaml", SERVICE),
        ("k/docs/huge-recording.bin", "not needed by the render\n"),
        (
            "g/kustomization.yaml",
            "configMapGenerator:\n- name: settings\n  files: [data.txt]\n",
        ),
        ("g/data.txt", "needed\n"),
    ]);
    // Remove two blobs from the object store, as a partial clone lacks
    // them.
    for file in ["k/docs/huge-recording.bin", "g/data.txt"] {
        let oid = git_run(&r.path, FIRST_DATE, &["rev-parse", &format!("HEAD:{file}")]).unwrap();
        let oid = oid.trim();
        std::fs::remove_file(r.path.join(".git/objects").join(&oid[..2]).join(&oid[2..])).unwrap();
    }
    // The unrelated file does not break the render of `k`.
    let b = build(&r, &["--path", "k"]);
    assert_eq!(b.objects.len(), 1);
    // The render that needs the missing file fails naming it and why.
    let e = build_fails(&r, &["--path", "g"]);
    assert!(
        e.contains("kubectl kustomize failed for g/kustomization.yaml"),
        "{e}"
    );
    assert!(
        e.contains("left out of the kustomize export: `g/data.txt` (its blob is not in the repository: a partial or shallow clone?)"),
        "{e}"
    );
}

/// Every YAML 1.1 scalar form go-yaml v2 resolves, one per key, read by
/// cairn and by kubectl.
#[test]
fn every_scalar_form_reads_as_kubectl_reads_it() {
    let values = [
        "0755",
        "0o17",
        "0O17",
        "0x1F",
        "-0x10",
        "0b101",
        "-0b11",
        "1_000",
        "+12",
        "-0",
        "09",
        "0755.5",
        "1e1",
        "1E3",
        "1.2e-3",
        "1.0",
        "1.",
        "1.5",
        ".5",
        "+.5",
        "-.5e1",
        "1e20",
        "1e21",
        "99999999999999999999",
        "18446744073709551615",
        "9223372036854775807",
        "-9223372036854775808",
        "9223372036854775808",
        "1e400",
        "y",
        "Y",
        "yes",
        "Yes",
        "YES",
        "n",
        "N",
        "no",
        "NO",
        "on",
        "On",
        "ON",
        "off",
        "OFF",
        "true",
        "True",
        "TRUE",
        "tRUE",
        "false",
        "FALSE",
        "~",
        "null",
        "Null",
        "NULL",
        "",
        "2001-12-14",
        "2001-12-14T21:59:43.10-05:00",
        "1:20",
        "0x",
        "0b",
        "0o",
        "+",
        "0xG",
        "08",
        "0.0.1",
        "1__0",
        "_1",
        "1_",
        "'quoted 0755'",
        "-x",
        "\"yes\"",
        "!!str 0755",
        "!!int 0x10",
        "!!float 1",
        "!!bool yes",
    ];
    let mut doc =
        String::from("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: scalars}\nspec:\n");
    for (i, v) in values.iter().enumerate() {
        doc.push_str(&format!("  k{i}: {v}\n"));
    }
    let r = repo(&[("s.yaml", &doc)]);
    let b = build(&r, &[]);
    let ours = objects_of(&b, "s.yaml");
    let theirs = kubectl_reads(&r.path.join("s.yaml"));
    for (i, v) in values.iter().enumerate() {
        let k = format!("k{i}");
        assert_eq!(ours[0]["spec"][&k], theirs[0]["spec"][&k], "`{v}`");
    }
    assert_eq!(ours, theirs);
}

/// Bundle ids are content addresses: a change to the builder (parsing,
/// canonical JSON, manifest encoding, chunking, the bundle file) must not
/// change a single byte of what a given commit builds. The constants were
/// taken from the builder before the format 2 encoding was made single-pass
/// (commit `8e43a1e`); both formats, several chunks, YAML 1.1 scalars,
/// anchors and merge keys, lists, JSON, escapes and Unicode.
#[test]
fn bundle_bytes_of_a_commit_never_change() {
    use cairn_test_support::fixture::{make_manifest_repo, FixtureOptions};
    let tmp = tempfile::tempdir().unwrap();
    let git = tmp.path().join("git");
    make_manifest_repo(
        &git,
        &FixtureOptions {
            apps: 120,
            configmap_kb: 1,
            commits: 1,
        },
    )
    .unwrap();
    commit_files(
        &git,
        &[
            ("clusters/edge/zz/deployment.yaml", DEPLOYMENT),
            ("clusters/edge/zz/service.yaml", SERVICE),
            (
                "clusters/edge/zz/mixed.yaml",
                "# leading comment\n---\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: anchors\n  labels: &l {a: \"1\", b: 'two'}\n  annotations:\n    <<: *l\n    c: |\n      line one\n      line \"two\" \\ tab\there\n    d: >\n      folded\n      text\ndata:\n  unicode: \"h\u{e9}llo \u{2603} \\u00e9 \\U0001F600\"\n  ctl: \"a\\x01b\\u2028c\"\n  empty: ''\n  keyyes: \"yes\"\n  slash: </script>\n---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Secret, metadata: {name: s1}, stringData: {k: v}}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s2, namespace: other}\n  spec: {ports: [{port: 80, targetPort: 8080}], x: [1, -2, 3.5, 1e300, 0.1, -0, null, true, ~]}\n",
            ),
            (
                "clusters/edge/zz/j.json",
                "\u{feff}{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"j\"}, \"data\": {\"n\": \"\\u00e9\\n\"}, \"x\": [1.0, 2.5e3, -7, 18446744073709551615]}\n",
            ),
        ],
        "more shapes",
        FIRST_DATE,
    )
    .unwrap();
    let mut got = Vec::new();
    for format in ["1", "2"] {
        let out = tmp.path().join(format!("f{format}.bundle"));
        let o = cairn(&[
            "bundle",
            "build",
            "--git",
            git.to_str().unwrap(),
            "--path",
            "clusters/edge",
            "--format",
            format,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let id = String::from_utf8(o.stdout).unwrap().trim().to_owned();
        let file = cairn_bundle::Address::of(&std::fs::read(&out).unwrap()).to_string();
        got.push((format, id, file));
    }
    let want = [
        (
            "1",
            "sha256:8fb12eb72017b083164a46733838226261bded5900ced18417ac249748d0a670",
            "sha256:bf655131a60343bfcac82da52405ba98a2d3ab5d4c069b8a92d107a3b34a175f",
        ),
        (
            "2",
            "sha256:20be44923978c1b2d0d5fcd551b3375ed5afe36d4800c95da370ec4526d9b1d2",
            "sha256:4705f8c0f7612868d05b6cd091a5b4b02a21440ecf2f679dbb4206ed759481d8",
        ),
    ];
    let got_ref: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|(f, i, b)| (*f, i.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        got_ref, want,
        "bundle id and bundle file address per format"
    );
}
