//! Per-site rendering through real agent processes (docs/SITES.md): the
//! same release renders differently at two sites, an out-of-pattern value
//! blocks adoption, and an AgeSecret made by Debian's `age` CLI is applied
//! decrypted where the key is and refused per object elsewhere — first on
//! the manifests-dir target, then on the Kubernetes target against one test
//! API server per site, read back with kubectl.

use crate::support::*;
use cairn_test_support::AgentConfig;
use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const VALUES: &str = "apiVersion: cairn.dev/v1alpha1\nkind: CairnValues\nmetadata:\n  name: site\nvariables:\n  - name: replicas\n    default: \"1\"\n    pattern: \"[0-9]{1,2}\"\n  - name: label:region\n    pattern: \"[a-z]+\"\n";
const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: site-settings\n  namespace: default\ndata:\n  region: \"${label:region}\"\n  replicas: \"${replicas}\"\n  literal: \"$${replicas}\"\n";

/// One site: its own data and manifests directories, labels and values.
fn site_config(
    w: &World,
    name: &str,
    region: &str,
    values: &str,
    extra: &str,
) -> std::path::PathBuf {
    let dir = w.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    let values_file = dir.join("values.yaml");
    std::fs::write(&values_file, values).unwrap();
    let mut c = AgentConfig::new(&dir.join("data"), &dir.join("manifests"));
    c.labels = Some(format!("{{region: {region}}}"));
    c.sources = vec![w.repo.display().to_string()];
    c.extra = format!("valuesFile: {}\n{extra}", values_file.display());
    c.write(&dir.join("agent.yaml"))
}

fn manifests(w: &World, name: &str) -> String {
    let mut all = String::new();
    let dir = w.path(name).join("manifests");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if !e.file_name().to_string_lossy().starts_with('.') {
            all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            all.push('\n');
        }
    }
    all
}

fn site_status(w: &World, name: &str) -> cairn_agent::status::Status {
    status_in(&w.path(name).join("data")).expect("status written")
}

#[test]

fn two_sites_render_one_release_differently_and_a_bad_value_blocks() {
    let w = World::new(1, 1, 1);
    std::fs::write(w.git.join("cairn-values.yaml"), VALUES).unwrap();
    std::fs::write(w.git.join("site-settings.yaml"), CM).unwrap();
    git(&w.git, &["add", "-A"]);
    git(&w.git, &["commit", "-qm", "site values"]);
    let bundle = w.build("HEAD", "b.cbundle");
    w.release(&bundle);

    let eu = site_config(&w, "eu", "eu", "replicas: 3\n", "");
    let us = site_config(&w, "us", "us", "other: x\n", "");
    w.once_ok(&eu);
    w.once_ok(&us);
    let (a, b) = (manifests(&w, "eu"), manifests(&w, "us"));
    assert!(
        a.contains("\"region\":\"eu\"") || a.contains("region: eu"),
        "{a}"
    );
    assert!(
        a.contains("\"replicas\":\"3\"")
            || a.contains("replicas: '3'")
            || a.contains("replicas: \"3\""),
        "{a}"
    );
    assert!(
        b.contains("\"region\":\"us\"") || b.contains("region: us"),
        "{b}"
    );
    assert!(
        b.contains("\"replicas\":\"1\"")
            || b.contains("replicas: '1'")
            || b.contains("replicas: \"1\""),
        "{b}"
    );
    assert!(
        a.contains("${replicas}") && !a.contains("$${replicas}"),
        "{a}"
    );
    assert!(
        !a.contains("CairnValues") && !b.contains("CairnValues"),
        "{a}"
    );
    let (sa, sb) = (site_status(&w, "eu"), site_status(&w, "us"));
    let da = sa
        .reconcile
        .as_ref()
        .and_then(|r| r.site.as_ref())
        .and_then(|s| s.values_digest.clone());
    let db = sb
        .reconcile
        .as_ref()
        .and_then(|r| r.site.as_ref())
        .and_then(|s| s.values_digest.clone());
    assert!(da.is_some() && db.is_some() && da != db, "{da:?} {db:?}");

    let bad = site_config(&w, "bad", "eu", "replicas: many\n", "");
    let _ = w.once(&bad);
    let st = site_status(&w, "bad");
    let rej = st.last_rejection.expect("rejected");
    assert_eq!(rej.reason, "site-values");
    assert!(
        rej.message.contains("variable `replicas`: value `many`")
            && rej.message.contains("does not match its pattern"),
        "{}",
        rej.message
    );
    assert!(
        !manifests(&w, "bad").contains("site-settings"),
        "nothing applied"
    );
}

#[test]

fn an_age_cli_secret_is_applied_where_the_key_is_and_refused_elsewhere() {
    let w = World::new(1, 1, 1);
    let key = w.path("site.key");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .expect("age-keygen (Debian package age)");
    assert!(out.status.success());
    let public = String::from_utf8(
        Command::new("age-keygen")
            .arg("-y")
            .arg(&key)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let plain = w.path("secret.yaml");
    std::fs::write(&plain, "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: default\nstringData:\n  password: hunter2\n").unwrap();
    let enc = Command::new("age")
        .args(["-a", "-r", public.trim()])
        .arg(&plain)
        .output()
        .unwrap();
    assert!(
        enc.status.success(),
        "{}",
        String::from_utf8_lossy(&enc.stderr)
    );
    let armored = String::from_utf8(enc.stdout).unwrap();
    let indented: String = armored.lines().map(|l| format!("  {l}\n")).collect();
    std::fs::write(
        w.git.join("db.age.yaml"),
        format!("apiVersion: cairn.dev/v1alpha1\nkind: AgeSecret\nmetadata:\n  name: db\n  namespace: default\nciphertext: |\n{indented}"),
    )
    .unwrap();
    git(&w.git, &["add", "-A"]);
    git(&w.git, &["commit", "-qm", "secret"]);
    let bundle = w.build("HEAD", "b.cbundle");
    w.release(&bundle);

    let with = site_config(
        &w,
        "with",
        "eu",
        "{}\n",
        &format!("ageIdentityFile: {}\n", key.display()),
    );
    let without = site_config(&w, "without", "us", "{}\n", "");
    let _ = w.once(&with);
    let _ = w.once(&without);
    let a = manifests(&w, "with");
    assert!(a.contains("hunter2") && a.contains("Secret"), "{a}");
    assert!(!a.contains("AGE ENCRYPTED"), "{a}");
    let b = manifests(&w, "without");
    assert!(
        !b.contains("hunter2") && !b.contains("AGE ENCRYPTED"),
        "{b}"
    );
    assert!(!b.trim().is_empty(), "the rest of the release applies");
    let st = site_status(&w, "without");
    let errs = st
        .reconcile
        .and_then(|r| r.site)
        .map(|s| s.object_errors)
        .unwrap_or_default();
    assert!(
        errs.iter()
            .any(|e| e.contains("AgeSecret default/db") && e.contains("no ageIdentityFile")),
        "{errs:?}"
    );
}

// ---- The same, through the Kubernetes target against the test API server.

/// One site with its own test API server (a cluster per site): labels,
/// values file and extra config lines as in [`site_config`], the
/// Kubernetes target instead of the manifests directory.
fn kube_site(
    w: &World,
    name: &str,
    region: &str,
    values: &str,
    extra: &str,
) -> (std::path::PathBuf, cairn_test_support::ApiServer) {
    let dir = w.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    let api = cairn_test_support::ApiServer::start(
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--deployment-ready-delay-ms",
            "100",
        ],
    );
    api.create_namespace(&dir, "cairn-system");
    let values_file = dir.join("values.yaml");
    std::fs::write(&values_file, values).unwrap();
    let mut c = AgentConfig::new(&dir.join("data"), &dir.join("manifests"));
    c.labels = Some(format!("{{region: {region}}}"));
    c.sources = vec![w.repo.display().to_string()];
    c.target = format!(
        "target:\n  kubernetes:\n    kubeconfig: {}\n    namespace: cairn-system\n    \
         healthTimeout: 20s\n",
        api.kubeconfig.display()
    );
    c.extra = format!("valuesFile: {}\n{extra}", values_file.display());
    (c.write(&dir.join("agent.yaml")), api)
}

/// `cairn-agent status --config CFG` (the text an operator reads).
fn status_text(cfg: &Path) -> String {
    ok(Command::new(agent_bin())
        .args(["status", "--config"])
        .arg(cfg))
}

#[test]
fn on_kubernetes_two_sites_render_one_release_differently_and_a_bad_value_blocks() {
    let w = World::new(1, 1, 1);
    std::fs::write(w.git.join("cairn-values.yaml"), VALUES).unwrap();
    std::fs::write(w.git.join("site-settings.yaml"), CM).unwrap();
    git(&w.git, &["add", "-A"]);
    git(&w.git, &["commit", "-qm", "site values"]);
    let bundle = w.build("HEAD", "b.cbundle");
    w.release(&bundle);

    let (eu, eu_api) = kube_site(&w, "eu", "eu", "replicas: 3\n", "");
    let (us, us_api) = kube_site(&w, "us", "us", "other: x\n", "");
    w.once_ok(&eu);
    w.once_ok(&us);
    // Read back from each cluster with kubectl.
    let a = eu_api.json(&["-n", "default", "get", "configmap", "site-settings"]);
    let b = us_api.json(&["-n", "default", "get", "configmap", "site-settings"]);
    assert_eq!(a["data"]["region"], "eu", "{a}");
    assert_eq!(a["data"]["replicas"], "3", "{a}");
    assert_eq!(a["data"]["literal"], "${replicas}", "{a}");
    assert_eq!(b["data"]["region"], "us", "{b}");
    assert_eq!(b["data"]["replicas"], "1", "{b}");
    assert_eq!(b["data"]["literal"], "${replicas}", "{b}");
    // The declaration itself is not a Kubernetes object.
    let decl = eu_api.kubectl(&["get", "cairnvalues"]);
    assert!(!decl.status.success());
    // Each status shows its own values digest.
    let digest = |name: &str| {
        site_status(&w, name)
            .reconcile
            .and_then(|r| r.site)
            .and_then(|s| s.values_digest)
            .expect("values digest in status")
    };
    let (da, db) = (digest("eu"), digest("us"));
    assert!(da.starts_with("sha256:") && da != db, "{da} {db}");
    let text = status_text(&eu);
    assert!(
        text.lines()
            .any(|l| l.starts_with("values ") && l.ends_with(&da)),
        "{text}"
    );

    // An out-of-pattern value: the release is not adopted, status says
    // which variable and why, and nothing reaches the cluster.
    let (bad, bad_api) = kube_site(&w, "bad", "eu", "replicas: many\n", "");
    let _ = w.once(&bad);
    let st = site_status(&w, "bad");
    let rej = st.last_rejection.expect("rejected");
    assert_eq!(rej.reason, "site-values");
    assert!(
        rej.message.contains("variable `replicas`: value `many`")
            && rej.message.contains("does not match its pattern"),
        "{}",
        rej.message
    );
    assert!(st.adopted.is_none(), "not adopted: {:?}", st.adopted);
    let text = status_text(&bad);
    assert!(
        text.contains("last rejection  site-values") && text.contains("does not match its pattern"),
        "{text}"
    );
    let none = bad_api.kubectl(&["-n", "default", "get", "configmap", "site-settings"]);
    assert!(!none.status.success());
    let none = bad_api.kubectl(&["-n", "edge-apps", "get", "deployment", "app-0000"]);
    assert!(!none.status.success(), "nothing of the release applied");
}

#[test]
fn on_kubernetes_an_age_cli_secret_is_applied_decrypted_where_the_key_is_and_refused_elsewhere() {
    let w = World::new(1, 1, 1);
    let key = w.path("site.key");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .expect("age-keygen (Debian package age)");
    assert!(out.status.success());
    let public = String::from_utf8(
        Command::new("age-keygen")
            .arg("-y")
            .arg(&key)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let plain = w.path("secret.yaml");
    std::fs::write(&plain, "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: default\nstringData:\n  password: hunter2\n").unwrap();
    // Encrypted with Debian's `age` CLI, not Cairn's.
    let enc = Command::new("age")
        .args(["-a", "-r", public.trim()])
        .arg(&plain)
        .output()
        .expect("age (Debian package age)");
    assert!(
        enc.status.success(),
        "{}",
        String::from_utf8_lossy(&enc.stderr)
    );
    let armored = String::from_utf8(enc.stdout).unwrap();
    let indented: String = armored.lines().map(|l| format!("  {l}\n")).collect();
    std::fs::write(
        w.git.join("db.age.yaml"),
        format!("apiVersion: cairn.dev/v1alpha1\nkind: AgeSecret\nmetadata:\n  name: db\n  namespace: default\nciphertext: |\n{indented}"),
    )
    .unwrap();
    git(&w.git, &["add", "-A"]);
    git(&w.git, &["commit", "-qm", "secret"]);
    let bundle = w.build("HEAD", "b.cbundle");
    w.release(&bundle);

    let (with, with_api) = kube_site(
        &w,
        "with",
        "eu",
        "{}\n",
        &format!("ageIdentityFile: {}\n", key.display()),
    );
    let (without, without_api) = kube_site(&w, "without", "us", "{}\n", "");
    w.once_ok(&with);
    let _ = w.once(&without);

    // Applied decrypted: a Secret with the plaintext (base64 in `data`).
    let s = with_api.json(&["-n", "default", "get", "secret", "db"]);
    assert_eq!(s["data"]["password"], "aHVudGVyMg==", "{s}");
    assert!(!s.to_string().contains("AGE ENCRYPTED"), "{s}");
    with_api.kubectl_ok(&["-n", "edge-apps", "get", "deployment", "app-0000"]);

    // Without the key: that object is refused, the rest of the release applies.
    let none = without_api.kubectl(&["-n", "default", "get", "secret", "db"]);
    assert!(!none.status.success(), "no Secret without the key");
    without_api.kubectl_ok(&["-n", "edge-apps", "get", "deployment", "app-0000"]);
    without_api.kubectl_ok(&["-n", "edge-apps", "get", "service", "app-0000"]);
    let st = site_status(&w, "without");
    assert_eq!(
        st.adopted.as_ref().map(|a| a.sequence),
        Some(1),
        "the release is adopted"
    );
    let errs = st
        .reconcile
        .and_then(|r| r.site)
        .map(|s| s.object_errors)
        .unwrap_or_default();
    assert!(
        errs.len() == 1
            && errs[0].contains("AgeSecret default/db")
            && errs[0].contains("no ageIdentityFile"),
        "{errs:?}"
    );
    let text = status_text(&without);
    assert!(
        text.lines()
            .any(|l| l.starts_with("not applied") && l.contains("AgeSecret default/db")),
        "{text}"
    );
}

/// Two meshed agents with different values: each gossips the digest of
/// its values in its signed status record, and `cairn fleet status` shows
/// both (JSON and table), equal to what each agent's own status says.
#[test]
fn the_values_digest_is_gossiped_and_shown_by_fleet_status() {
    let w = World::new(1, 1, 1);
    std::fs::write(
        w.git.join("cairn-values.yaml"),
        "apiVersion: cairn.dev/v1alpha1\nkind: CairnValues\nmetadata:\n  name: site\nvariables:\n  - name: replicas\n    default: \"1\"\n    pattern: \"[0-9]{1,2}\"\n  - name: label:site\n    pattern: \"s[0-9]+\"\n",
    )
    .unwrap();
    std::fs::write(
        w.git.join("site-settings.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: site-settings\n  namespace: default\ndata:\n  site: \"${label:site}\"\n  replicas: \"${replicas}\"\n",
    )
    .unwrap();
    git(&w.git, &["add", "-A"]);
    git(&w.git, &["commit", "-qm", "site values"]);
    let bundle = w.build("HEAD", "b.cbundle");
    w.release(&bundle);
    let mut f = fleet(w, Vec::new());
    for (i, replicas) in [(0, "3"), (1, "5")] {
        let target = format!(
            "target:\n  manifestsDir: {}\n",
            f.dir(i, "manifests").display()
        );
        let cfg = f.configure(i, &target);
        let values = f.dir(i, "values.yaml");
        std::fs::write(&values, format!("replicas: {replicas}\n")).unwrap();
        let mut yaml = std::fs::read_to_string(&cfg).unwrap();
        yaml.push_str(&format!("valuesFile: {}\n", values.display()));
        std::fs::write(&cfg, yaml).unwrap();
        f.spawn(i, &cfg);
    }
    f.wait_sequence(&[0, 1], 1, 60);
    let digest = |f: &Fleet, i: usize| {
        f.status(i)
            .and_then(|s| s.reconcile)
            .and_then(|r| r.site)
            .and_then(|s| s.values_digest)
    };
    f.wait(30, "both agents report a values digest", |f| {
        digest(f, 0).is_some() && digest(f, 1).is_some()
    });
    let (d0, d1) = (digest(&f, 0).unwrap(), digest(&f, 1).unwrap());
    assert_ne!(d0, d1);
    let op = f.w.path("operator");
    mesh_issue_operator(&f.ca, "ops", &op);
    let mut last = serde_json::Value::Null;
    f.wait(30, "fleet status shows both digests", |f| {
        last = fleet_status_json(f, 0, &op);
        let agents = last["agents"].as_array().cloned().unwrap_or_default();
        agents.len() == 2
            && agents[0]["values_digest"] == d0.as_str()
            && agents[1]["values_digest"] == d1.as_str()
    });
    let table = f.cairn(&[
        "fleet",
        "status",
        "--peer",
        &f.addr(0),
        "--cert",
        &op.join("operator.crt").display().to_string(),
        "--key",
        &op.join("operator.key").display().to_string(),
        "--ca",
        &op.join("ca.crt").display().to_string(),
    ]);
    assert!(table.contains("VALUES"), "{table}");
    for (i, d) in [(0, &d0), (1, &d1)] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&f.id(i)))
            .unwrap_or_else(|| panic!("no row for {}: {table}", f.id(i)));
        assert!(row.contains(&d[..19]), "{row}");
    }
}
