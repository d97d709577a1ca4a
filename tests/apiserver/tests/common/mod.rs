//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_test_apiserver::{Config, TestApiServer};

/// A running in-process server plus a temp dir with a kubeconfig.
pub(crate) struct Env {
    pub server: TestApiServer,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

/// Output of one kubectl run.
#[derive(Debug)]
pub(crate) struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Env {
    pub(crate) async fn start(config: Config) -> Env {
        let server = TestApiServer::start(config).await.expect("start server");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        Env {
            server,
            dir,
            kubeconfig,
        }
    }

    pub(crate) async fn default() -> Env {
        Env::start(Config {
            deployment_ready_delay: Duration::from_millis(200),
            ..Config::default()
        })
        .await
    }

    /// Runs kubectl with this server's kubeconfig and a private cache dir.
    pub(crate) async fn kubectl(&self, args: &[&str]) -> Out {
        self.kubectl_stdin(args, None).await
    }

    pub(crate) async fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Out {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .env("HOME", self.dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl must be installed");
        let mut sin = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            sin.write_all(s.as_bytes()).await.expect("write stdin");
        }
        drop(sin);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("kubectl timed out")
            .expect("kubectl output");
        let o = Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!("$ kubectl {}\n{}{}", args.join(" "), o.stdout, o.stderr);
        o
    }

    /// Runs kubectl and expects success.
    pub(crate) async fn ok(&self, args: &[&str]) -> String {
        let o = self.kubectl(args).await;
        assert!(o.ok, "kubectl {args:?} failed: {}", o.stderr);
        o.stdout
    }

    /// Runs kubectl expecting JSON output.
    pub(crate) async fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args).await;
        serde_json::from_str(&out).expect("kubectl printed JSON")
    }

    pub(crate) fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write");
        p
    }

    pub(crate) fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    /// A kube-rs client for this server.
    pub(crate) fn client(&self) -> kube::Client {
        client_for(&self.server.url())
    }
}

pub(crate) fn client_for(url: &str) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let uri: hyper::Uri = url.parse().expect("url");
    let config = kube::Config::new(uri);
    kube::Client::try_from(config).expect("client")
}

/// Polls `f` until it returns Some or the timeout passes.
pub(crate) async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn exists(p: &Path) -> bool {
    p.exists()
}

pub(crate) const CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wd]
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
    subresources:
      status: {}
    additionalPrinterColumns:
    - name: Size
      type: integer
      jsonPath: .spec.size
"#;
