//! `cairn bundle build / inspect / diff`, run as processes against
//! fixture repositories: determinism, ref and path selection, Kustomize,
//! and each bad input with its one-line error.

use cairn_test_support::fixture::{git_run, FIRST_DATE};
use cairn_test_support::{add_kustomize_overlay, commit_files, make_manifest_repo, FixtureOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cairn_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.args(args);
    c
}

fn run(args: &[&str]) -> Output {
    cairn_cmd(args).output().expect("run cairn")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail with exit code 1 and a one-line
/// `cairn: ` error; returns that line.
fn fails(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "cairn {args:?}: {stderr}");
    assert!(stderr.starts_with("cairn: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    stderr
}

struct Fixture {
    dir: tempfile::TempDir,
    head: String,
}

impl Fixture {
    fn new(apps: usize, commits: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let head = make_manifest_repo(
            &dir.path().join("edge"),
            &FixtureOptions {
                apps,
                configmap_kb: 1,
                commits,
            },
        )
        .unwrap();
        Self { dir, head }
    }
    fn repo(&self) -> PathBuf {
        self.dir.path().join("edge")
    }
    fn repo_s(&self) -> String {
        self.repo().display().to_string()
    }
    fn out(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    /// Builds with extra arguments; returns (id, bundle file).
    fn build(&self, name: &str, extra: &[&str]) -> (String, String) {
        let out = self.out(name);
        let repo = self.repo_s();
        let mut args = vec![
            "bundle",
            "build",
            "--git",
            repo.as_str(),
            "--out",
            out.as_str(),
        ];
        args.extend_from_slice(extra);
        let id = ok(&args).trim().to_owned();
        assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
        (id, out)
    }
    fn build_err(&self, extra: &[&str]) -> String {
        let out = self.out("err.bundle");
        let repo = self.repo_s();
        let mut args = vec![
            "bundle",
            "build",
            "--git",
            repo.as_str(),
            "--out",
            out.as_str(),
        ];
        args.extend_from_slice(extra);
        let e = fails(&args);
        assert!(!Path::new(&out).exists(), "no bundle file on failure");
        e
    }
    fn commit(&self, files: &[(&str, &str)]) -> String {
        commit_files(&self.repo(), files, "test change", "2026-03-01T00:00:00Z").unwrap()
    }
}

fn inspect_json(file: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["bundle", "inspect", file, "--json"])).unwrap()
}

#[test]
fn same_commit_gives_same_id_across_clones_and_runs() {
    let f = Fixture::new(5, 1);
    let (a, fa) = f.build("a.bundle", &[]);
    let (b, fb) = f.build("b.bundle", &[]);
    assert_eq!(a, b, "same commit twice");
    assert_eq!(std::fs::read(&fa).unwrap(), std::fs::read(&fb).unwrap());

    // A clone in another folder with the same name: same id by default.
    let other = tempfile::tempdir().unwrap();
    let clone = other.path().join("edge");
    git_run(
        other.path(),
        FIRST_DATE,
        &["clone", "-q", &f.repo_s(), clone.to_str().unwrap()],
    )
    .unwrap();
    let out = other.path().join("c.bundle").display().to_string();
    let c = ok(&[
        "bundle",
        "build",
        "--git",
        clone.to_str().unwrap(),
        "--out",
        &out,
    ]);
    assert_eq!(c.trim(), a, "clone named the same");

    // A bare clone under another name: different default source name,
    // same id once the source name is given explicitly.
    let bare = other.path().join("mirror-of-edge.git");
    git_run(
        other.path(),
        FIRST_DATE,
        &["clone", "-q", "--bare", &f.repo_s(), bare.to_str().unwrap()],
    )
    .unwrap();
    let d = ok(&[
        "bundle",
        "build",
        "--git",
        bare.to_str().unwrap(),
        "--out",
        &out,
    ]);
    assert_ne!(d.trim(), a, "the source name is part of the id");
    let named = |repo: &str| {
        ok(&[
            "bundle",
            "build",
            "--git",
            repo,
            "--source-name",
            "git.example.com/edge",
            "--out",
            &out,
        ])
    };
    assert_eq!(named(bare.to_str().unwrap()), named(&f.repo_s()));
    let j = inspect_json(&out);
    assert_eq!(j["source"]["repository"], "git.example.com/edge");
    assert_eq!(j["source"]["commit"], f.head.as_str());
}

#[test]
fn refs_resolve_branches_tags_and_commits() {
    let f = Fixture::new(3, 3);
    let first = git_run(
        &f.repo(),
        FIRST_DATE,
        &["rev-list", "--max-parents=0", "HEAD"],
    )
    .unwrap();
    git_run(&f.repo(), FIRST_DATE, &["tag", "v1", &first]).unwrap();
    git_run(
        &f.repo(),
        FIRST_DATE,
        &["tag", "-a", "-m", "annotated", "v1-annotated", &first],
    )
    .unwrap();
    git_run(&f.repo(), FIRST_DATE, &["branch", "old", &first]).unwrap();
    let (head, _) = f.build("head.bundle", &[]);
    let (main, _) = f.build("main.bundle", &["--ref", "main"]);
    assert_eq!(head, main);
    let (by_commit, _) = f.build("c.bundle", &["--ref", &first]);
    let (by_tag, tag_file) = f.build("t.bundle", &["--ref", "v1"]);
    let (by_atag, _) = f.build("at.bundle", &["--ref", "v1-annotated"]);
    let (by_branch, _) = f.build("b.bundle", &["--ref", "old"]);
    let (by_short, _) = f.build("s.bundle", &["--ref", &first[..12]]);
    assert_eq!(by_commit, by_tag);
    assert_eq!(by_commit, by_atag);
    assert_eq!(by_commit, by_branch);
    assert_eq!(by_commit, by_short);
    assert_ne!(by_commit, head);
    assert_eq!(inspect_json(&tag_file)["source"]["commit"], first.as_str());

    let e = f.build_err(&["--ref", "no-such-branch"]);
    assert!(e.contains("ref `no-such-branch` not found"), "{e}");
    let e = f.build_err(&["--ref", "0123456789abcdef0123456789abcdef01234567"]);
    assert!(e.contains("not found"), "{e}");
}

#[test]
fn subdirectory_selection_and_entry_paths() {
    let f = Fixture::new(3, 1);
    let (all, all_file) = f.build("all.bundle", &[]);
    let (sub, sub_file) = f.build("sub.bundle", &["--path", "clusters/edge/app-0001"]);
    let (sub2, _) = f.build("sub2.bundle", &["--path", "./clusters/edge/app-0001/"]);
    assert_ne!(all, sub);
    assert_eq!(sub, sub2, "path is normalised");
    let j = inspect_json(&sub_file);
    assert_eq!(j["source"]["path"], "clusters/edge/app-0001");
    let paths: Vec<&str> = j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "clusters/edge/app-0001/configmap.yaml",
            "clusters/edge/app-0001/deployment.yaml",
            "clusters/edge/app-0001/service.yaml"
        ],
        "paths are relative to the repository root"
    );
    let j = inspect_json(&all_file);
    assert_eq!(
        j["objects"],
        3 * 3 + 3,
        "apps + namespace, CRD and Sensor; README ignored"
    );

    let e = f.build_err(&["--path", "clusters/nowhere"]);
    assert!(
        e.contains("path `clusters/nowhere` not found in the tree of commit"),
        "{e}"
    );
    let e = f.build_err(&["--path", "../etc"]);
    assert!(e.contains("`..` is not allowed"), "{e}");
}

#[test]
fn canonical_objects_are_sorted_compact_json() {
    let f = Fixture::new(1, 1);
    f.commit(&[(
        "clusters/edge/extra.yml",
        "# comment\nkind: ConfigMap\nmetadata: {namespace: edge-apps, name: extra}\napiVersion: v1\ndata:\n  z: \"1\"\n  a: two\n---\n---\n",
    )]);
    let (_, file) = f.build("b.bundle", &[]);
    let j = inspect_json(&file);
    let e = j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "extra")
        .unwrap()
        .clone();
    assert_eq!(e["path"], "clusters/edge/extra.yml");
    let want = br#"{"apiVersion":"v1","data":{"a":"two","z":"1"},"kind":"ConfigMap","metadata":{"name":"extra","namespace":"edge-apps"}}"#;
    assert_eq!(e["size"], want.len());
    assert_eq!(e["object"], cairn_keys::sha256_address(want));
}

#[test]
fn kustomize_directories_are_rendered() {
    let f = Fixture::new(2, 1);
    add_kustomize_overlay(&f.repo()).unwrap();
    let (id, file) = f.build("k.bundle", &["--path", "clusters/kustomized"]);
    let j = inspect_json(&file);
    let entries = j["entries"].as_array().unwrap();
    let got: Vec<(String, u64, String)> = entries
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_owned(),
                e["document"].as_u64().unwrap(),
                format!(
                    "{} {}/{}",
                    e["kind"].as_str().unwrap(),
                    e["namespace"].as_str().unwrap(),
                    e["name"].as_str().unwrap()
                ),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "clusters/kustomized/kustomization.yaml".to_owned(),
                0,
                "ConfigMap edge-apps/kz-settings".to_owned()
            ),
            (
                "clusters/kustomized/kustomization.yaml".to_owned(),
                1,
                "Deployment edge-apps/kz-web".to_owned()
            ),
        ],
        "rendered objects only; notes.yaml and the raw files are not parsed on their own"
    );
    // Deterministic: rendering again gives the same id.
    assert_eq!(
        f.build("k2.bundle", &["--path", "clusters/kustomized"]).0,
        id
    );
    // The whole tree: plain files plus the render.
    let (_, all) = f.build("all.bundle", &[]);
    assert_eq!(inspect_json(&all)["objects"], 2 * 3 + 3 + 2);

    // kubectl missing: a clear error naming the kustomization.
    let empty = tempfile::tempdir().unwrap();
    let out = f.out("nok.bundle");
    let repo = f.repo_s();
    let o = cairn_cmd(&["bundle", "build", "--git", &repo, "--out", &out])
        .env("PATH", empty.path())
        .env_remove("CAIRN_KUBECTL")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        e.trim(),
        "cairn: kubectl not found in PATH: needed to render clusters/kustomized/kustomization.yaml; install kubectl 1.27+"
    );
    assert!(!Path::new(&out).exists());

    // A broken kustomization: kubectl's error, with the file named.
    f.commit(&[(
        "clusters/kustomized/kustomization.yaml",
        "resources:\n  - missing.yaml\n",
    )]);
    let e = f.build_err(&["--path", "clusters/kustomized"]);
    assert!(
        e.contains("kubectl kustomize failed for clusters/kustomized/kustomization.yaml"),
        "{e}"
    );
    assert!(e.contains("missing.yaml"), "{e}");
}

#[test]
fn malformed_yaml_names_file_line_and_column() {
    let f = Fixture::new(1, 1);
    f.commit(&[(
        "clusters/edge/bad.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad\n data: [x\n",
    )]);
    let e = f.build_err(&[]);
    assert!(
        e.starts_with("cairn: clusters/edge/bad.yaml: invalid YAML at line 5 column"),
        "{e}"
    );
}

#[test]
fn documents_without_kind_or_name_are_named() {
    let f = Fixture::new(1, 1);
    f.commit(&[(
        "clusters/edge/nokind.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok, namespace: edge-apps}\n---\napiVersion: v1\nmetadata: {name: x}\n",
    )]);
    let e = f.build_err(&[]);
    assert_eq!(
        e.trim(),
        "cairn: clusters/edge/nokind.yaml: document 1: missing `kind`"
    );

    let f = Fixture::new(1, 1);
    f.commit(&[(
        "clusters/edge/noname.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  namespace: edge-apps\n",
    )]);
    let e = f.build_err(&[]);
    assert_eq!(
        e.trim(),
        "cairn: clusters/edge/noname.yaml: document 0: Secret: missing `metadata.name`"
    );
}

#[test]
fn non_json_yaml_and_namespace_rules_are_refused() {
    let f = Fixture::new(1, 1);
    f.commit(&[(
        "clusters/edge/keys.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: k}\ndata:\n  8080: port\n",
    )]);
    let e = f.build_err(&[]);
    assert!(
        e.contains(
            "clusters/edge/keys.yaml: document 0: `data`: mapping key `8080` is not a string"
        ),
        "{e}"
    );

    let f = Fixture::new(1, 1);
    f.commit(&[("clusters/edge/ns.yaml", "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: reader, namespace: edge-apps}\n")]);
    let e = f.build_err(&[]);
    assert!(
        e.contains("clusters/edge/ns.yaml: document 0: ClusterRole reader is cluster-scoped"),
        "{e}"
    );
}

#[test]
fn duplicate_objects_name_both_files() {
    let f = Fixture::new(2, 1);
    f.commit(&[(
        "clusters/edge/zz-copy.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: app-0001\n  namespace: edge-apps\n",
    )]);
    let e = f.build_err(&[]);
    assert!(
        e.contains("duplicate object Service edge-apps/app-0001"),
        "{e}"
    );
    assert!(
        e.contains("clusters/edge/app-0001/service.yaml (document 0)"),
        "{e}"
    );
    assert!(e.contains("clusters/edge/zz-copy.yaml (document 0)"), "{e}");
}

#[test]
fn empty_bundles_need_allow_empty() {
    let f = Fixture::new(1, 1);
    f.commit(&[
        ("docs/notes.yaml", "---\n# nothing here\n"),
        ("docs/readme.txt", "kind: Nope\n"),
    ]);
    let e = f.build_err(&["--path", "docs"]);
    assert!(
        e.contains("empty bundle: no Kubernetes objects in `docs`"),
        "{e}"
    );
    assert!(e.contains("--allow-empty"), "{e}");
    let (_, file) = f.build("empty.bundle", &["--path", "docs", "--allow-empty"]);
    assert_eq!(inspect_json(&file)["objects"], 0);
}

#[test]
fn inspect_and_diff_show_objects() {
    let f = Fixture::new(3, 1);
    let (old_id, old) = f.build("old.bundle", &[]);
    f.commit(&[
        (
            "clusters/edge/app-0001/configmap.yaml",
            &cairn_test_support::fixture::configmap("app-0001", 1, 7),
        ),
        (
            "clusters/edge/new.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fresh, namespace: edge-apps}\n",
        ),
    ]);
    git_run(
        &f.repo(),
        FIRST_DATE,
        &["rm", "-q", "clusters/edge/app-0002/service.yaml"],
    )
    .unwrap();
    f.commit(&[]);
    let (new_id, new) = f.build("new.bundle", &[]);
    assert_ne!(old_id, new_id);

    let text = ok(&["bundle", "inspect", &old]);
    assert!(text.contains(&old_id), "{text}");
    assert!(
        text.contains("ConfigMap") && text.contains("edge-apps/app-0001-config"),
        "{text}"
    );
    assert!(text.contains("clusters/edge/crd.yaml#1"), "{text}");

    let d = ok(&["bundle", "diff", &old, &new]);
    assert!(d.contains("+ ConfigMap edge-apps/fresh"), "{d}");
    assert!(d.contains("- Service edge-apps/app-0002"), "{d}");
    assert!(d.contains("~ ConfigMap edge-apps/app-0001-config"), "{d}");
    assert!(
        d.contains("1 added, 1 removed, 1 changed, 10 unchanged"),
        "{d}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["bundle", "diff", &old, &new, "--json"])).unwrap();
    assert_eq!(j["old"], old_id.as_str());
    assert_eq!(j["added"][0]["name"], "fresh");
    assert_eq!(j["removed"][0]["kind"], "Service");
    assert_eq!(j["changed"][0]["new"]["name"], "app-0001-config");
    assert_eq!(j["unchanged"], 10);

    // A corrupted bundle file is refused by inspect.
    let mut bytes = std::fs::read(&old).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(&old, bytes).unwrap();
    let e = fails(&["bundle", "inspect", &old]);
    assert!(e.contains("content hashes to"), "{e}");
}

#[test]
fn thread_count_does_not_change_the_id() {
    let f = Fixture::new(30, 1);
    add_kustomize_overlay(&f.repo()).unwrap();
    let ids: Vec<String> = [1, 2, 7]
        .iter()
        .map(|&threads| {
            let mut o = cairn_bundle::build::BuildOptions::new(f.repo());
            o.threads = threads;
            cairn_bundle::build::build(&o).unwrap().id()
        })
        .collect();
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[0], ids[2]);
    let (cli, _) = f.build("cli.bundle", &[]);
    assert_eq!(cli, ids[0], "the library and the CLI agree");
}
