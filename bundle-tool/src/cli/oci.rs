//! `cairn push` and `cairn pull`: a channel to and from an OCI registry
//! (`docs/REGISTRY.md`; the artifact layout is in `docs/FORMATS.md`).

use super::release::RootArgs;
use crate::limits::Limits;
use crate::oci::{Client, NetSettings, OciRef};
use crate::repo::RepoDir;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// TLS and credentials for the registry.
#[derive(Debug, Args)]
pub(super) struct RegistryArgs {
    /// PEM CA bundle trusted for the registry, in addition to the system roots.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for registries that require one.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Credentials file: {"username": ..., "password": ...} or a Docker
    /// config.json with an `auths` entry for the registry.
    #[arg(long, value_name = "FILE", env = "CAIRN_REGISTRY_CREDENTIALS")]
    credentials_file: Option<PathBuf>,
    /// Upper bound for one request.
    #[arg(long, default_value = "120s", value_parser = crate::duration::parse_duration)]
    request_timeout: Duration,
}

impl RegistryArgs {
    fn client(&self, url: &str) -> Result<Client> {
        let reference = OciRef::parse(url).map_err(anyhow::Error::msg)?;
        let settings = NetSettings {
            ca_file: self.ca_file.clone(),
            client_cert_file: self.client_cert.clone(),
            client_key_file: self.client_key.clone(),
            credentials_file: self.credentials_file.clone(),
            redirect_hosts: Vec::new(),
        };
        Client::new(
            reference,
            &settings,
            Duration::from_secs(10),
            self.request_timeout,
        )
        .map_err(anyhow::Error::msg)
    }
}

/// `cairn push`.
#[derive(Debug, Args)]
pub(super) struct PushArgs {
    /// The bundle repository directory.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// The channel to push; it becomes the tag.
    #[arg(long, value_name = "NAME")]
    channel: String,
    /// The registry repository: oci://HOST[:PORT]/NAME.
    #[arg(long, value_name = "URL")]
    to: String,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    root: RootArgs,
}

/// `cairn pull`.
#[derive(Debug, Args)]
pub(super) struct PullArgs {
    /// The registry repository: oci://HOST[:PORT]/NAME.
    #[arg(long, value_name = "URL")]
    from: String,
    /// The channel (tag) to pull.
    #[arg(long, value_name = "NAME")]
    channel: String,
    /// The bundle repository directory (created if missing).
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    root: RootArgs,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `cairn push`.
pub(super) fn push(a: PushArgs) -> Result<()> {
    let limits = Limits::default();
    let repo = RepoDir::new(&a.repo);
    if !repo.path().is_dir() {
        anyhow::bail!("{}: no such repository directory", repo.path().display());
    }
    let chain = a.root.chain(&repo)?;
    let client = a.registry.client(&a.to)?;
    let s = runtime()?.block_on(crate::oci::push(
        &client,
        &repo,
        &chain,
        &a.channel,
        crate::unix_now(),
        &limits,
    ))?;
    eprintln!(
        "pushed {}:{} (release {}): {} blob(s) uploaded ({} bytes), {} already present, \
         {} manifest(s) written",
        client.reference(),
        a.channel,
        s.sequence,
        s.blobs_uploaded,
        s.bytes_uploaded,
        s.blobs_present,
        s.manifests_written
    );
    Ok(())
}

/// Runs `cairn pull`.
pub(super) fn pull(a: PullArgs) -> Result<()> {
    let limits = Limits::default();
    let repo = RepoDir::new(&a.repo);
    std::fs::create_dir_all(repo.path())
        .with_context(|| format!("creating {}", repo.path().display()))?;
    let start = a.root.start()?;
    let client = a.registry.client(&a.from)?;
    let s = runtime()?.block_on(crate::oci::pull(
        &client,
        &repo,
        start,
        &a.channel,
        crate::unix_now(),
        &limits,
    ))?;
    for (c, n) in &s.updated {
        eprintln!("channel {c}: now at release {n}");
    }
    for c in &s.unchanged {
        eprintln!("channel {c}: already at the registry's release");
    }
    eprintln!(
        "pulled {}:{} into {}: {} new object(s) ({} image blob(s)), {} new root(s)",
        client.reference(),
        a.channel,
        repo.path().display(),
        s.objects_written,
        s.image_blobs_written,
        s.roots_written.len()
    );
    Ok(())
}
