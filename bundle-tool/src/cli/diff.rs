//! `cairn diff`: what applying a bundle would change on a live cluster —
//! objects to create, fields a server-side apply would change (from a
//! `dryRun=All` apply with field manager `cairn`), objects to prune — like
//! `flux diff kustomization`. Nothing on the cluster changes.
//!
//! Exit codes, as diff(1) and `flux diff`: 0 no changes, 1 changes, 2
//! error (docs/KUBERNETES.md, "Previewing a release").

use super::release::RootArgs;
use crate::check::ChannelCheck;
use crate::limits::Limits;
use crate::repo::{channel_path, RepoDir};
use anyhow::{bail, Context, Result};
use cairn_core::ChannelName;
use clap::Args;
use std::path::PathBuf;

/// Exit code: applying would change something.
pub(super) const EXIT_CHANGES: i32 = 1;
/// Exit code: the diff could not be computed.
pub(super) const EXIT_ERROR: i32 = 2;

/// `cairn diff`.
#[derive(Debug, Args)]
pub(super) struct DiffArgs {
    /// The bundle file to compare (`cairn bundle build --out FILE`).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "repo",
        required_unless_present = "repo"
    )]
    bundle: Option<PathBuf>,
    /// Compare the head of `--channel` in this bundle repository instead,
    /// after verifying it as `cairn verify` does.
    #[arg(long, value_name = "DIR")]
    repo: Option<PathBuf>,
    /// The channel: the `cairn.dev/channel` label the objects would carry,
    /// which selects what the cluster holds of the channel (and so what
    /// would be pruned); with `--repo`, also the channel read.
    #[arg(long, value_name = "CHANNEL", default_value = "stable")]
    channel: String,
    /// Kubeconfig of the cluster.
    #[arg(long, value_name = "FILE")]
    kubeconfig: PathBuf,
    /// Dry-run without server-side apply `force` (as an agent configured
    /// with `force: false`): fields other managers own show as conflicts.
    #[arg(long)]
    no_force: bool,
    #[command(flatten)]
    root: RootArgs,
}

/// Runs `cairn diff` and returns its exit code; errors are printed here.
pub(super) fn run(a: DiffArgs) -> i32 {
    match diff(&a) {
        Ok((text, skipped)) => {
            for s in skipped {
                eprintln!(
                    "cairn: warning: not listed, so not checked for pruning: {}",
                    cairn_keys::text::escape_untrusted(&s)
                );
            }
            if text.is_empty() {
                0
            } else {
                print!("{text}");
                EXIT_CHANGES
            }
        }
        Err(e) => {
            eprintln!(
                "cairn: {}",
                cairn_keys::text::escape_untrusted(&super::error_chain(&e))
            );
            EXIT_ERROR
        }
    }
}

/// The rendered report (empty: no changes) and the kinds not listed.
fn diff(a: &DiffArgs) -> Result<(String, Vec<String>)> {
    let channel = ChannelName::parse(&a.channel)
        .map_err(|e| anyhow::anyhow!("--channel {}: {e}", a.channel))?;
    let limits = Limits::default();
    // (object bytes, address) in entry order.
    let objects: Vec<(Vec<u8>, String)> = match (&a.bundle, &a.repo) {
        (Some(path), _) => {
            let mut out = Vec::new();
            crate::bundle_file::read_bundle_file(path, &limits, |e, bytes| {
                out.push((bytes, e.object.to_string()));
                Ok(())
            })?;
            out
        }
        (None, Some(dir)) => read_channel(dir, &channel, &a.root, &limits)?,
        (None, None) => bail!("pass --bundle FILE or --repo DIR"),
    };
    let raw: Vec<(&[u8], &str)> = objects
        .iter()
        .map(|(b, addr)| (b.as_slice(), addr.as_str()))
        .collect();
    // Objects that are not Kubernetes objects fail here, before connecting.
    cairn_plan::diff::desired_objects(&cairn_plan::diff::split_site_documents(&raw).0, &channel)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let mut cluster = cairn_plan::cluster::Cluster::connect(Some(&a.kubeconfig))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (previous, skipped) = cairn_plan::diff::cluster_inventory(&mut cluster, &channel)
            .await
            .map_err(|e| anyhow::anyhow!("listing the channel's objects: {e}"))?;
        let report =
            cairn_plan::diff::plan_bundle(&mut cluster, &raw, &channel, &previous, !a.no_force)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((report.render(), skipped))
    })
}

/// The objects of `channel`'s head in a repository directory, verified:
/// the release against the trust chain, every object against its address.
fn read_channel(
    dir: &std::path::Path,
    channel: &str,
    root: &RootArgs,
    limits: &Limits,
) -> Result<Vec<(Vec<u8>, String)>> {
    let repo = RepoDir::new(dir);
    if !repo.path().is_dir() {
        bail!("{}: no such repository directory", repo.path().display());
    }
    let chain = root.chain(&repo)?;
    let v = ChannelCheck {
        repo: &repo,
        fallback: None,
        root: chain.current().root(),
        now: crate::unix_now(),
        limits,
        threads: 2,
    }
    .verify(channel)
    .map_err(|e| match e {
        e @ crate::Error::Objects { .. } => anyhow::Error::from(e),
        e => anyhow::Error::from(e).context(channel_path(channel)),
    })?;
    let mut out = Vec::with_capacity(v.manifest.entries.len());
    for e in &v.manifest.entries {
        // Read again (checked against its address again): the files may
        // have changed since the check.
        let bytes = repo
            .get_object(&e.object, limits.max_object_bytes)?
            .with_context(|| format!("object {} vanished from {}", e.object, dir.display()))?;
        out.push((bytes, e.object.to_string()));
    }
    Ok(out)
}
