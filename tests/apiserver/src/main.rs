//! `cairn-test-apiserver`: runs the test Kubernetes API server as a process.
//!
//! Prints `READY address=http://127.0.0.1:PORT kubeconfig=PATH` on stdout once
//! serving, and shuts down cleanly on SIGTERM/SIGINT (saving `--state`).
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_test_apiserver::{Config, TestApiServer};
use clap::Parser;

/// A test Kubernetes API server for kubectl and kube-rs.
#[derive(Debug, Parser)]
#[command(name = "cairn-test-apiserver", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write a kubeconfig (default: a file in the temp directory).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Also write the READY line to this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// State file: loaded at start if present, saved on shutdown.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Deny rule `TARGET[:VERBS]` (repeatable), e.g. `Secret`, `apps/Deployment:all`,
    /// `configmaps:create,delete`. Default verbs: writes.
    #[arg(long = "deny")]
    deny: Vec<String>,
    /// Delay before workloads become ready, in milliseconds.
    #[arg(long, default_value_t = 300)]
    deployment_ready_delay_ms: u64,
    /// User named in Forbidden messages.
    #[arg(long, default_value = "system:serviceaccount:cairn-system:cairn")]
    user: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = Config {
        listen: args.listen,
        deny: args.deny,
        deployment_ready_delay: Duration::from_millis(args.deployment_ready_delay_ms),
        user: args.user,
        state_file: args.state,
        ..Config::default()
    };
    let server = TestApiServer::start(config).await?;
    let kc = args.kubeconfig.unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "cairn-test-apiserver-{}.kubeconfig",
            server.addr().port()
        ))
    });
    server.write_kubeconfig(&kc)?;
    let line = format!("READY address={} kubeconfig={}", server.url(), kc.display());
    if let Some(rf) = &args.ready_file {
        std::fs::write(rf, format!("{line}\n"))
            .with_context(|| format!("writing ready file {}", rf.display()))?;
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.shutdown().await;
    Ok(())
}
