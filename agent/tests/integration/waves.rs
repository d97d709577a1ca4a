//! Waves (`cairn.dev/wave`) through a real `cairn-agent` against the test
//! API server: a wave is applied and healthy (Jobs complete) before the
//! next starts, and a failed Job stops later waves and fails the release.

use crate::support::World;
use cairn_test_support::ApiServer;
use std::path::{Path, PathBuf};

fn kube_config(w: &World, kubeconfig: &Path) -> PathBuf {
    let mut c = cairn_test_support::AgentConfig::new(&w.data, &w.manifests);
    c.sources = vec![w.repo.display().to_string()];
    c.target = format!(
        "target:\n  kubernetes:\n    kubeconfig: {}\n    namespace: cairn-system\n    \
         healthTimeout: 5s\n",
        kubeconfig.display()
    );
    c.write(&w.path("agent.yaml"))
}

fn commit(w: &World, files: &[(&str, &str)], msg: &str) {
    cairn_test_support::fixture::commit_files(&w.git, files, msg, "2026-02-01T00:00:00Z")
        .expect("commit");
}

fn job(name: &str, wave: &str, image: &str) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\n  namespace: edge-apps\n  \
         annotations:\n    cairn.dev/wave: \"{wave}\"\nspec:\n  template:\n    spec:\n      \
         restartPolicy: Never\n      containers:\n      - name: m\n        image: {image}\n"
    )
}

fn configmap(name: &str, wave: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: edge-apps\n  \
         annotations:\n    cairn.dev/wave: \"{wave}\"\ndata:\n  k: v\n"
    )
}

fn rv(v: &serde_json::Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {v}"))
}

#[test]
fn waves_apply_in_order_and_a_failed_job_stops_later_waves() {
    let w = World::new(2, 1, 1);
    // Without waves the ConfigMap (core group) would be applied before
    // the Job (batch): the annotations reverse that.
    commit(
        &w,
        &[
            (
                "clusters/edge/waves/migrate.yaml",
                &job("migrate", "1", "registry.local/edge/migrate:1"),
            ),
            (
                "clusters/edge/waves/after.yaml",
                &configmap("after-migrate", "2"),
            ),
        ],
        "a migration Job in wave 1, a ConfigMap in wave 2",
    );
    let api = ApiServer::start(
        w.tmp.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--deployment-ready-delay-ms",
            "400",
        ],
    );
    api.create_namespace(w.tmp.path(), "cairn-system");
    let cfg = kube_config(&w, &api.kubeconfig);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    w.once_ok(&cfg);

    let job1 = api.json(&["-n", "edge-apps", "get", "job", "migrate"]);
    let complete = job1["status"]["conditions"]
        .as_array()
        .expect("job conditions")
        .iter()
        .any(|c| c["type"] == "Complete" && c["status"] == "True");
    assert!(complete, "{job1}");
    let cm = api.json(&["-n", "edge-apps", "get", "configmap", "after-migrate"]);
    // The Job's last write is the controller marking it complete (the
    // test server's resourceVersion is one global counter): the wave-2
    // ConfigMap was created after that.
    assert!(
        rv(&cm) > rv(&job1),
        "wave 2 created (rv {}) before the wave-1 Job completed (rv {})",
        rv(&cm),
        rv(&job1)
    );
    // Wave 0 (the fixture's Deployments) was ready before the Job started.
    let d = api.json(&["-n", "edge-apps", "get", "deployment", "app-0000"]);
    let job_created = job1["metadata"]["creationTimestamp"].as_str().unwrap_or("");
    assert!(!job_created.is_empty());
    assert!(rv(&d) < rv(&job1), "{d}");

    // Release 2: a failing Job in wave 1 stops wave 2 and fails the release.
    commit(
        &w,
        &[
            (
                "clusters/edge/waves/migrate2.yaml",
                &job("migrate-2", "1", "registry.local/edge/migrate:broken"),
            ),
            (
                "clusters/edge/waves/after2.yaml",
                &configmap("after-migrate-2", "2"),
            ),
        ],
        "a failing Job",
    );
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b2);
    let out = w.once(&cfg);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failed Job must fail the release: {log}"
    );
    assert!(
        log.contains("wave 1 failed") && log.contains("Job edge-apps/migrate-2: job failed"),
        "{log}"
    );
    let gone = api.kubectl(&["-n", "edge-apps", "get", "configmap", "after-migrate-2"]);
    assert!(
        !gone.status.success(),
        "wave 2 must not be applied after a failed Job"
    );
    let st = api.json(&["-n", "cairn-system", "get", "configmap", "cairn-status"])["data"].clone();
    assert_eq!(st["appliedSequence"], "1", "rolled back to last-good: {st}");
    assert!(
        st["failedRelease"].as_str().unwrap_or("").starts_with('2'),
        "{st}"
    );
    // The earlier waves' objects are still there.
    api.kubectl_ok(&["-n", "edge-apps", "get", "configmap", "after-migrate"]);
}

#[test]
fn a_bad_wave_annotation_is_an_error_naming_the_object() {
    let w = World::new(1, 1, 1);
    commit(
        &w,
        &[("clusters/edge/bad.yaml", &configmap("soon", "soon"))],
        "a bad wave",
    );
    let api = ApiServer::start(w.tmp.path(), &["--listen", "127.0.0.1:0"]);
    api.create_namespace(w.tmp.path(), "cairn-system");
    let cfg = kube_config(&w, &api.kubeconfig);
    let b = w.build("HEAD", "b.bundle");
    w.release(&b);
    let out = w.once(&cfg);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("ConfigMap edge-apps/soon: annotation cairn.dev/wave must be an integer"),
        "{log}"
    );
    // Nothing of the release was applied.
    let none = api.kubectl(&["-n", "edge-apps", "get", "deployment", "app-0000"]);
    assert!(!none.status.success());
}

fn plan(w: &World, bundle: &Path, kubeconfig: &Path, cfg: &Path) -> (i32, String, String) {
    cairn_test_support::run_code(
        std::process::Command::new(crate::support::agent_bin())
            .args(["plan", "--bundle"])
            .arg(bundle)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--config")
            .arg(cfg)
            .current_dir(w.tmp.path()),
    )
}

#[test]
fn plan_reports_exactly_the_changes_and_exits_like_diff() {
    let w = World::new(2, 1, 1);
    commit(
        &w,
        &[(
            "clusters/edge/plan/cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: plan-cm\n  namespace: edge-apps\ndata:\n  k: v\n",
        )],
        "a ConfigMap to change",
    );
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
    let cfg = kube_config(&w, &api.kubeconfig);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    w.once_ok(&cfg);

    // The applied bundle: nothing to do.
    let (code, out, err) = plan(&w, &b1, &api.kubeconfig, &cfg);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");

    // Change one field, add one object, remove one app.
    commit(
        &w,
        &[
            (
                "clusters/edge/plan/cm.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: plan-cm\n  namespace: edge-apps\ndata:\n  k: w\n",
            ),
            (
                "clusters/edge/plan/new.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: plan-new\n  namespace: edge-apps\ndata:\n  k: n\n",
            ),
        ],
        "change, add",
    );
    cairn_test_support::fixture::remove_and_commit(
        &w.git,
        "clusters/edge/app-0001",
        "remove app-0001",
        "2026-02-02T00:00:00Z",
    )
    .expect("git rm");
    let b2 = w.build("HEAD", "b2.bundle");
    let (code, out, err) = plan(&w, &b2, &api.kubeconfig, &cfg);
    assert_eq!(code, 1, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    let mut expected = vec![
        "create ConfigMap edge-apps/plan-new",
        "change ConfigMap edge-apps/plan-cm",
        "  /data/k: \"v\" -> \"w\"",
    ];
    let pruned: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("prune "))
        .collect();
    assert!(!pruned.is_empty(), "{out}");
    for p in &pruned {
        assert!(
            p.ends_with("edge-apps/app-0001") || p.contains("app-0001"),
            "{out}"
        );
    }
    expected.extend(pruned.iter().copied());
    assert_eq!(lines, expected, "{out}");
    // Deployment and Service of app-0001 are among them.
    assert!(
        pruned.contains(&"prune Deployment edge-apps/app-0001"),
        "{out}"
    );
    // Nothing was changed by planning.
    let cm = api.json(&["-n", "edge-apps", "get", "configmap", "plan-cm"]);
    assert_eq!(cm["data"]["k"], "v");
    api.kubectl_ok(&["-n", "edge-apps", "get", "deployment", "app-0001"]);
    let none = api.kubectl(&["-n", "edge-apps", "get", "configmap", "plan-new"]);
    assert!(!none.status.success());

    // An error (not a bundle file) exits 2 and names the file.
    let junk = w.path("junk.bundle");
    std::fs::write(&junk, b"not a bundle\x1b[31m").unwrap();
    let (code, out, err) = plan(&w, &junk, &api.kubeconfig, &cfg);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("junk.bundle") && !err.contains('\x1b'),
        "{err}"
    );
}
