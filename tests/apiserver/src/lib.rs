//! A test Kubernetes API server, faithful enough for `kubectl` and kube-rs.
//!
//! It serves discovery, CRUD, PATCH (merge, simplified strategic, JSON patch),
//! server-side apply with managedFields, watches with event history, CRDs, a fake
//! workload controller and RBAC-like denial rules, over plain HTTP on 127.0.0.1.
//! See `docs/TEST-APISERVER.md` for what is simplified.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use cairn_test_apiserver::{Config, TestApiServer};
//! let server = TestApiServer::start(Config::default()).await?;
//! server.write_kubeconfig(std::path::Path::new("/tmp/kc"))?;
//! println!("{}", server.url());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod apply;
pub mod controller;
pub mod deny;
pub mod discovery;
pub mod error;
pub mod http;
pub mod kubeconfig;
pub mod openapi;
pub mod patch;
pub mod selector;
pub mod store;
pub mod table;
pub mod util;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use deny::DenyRule;

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:0`, a free port).
    pub listen: SocketAddr,
    /// Denial rules (see [`deny`] for the syntax), e.g. `Secret` or `apps/Deployment:all`.
    pub deny: Vec<String>,
    /// Delay before the fake controller marks workloads ready (default 300 ms).
    pub deployment_ready_delay: Duration,
    /// The user named in Forbidden messages.
    pub user: String,
    /// How many events are kept for watches resuming from an old resourceVersion.
    pub history_limit: usize,
    /// Maximum request body size (default 3 MiB, like a real API server).
    pub max_body_bytes: usize,
    /// Optional state file: loaded at start if present, saved on shutdown.
    pub state_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            deny: Vec::new(),
            deployment_ready_delay: Duration::from_millis(300),
            user: "system:serviceaccount:cairn-system:cairn".into(),
            history_limit: 10_000,
            max_body_bytes: 3 * 1024 * 1024,
            state_file: None,
        }
    }
}

/// State shared by the HTTP handlers and the controller.
pub struct Shared {
    /// The object store.
    pub store: store::Store,
    /// Configuration.
    pub config: Config,
    /// Active denial rules.
    pub deny: RwLock<Vec<DenyRule>>,
    /// The bound address.
    pub addr: SocketAddr,
    /// Becomes `true` on shutdown.
    pub shutdown: watch::Receiver<bool>,
}

/// A running test API server (in-process, on the current tokio runtime).
pub struct TestApiServer {
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl TestApiServer {
    /// Binds `config.listen`, loads `config.state_file` if it exists, and starts
    /// serving and the fake controller.
    pub async fn start(config: Config) -> anyhow::Result<TestApiServer> {
        let rules = config
            .deny
            .iter()
            .map(|r| DenyRule::parse(r))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let store = store::Store::new(config.history_limit);
        if let Some(path) = &config.state_file {
            if path.exists() {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading state file {}", path.display()))?;
                let snap: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("parsing state file {}", path.display()))?;
                store.lock().restore(&snap)?;
            }
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            store,
            config,
            deny: RwLock::new(rules),
            addr,
            shutdown: shutdown_rx,
        });
        let tasks = vec![
            tokio::spawn(http::serve(listener, shared.clone())),
            tokio::spawn(controller::run(shared.clone())),
        ];
        Ok(TestApiServer {
            shared,
            shutdown_tx,
            tasks,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A kubeconfig (YAML) pointing at this server.
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig::render(&self.url())
    }

    /// Writes a kubeconfig pointing at this server to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        kubeconfig::write(&self.url(), path)
            .with_context(|| format!("writing kubeconfig {}", path.display()))
    }

    /// Adds a denial rule at runtime (syntax as for `--deny`).
    pub fn deny(&self, rule: &str) -> anyhow::Result<()> {
        let r = DenyRule::parse(rule)?;
        self.shared
            .deny
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(r);
        Ok(())
    }

    /// Removes all denial rules.
    pub fn clear_denies(&self) {
        self.shared
            .deny
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().rv
    }

    /// A JSON snapshot of all objects (the `--state` file format).
    pub fn snapshot(&self) -> serde_json::Value {
        self.shared.store.lock().snapshot()
    }

    /// Stops serving (open watches end), stops the controller and saves the state
    /// file if configured.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        if let Some(path) = &self.shared.config.state_file {
            let snap = self.shared.store.lock().snapshot();
            let text = serde_json::to_string_pretty(&snap).unwrap_or_default();
            if let Err(e) = std::fs::write(path, text) {
                tracing::warn!("saving state to {}: {e}", path.display());
            }
        }
    }
}

/// Resolves once shutdown has been signalled.
pub async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
    }
}
