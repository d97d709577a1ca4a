//! `cairn promote`: sign the bundle of one channel's head into another
//! channel (e.g. `beta` → `stable`) without rebuilding it.

use super::release::{read_keys, RootArgs};
use crate::limits::Limits;
use crate::publish::{parse_selector, promote, ReleaseRequest};
use crate::release::Rollout;
use crate::repo::{channel_path, RepoDir};
use anyhow::{bail, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `cairn promote`.
#[derive(Debug, Args)]
pub struct PromoteArgs {
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
    /// Private release key file (repeat to reach the threshold).
    #[arg(long = "key", value_name = "KEY", required = true)]
    keys: Vec<PathBuf>,
    #[command(flatten)]
    root: RootArgs,
    /// How long the new release stays valid, e.g. 30d.
    #[arg(long, default_value = "30d", value_parser = crate::duration::parse_duration)]
    expires: std::time::Duration,
    /// Rollout waves of the new release, e.g.
    /// `10%:0s,50%:1h,100%:6h,max-failures=3` [default: everyone at once].
    /// The source release's rollout is not copied.
    #[arg(long, value_name = "SPEC", value_parser = crate::rollout::parse_rollout)]
    rollout: Option<Rollout>,
    /// Only agents with these labels, e.g. `region=eu,tier=edge`.
    #[arg(long, value_name = "K=V,...", value_parser = parse_selector)]
    selector: Option<BTreeMap<String, String>>,
}

/// Runs `cairn promote`: prints `CHANNEL SEQUENCE` of the new release on
/// stdout, details on stderr.
pub fn run(a: PromoteArgs) -> Result<()> {
    let limits = Limits::default();
    let repo = RepoDir::new(&a.repo);
    if !repo.path().is_dir() {
        bail!(
            "{}: no such repository directory; pass the repository that holds channel `{}`",
            repo.path().display(),
            a.from
        );
    }
    let chain = a.root.chain(&repo)?;
    let keys = read_keys(&a.keys)?;
    let req = ReleaseRequest {
        channel: a.to.clone(),
        expires_in: a.expires.as_secs(),
        rollout: a.rollout.unwrap_or_default(),
        selector: a.selector.unwrap_or_default(),
        now: crate::unix_now(),
    };
    let p = promote(&repo, &chain, &a.from, &keys, &req, &limits).map_err(|e| match e {
        e @ crate::Error::Objects { .. } => {
            anyhow::Error::from(e).context(format!("channel `{}` does not verify", a.from))
        }
        e => anyhow::Error::from(e),
    })?;
    let (f, t) = (&p.from.release, &p.to.release);
    eprintln!(
        "promoted {} from {} sequence {} to {} sequence {} ({} signature(s), rollout {}), expires {}",
        t.bundle,
        channel_path(&f.channel),
        f.sequence,
        channel_path(&t.channel),
        t.sequence,
        p.to.signers.len(),
        crate::rollout::format_rollout(&t.rollout),
        t.expires
    );
    println!("{} {}", t.channel, t.sequence);
    Ok(())
}
