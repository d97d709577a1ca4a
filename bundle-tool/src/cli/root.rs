//! `cairn root`: trust root creation, rotation and verification.

use anyhow::{bail, Context, Result};
use cairn_keys::{keyfile, KeyPair, PublicKey, Role, Root, RootChain, VerifiedRoot};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub(super) enum RootCommand {
    /// Create root version 1, signed by its own root keys.
    Init {
        #[command(flatten)]
        spec: RootSpec,
        /// Write the signed root here.
        #[arg(long)]
        out: PathBuf,
    },
    /// Create root version N+1 from root N. It must be signed by a threshold
    /// of the previous root's root keys and of its own.
    Rotate {
        /// The current root file (version N).
        #[arg(long)]
        previous: PathBuf,
        #[command(flatten)]
        spec: RootSpec,
        /// Write the signed root here.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify a root chain in order and print the resulting root.
    Verify {
        /// Root files, oldest first. With --embedded they continue the
        /// embedded root's chain.
        files: Vec<PathBuf>,
        /// Start from the root embedded in this binary.
        #[arg(long)]
        embedded: bool,
        /// Succeed even if the newest root has expired.
        #[arg(long)]
        allow_expired: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Keys, thresholds, expiry and signers of a new root.
#[derive(Debug, Args)]
pub(super) struct RootSpec {
    /// Public key file of a root key (repeat for each).
    #[arg(long = "root-key", required = true)]
    root_keys: Vec<PathBuf>,
    /// Root key signatures required to sign the next root.
    #[arg(long)]
    root_threshold: u32,
    /// Public key file of a release key (repeat for each).
    #[arg(long = "release-key", required = true)]
    release_keys: Vec<PathBuf>,
    /// Release key signatures required on a release.
    #[arg(long)]
    release_threshold: u32,
    /// How long the root stays valid, e.g. 365d.
    #[arg(long, default_value = "365d", value_parser = crate::duration::parse_duration)]
    expires: std::time::Duration,
    /// Private key file to sign with (repeat for each).
    #[arg(long = "sign", required = true)]
    sign: Vec<PathBuf>,
}

fn read_publics(paths: &[PathBuf]) -> Result<Vec<PublicKey>> {
    paths
        .iter()
        .map(|p| keyfile::read_public(p).map_err(Into::into))
        .collect()
}

fn read_signers(paths: &[PathBuf]) -> Result<Vec<KeyPair>> {
    paths
        .iter()
        .map(|p| keyfile::read_private(p).map_err(Into::into))
        .collect()
}

impl RootSpec {
    fn build(&self, version: u64, now: u64) -> Result<(Root, Vec<KeyPair>)> {
        let root = Root::new(
            version,
            now.saturating_add(self.expires.as_secs()),
            &read_publics(&self.root_keys)?,
            self.root_threshold,
            &read_publics(&self.release_keys)?,
            self.release_threshold,
        )?;
        Ok((root, read_signers(&self.sign)?))
    }
}

/// Reads a root file with the size limit applied before reading.
pub(crate) fn read_root_file(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .len();
    if len > cairn_keys::root::MAX_ROOT_BYTES as u64 {
        bail!(
            "{}: {len} bytes is too large for a root file",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("{}", path.display()))
}

fn write_root(out: &Path, bytes: &[u8]) -> Result<()> {
    cairn_keys::fs::write_atomic(out, bytes, None).with_context(|| format!("{}", out.display()))
}

pub(super) fn run(cmd: RootCommand) -> Result<()> {
    let now = crate::unix_now();
    match cmd {
        RootCommand::Init { spec, out } => {
            let (root, signers) = spec.build(1, now)?;
            let refs: Vec<&KeyPair> = signers.iter().collect();
            let bytes = root.sign(&refs).encode();
            VerifiedRoot::verify_initial(&bytes).context("the new root does not verify")?;
            write_root(&out, &bytes)?;
            eprintln!("wrote root v1 to {}", out.display());
            println!("root v1");
        }
        RootCommand::Rotate {
            previous,
            spec,
            out,
        } => {
            let prev_bytes = read_root_file(&previous)?;
            let (_, prev) = Root::decode_envelope(&prev_bytes)
                .with_context(|| format!("{}", previous.display()))?;
            let (root, signers) = spec.build(prev.version + 1, now)?;
            let refs: Vec<&KeyPair> = signers.iter().collect();
            let bytes = root.sign(&refs).encode();
            let trusted = VerifiedRoot::verify_initial(&prev_bytes).with_context(|| {
                format!(
                    "{}: the previous root does not carry a threshold of its own root keys' signatures",
                    previous.display()
                )
            })?;
            trusted
                .verify_next(&bytes)
                .context("the rotated root does not verify; sign it with a threshold of the previous root's root keys and of the new root keys")?;
            write_root(&out, &bytes)?;
            eprintln!("wrote root v{} to {}", root.version, out.display());
            println!("root v{}", root.version);
        }
        RootCommand::Verify {
            files,
            embedded,
            allow_expired,
            json,
        } => {
            let mut contents = Vec::new();
            for f in &files {
                contents.push((f, read_root_file(f)?));
            }
            let (first, rest) = if embedded {
                let first = cairn_keys::embedded::root().context("embedded root")?;
                // The embedded root itself may be listed first; skip it.
                let skip = usize::from(contents.first().is_some_and(|(_, b)| *b == first.bytes()));
                (first, &contents[skip..])
            } else {
                let Some(((path, bytes), rest)) = contents.split_first() else {
                    bail!("no root files given (or use --embedded)");
                };
                let first = VerifiedRoot::verify_initial(bytes)
                    .with_context(|| format!("{}", path.display()))?;
                (first, rest)
            };
            let mut current = first;
            for (path, bytes) in rest {
                current = current
                    .verify_next(bytes)
                    .with_context(|| format!("{}", path.display()))?;
            }
            let chain = RootChain::follow(current, [], now)?;
            print_root(&chain, json);
            if chain.expired && !allow_expired {
                bail!(
                    "root v{} expired at {} (unix seconds); rotate to a new root, or pass --allow-expired",
                    chain.current.root().version,
                    chain.current.root().expires
                );
            }
        }
    }
    Ok(())
}

fn print_root(chain: &RootChain, json: bool) {
    let r = &chain.current.root();
    let ids = |role| -> Vec<String> { r.role(role).key_ids.iter().map(|k| k.0.clone()).collect() };
    if json {
        let v = serde_json::json!({
            "version": r.version,
            "expires": r.expires,
            "expired": chain.expired,
            "root": {"threshold": r.root.threshold, "keys": ids(Role::Root)},
            "release": {"threshold": r.release.threshold, "keys": ids(Role::Release)},
        });
        println!("{v}");
    } else {
        println!(
            "root v{} ok{}, expires {} (unix seconds)",
            r.version,
            if chain.expired { " but EXPIRED" } else { "" },
            r.expires
        );
        for role in [Role::Root, Role::Release] {
            println!(
                "  {role} keys (threshold {}): {}",
                r.role(role).threshold,
                ids(role).join(" ")
            );
        }
    }
}
