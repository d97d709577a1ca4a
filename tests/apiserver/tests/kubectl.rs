//! Real `kubectl` against the in-process test API server.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use cairn_test_apiserver::Config;
use common::{eventually, Env, CRD};
use serde_json::Value;

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n";

const WIDGET: &str = r#"apiVersion: example.com/v1
kind: Widget
metadata:
  name: w1
  namespace: demo
  labels: {app: x}
spec:
  size: 3
"#;

const APP: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
  labels: {app: x}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
  labels: {app: x}
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 80
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: cfg
  namespace: demo
  labels: {app: x}
data:
  key: value
  color: blue
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: cfg2
  namespace: demo
  labels: {app: other}
data:
  k: v
"#;

async fn setup(env: &Env) {
    env.write("manifests/00-namespace.yaml", NS);
    env.write("manifests/01-crd.yaml", CRD);
    env.write("manifests/02-widget.yaml", WIDGET);
    env.write("manifests/03-app.yaml", APP);
    let dir = env.path("manifests");
    // Like against a real cluster, the custom object cannot be mapped before its
    // CRD exists, so the first pass may fail for it; a second pass succeeds.
    let first = env.kubectl(&["apply", "--server-side", "-f", &dir]).await;
    assert!(
        first.stdout.contains("namespace/demo serverside-applied"),
        "{first:?}"
    );
    assert!(first.stdout.contains(
        "customresourcedefinition.apiextensions.k8s.io/widgets.example.com serverside-applied"
    ));
    let established = eventually(Duration::from_secs(10), || async {
        let o = env
            .kubectl(&[
                "get",
                "crd",
                "widgets.example.com",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
            ])
            .await;
        (o.stdout.trim() == "True").then_some(())
    })
    .await;
    assert!(established.is_some(), "CRD never became Established");
    let second = env.ok(&["apply", "--server-side", "-f", &dir]).await;
    for line in [
        "widget.example.com/w1 serverside-applied",
        "deployment.apps/web serverside-applied",
        "service/web serverside-applied",
        "configmap/cfg serverside-applied",
    ] {
        assert!(second.contains(line), "missing {line:?} in {second}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_label_patch_delete() {
    let env = Env::default().await;
    setup(&env).await;

    // Table output of each kind, including the custom resource.
    let table = env
        .ok(&["get", "deploy,svc,cm,widgets", "-n", "demo"])
        .await;
    for needle in [
        "deployment.apps/web",
        "service/web",
        "configmap/cfg",
        "widget.example.com/w1",
        "ClusterIP",
        "SIZE",
    ] {
        assert!(table.contains(needle), "missing {needle:?} in\n{table}");
    }
    let ns = env.ok(&["get", "ns"]).await;
    assert!(ns.contains("demo") && ns.contains("Active"), "{ns}");
    let crds = env.ok(&["get", "crd"]).await;
    assert!(crds.contains("widgets.example.com"), "{crds}");
    let wd = env.ok(&["get", "wd", "-n", "demo"]).await;
    assert!(
        wd.lines().any(|l| l.starts_with("w1") && l.contains('3')),
        "{wd}"
    );

    // JSON output of each kind.
    let w = env
        .json(&["get", "widget", "w1", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(w["spec"]["size"], 3);
    assert_eq!(w["apiVersion"], "example.com/v1");
    let d = env
        .json(&["get", "deployment", "web", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.27"
    );
    assert!(d["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert_eq!(d["metadata"]["generation"], 1);
    let s = env
        .json(&["get", "svc", "web", "-n", "demo", "-o", "json"])
        .await;
    assert!(s["spec"]["clusterIP"]
        .as_str()
        .is_some_and(|ip| ip.starts_with("10.96.")));
    let list = env.json(&["get", "cm", "-n", "demo", "-o", "json"]).await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, vec!["cfg", "cfg2"]);

    // Label selectors.
    let sel = env
        .ok(&["get", "cm", "-n", "demo", "-l", "app=x", "-o", "name"])
        .await;
    assert_eq!(sel.trim(), "configmap/cfg");
    let sel = env
        .ok(&["get", "cm", "-n", "demo", "-l", "app!=x", "-o", "name"])
        .await;
    assert_eq!(sel.trim(), "configmap/cfg2");
    let sel = env
        .ok(&[
            "get",
            "cm",
            "-n",
            "demo",
            "-l",
            "app in (x,other)",
            "-o",
            "name",
        ])
        .await;
    assert_eq!(sel.lines().count(), 2, "{sel}");
    let sel = env
        .ok(&[
            "get",
            "deploy,svc,cm,widgets",
            "-A",
            "-l",
            "app=x",
            "-o",
            "name",
        ])
        .await;
    let mut got: Vec<&str> = sel.lines().collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            "configmap/cfg",
            "deployment.apps/web",
            "service/web",
            "widget.example.com/w1"
        ]
    );
    let none = env
        .ok(&["get", "cm", "-n", "demo", "-l", "app=nope", "-o", "name"])
        .await;
    assert!(none.trim().is_empty());

    // kubectl patch: default (strategic), merge, json.
    env.ok(&[
        "patch",
        "cm",
        "cfg",
        "-n",
        "demo",
        "-p",
        r#"{"data":{"key":"patched"}}"#,
    ])
    .await;
    let cm = env
        .json(&["get", "cm", "cfg", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(cm["data"]["key"], "patched");
    assert_eq!(cm["data"]["color"], "blue");
    env.ok(&[
        "patch",
        "widget",
        "w1",
        "-n",
        "demo",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"size":5}}"#,
    ])
    .await;
    let w = env
        .json(&["get", "widget", "w1", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(w["spec"]["size"], 5);
    assert_eq!(w["metadata"]["generation"], 2);
    env.ok(&[
        "patch",
        "deploy",
        "web",
        "-n",
        "demo",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"nginx:1.28"}]}}}}"#,
    ])
    .await;
    let d = env
        .json(&["get", "deploy", "web", "-n", "demo", "-o", "json"])
        .await;
    let containers = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0]["image"], "nginx:1.28");
    assert_eq!(
        containers[0]["ports"][0]["containerPort"], 80,
        "strategic merge keeps other container fields"
    );
    env.ok(&[
        "patch",
        "deploy",
        "web",
        "-n",
        "demo",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":3}]"#,
    ])
    .await;
    let d = env
        .json(&["get", "deploy", "web", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(d["spec"]["replicas"], 3);

    // kubectl label / annotate (merge patches).
    env.ok(&["label", "cm", "cfg2", "-n", "demo", "tier=db"])
        .await;
    let sel = env
        .ok(&["get", "cm", "-n", "demo", "-l", "tier", "-o", "name"])
        .await;
    assert_eq!(sel.trim(), "configmap/cfg2");

    // Delete.
    let out = env.ok(&["delete", "cm", "cfg2", "-n", "demo"]).await;
    assert!(out.contains("configmap \"cfg2\" deleted"), "{out}");
    let gone = env.kubectl(&["get", "cm", "cfg2", "-n", "demo"]).await;
    assert!(!gone.ok);
    assert!(
        gone.stderr.contains("NotFound") && gone.stderr.contains("configmaps \"cfg2\" not found"),
        "{}",
        gone.stderr
    );
    env.ok(&["delete", "widget", "w1", "-n", "demo"]).await;
    let list = env
        .json(&["get", "widgets", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0));

    // Deleting the CRD stops serving the kind.
    env.ok(&["delete", "crd", "widgets.example.com"]).await;
    let gone = env.kubectl(&["get", "widgets", "-n", "demo"]).await;
    assert!(!gone.ok, "widgets still served");

    // Namespaced objects need their namespace.
    let o = env
        .kubectl_stdin(
            &["apply", "--server-side", "-f", "-"],
            Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: nowhere}\n"),
        )
        .await;
    assert!(
        !o.ok && o.stderr.contains("namespaces \"nowhere\" not found"),
        "{}",
        o.stderr
    );

    // Deleting the namespace removes its contents.
    env.ok(&["delete", "ns", "demo"]).await;
    let o = env.kubectl(&["get", "cm", "cfg", "-n", "demo"]).await;
    assert!(!o.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_conflicts_and_force() {
    let env = Env::default().await;
    setup(&env).await;
    let theirs = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\n  namespace: demo\ndata:\n  color: red\n";
    env.write("other/cm.yaml", theirs);
    let path = env.path("other/cm.yaml");

    let o = env
        .kubectl(&[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "-f",
            &path,
        ])
        .await;
    assert!(!o.ok, "conflicting apply must fail");
    assert!(o.stderr.contains("conflict"), "{}", o.stderr);
    assert!(
        o.stderr.contains(r#"conflict with "kubectl""#),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains(".data.color"), "{}", o.stderr);
    let cm = env
        .json(&["get", "cm", "cfg", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(
        cm["data"]["color"], "blue",
        "a failed apply changes nothing"
    );

    let out = env
        .ok(&[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "--force-conflicts",
            "-f",
            &path,
        ])
        .await;
    assert!(out.contains("configmap/cfg serverside-applied"));
    let cm = env
        .json(&[
            "get",
            "cm",
            "cfg",
            "-n",
            "demo",
            "-o",
            "json",
            "--show-managed-fields",
        ])
        .await;
    assert_eq!(cm["data"]["color"], "red");
    assert_eq!(cm["data"]["key"], "value");
    let mf = cm["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields");
    let entry = |m: &str| {
        mf.iter()
            .find(|e| e["manager"] == m && e["operation"] == "Apply")
            .cloned()
            .unwrap_or(Value::Null)
    };
    let other = entry("other");
    assert_eq!(other["fieldsType"], "FieldsV1");
    assert!(
        other["fieldsV1"]["f:data"]["f:color"].is_object(),
        "{other}"
    );
    let kubectl = entry("kubectl");
    assert!(
        kubectl["fieldsV1"]["f:data"]["f:key"].is_object(),
        "{kubectl}"
    );
    assert!(
        kubectl["fieldsV1"]["f:data"].get("f:color").is_none(),
        "ownership moved: {kubectl}"
    );
    assert!(kubectl["fieldsV1"]["f:metadata"]["f:labels"]["f:app"].is_object());

    // The first manager re-applying without the field it lost keeps it (now
    // owned by "other"); dropping a field it still owns removes it.
    let mine = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\n  namespace: demo\n  labels: {app: x}\ndata:\n  color: red\n";
    env.write("mine/cm.yaml", mine);
    env.ok(&["apply", "--server-side", "-f", &env.path("mine/cm.yaml")])
        .await;
    let cm = env
        .json(&["get", "cm", "cfg", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(
        cm["data"].get("key"),
        None,
        "field dropped by its only manager is removed"
    );
    assert_eq!(cm["data"]["color"], "red");

    // An Update manager (kubectl patch) also causes conflicts.
    env.ok(&[
        "patch",
        "cm",
        "cfg",
        "-n",
        "demo",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"color":"green"}}"#,
    ])
    .await;
    let o = env
        .kubectl(&[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "-f",
            &path,
        ])
        .await;
    assert!(!o.ok && o.stderr.contains("kubectl-patch"), "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rules_reach_kubectl_as_forbidden() {
    let env = Env::start(Config {
        deny: vec!["Secret".into()],
        ..Config::default()
    })
    .await;
    let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: default}\nstringData: {a: b}\n";
    let o = env
        .kubectl_stdin(&["apply", "--server-side", "-f", "-"], Some(secret))
        .await;
    assert!(!o.ok);
    assert!(
        o.stderr.contains("Forbidden") || o.stderr.contains("forbidden"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains(r#"secrets "s" is forbidden: User "system:serviceaccount:cairn-system:cairn" cannot patch resource "secrets" in API group "" in the namespace "default""#),
        "{}",
        o.stderr
    );
    let o = env
        .kubectl_stdin(&["create", "-f", "-"], Some(secret))
        .await;
    assert!(
        !o.ok && o.stderr.contains("cannot create resource \"secrets\""),
        "{}",
        o.stderr
    );
    // Reads are allowed by default.
    let list = env.ok(&["get", "secrets"]).await;
    assert!(!list.contains("forbidden"));

    // Runtime rules, including reads.
    env.server.deny("apps/Deployment:all").expect("rule");
    let o = env.kubectl(&["get", "deployments", "-A"]).await;
    assert!(
        !o.ok && o.stderr.contains("Forbidden") && o.stderr.contains("at the cluster scope"),
        "{}",
        o.stderr
    );
    env.server.clear_denies();
    env.ok(&["get", "deployments", "-A"]).await;
    let o = env
        .kubectl_stdin(&["apply", "--server-side", "-f", "-"], Some(secret))
        .await;
    assert!(o.ok, "{}", o.stderr);
    let s = env.json(&["get", "secret", "s", "-o", "json"]).await;
    assert_eq!(s["data"]["a"], "Yg==", "stringData is encoded into data");
    assert_eq!(s["type"], "Opaque");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_status_and_jobs() {
    let env = Env::default().await;
    let manifest = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: good, namespace: default}
spec:
  selector: {matchLabels: {app: good}}
  template:
    metadata: {labels: {app: good}}
    spec:
      containers: [{name: c, image: nginx}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad, namespace: default}
spec:
  selector: {matchLabels: {app: bad}}
  template:
    metadata: {labels: {app: bad}}
    spec:
      containers: [{name: c, image: registry.local/broken:1}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: ok-job, namespace: default}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: bad-job, namespace: default}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: broken-image}]
"#;
    env.kubectl_stdin(&["apply", "--server-side", "-f", "-"], Some(manifest))
        .await;
    let o = env
        .ok(&["rollout", "status", "deployment/good", "--timeout=30s"])
        .await;
    assert!(o.contains("successfully rolled out"), "{o}");
    env.ok(&[
        "wait",
        "--for=condition=complete",
        "job/ok-job",
        "--timeout=30s",
    ])
    .await;
    env.ok(&[
        "wait",
        "--for=condition=failed",
        "job/bad-job",
        "--timeout=30s",
    ])
    .await;
    let o = env
        .kubectl(&["rollout", "status", "deployment/bad", "--timeout=2s"])
        .await;
    assert!(!o.ok, "broken deployment must not roll out");
    let d = env.json(&["get", "deploy", "bad", "-o", "json"]).await;
    let available = d["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Available"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(available["status"], "False", "{d}");
    assert_eq!(d["status"].get("availableReplicas"), None);
    // kubectl scale goes through the scale subresource.
    let o = env.ok(&["scale", "deployment/good", "--replicas=3"]).await;
    assert!(o.contains("deployment.apps/good scaled"), "{o}");
    let ready = eventually(Duration::from_secs(20), || async {
        let d = env.json(&["get", "deploy", "good", "-o", "json"]).await;
        (d["spec"]["replicas"] == 3
            && d["status"]["readyReplicas"] == 3
            && d["metadata"]["generation"] == 2)
            .then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "scaled deployment becomes ready with 3 replicas"
    );
    let table = env.ok(&["get", "jobs"]).await;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("ok-job") && l.contains("Complete")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("bad-job") && l.contains("Failed")),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_prints_events() {
    let env = Env::default().await;
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .arg("--cache-dir")
        .arg(env.dir.path().join("cache"))
        .args([
            "get",
            "cm",
            "-w",
            "--output-watch-events",
            "--request-timeout=5s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("kubectl");
    tokio::time::sleep(Duration::from_millis(800)).await;
    env.kubectl_stdin(
        &["apply", "--server-side", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: watched}\ndata: {a: b}\n"),
    )
    .await;
    env.ok(&["delete", "cm", "watched"]).await;
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("watch ends after its timeout")
        .expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ADDED") && l.contains("watched")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("DELETED") && l.contains("watched")),
        "{stdout}"
    );
}
