//! `cairn release`, `cairn verify`, `cairn export` and `cairn import`:
//! publishing to, checking and moving bundle repositories.

use crate::archive;
use crate::check::ChannelCheck;
use crate::limits::Limits;
use crate::publish::{parse_selector, publish, ReleaseRequest};
use crate::release::Rollout;
use crate::repo::{channel_path, RepoDir};
use crate::trust::TrustChain;
use anyhow::{Context, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Root files that start the trust chain.
#[derive(Debug, Args)]
pub(super) struct RootArgs {
    /// Root files, in order from the first trusted version (usually v1).
    /// Without them the chain starts at the root embedded in this binary.
    /// Newer roots found in the repository continue the chain.
    #[arg(long = "root", value_name = "FILE")]
    roots: Vec<PathBuf>,
}

impl RootArgs {
    /// The trusted start of the chain.
    pub(super) fn start(&self) -> Result<TrustChain> {
        if self.roots.is_empty() {
            return TrustChain::embedded().context("embedded root");
        }
        let mut files = Vec::new();
        for p in &self.roots {
            files.push((p.display().to_string(), super::root::read_root_file(p)?));
        }
        Ok(TrustChain::from_files(&files)?)
    }

    /// The chain continued with the repository's roots.
    pub(super) fn chain(&self, repo: &RepoDir) -> Result<TrustChain> {
        let mut chain = self.start()?;
        chain.extend(&repo.path().display().to_string(), &repo.roots()?)?;
        Ok(chain)
    }
}

/// `cairn release`.
#[derive(Debug, Args)]
pub(super) struct ReleaseArgs {
    /// The bundle repository directory (created if missing).
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// The bundle file to release (from `cairn bundle build`).
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    /// The channel, e.g. stable.
    #[arg(long, value_name = "NAME")]
    channel: String,
    /// The bundle's image store (from `cairn bundle build --images`),
    /// whose image list and blobs are verified and copied into the
    /// repository before the release is signed [default: FILE.images].
    #[arg(long, value_name = "DIR")]
    image_store: Option<PathBuf>,
    #[command(flatten)]
    signing: SigningArgs,
}

/// What signs a new release, and its policy: shared by `cairn release` and
/// `cairn promote`.
#[derive(Debug, Args)]
pub(super) struct SigningArgs {
    /// Private release key file (repeat to reach the threshold).
    #[arg(long = "key", value_name = "KEY", required = true)]
    keys: Vec<PathBuf>,
    #[command(flatten)]
    pub(super) root: RootArgs,
    /// How long the release stays valid, e.g. 30d.
    #[arg(long, default_value = "30d", value_parser = crate::duration::parse_duration)]
    expires: std::time::Duration,
    /// Rollout waves, e.g. `10%:0s,50%:1h,100%:6h,max-failures=3`
    /// [default: everyone at once].
    #[arg(long, value_name = "SPEC", value_parser = crate::rollout::parse_rollout)]
    rollout: Option<Rollout>,
    /// Only agents with these labels, e.g. `region=eu,tier=edge`.
    #[arg(long, value_name = "K=V,...", value_parser = parse_selector)]
    selector: Option<BTreeMap<String, String>>,
}

impl SigningArgs {
    /// Reads the signing keys and builds the request for a release on
    /// `channel`, signed now.
    pub(super) fn request(
        self,
        channel: &str,
    ) -> Result<(Vec<cairn_keys::KeyPair>, ReleaseRequest)> {
        let keys = read_keys(&self.keys)?;
        let req = ReleaseRequest {
            channel: channel.to_owned(),
            expires_in: self.expires.as_secs(),
            rollout: self.rollout.unwrap_or_default(),
            selector: self.selector.unwrap_or_default(),
            now: crate::unix_now(),
        };
        Ok((keys, req))
    }
}

/// `cairn verify`.
#[derive(Debug, Args)]
pub(super) struct VerifyArgs {
    /// The bundle repository directory.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// The channel to verify.
    #[arg(long, value_name = "NAME")]
    channel: String,
    #[command(flatten)]
    root: RootArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// `cairn export`.
#[derive(Debug, Args)]
pub(super) struct ExportArgs {
    /// The bundle repository directory.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// Channel to export (repeat for several).
    #[arg(long = "channel", value_name = "NAME", required = true)]
    channels: Vec<String>,
    /// The tar archive to write.
    #[arg(long, value_name = "FILE.tar")]
    out: PathBuf,
    #[command(flatten)]
    root: RootArgs,
}

/// `cairn import`.
#[derive(Debug, Args)]
pub(super) struct ImportArgs {
    /// The tar archive (from `cairn export`).
    file: PathBuf,
    /// The bundle repository directory (created if missing).
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    #[command(flatten)]
    root: RootArgs,
}

pub(super) fn read_keys(paths: &[PathBuf]) -> Result<Vec<cairn_keys::KeyPair>> {
    paths
        .iter()
        .map(|p| cairn_keys::keyfile::read_private(p).map_err(Into::into))
        .collect()
}

pub(super) fn release(a: ReleaseArgs) -> Result<()> {
    let limits = Limits::default();
    let repo = RepoDir::new(&a.repo);
    let chain = a.signing.root.chain(&repo)?;
    let (keys, req) = a.signing.request(&a.channel)?;
    // Images first (objects before the head): verified while copied.
    let manifest = crate::bundle::read_bundle_file(&a.bundle, &limits, |_, _| Ok(()))?;
    if cairn_core::images::list_address(&manifest).is_some() {
        let store = a
            .image_store
            .clone()
            .unwrap_or_else(|| crate::images::default_store(&a.bundle));
        std::fs::create_dir_all(repo.path()).with_context(|| repo.path().display().to_string())?;
        let (n, bytes) = crate::images::publish_images(
            &manifest,
            &store,
            repo.path(),
            cairn_core::images::DEFAULT_MAX_BLOB_BYTES,
            cairn_core::images::DEFAULT_MAX_TOTAL_BYTES,
        )?;
        eprintln!(
            "images: {n} blob(s), {bytes} bytes copied from {}",
            store.display()
        );
    }
    let v = publish(&repo, &chain, &a.bundle, &keys, &req, &limits)?;
    let r = &v.release();
    eprintln!(
        "released {} as {} sequence {} (root v{}, {} signature(s)), expires {}",
        r.bundle,
        channel_path(&r.channel),
        r.sequence,
        chain.current().root().version,
        v.signers().len(),
        r.expires
    );
    println!("{} {}", r.channel, r.sequence);
    Ok(())
}

pub(super) fn verify(a: VerifyArgs) -> Result<()> {
    let limits = Limits::default();
    let repo = RepoDir::new(&a.repo);
    if !repo.path().is_dir() {
        anyhow::bail!("{}: no such repository directory", repo.path().display());
    }
    let result = (|| -> Result<_> {
        let chain = a.root.chain(&repo)?;
        let v = ChannelCheck {
            repo: &repo,
            fallback: None,
            root: chain.current().root(),
            now: crate::unix_now(),
            limits: &limits,
            threads: 2,
        }
        .verify(&a.channel)
        .map_err(|e| match e {
            // Object problems already name their files.
            e @ crate::Error::Objects { .. } => anyhow::Error::from(e),
            e => anyhow::Error::from(e).context(channel_path(&a.channel)),
        })?;
        // The image blobs the release carries: present, of the listed
        // size, hashing to their digests.
        if let Some(images) = &v.images {
            let problems = ChannelCheck {
                repo: &repo,
                fallback: None,
                root: chain.current().root(),
                now: crate::unix_now(),
                limits: &limits,
                threads: 2,
            }
            .check_image_blobs(images);
            if !problems.is_empty() {
                return Err(crate::Error::Objects { problems }.into());
            }
        }
        Ok((chain, v))
    })();
    let (chain, v) = match result {
        Ok(x) => x,
        Err(e) => {
            if a.json {
                let problems = e
                    .chain()
                    .find_map(|c| match c.downcast_ref::<crate::Error>() {
                        Some(crate::Error::Objects { problems }) => Some(problems.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                let v = serde_json::json!({
                    "ok": false,
                    "channel": a.channel,
                    "error": super::error_chain(&e),
                    "problems": problems,
                });
                println!("{v}");
            } else if let Some(crate::Error::Objects { problems }) =
                e.chain().find_map(|c| c.downcast_ref::<crate::Error>())
            {
                for p in problems.iter().skip(1) {
                    eprintln!("  also: {p}");
                }
            }
            return Err(e);
        }
    };
    let r = &v.release.release();
    let m = &v.manifest;
    let signers: Vec<String> = v.release.signers().iter().map(|k| k.0.clone()).collect();
    if a.json {
        let out = serde_json::json!({
            "ok": true,
            "channel": r.channel,
            "sequence": r.sequence,
            "bundle": r.bundle,
            "created": r.created,
            "expires": r.expires,
            "root_version": chain.current().root().version,
            "signers": signers,
            "source": m.source,
            "objects": m.entries.len(),
            "bytes": v.bytes,
            "rollout": crate::rollout::format_rollout(&r.rollout),
            "selector": r.selector,
            "images": v.images.as_ref().map(|i| i.list.images.len()),
            "image_blobs": v.images.as_ref().map(|i| i.list.distinct_blobs().len()),
            "image_bytes": v.images.as_ref().map(|i| i.list.total_bytes()),
        });
        println!("{out}");
    } else {
        println!("channel  {} sequence {}", r.channel, r.sequence);
        println!("bundle   {}", r.bundle);
        println!(
            "source   {} commit {}{}",
            m.source.repository,
            m.source.commit,
            if m.source.path.is_empty() {
                String::new()
            } else {
                format!(" path {}", m.source.path)
            }
        );
        println!(
            "objects  {} ({} bytes with the manifest)",
            m.entries.len(),
            v.bytes
        );
        if let Some(i) = &v.images {
            println!(
                "images   {} ({} blobs, {} bytes, every blob checked)",
                i.list.images.len(),
                i.list.distinct_blobs().len(),
                i.list.total_bytes()
            );
        }
        println!(
            "signed   {} of threshold {} release key(s), root v{}",
            signers.len(),
            chain.current().root().release.threshold,
            chain.current().root().version
        );
        println!("expires  {} (unix seconds)", r.expires);
        println!("ok");
    }
    Ok(())
}

pub(super) fn export(a: ExportArgs) -> Result<()> {
    let limits = Limits::default();
    let repo = RepoDir::new(&a.repo);
    let chain = a.root.chain(&repo)?;
    let s = archive::export(
        &repo,
        &chain,
        &a.channels,
        &a.out,
        crate::unix_now(),
        &limits,
    )?;
    let chans: Vec<String> = s.channels.iter().map(|(c, n)| format!("{c}@{n}")).collect();
    eprintln!(
        "exported {} ({} root(s), {} object(s), {} image blob(s), {} bytes) to {}",
        chans.join(" "),
        s.roots.len(),
        s.objects,
        s.image_blobs,
        s.bytes,
        a.out.display()
    );
    Ok(())
}

pub(super) fn import(a: ImportArgs) -> Result<()> {
    let limits = Limits::default();
    let repo = RepoDir::new(&a.repo);
    let start = a.root.start()?;
    let s = archive::import(&a.file, &repo, start, crate::unix_now(), &limits)?;
    for (c, n) in &s.updated {
        eprintln!("channel {c}: now at release {n}");
    }
    for c in &s.unchanged {
        eprintln!("channel {c}: already at the archive's release");
    }
    if s.unreferenced > 0 {
        eprintln!("skipped {} object(s) that no channel needs", s.unreferenced);
    }
    eprintln!(
        "imported into {}: {} new object(s) ({} image blob(s)), {} new root(s)",
        display(repo.path()),
        s.objects_written,
        s.image_blobs_written,
        s.roots_written.len()
    );
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
