//! The Kubernetes target end to end: real `cairn-agent` processes against
//! the test API server (`cairn-test-apiserver`), checked with real `kubectl`.

use crate::support::{ok, World};
use cairn_test_support::ApiServer;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The test API server on `listen`, refusing the `deny` kinds.
fn api_server(dir: &Path, listen: &str, deny: &[&str]) -> ApiServer {
    let mut args = vec!["--listen", listen, "--deployment-ready-delay-ms", "100"];
    for d in deny {
        args.extend(["--deny", d]);
    }
    ApiServer::start(dir, &args)
}

/// Writes an agent config with a Kubernetes target.
fn kube_config(w: &World, name: &str, kubeconfig: &Path, extra: &str) -> PathBuf {
    let mut c = cairn_test_support::AgentConfig::new(&w.data, &w.manifests);
    c.sources = vec![w.repo.display().to_string()];
    c.target = format!(
        "target:\n  kubernetes:\n    kubeconfig: {}\n    namespace: cairn-system\n    \
         healthTimeout: 5s\n",
        kubeconfig.display()
    );
    c.extra = extra.to_owned();
    c.write(&w.path(name))
}

fn commit(w: &World, files: &[(&str, &str)], msg: &str) {
    cairn_test_support::fixture::commit_files(&w.git, files, msg, "2026-02-01T00:00:00Z")
        .expect("commit");
}

fn git_rm(w: &World, path: &str) {
    cairn_test_support::fixture::remove_and_commit(
        &w.git,
        path,
        &format!("remove {path}"),
        "2026-02-02T00:00:00Z",
    )
    .expect("git rm and commit");
}

fn status_cm(api: &ApiServer) -> serde_json::Value {
    api.json(&["-n", "cairn-system", "get", "configmap", "cairn-status"])["data"].clone()
}

#[test]
fn applies_updates_prunes_corrects_drift_and_rolls_back() {
    let w = World::new(3, 2, 1);
    let api = api_server(w.tmp.path(), "127.0.0.1:0", &[]);
    api.create_namespace(w.tmp.path(), "cairn-system");
    let cfg = kube_config(&w, "agent.yaml", &api.kubeconfig, "");

    // Release 1: everything, CRD and custom object included.
    let b1 = w.build("HEAD~1", "b1.bundle");
    w.release(&b1);
    w.once_ok(&cfg);
    let deploys = api.json(&[
        "-n",
        "edge-apps",
        "get",
        "deployments",
        "--show-managed-fields",
    ]);
    assert_eq!(deploys["items"].as_array().unwrap().len(), 3);
    let d0 = &deploys["items"][0];
    assert_eq!(
        d0["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "cairn"
    );
    assert_eq!(d0["metadata"]["labels"]["cairn.dev/channel"], "stable");
    let managers: Vec<&str> = d0["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert!(managers.contains(&"cairn"), "{managers:?}");
    assert_eq!(
        api.json(&["-n", "edge-apps", "get", "services"])["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let sensor = api.json(&["-n", "edge-apps", "get", "sensors", "thermometer"]);
    assert_eq!(sensor["spec"]["unit"], "celsius");
    let table = api.kubectl_ok(&["get", "crd", "sensors.edge.example.com"]);
    assert!(table.contains("sensors.edge.example.com"), "{table}");
    let st = status_cm(&api);
    assert_eq!(st["appliedSequence"], "1");
    assert_eq!(st["health"], "Healthy");

    // Release 2: commit 2 bumps app-0000's ConfigMap; also drop app-0002.
    git_rm(&w, "clusters/edge/app-0002");
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b2);
    w.once_ok(&cfg);
    let cm = api.json(&["-n", "edge-apps", "get", "configmap", "app-0000-config"]);
    assert_eq!(cm["data"]["version"], "2");
    let gone = api.kubectl(&["-n", "edge-apps", "get", "deployment", "app-0002"]);
    assert!(!gone.status.success(), "app-0002 should be pruned");
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    assert_eq!(status_cm(&api)["appliedSequence"], "2");

    // Drift: a manual patch to a managed field and a manual delete.
    api.kubectl_ok(&[
        "-n",
        "edge-apps",
        "patch",
        "configmap",
        "app-0001-config",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"version":"hand-edited"}}"#,
    ]);
    api.kubectl_ok(&["-n", "edge-apps", "delete", "service", "app-0000"]);
    w.once_ok(&cfg);
    let cm = api.json(&["-n", "edge-apps", "get", "configmap", "app-0001-config"]);
    assert_eq!(cm["data"]["version"], "1");
    api.kubectl_ok(&["-n", "edge-apps", "get", "service", "app-0000"]);
    let drift: u64 = status_cm(&api)["driftCorrections"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(drift >= 2, "drift corrections counted: {drift}");

    // Release 3: a broken image never becomes available: rolled back.
    let dep =
        std::fs::read_to_string(w.git.join("clusters/edge/app-0001/deployment.yaml")).unwrap();
    let broken = dep.replace(
        "registry.local/edge/app-0001:1.0.0",
        "registry.local/edge/app-0001:broken",
    );
    assert_ne!(dep, broken);
    commit(
        &w,
        &[("clusters/edge/app-0001/deployment.yaml", &broken)],
        "break app-0001",
    );
    let b3 = w.build("HEAD", "b3.bundle");
    w.release(&b3);
    let out = w.once(&cfg);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failed release must not report success: {log}"
    );
    let d1 = api.json(&["-n", "edge-apps", "get", "deployment", "app-0001"]);
    assert_eq!(
        d1["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.local/edge/app-0001:1.0.0",
        "rolled back to the last-good image"
    );
    let st = status_cm(&api);
    assert_eq!(st["appliedSequence"], "2", "{st}");
    assert!(
        st["failedRelease"].as_str().unwrap_or("").starts_with('3'),
        "{st}"
    );
    // The failed release is not retried until a newer one arrives.
    let out = w.once(&cfg);
    let d1 = api.json(&["-n", "edge-apps", "get", "deployment", "app-0001"]);
    assert_eq!(
        d1["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.local/edge/app-0001:1.0.0"
    );
    drop(out);
}

#[test]
fn forbidden_kind_is_reported_per_object_and_the_rest_applies() {
    let w = World::new(2, 1, 1);
    let secret = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: token\n  namespace: edge-apps\nstringData:\n  t: x\n";
    commit(&w, &[("clusters/edge/secret.yaml", secret)], "add a secret");
    let api = api_server(w.tmp.path(), "127.0.0.1:0", &["Secret"]);
    api.create_namespace(w.tmp.path(), "cairn-system");
    let cfg = kube_config(&w, "agent.yaml", &api.kubeconfig, "");
    let b = w.build("HEAD", "b.bundle");
    w.release(&b);
    let out = w.once(&cfg);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        log.contains("Secret edge-apps/token") && log.contains("403"),
        "{log}"
    );
    // Everything else is there.
    assert_eq!(
        api.json(&["-n", "edge-apps", "get", "deployments"])["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let errors = status_cm(&api)["errors"].as_str().unwrap_or("").to_owned();
    assert!(errors.contains("Secret edge-apps/token: 403"), "{errors}");
}

#[test]
fn agent_started_with_the_api_server_down_converges_when_it_comes_up() {
    let w = World::new(2, 1, 1);
    // Reserve a port, write a kubeconfig pointing at it, start nothing yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let kubeconfig = w.path("kubeconfig");
    let b = w.build("HEAD", "b.bundle");
    w.release(&b);
    // A placeholder kubeconfig; the API server overwrites it with the same server URL.
    std::fs::write(&kubeconfig, format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: http://{listen}\n\
         contexts:\n- name: t\n  context:\n    cluster: t\n    user: t\ncurrent-context: t\nusers:\n- name: t\n  user: {{}}\n"
    )).unwrap();
    let cfg = kube_config(&w, "agent.yaml", &kubeconfig, "");
    let mut agent = w.spawn(&cfg, "agent.log");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent keeps running: {}",
        w.log("agent.log")
    );
    let api = api_server(w.tmp.path(), &listen, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = api.kubectl(&["-n", "edge-apps", "get", "deployments", "-o", "json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["items"].as_array().map_or(0, Vec::len) == 2 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no convergence: {}",
            w.log("agent.log")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = ok;
}
