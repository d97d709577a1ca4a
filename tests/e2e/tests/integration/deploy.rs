//! `deploy/`: the kustomize base renders with the real kubectl, applies
//! server-side to the test API server, and holds what an operator expects
//! (non-root, read-only root file system, resources, least privilege); the
//! agent configurations in `deploy/` are accepted by the agent's own config
//! loader and agree with the Deployment and the systemd unit around them.
//!
//! Needs `kubectl` (1.32, with kustomize) on PATH and the
//! `cairn-test-apiserver` binary (`cargo build --workspace --bins`).

use cairn_agent::config::{Config, TargetConfig};
use cairn_test_support::{run_ok, ApiServer};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn deploy(rel: &str) -> PathBuf {
    workspace().join("deploy").join(rel)
}

/// The test API server as a process (stopped with SIGTERM on drop), with
/// the READY line this test expects.
fn api_server(dir: &Path) -> ApiServer {
    let server = ApiServer::start(dir, &[]);
    let line = &server.ready;
    assert!(
        line.starts_with("READY address=http://127.0.0.1:"),
        "unexpected first line from cairn-test-apiserver: {line:?}"
    );
    assert!(line.contains("kubeconfig="), "{line}");
    server
}

/// `kubectl kustomize deploy/kubernetes` (no cluster needed).
fn render() -> String {
    let home = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("kubectl")
            .env("HOME", home.path())
            .arg("kustomize")
            .arg(deploy("kubernetes")),
    )
}

/// The rendered documents as JSON values.
fn rendered_objects() -> Vec<Value> {
    let text = render();
    text.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_norway::from_str::<Value>(d).expect("rendered YAML"))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} not rendered"))
}

fn agent_yaml(objects: &[Value]) -> String {
    find(objects, "ConfigMap", "cairn-agent-config")["data"]["agent.yaml"]
        .as_str()
        .expect("ConfigMap data agent.yaml")
        .to_owned()
}

#[test]
fn the_kustomize_base_applies_server_side_with_the_expected_objects() {
    let dir = tempfile::tempdir().unwrap();
    let rendered = render();
    let server = api_server(dir.path());

    let mut child = server
        .kubectl_cmd()
        .args(["apply", "--server-side", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl apply");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rendered.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl apply --server-side failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for applied in [
        "namespace/cairn-system serverside-applied",
        "serviceaccount/cairn-agent serverside-applied",
        "clusterrole.rbac.authorization.k8s.io/cairn-agent serverside-applied",
        "deployment.apps/cairn-agent serverside-applied",
        "networkpolicy.networking.k8s.io/cairn-agent serverside-applied",
    ] {
        assert!(
            stdout.contains(applied),
            "missing `{applied}` in:\n{stdout}"
        );
    }

    let ns = ["-n", "cairn-system"];
    let get = |kind: &str, name: &str| {
        let mut args = vec![kind, name];
        args.extend_from_slice(&ns);
        server.get_json(&args)
    };

    // Deployment: one replica, Recreate (one agent per data dir), non-root,
    // read-only root file system, no privilege escalation, resources.
    let d = get("deployment", "cairn-agent");
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "cairn-agent");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    assert!(pod["securityContext"]["runAsUser"].as_u64().is_some());
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    for r in ["cpu", "memory"] {
        assert!(
            c["resources"]["requests"][r].is_string(),
            "requests.{r}: {}",
            c["resources"]
        );
    }
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let volumes = pod["volumes"].as_array().unwrap();
    let claim = volumes
        .iter()
        .find_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
        .expect("a PVC volume");
    assert_eq!(claim, "cairn-agent-data");
    assert!(volumes
        .iter()
        .any(|v| v["configMap"]["name"] == "cairn-agent-config"));

    let sa = get("serviceaccount", "cairn-agent");
    assert_eq!(sa["metadata"]["namespace"], "cairn-system");

    let cr = server.get_json(&["clusterrole", "cairn-agent"]);
    assert!(!cr["rules"].as_array().unwrap().is_empty());
    let crb = server.get_json(&["clusterrolebinding", "cairn-agent"]);
    assert_eq!(crb["roleRef"]["name"], "cairn-agent");
    assert_eq!(crb["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(crb["subjects"][0]["name"], "cairn-agent");
    assert_eq!(crb["subjects"][0]["namespace"], "cairn-system");
    // The status ConfigMap rights are namespaced (a Role, not cluster-wide).
    let role = get("role", "cairn-agent-status");
    assert_eq!(role["rules"][0]["resources"][0], "configmaps");

    let np = get("networkpolicy", "cairn-agent");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "cairn-agent"
    );
    let ports: Vec<u64> = np["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert!(ports.contains(&7440), "mesh port open: {ports:?}");

    let pvc = get("pvc", "cairn-agent-data");
    assert_eq!(pvc["spec"]["accessModes"][0], "ReadWriteOnce");
    assert!(pvc["spec"]["resources"]["requests"]["storage"].is_string());

    let svc = get("service", "cairn-mesh");
    assert_eq!(svc["spec"]["ports"][0]["port"], 7440);
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/name"],
        "cairn-agent"
    );

    let cm = get("configmap", "cairn-agent-config");
    let text = cm["data"]["agent.yaml"].as_str().expect("agent.yaml");
    Config::parse(text, "applied ConfigMap").expect("the applied agent.yaml parses");
}

#[test]
fn the_configmaps_agent_yaml_is_accepted_by_the_agent_and_matches_the_deployment() {
    let objects = rendered_objects();
    let text = agent_yaml(&objects);
    let cfg = Config::parse(&text, "deploy/kubernetes/configmap.yaml agent.yaml")
        .unwrap_or_else(|e| panic!("the agent refuses deploy/'s agent.yaml:\n{e}"));
    // A deployed agent embeds the organisation's root: never allow the
    // development one here.
    assert!(!cfg.insecure_allow_development_root);
    let d = find(&objects, "Deployment", "cairn-agent");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount_of = |volume: &str| -> PathBuf {
        PathBuf::from(
            mounts
                .iter()
                .find(|m| m["name"] == volume)
                .and_then(|m| m["mountPath"].as_str())
                .unwrap_or_else(|| panic!("no mount for volume {volume}")),
        )
    };

    // The file the container is told to read is the one mounted.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let config_arg = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1])
        .expect("--config in args");
    assert_eq!(PathBuf::from(config_arg), mount_of("config"));

    // The data directory is the persistent volume.
    assert_eq!(cfg.data_dir, mount_of("data"));

    // The Kubernetes target, in-cluster, status in the agent's namespace.
    match &cfg.target {
        TargetConfig::Kubernetes(k) => {
            assert_eq!(k.kubeconfig, None, "in-cluster configuration");
            assert_eq!(k.namespace, "cairn-system");
        }
        other => panic!("expected the kubernetes target, got {other:?}"),
    }

    // Ports: HTTP (probes) and mesh, reachable from outside the pod.
    let port_of = |name: &str| -> u16 {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}")) as u16
    };
    let http = cfg.listen_http.expect("HTTP listener on (probes need it)");
    assert!(http.ip().is_unspecified(), "probes come from the kubelet");
    assert_eq!(http.port(), port_of("http"));
    let mesh = cfg.mesh.as_ref().expect("mesh section");
    assert_eq!(mesh.listen, format!("0.0.0.0:{}", port_of("mesh")));
    // The mesh credentials live in the mounted Secret.
    let tls = mount_of("mesh-tls");
    for p in [
        &mesh.credentials.cert,
        &mesh.credentials.key,
        &mesh.credentials.ca,
    ] {
        assert!(
            p.starts_with(&tls),
            "{} is not under {}",
            p.display(),
            tls.display()
        );
    }
    let secret_volume = d["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "mesh-tls")
        .expect("mesh-tls volume");
    assert_eq!(secret_volume["secret"]["secretName"], "cairn-mesh-tls");
}

#[test]
fn the_systemd_agent_yaml_is_accepted_and_matches_the_unit() {
    let path = deploy("systemd/agent.yaml");
    // No CAIRN_* overrides from the test's environment.
    let cfg = Config::load_with_env(Some(&path), &|_| None)
        .unwrap_or_else(|e| panic!("the agent refuses {}:\n{e}", path.display()));
    assert!(!cfg.insecure_allow_development_root);
    let unit = std::fs::read_to_string(deploy("systemd/cairn-agent.service")).unwrap();
    let line = |key: &str| -> String {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing in the unit"))
            .to_owned()
    };
    assert!(line("ExecStart").contains("--config /etc/cairn/agent.yaml"));
    // StateDirectory=cairn is /var/lib/cairn: the data directory.
    assert_eq!(
        cfg.data_dir,
        PathBuf::from("/var/lib").join(line("StateDirectory"))
    );
    let writable = line("ReadWritePaths");
    match &cfg.target {
        TargetConfig::ManifestsDir(d) => assert!(
            writable.split_whitespace().any(|p| Path::new(p) == d),
            "the manifests directory {} is not in ReadWritePaths={writable}",
            d.display()
        ),
        other => panic!("expected the manifests-dir target, got {other:?}"),
    }
    assert!(writable
        .split_whitespace()
        .any(|p| Path::new(p) == cfg.data_dir));
    assert!(
        cfg.listen_http.is_some_and(|a| a.ip().is_loopback()),
        "metrics stay on the host's loopback"
    );
}

/// The Containerfile's guard: a build without `--build-arg
/// CAIRN_TRUST_ROOT=...` fails with a message saying what to pass, unless
/// `CAIRN_ALLOW_DEVELOPMENT_ROOT=true` is given; it runs before anything is
/// installed or compiled. (Runs the guard's shell command itself: no
/// container engine in CI.)
#[test]
fn the_containerfile_refuses_to_build_with_the_development_root() {
    let text = std::fs::read_to_string(deploy("container/Containerfile")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (at, script) = cairn_test_support::containerfile_step(&text, "# guard: development root");
    let position = |needle: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no `{needle}` line"))
    };
    assert!(position("ARG CAIRN_TRUST_ROOT=") < at);
    assert!(position("ARG CAIRN_ALLOW_DEVELOPMENT_ROOT=") < at);
    assert!(at < position("RUN apt-get"), "the guard runs first");
    assert!(at < position("RUN cargo build"));

    let run = |env: &[(&str, &str)]| {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(&script)
            .env_remove("CAIRN_TRUST_ROOT")
            .env_remove("CAIRN_ALLOW_DEVELOPMENT_ROOT");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("sh")
    };
    for env in [
        &[][..],
        &[("CAIRN_TRUST_ROOT", "")][..],
        &[("CAIRN_ALLOW_DEVELOPMENT_ROOT", "1")][..],
        &[("CAIRN_ALLOW_DEVELOPMENT_ROOT", "yes")][..],
    ] {
        let out = run(env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{env:?}: {err}");
        for want in [
            "error: no trust root given",
            "--build-arg CAIRN_TRUST_ROOT=",
            "DEVELOPMENT root, whose private keys are public",
            "--build-arg CAIRN_ALLOW_DEVELOPMENT_ROOT=true",
        ] {
            assert!(err.contains(want), "{env:?}: missing {want:?} in {err}");
        }
    }
    for env in [
        &[("CAIRN_TRUST_ROOT", "keys/trust/acme-root.v1")][..],
        &[("CAIRN_ALLOW_DEVELOPMENT_ROOT", "true")][..],
    ] {
        let out = run(env);
        assert!(
            out.status.success(),
            "{env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
