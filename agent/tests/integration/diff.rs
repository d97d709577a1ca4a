//! `cairn diff` through the real `cairn` binary against the test API
//! server: after a real agent applied a release, it reports exactly what a
//! test changed (an object edited with kubectl, one added to the bundle,
//! one dropped from it), changes nothing, and exits 0 / 1 / 2 like diff(1).

use crate::support::{cairn_bin, World};
use cairn_test_support::ApiServer;
use std::path::Path;

fn configmap(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: edge-apps\n\
         data:\n  k: {value}\n"
    )
}

fn diff(dir: &Path, args: &[&str], kubeconfig: &Path) -> (i32, String, String) {
    cairn_test_support::run_code(
        std::process::Command::new(cairn_bin())
            .arg("diff")
            .args(args)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .current_dir(dir),
    )
}

#[test]
fn cairn_diff_reports_exactly_the_changes_a_test_makes() {
    let w = World::new(1, 1, 1);
    // An AgeSecret (encrypted with the `age` CLI) the agent decrypts: the
    // diff cannot, so it neither compares nor prunes its Secret.
    let key = w.path("site.key");
    cairn_test_support::ok(std::process::Command::new("age-keygen").arg("-o").arg(&key));
    let public =
        cairn_test_support::ok(std::process::Command::new("age-keygen").arg("-y").arg(&key));
    let plain = w.path("secret.yaml");
    std::fs::write(&plain, "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: edge-apps\nstringData:\n  password: hunter2\n").unwrap();
    let armored = cairn_test_support::ok(
        std::process::Command::new("age")
            .args(["-a", "-r", public.trim()])
            .arg(&plain),
    );
    let indented: String = armored.lines().map(|l| format!("  {l}\n")).collect();
    let age_secret = format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: AgeSecret\nmetadata:\n  name: db\n  namespace: edge-apps\nciphertext: |\n{indented}"
    );
    cairn_test_support::fixture::commit_files(
        &w.git,
        &[
            ("clusters/edge/diff/keep.yaml", &configmap("diff-keep", "v")),
            ("clusters/edge/diff/gone.yaml", &configmap("diff-gone", "g")),
            ("clusters/edge/diff/db.age.yaml", &age_secret),
        ],
        "two ConfigMaps",
        "2026-02-01T00:00:00Z",
    )
    .expect("commit");
    let api = ApiServer::start(
        w.tmp.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--deployment-ready-delay-ms",
            "100",
        ],
    );
    api.create_namespace(w.tmp.path(), "cairn-system");
    let mut c = cairn_test_support::AgentConfig::new(&w.data, &w.manifests);
    c.sources = vec![w.repo.display().to_string()];
    c.target = format!(
        "target:\n  kubernetes:\n    kubeconfig: {}\n    namespace: cairn-system\n    \
         healthTimeout: 20s\n",
        api.kubeconfig.display()
    );
    c.extra = format!("ageIdentityFile: {}\n", key.display());
    let cfg = c.write(&w.path("agent.yaml"));
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    w.once_ok(&cfg);
    let db = api.json(&["-n", "edge-apps", "get", "secret", "db"]);
    assert_eq!(db["data"]["password"], "aHVudGVyMg==", "{db}");
    let b1s = b1.to_str().unwrap();

    // What the agent applied: no changes, exit 0, nothing printed.
    let (code, out, err) = diff(w.tmp.path(), &["--bundle", b1s], &api.kubeconfig);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");

    // Someone edits one object on the cluster; the next commit adds one
    // object and drops another.
    api.kubectl_ok(&[
        "-n",
        "edge-apps",
        "patch",
        "configmap",
        "diff-keep",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"k":"edited"}}"#,
    ]);
    cairn_test_support::fixture::commit_files(
        &w.git,
        &[("clusters/edge/diff/new.yaml", &configmap("diff-new", "n"))],
        "add one",
        "2026-02-02T00:00:00Z",
    )
    .expect("commit");
    cairn_test_support::fixture::remove_and_commit(
        &w.git,
        "clusters/edge/diff/gone.yaml",
        "drop one",
        "2026-02-03T00:00:00Z",
    )
    .expect("git rm");
    let b2 = w.build("HEAD", "b2.bundle");
    let expected = "create ConfigMap edge-apps/diff-new\n\
                    change ConfigMap edge-apps/diff-keep\n  \
                    /data/k: \"edited\" -> \"v\"\n\
                    prune ConfigMap edge-apps/diff-gone\n\
                    not compared Secret edge-apps/db (an AgeSecret, decrypted at each site)\n";
    let (code, out, err) = diff(
        w.tmp.path(),
        &["--bundle", b2.to_str().unwrap()],
        &api.kubeconfig,
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert_eq!(out, expected, "{err}");

    // The same bundle released into a repository, read and verified from
    // there: the same report.
    w.release(&b2);
    let repo = w.repo.to_str().unwrap();
    let (code, out, err) = diff(
        w.tmp.path(),
        &["--repo", repo, "--channel", "stable"],
        &api.kubeconfig,
    );
    assert_eq!((code, out.as_str()), (1, expected), "{err}");

    // Diffing changed nothing on the cluster.
    let keep = api.json(&["-n", "edge-apps", "get", "configmap", "diff-keep"]);
    assert_eq!(keep["data"]["k"], "edited");
    api.kubectl_ok(&["-n", "edge-apps", "get", "configmap", "diff-gone"]);
    let none = api.kubectl(&["-n", "edge-apps", "get", "configmap", "diff-new"]);
    assert!(!none.status.success());

    // Another channel owns none of these objects: everything is a change,
    // nothing of `stable` is pruned.
    let (code, out, err) = diff(
        w.tmp.path(),
        &["--bundle", b1s, "--channel", "beta"],
        &api.kubeconfig,
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(!out.contains("prune "), "{out}");

    // Errors exit 2 and name what failed, escaped.
    let junk = w.path("junk\x1b[31m.bundle");
    std::fs::write(&junk, b"not a bundle").unwrap();
    let (code, out, err) = diff(
        w.tmp.path(),
        &["--bundle", junk.to_str().unwrap()],
        &api.kubeconfig,
    );
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("junk") && !err.contains('\x1b'), "{err}");
    let (code, _, err) = diff(w.tmp.path(), &["--bundle", b1s], &w.path("no-kubeconfig"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no-kubeconfig"), "{err}");
}
