//! `cairn promote`: sign the bundle of one channel's head into another
//! channel (e.g. `beta` → `stable`) without rebuilding it.

use super::release::SigningArgs;
use crate::limits::Limits;
use crate::publish::promote;
use crate::repo::{channel_path, RepoDir};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// `cairn promote`.
#[derive(Debug, Args)]
pub(super) struct PromoteArgs {
    /// The bundle repository directory.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// The channel whose head is promoted, e.g. beta. Its release and every
    /// object are verified first.
    #[arg(long, value_name = "CHANNEL")]
    from: String,
    /// The channel to sign the same bundle into, e.g. stable (its next
    /// sequence).
    #[arg(long, value_name = "CHANNEL")]
    to: String,
    #[command(flatten)]
    signing: SigningArgs,
}

/// Runs `cairn promote`: prints `CHANNEL SEQUENCE` of the new release on
/// stdout, details on stderr.
pub(super) fn run(a: PromoteArgs) -> Result<()> {
    let limits = Limits::default();
    let repo = RepoDir::new(&a.repo);
    if !repo.path().is_dir() {
        bail!(
            "{}: no such repository directory; pass the repository that holds channel `{}`",
            repo.path().display(),
            a.from
        );
    }
    let chain = a.signing.root.chain(&repo)?;
    let (keys, req) = a.signing.request(&a.to)?;
    let p = promote(&repo, &chain, &a.from, &keys, &req, &limits).map_err(|e| match e {
        e @ crate::Error::Objects { .. } => {
            anyhow::Error::from(e).context(format!("channel `{}` does not verify", a.from))
        }
        e => anyhow::Error::from(e),
    })?;
    let (f, t) = (&p.from.release(), &p.to.release());
    eprintln!(
        "promoted {} from {} sequence {} to {} sequence {} ({} signature(s), rollout {}), expires {}",
        t.bundle,
        channel_path(&f.channel),
        f.sequence,
        channel_path(&t.channel),
        t.sequence,
        p.to.signers().len(),
        crate::rollout::format_rollout(&t.rollout),
        t.expires
    );
    println!("{} {}", t.channel, t.sequence);
    Ok(())
}
