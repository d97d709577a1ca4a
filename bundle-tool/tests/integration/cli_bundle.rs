//! `cairn bundle build / inspect / diff`, run as processes against
//! fixture repositories: determinism, ref and path selection, Kustomize,
//! and each bad input with its one-line error.

use crate::support::{cairn as cairn_cmd, fails_code, ok};
use cairn_test_support::fixture::{git_run, FIRST_DATE};
use cairn_test_support::{add_kustomize_overlay, commit_files, make_manifest_repo, FixtureOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a command that must fail with exit code 1 and a one-line
/// `cairn: ` error; returns that line.
fn fails(args: &[&str]) -> String {
    let stderr = fails_code(args, None, 1);
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
    assert_eq!(
        d.trim(),
        a,
        "no source name unless given: folder names do not matter"
    );
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

// ---------------------------------------------------------------------
// A hostile commit on the build host (issue 13 §1): the attacker controls
// every byte of the commit. Each test asserts the refusal, its message,
// that no bundle file is written, and that nothing lands outside the
// build's own temporary folder (TMPDIR points at a fresh sentinel folder
// that must stay empty).
// ---------------------------------------------------------------------

/// Runs `git` in `repo` with `stdin`; returns trimmed stdout.
fn git_in(repo: &Path, args: &[&str], stdin: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .env("GIT_AUTHOR_DATE", FIRST_DATE)
        .env("GIT_COMMITTER_DATE", FIRST_DATE)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Writes a blob; returns its id.
fn blob(repo: &Path, bytes: &[u8]) -> String {
    git_in(repo, &["hash-object", "-w", "--stdin"], bytes)
}

/// Writes a tree object by hand (git's own tools refuse the names these
/// tests need): `<mode> <name>\0<20-byte id>` per entry, sorted the way
/// Git sorts them. Returns its id.
fn raw_tree(repo: &Path, entries: &[(&str, &[u8], &str)]) -> String {
    let mut sorted: Vec<_> = entries.to_vec();
    sorted.sort_by_key(|(mode, name, _)| {
        let mut k = name.to_vec();
        if *mode == "40000" {
            k.push(b'/');
        }
        k
    });
    let mut body = Vec::new();
    for (mode, name, id) in sorted {
        body.extend_from_slice(mode.as_bytes());
        body.push(b' ');
        body.extend_from_slice(name);
        body.push(0);
        body.extend_from_slice(&hex_bytes(id));
    }
    git_in(
        repo,
        &["hash-object", "-t", "tree", "--literally", "-w", "--stdin"],
        &body,
    )
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

fn commit_tree(repo: &Path, tree: &str) -> String {
    git_in(repo, &["commit-tree", tree, "-m", "hostile"], b"")
}

/// A fresh, empty folder used as TMPDIR for one build.
struct Sentinel(tempfile::TempDir);

impl Sentinel {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    /// Everything under the sentinel (must be nothing after a build).
    fn contents(&self) -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                out.push(p.clone());
                if p.is_dir() && !p.is_symlink() {
                    walk(&p, out);
                }
            }
        }
        let mut v = Vec::new();
        walk(self.path(), &mut v);
        v
    }
}

/// Builds `reference` of `repo` with TMPDIR at a fresh sentinel; returns
/// (exit ok, stderr, sentinel). Asserts that a failed build wrote no
/// bundle file.
fn build_with_sentinel(
    repo: &Path,
    out_dir: &Path,
    reference: &str,
    extra: &[&str],
) -> (bool, String, Sentinel) {
    let sentinel = Sentinel::new();
    let out = out_dir.join("hostile.bundle");
    let _ = std::fs::remove_file(&out);
    let mut args = vec![
        "bundle".to_owned(),
        "build".into(),
        "--git".into(),
        repo.display().to_string(),
        "--ref".into(),
        reference.into(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(&args)
        .env("TMPDIR", sentinel.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    if !o.status.success() {
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(stderr.starts_with("cairn: "), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(!out.exists(), "no bundle file on failure");
    }
    (o.status.success(), stderr, sentinel)
}

const KUSTOMIZATION: &str =
    "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - cm.yaml\n";
const CONFIGMAP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm\ndata:\n  a: b\n";

#[test]
fn evil_tree_entry_names_are_refused_and_nothing_is_written() {
    let f = Fixture::new(1, 1);
    let repo = f.repo();
    let sentinel_target = Sentinel::new();
    let kust = blob(&repo, KUSTOMIZATION.as_bytes());
    let cm = blob(&repo, CONFIGMAP.as_bytes());
    let payload = blob(
        &repo,
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: pwned}\n",
    );
    // A directory holding the payload, to hang under an evil name.
    let pwn_dir = raw_tree(&repo, &[("100644", b"pwned.yaml", &payload)]);
    let abs_name = format!("{}/abs-pwned.yaml", sentinel_target.path().display());
    let cases: Vec<(Vec<u8>, &str, &str, &str)> = vec![
        (
            b"..".to_vec(),
            "40000",
            &pwn_dir,
            "a relative path component",
        ),
        (
            b".".to_vec(),
            "40000",
            &pwn_dir,
            "a relative path component",
        ),
        (b"".to_vec(), "100644", &payload, "an empty name"),
        (
            b"a/b.yaml".to_vec(),
            "100644",
            &payload,
            "a name containing `/`",
        ),
        (
            abs_name.as_bytes().to_vec(),
            "100644",
            &payload,
            "a name containing `/`",
        ),
        (
            b".git".to_vec(),
            "40000",
            &pwn_dir,
            "a `.git` directory name",
        ),
        (
            b".GiT".to_vec(),
            "40000",
            &pwn_dir,
            "a `.git` directory name",
        ),
        (
            b"x\x1b]0;owned\x07.yaml".to_vec(),
            "100644",
            &payload,
            "a name containing a control character",
        ),
    ];
    let clean = raw_tree(&repo, &[("100644", b"cm.yaml", &cm)]);
    for (name, mode, id, why) in &cases {
        // Shown escaped: no raw control characters reach the terminal.
        let shown = String::from_utf8_lossy(name)
            .chars()
            .map(|c| match c {
                '\t' => "\\t".to_owned(),
                '\n' => "\\n".to_owned(),
                '\r' => "\\r".to_owned(),
                c if c.is_ascii_control() => format!("\\x{:02x}", c as u32),
                c => c.to_string(),
            })
            .collect::<String>();
        // The evil entry at the root (where `..` and an absolute name
        // escaped the old export's temporary folder) and inside `app/`,
        // next to a kustomization; each with and without `--path`.
        let evil_app = raw_tree(
            &repo,
            &[
                ("100644", b"kustomization.yaml", &kust),
                ("100644", b"cm.yaml", &cm),
                (mode, name, id),
            ],
        );
        let good_app = raw_tree(
            &repo,
            &[
                ("100644", b"kustomization.yaml", &kust),
                ("100644", b"cm.yaml", &cm),
            ],
        );
        let at_root = raw_tree(
            &repo,
            &[
                ("40000", b"app", &good_app),
                ("40000", b"clean", &clean),
                ("100644", b"kustomization.yaml", &kust),
                ("100644", b"cm.yaml", &cm),
                (mode, name, id),
            ],
        );
        let in_app = raw_tree(
            &repo,
            &[("40000", b"app", &evil_app), ("40000", b"clean", &clean)],
        );
        for (root, place) in [(at_root, "the root"), (in_app, "`app`")] {
            let commit = commit_tree(&repo, &root);
            for extra in [&[][..], &["--path", "clean"][..], &["--path", "app"][..]] {
                let (ok, e, sentinel) = build_with_sentinel(&repo, f.dir.path(), &commit, extra);
                assert!(
                    !ok,
                    "entry {shown:?} in {place} must be refused ({extra:?})"
                );
                assert!(
                    e.contains(&format!("tree entry `{shown}` in {place} is {why}")),
                    "{shown:?} {extra:?}: {e}"
                );
                assert!(e.contains(&commit), "names the commit: {e}");
                assert!(!e.contains('\x1b') && !e.contains('\x07'), "{e:?}");
                assert_eq!(
                    sentinel.contents(),
                    Vec::<PathBuf>::new(),
                    "TMPDIR left empty"
                );
            }
        }
    }
    assert_eq!(sentinel_target.contents(), Vec::<PathBuf>::new());
    assert!(!f.dir.path().join("pwned.yaml").exists());
}

/// Commits `files` and `links` (path, target) in the fixture's work tree.
fn commit_with_links(f: &Fixture, files: &[(&str, &str)], links: &[(&str, &str)]) -> String {
    for (path, target) in links {
        let p = f.repo().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(target, &p).unwrap();
    }
    f.commit(files)
}

#[test]
fn kustomize_symlinks_leaving_the_repository_are_refused() {
    let f = Fixture::new(1, 1);
    let secret = Sentinel::new();
    let secret_file = secret.path().join("host-secret.txt");
    std::fs::write(&secret_file, "password=hunter2\n").unwrap();
    let k = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources:\n  - cm.yaml\nconfigMapGenerator:\n  - name: leak\n    files:\n      - secret.txt\n";
    for (target, why) in [
        (secret_file.display().to_string(), "is absolute"),
        (
            format!("../../../../../../../..{}", secret_file.display()),
            "leaves the repository",
        ),
    ] {
        let commit = commit_with_links(
            &f,
            &[
                ("clusters/k/kustomization.yaml", k),
                ("clusters/k/cm.yaml", CONFIGMAP),
            ],
            &[("clusters/k/secret.txt", &target)],
        );
        let (ok, e, sentinel) =
            build_with_sentinel(&f.repo(), f.dir.path(), &commit, &["--path", "clusters/k"]);
        assert!(!ok);
        assert!(
            e.contains(&format!(
                "symbolic link `clusters/k/secret.txt` -> `{target}` {why}; refused"
            )),
            "{e}"
        );
        assert_eq!(sentinel.contents(), Vec::<PathBuf>::new());
    }

    // A link that stays inside the repository is exported as a copy of its
    // target: the render sees the file, the export holds no link.
    let commit = commit_with_links(
        &f,
        &[
            ("clusters/k/kustomization.yaml", k),
            ("clusters/k/cm.yaml", CONFIGMAP),
            ("shared/settings.txt", "mode=edge\n"),
        ],
        &[("clusters/k/secret.txt", "../../shared/settings.txt")],
    );
    let (ok, e, sentinel) =
        build_with_sentinel(&f.repo(), f.dir.path(), &commit, &["--path", "clusters/k"]);
    assert!(ok, "{e}");
    assert_eq!(sentinel.contents(), Vec::<PathBuf>::new(), "export removed");
    let j = inspect_json(&f.dir.path().join("hostile.bundle").display().to_string());
    let names: Vec<&str> = j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("leak-")), "{names:?}");
}

#[test]
fn kustomize_export_is_capped_and_holds_only_what_the_render_needs() {
    let f = Fixture::new(1, 1);
    let repo = f.repo();
    let kust = blob(&repo, KUSTOMIZATION.as_bytes());
    let cm = blob(&repo, CONFIGMAP.as_bytes());
    // One 1 MiB blob under 64 names: 64 MiB in the export from a
    // repository of about 1 MiB.
    let big = blob(&repo, &vec![b'x'; 1 << 20]);
    let names: Vec<String> = (0..64).map(|i| format!("copy-{i:02}.txt")).collect();
    let mut bomb: Vec<(&str, &[u8], &str)> = names
        .iter()
        .map(|n| ("100644", n.as_bytes(), big.as_str()))
        .collect();
    let bomb_dir = raw_tree(&repo, &bomb);
    bomb.push(("100644", b"kustomization.yaml", &kust));
    bomb.push(("100644", b"cm.yaml", &cm));
    let app_bomb = raw_tree(&repo, &bomb);
    let app = raw_tree(
        &repo,
        &[
            ("100644", b"kustomization.yaml", &kust),
            ("100644", b"cm.yaml", &cm),
        ],
    );
    let root = raw_tree(
        &repo,
        &[
            ("40000", b"app", &app),
            ("40000", b"app-bomb", &app_bomb),
            ("40000", b"unrelated", &bomb_dir),
        ],
    );
    let commit = commit_tree(&repo, &root);

    let (ok, e, sentinel) = build_with_sentinel(
        &repo,
        f.dir.path(),
        &commit,
        &["--path", "app-bomb", "--max-export-bytes", "4000000"],
    );
    assert!(!ok);
    assert!(
        e.contains("kustomize export: more than 4000000 bytes (at `app-bomb/copy-03.txt`, 1048576 bytes); refused (raise the cap with --max-export-bytes)"),
        "{e}"
    );
    assert_eq!(sentinel.contents(), Vec::<PathBuf>::new());

    let (ok, e, _) = build_with_sentinel(
        &repo,
        f.dir.path(),
        &commit,
        &["--path", "app-bomb", "--max-export-files", "10"],
    );
    assert!(!ok);
    assert!(
        e.contains("kustomize export: more than 10 files") && e.contains("--max-export-files"),
        "{e}"
    );

    // The same bomb elsewhere in the repository is not exported: rendering
    // `app` fits in a 4 kB cap.
    let (ok, e, sentinel) = build_with_sentinel(
        &repo,
        f.dir.path(),
        &commit,
        &["--path", "app", "--max-export-bytes", "4000"],
    );
    assert!(ok, "{e}");
    assert_eq!(sentinel.contents(), Vec::<PathBuf>::new());
}

#[test]
fn kustomize_references_outside_the_repository_are_refused() {
    let f = Fixture::new(1, 1);
    let k = |extra: &str| {
        format!("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n{extra}")
    };
    let cases = [
        (
            k("resources:\n  - cm.yaml\n  - ../../../../../../../../etc\n"),
            "clusters/k/kustomization.yaml: `resources` entry `../../../../../../../../etc` leaves the repository",
        ),
        (
            k("resources:\n  - /etc/kubernetes\n"),
            "clusters/k/kustomization.yaml: `resources` entry `/etc/kubernetes` is an absolute path",
        ),
        (
            k("resources:\n  - cm.yaml\nconfigMapGenerator:\n  - name: x\n    files:\n      - pw=../../../../../../etc/passwd\n"),
            "clusters/k/kustomization.yaml: `configMapGenerator.files` entry `../../../../../../etc/passwd` leaves the repository",
        ),
        (
            k("resources:\n  - cm.yaml\npatches:\n  - path: /etc/shadow\n"),
            "clusters/k/kustomization.yaml: `patches.path` entry `/etc/shadow` is an absolute path",
        ),
        // Followed through a base inside the repository.
        (
            k("resources:\n  - ../../base\n"),
            "base/kustomization.yaml: `components` entry `../../../../etc` leaves the repository",
        ),
    ];
    for (kustomization, want) in cases {
        let commit = f.commit(&[
            ("clusters/k/kustomization.yaml", &kustomization),
            ("clusters/k/cm.yaml", CONFIGMAP),
            (
                "base/kustomization.yaml",
                &k("components:\n  - ../../../../etc\n"),
            ),
        ]);
        let (ok, e, sentinel) =
            build_with_sentinel(&f.repo(), f.dir.path(), &commit, &["--path", "clusters/k"]);
        assert!(!ok, "{kustomization}");
        assert!(e.contains(want), "want {want}\ngot {e}");
        assert_eq!(sentinel.contents(), Vec::<PathBuf>::new());
    }
}

#[test]
fn remote_kustomize_resources_need_allow_remote() {
    let f = Fixture::new(1, 1);
    for remote in [
        "https://github.com/kubernetes-sigs/kustomize//examples/helloWorld?ref=v3.3.1",
        "github.com/kubernetes-sigs/kustomize/examples/helloWorld",
        "git@github.com:kubernetes-sigs/kustomize.git",
    ] {
        let commit = f.commit(&[
            (
                "clusters/k/kustomization.yaml",
                &format!("resources:\n  - cm.yaml\n  - {remote}\n"),
            ),
            ("clusters/k/cm.yaml", CONFIGMAP),
        ]);
        let (ok, e, _) =
            build_with_sentinel(&f.repo(), f.dir.path(), &commit, &["--path", "clusters/k"]);
        assert!(!ok);
        assert!(
            e.contains(&format!("clusters/k/kustomization.yaml: `resources` entry `{remote}` is a remote reference, refused: a bundle must be a function of its commit (pass --allow-remote to allow remote resources)")),
            "{e}"
        );
    }
    // With --allow-remote the reference reaches kustomize (here a closed
    // loopback port, so the fetch itself fails).
    let commit = f.commit(&[(
        "clusters/k/kustomization.yaml",
        "resources:\n  - cm.yaml\n  - http://127.0.0.1:9/cm.yaml\n",
    )]);
    let (ok, e, _) = build_with_sentinel(
        &f.repo(),
        f.dir.path(),
        &commit,
        &["--path", "clusters/k", "--allow-remote"],
    );
    assert!(!ok);
    assert!(!e.contains("remote reference"), "{e}");
    assert!(
        e.contains("kubectl kustomize failed for clusters/k/kustomization.yaml"),
        "{e}"
    );
}

#[test]
fn hostile_yaml_is_refused_before_parsing() {
    let f = Fixture::new(1, 1);
    let deep = "[".repeat(1 << 20);
    let laughs = {
        let mut t = String::from("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: lol}\nx: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
        let mut prev = "a".to_owned();
        for n in ["b", "c", "d", "e", "f", "g", "h", "i"] {
            t.push_str(&format!(
                "{n}: &{n} [{}]\n",
                vec![format!("*{prev}"); 9].join(",")
            ));
            prev = n.to_owned();
        }
        t
    };
    let cases = [
        (
            "clusters/edge/deep.yaml",
            deep.clone(),
            "cairn: clusters/edge/deep.yaml: line 1 column 100: collections nested deeper than 100 levels; refused",
        ),
        (
            "clusters/edge/python.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p}\ndata:\n  x: !!python/object/apply:os.system [\"id\"]\n".to_owned(),
            "cairn: clusters/edge/python.yaml: line 5 column 6: YAML tag `!!python/object/apply:os.system` is not allowed",
        ),
        (
            "clusters/edge/binary.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata:\n  x: !!binary aGk=\n".to_owned(),
            "cairn: clusters/edge/binary.yaml: line 5 column 6: YAML tag `!!binary` is not allowed",
        ),
        (
            "clusters/edge/custom.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: !vault {x: y}\n".to_owned(),
            "cairn: clusters/edge/custom.yaml: line 4 column 7: YAML tag `!vault` is not allowed",
        ),
        (
            "clusters/edge/laughs.yaml",
            laughs,
            "cairn: clusters/edge/laughs.yaml: line 10 column 17: aliases expand the document by more than 16777216 bytes (alias `*f`); refused",
        ),
        // The kustomization file itself goes through the same parser.
        (
            "clusters/k/kustomization.yaml",
            format!("resources:\n  - {}\n", "{".repeat(5000)),
            "cairn: clusters/k/kustomization.yaml: line 2 column 102: collections nested deeper than 100 levels",
        ),
    ];
    for (path, text, want) in cases {
        let fresh = Fixture::new(1, 1);
        let commit = fresh.commit(&[(path, &text)]);
        let (ok, e, sentinel) = build_with_sentinel(&fresh.repo(), fresh.dir.path(), &commit, &[]);
        assert!(!ok, "{path}");
        assert!(e.starts_with(want), "want {want}\ngot {e}");
        assert_eq!(sentinel.contents(), Vec::<PathBuf>::new());
    }
    drop(f);
}

#[test]
fn kubectl_runs_root_only_without_environment_or_network() {
    // A stand-in kubectl that reports what it was given: its arguments,
    // its environment's names and its network interfaces (from its own
    // network namespace's /proc view).
    let f = Fixture::new(1, 1);
    let bin = tempfile::tempdir().unwrap();
    let script = bin.path().join("kubectl");
    std::fs::write(
        &script,
        r#"#!/bin/sh
ifaces=$(tail -n +3 /proc/self/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ,)
envs=$(env | cut -d= -f1 | grep -v -e '^PWD$' -e '^SHLVL$' -e '^_$' | sort | tr '\n' ,)
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: seen}\ndata:\n  args: "%s %s %s"\n  env: "%s"\n  net: "%s"\n' "$1" "$2" "$3" "$envs" "$ifaces"
"#,
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let commit = f.commit(&[
        ("clusters/k/kustomization.yaml", KUSTOMIZATION),
        ("clusters/k/cm.yaml", CONFIGMAP),
    ]);
    let kubectl = script.display().to_string();
    let out = f.out("seen.bundle");
    let repo = f.repo_s();
    let o = cairn_cmd(&[
        "bundle",
        "build",
        "--git",
        &repo,
        "--ref",
        &commit,
        "--path",
        "clusters/k",
        "--out",
        &out,
        "--kubectl",
        &kubectl,
    ])
    .env("HTTPS_PROXY", "http://proxy.invalid:3128")
    .env("AWS_SECRET_ACCESS_KEY", "hunter2")
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = inspect_json(&out);
    assert_eq!(j["objects"], 1);
    let entries = j["entries"].as_array().unwrap();
    assert_eq!(entries[0]["name"], "seen");
    // The object's bytes are in the bundle file: read them back through
    // the canonical JSON (compact, so the fields are searchable).
    let bytes = std::fs::read(&out).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains(r#""args":"kustomize --load-restrictor LoadRestrictionsRootOnly""#),
        "{text}"
    );
    assert!(text.contains(r#""env":"HOME,PATH,TMPDIR,""#), "{text}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // As root the render always gets a network namespace of its own.
        assert!(text.contains(r#""net":"lo,""#), "{text}");
    }
}

/// Every command that reads a bundle file uses core's one parser: a
/// truncated file or one with bytes after the last object is refused,
/// naming the file.
#[test]
fn truncated_and_padded_bundle_files_are_refused_naming_the_file() {
    let f = Fixture::new(1, 1);
    let (_, good) = f.build("good.bundle", &[]);
    let bytes = std::fs::read(&good).unwrap();
    let short = f.out("short.bundle");
    std::fs::write(&short, &bytes[..bytes.len() - 1]).unwrap();
    let long = f.out("long.bundle");
    let mut padded = bytes.clone();
    padded.push(b'\n');
    std::fs::write(&long, &padded).unwrap();
    for (file, why) in [
        (&short, "truncated at object"),
        (&long, "trailing bytes after the last object"),
    ] {
        for args in [
            vec!["bundle", "inspect", file.as_str()],
            vec!["bundle", "diff", good.as_str(), file.as_str()],
        ] {
            let e = fails(&args);
            assert!(e.contains(file.as_str()), "{args:?}: {e}");
            assert!(e.contains(why), "{args:?}: {e}");
        }
    }
}
