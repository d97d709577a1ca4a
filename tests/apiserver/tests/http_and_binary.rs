//! Raw HTTP behaviour (status codes, error bodies) and the binary as a process.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Env;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one HTTP/1.1 request and returns (status, headers, body).
async fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    ct: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nUser-Agent: raw-test/1.0\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (headers, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.as_bytes().to_vec()
    };
    (code, headers.to_string(), body)
}

fn dechunk(mut s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest.as_bytes()[..n]);
        s = &rest[n..];
        s = s.strip_prefix("\r\n").unwrap_or(s);
    }
    out
}

async fn status(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    ct: &str,
    body: &[u8],
) -> (u16, Value) {
    let (code, _, b) = raw(addr, method, path, ct, body).await;
    (code, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes_and_status_bodies() {
    let env = Env::default().await;
    let a = env.server.addr();
    let cm = |name: &str| {
        serde_json::to_vec(
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}),
        )
        .expect("json")
    };

    let (code, v) = status(a, "GET", "/api/v1/widgets", "", b"").await;
    assert_eq!(code, 404);
    assert_eq!(v["kind"], "Status");
    assert_eq!(v["reason"], "NotFound");
    assert_eq!(
        v["message"],
        "the server could not find the requested resource"
    );

    let (code, v) = status(
        a,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        b"{not json",
    )
    .await;
    assert_eq!(
        (code, v["reason"].as_str()),
        (400, Some("BadRequest")),
        "{v}"
    );

    let (code, v) = status(
        a,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/yaml",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: from-yaml}\n",
    )
    .await;
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["metadata"]["name"], "from-yaml");
    assert_eq!(
        v["metadata"]["resourceVersion"]
            .as_str()
            .map(|s| s.parse::<u64>().is_ok()),
        Some(true)
    );
    assert!(v["metadata"]["creationTimestamp"]
        .as_str()
        .is_some_and(|t| t.len() == 20 && t.ends_with('Z')));

    let (code, v) = status(
        a,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        &cm("from-yaml"),
    )
    .await;
    assert_eq!((code, v["reason"].as_str()), (409, Some("AlreadyExists")));
    assert_eq!(v["message"], r#"configmaps "from-yaml" already exists"#);
    assert_eq!(v["details"]["kind"], "configmaps");

    let (code, v) = status(
        a,
        "PUT",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        &cm("x"),
    )
    .await;
    assert_eq!(
        (code, v["reason"].as_str()),
        (405, Some("MethodNotAllowed"))
    );

    let (code, v) = status(
        a,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/from-yaml",
        "text/plain",
        b"{}",
    )
    .await;
    assert_eq!(
        (code, v["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );

    let (code, v) = status(
        a,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/from-yaml",
        "application/apply-patch+yaml",
        b"apiVersion: v1\nkind: ConfigMap\n",
    )
    .await;
    assert_eq!(code, 400, "apply without fieldManager: {v}");
    assert!(v["message"]
        .as_str()
        .is_some_and(|m| m.contains("fieldManager is required")));

    let (code, v) = status(
        a,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/from-yaml?fieldManager=t",
        "application/apply-patch+yaml",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-yaml\ndata:\n  k: [unclosed\n",
    )
    .await;
    assert_eq!(code, 400, "bad YAML: {v}");

    let (code, v) = status(
        a,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        &cm("UPPER"),
    )
    .await;
    assert_eq!((code, v["reason"].as_str()), (422, Some("Invalid")));
    assert_eq!(v["details"]["causes"][0]["field"], "metadata.name");

    let (code, v) = status(
        a,
        "POST",
        "/api/v1/namespaces/default/secrets",
        "application/json",
        &cm("x"),
    )
    .await;
    assert_eq!(code, 400, "kind mismatch: {v}");

    let big = vec![b' '; 3 * 1024 * 1024 + 10];
    let (code, _, _) = raw(
        a,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        &big,
    )
    .await;
    assert_eq!(code, 413);

    // Discovery documents.
    let (code, v) = status(a, "GET", "/api/v1", "", b"").await;
    assert_eq!(code, 200);
    let res = v["resources"].as_array().expect("resources");
    let find = |n: &str| {
        res.iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(find("namespaces")["shortNames"], json!(["ns"]));
    assert_eq!(find("namespaces")["namespaced"], false);
    assert_eq!(find("configmaps")["singularName"], "configmap");
    assert_eq!(find("services")["shortNames"], json!(["svc"]));
    assert_eq!(find("persistentvolumeclaims")["shortNames"], json!(["pvc"]));
    assert!(find("configmaps")["verbs"]
        .as_array()
        .is_some_and(|v| v.contains(&json!("watch"))));
    let (_, v) = status(a, "GET", "/apis", "", b"").await;
    let groups: Vec<&str> = v["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    for g in [
        "apps",
        "batch",
        "rbac.authorization.k8s.io",
        "networking.k8s.io",
        "apiextensions.k8s.io",
    ] {
        assert!(groups.contains(&g), "{groups:?}");
    }
    let (_, v) = status(a, "GET", "/apis/networking.k8s.io/v1", "", b"").await;
    assert_eq!(v["resources"][0]["shortNames"], json!(["netpol"]));
    let (_, v) = status(a, "GET", "/version", "", b"").await;
    assert_eq!(v["major"], "1");

    // Watch over raw HTTP: chunked newline-delimited JSON, timeoutSeconds honoured.
    let (code, headers, body) = raw(
        a,
        "GET",
        "/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1",
        "",
        b"",
    )
    .await;
    assert_eq!(code, 200);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{headers}"
    );
    let text = String::from_utf8_lossy(&body);
    let first: Value =
        serde_json::from_str(text.lines().next().expect("a line")).expect("json line");
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["metadata"]["name"], "from-yaml");
}

fn start_binary(args: &[&str]) -> (std::process::Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-test-apiserver"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("READY line");
    let mut addr = String::new();
    let mut kc = String::new();
    for part in line.split_whitespace() {
        if let Some(v) = part.strip_prefix("address=") {
            addr = v.to_string();
        }
        if let Some(v) = part.strip_prefix("kubeconfig=") {
            kc = v.to_string();
        }
    }
    assert!(line.starts_with("READY "), "{line}");
    (child, addr, kc)
}

fn kubectl(kc: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let dir = std::path::Path::new(kc)
        .parent()
        .expect("dir")
        .join("cache");
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kc)
        .arg("--cache-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    let mut sin = child.stdin.take().expect("stdin");
    if let Some(s) = stdin {
        sin.write_all(s.as_bytes()).expect("stdin");
    }
    drop(sin);
    let out = child.wait_with_output().expect("kubectl output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn terminate(child: &mut std::process::Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: sending SIGTERM to our own child process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}

#[test]
fn binary_ready_line_state_and_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let kc = dir.path().join("kc");
    let ready = dir.path().join("ready");
    let state = dir.path().join("state.json");
    let args = [
        "--kubeconfig",
        kc.to_str().expect("utf8"),
        "--ready-file",
        ready.to_str().expect("utf8"),
        "--state",
        state.to_str().expect("utf8"),
        "--deny",
        "Secret",
        "--deployment-ready-delay-ms",
        "100",
    ];
    let (mut child, addr, kcpath) = start_binary(&args);
    assert!(addr.starts_with("http://127.0.0.1:"), "{addr}");
    assert_eq!(kcpath, kc.display().to_string());
    let ready_text = std::fs::read_to_string(&ready).expect("ready file");
    assert!(ready_text.starts_with(&format!("READY address={addr} kubeconfig=")));
    let kc_text = std::fs::read_to_string(&kc).expect("kubeconfig");
    assert!(kc_text.contains(&format!("server: {addr}")));

    let (ok, out, err) = kubectl(&kcpath, &["get", "ns"], None);
    assert!(ok, "{err}");
    assert!(out.contains("default") && out.contains("kube-system"));
    let (ok, _, err) = kubectl(
        &kcpath,
        &["apply", "--server-side", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: persisted, namespace: default}\ndata: {a: b}\n"),
    );
    assert!(ok, "{err}");
    let (ok, _, err) = kubectl(
        &kcpath,
        &["apply", "--server-side", "-f", "-"],
        Some("apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: default}\n"),
    );
    assert!(!ok && err.contains("forbidden"), "{err}");
    terminate(&mut child);
    let saved = std::fs::read_to_string(&state).expect("state saved on SIGTERM");
    assert!(saved.contains("persisted"));

    // Restart from the state file.
    let (mut child, _, kcpath) = start_binary(&args);
    let (ok, out, err) = kubectl(
        &kcpath,
        &["get", "cm", "persisted", "-o", "jsonpath={.data.a}"],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out, "b");
    terminate(&mut child);
}
