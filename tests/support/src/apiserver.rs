//! The test Kubernetes API server (`cairn-test-apiserver`, built before
//! the tests run) as a process, with `kubectl` pointed at it.

use crate::{cargo_bin, run, run_ok};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running `cairn-test-apiserver`, stopped with SIGTERM (then killed
/// after 20 s) when dropped. `kubectl` runs against it with a private
/// HOME and cache under the test's directory.
pub struct ApiServer {
    child: Child,
    /// The kubeconfig the server wrote.
    pub kubeconfig: PathBuf,
    /// HOME (and cache) for kubectl.
    pub home: PathBuf,
    /// The server's first stdout line (`READY address=... kubeconfig=...`).
    pub ready: String,
}

impl ApiServer {
    /// Starts the server with `--kubeconfig <dir>/kubeconfig` and `args`,
    /// and waits for its READY line.
    pub fn start(dir: &Path, args: &[&str]) -> ApiServer {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let kubeconfig = dir.join("kubeconfig");
        let mut child = Command::new(cargo_bin("cairn-test-apiserver"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start cairn-test-apiserver: {e}"));
        let mut ready = String::new();
        if let Some(stdout) = child.stdout.take() {
            // Blocks until the READY line or EOF (the server exited).
            BufReader::new(stdout)
                .read_line(&mut ready)
                .unwrap_or_else(|e| panic!("read cairn-test-apiserver's READY line: {e}"));
        }
        let home = dir.join("kubectl-home");
        std::fs::create_dir_all(&home).unwrap_or_else(|e| panic!("mkdir {}: {e}", home.display()));
        let server = ApiServer {
            child,
            kubeconfig,
            home,
            ready,
        };
        assert!(
            server.ready.starts_with("READY "),
            "unexpected first line from cairn-test-apiserver: {:?}",
            server.ready
        );
        server
    }

    /// `kubectl --kubeconfig ... --cache-dir ...` with a private HOME.
    pub fn kubectl_cmd(&self) -> Command {
        let mut c = Command::new("kubectl");
        c.env("HOME", &self.home)
            .env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.home.join("cache"));
        c
    }

    /// `kubectl <args>` run to completion.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        run(self.kubectl_cmd().args(args))
    }

    /// `kubectl <args>`, which must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        run_ok(self.kubectl_cmd().args(args))
    }

    /// `kubectl <args> -o json`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.kubectl_ok(&[args, &["-o", "json"]].concat());
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("kubectl {args:?} -o json: {e}: {out}"))
    }

    /// `kubectl get <args> -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        self.json(&[&["get"], args].concat())
    }

    /// Creates a namespace with a server-side apply (kubectl's imperative
    /// `create namespace` speaks protobuf, which the test server does not).
    pub fn create_namespace(&self, dir: &Path, name: &str) {
        let f = dir.join(format!("ns-{name}.yaml"));
        std::fs::write(
            &f,
            format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", f.display()));
        run_ok(
            self.kubectl_cmd()
                .args(["apply", "--server-side", "-f"])
                .arg(&f),
        );
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
