//! Publishing a release into a bundle repository directory.
//!
//! Order of writes, each atomic: every object of the bundle (only those
//! absent), the manifest itself at the bundle id, the roots of the trust
//! chain (only those absent), and the signed release envelope at
//! `channels/<channel>` last. Everything that can be refused is checked
//! before the first write: the root, the keys, the threshold, the previous
//! channel head and the whole bundle file.
//!
//! Two releases on the same channel at the same moment are not serialised;
//! release engineers publish one at a time.

use crate::bundle::read_bundle_file;
use crate::limits::Limits;
use crate::release::{validate_channel, Release, Rollout, RELEASE_FORMAT};
use crate::repo::{channel_path, root_path, RepoDir};
use crate::trust::TrustChain;
use crate::verify::{binding_floor, signed_under_any, ReleaseCheck, VerifiedRelease};
use crate::{Error, Result};
use cairn_keys::root::release_epoch;
use cairn_keys::Root;
use cairn_keys::{KeyPair, Role};
use std::collections::BTreeMap;
use std::path::Path;

/// What to release.
#[derive(Clone, Debug)]
pub struct ReleaseRequest {
    /// The channel.
    pub channel: String,
    /// Seconds from now until the release expires.
    pub expires_in: u64,
    /// Rollout policy.
    pub rollout: Rollout,
    /// Agents must carry these labels.
    pub selector: BTreeMap<String, String>,
    /// Now, Unix seconds (`created`).
    pub now: u64,
}

/// Parses `k=v,k2=v2` into a selector. Keys and values must be non-empty
/// and keys distinct.
pub fn parse_selector(spec: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: a selector label is KEY=VALUE"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || v.is_empty() {
            return Err(format!("`{part}`: label key and value must not be empty"));
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(format!("`{part}`: label `{k}` given twice"));
        }
    }
    Ok(out)
}

/// Checks that `keys` can sign releases under the chain's current root:
/// every key is a release key of the root, and there are at least
/// threshold distinct keys. Returns the distinct keys.
pub fn check_release_keys<'k>(
    chain: &TrustChain,
    keys: &'k [KeyPair],
    what: &str,
) -> Result<Vec<&'k KeyPair>> {
    let root = &chain.current().root();
    let mut distinct: Vec<&KeyPair> = Vec::new();
    for k in keys {
        let id = k.key_id();
        if !root.authorises(Role::Release, &id) {
            return Err(cairn_keys::Error::NotAuthorised {
                key_id: id.0,
                role: Role::Release,
                root_version: root.version,
            }
            .into());
        }
        if !distinct.iter().any(|d| d.key_id() == id) {
            distinct.push(k);
        }
    }
    if distinct.len() < root.release.threshold as usize {
        return Err(cairn_keys::Error::Threshold {
            what: what.to_owned(),
            role: Role::Release,
            valid: distinct.len(),
            threshold: root.release.threshold,
            detail: format!(
                " (root v{}); pass at least {} distinct release keys with --key",
                root.version, root.release.threshold
            ),
        }
        .into());
    }
    Ok(distinct)
}

/// A release signed and verified, not yet written: what [`sign_release`]
/// returns for [`publish`] and [`promote`] to commit.
#[derive(Clone, Debug)]
pub struct SignedRelease {
    /// The release, verified as an agent would verify it.
    pub verified: VerifiedRelease,
    /// The previous head's sequence on the channel, if any.
    pub previous: Option<u64>,
}

/// Everything that can be refused before the first write, shared by
/// [`publish`] and [`promote`]: the channel name, the root's expiry, the
/// channel's current head (the new sequence is one above it), the keys and
/// threshold. Signs a release of `bundle` on `req.channel` and verifies the
/// envelope exactly as an agent would.
pub fn sign_release(
    repo: &RepoDir,
    chain: &TrustChain,
    bundle: &str,
    keys: &[KeyPair],
    req: &ReleaseRequest,
    limits: &Limits,
) -> Result<SignedRelease> {
    validate_channel(&req.channel).map_err(Error::InvalidRelease)?;
    let root = &chain.current().root();
    if root.is_expired(req.now) {
        return Err(Error::RootExpired {
            version: root.version,
            expires: root.expires,
        });
    }
    let previous = match repo.channel(&req.channel, limits.max_release_bytes)? {
        None => None,
        Some(bytes) => {
            let (_, prev) = Release::decode_envelope(&bytes, limits.max_release_bytes).map_err(|e| {
                Error::Repository(format!(
                    "{}: the current channel head is unreadable ({e}); repair or remove it before releasing",
                    channel_path(&req.channel)
                ))
            })?;
            Some((prev.sequence, bytes))
        }
    };
    let floor = release_floor(chain, &req.channel, previous.as_ref(), limits)?;
    let previous = previous.map(|(s, _)| s);
    let sequence = match floor {
        None => 1,
        Some(s) => s.checked_add(1).ok_or_else(|| Error::ChannelExhausted {
            channel: req.channel.clone(),
            sequence: s,
        })?,
    };
    let what = format!("release {sequence} on channel `{}`", req.channel);
    let signers = check_release_keys(chain, keys, &what)?;
    let release = Release {
        format: RELEASE_FORMAT,
        channel: crate::ChannelName::parse(&req.channel)
            .map_err(|e| Error::InvalidRelease(e.to_string()))?,
        sequence,
        bundle: crate::BundleId::parse(bundle).map_err(|e| Error::InvalidRelease(e.to_string()))?,
        created: req.now,
        expires: req.now.saturating_add(req.expires_in),
        rollout: req.rollout.clone(),
        selector: req.selector.clone(),
    };
    release.validate()?;
    let envelope = release.sign(&signers).encode();
    let verified = ReleaseCheck {
        root,
        channel: &req.channel,
        last_sequence: floor,
        now: req.now,
        limits,
    }
    .verify(&envelope)?;
    Ok(SignedRelease { verified, previous })
}

/// The rollback floor the channel's current head sets for the next
/// release: its sequence while a root of the chain's current release epoch
/// signed it (the next release is one above it), `None` when the epoch has
/// replaced the release role that signed it (the next release restarts at
/// 1: agents drop that floor the same way, [`binding_floor`]). A head no
/// root of the chain signed is an error: releasing on top of it would
/// guess the agents' floor.
fn release_floor(
    chain: &TrustChain,
    channel: &str,
    head: Option<&(u64, Vec<u8>)>,
    limits: &Limits,
) -> Result<Option<u64>> {
    let Some((sequence, bytes)) = head else {
        return Ok(None);
    };
    let roots: Vec<Root> = chain.roots().iter().map(|r| r.root().clone()).collect();
    let floor = binding_floor(release_epoch(&roots), Some((*sequence, bytes)), limits);
    if floor.is_none() && !signed_under_any(&roots, bytes, limits) {
        return Err(Error::Repository(format!(
            "{}: the current channel head (sequence {sequence}) is not signed by a threshold of release keys of any root of the trust chain (v{}..v{}); pass the --root files it was signed under, or repair or remove it before releasing",
            channel_path(channel),
            roots.first().map_or(0, |r| r.version),
            roots.last().map_or(0, |r| r.version),
        )));
    }
    Ok(floor)
}

/// Writes the chain's roots the repository lacks, then the channel head
/// (last, atomically): the final step of [`publish`] and [`promote`].
fn commit_head(repo: &RepoDir, chain: &TrustChain, signed: &SignedRelease) -> Result<()> {
    for r in chain.roots() {
        let rel = root_path(r.root().version);
        if repo
            .read(&rel, cairn_keys::root::MAX_ROOT_BYTES as u64)?
            .is_none()
        {
            repo.write(&rel, r.bytes())?;
        }
    }
    repo.write(
        &channel_path(&signed.verified.release().channel),
        signed.verified.bytes(),
    )
}

/// Releases the bundle in `bundle_file` on a channel of `repo`, signed with
/// `keys` under the chain's current root. Returns the verified release.
pub fn publish(
    repo: &RepoDir,
    chain: &TrustChain,
    bundle_file: &Path,
    keys: &[KeyPair],
    req: &ReleaseRequest,
    limits: &Limits,
) -> Result<VerifiedRelease> {
    validate_channel(&req.channel).map_err(Error::InvalidRelease)?;
    // Pass 1: the whole bundle file verifies before anything is written.
    let manifest = read_bundle_file(bundle_file, limits, |_, _| Ok(()))?;
    let encoded = manifest.encode_all();
    let signed = sign_release(repo, chain, &encoded.id(), keys, req, limits)?;
    // Pass 2: objects, manifest chunks (format 2), the manifest, roots,
    // channel head last.
    let mut batch = repo.object_batch();
    read_bundle_file(bundle_file, limits, |e, bytes| {
        batch.add(&e.object, &bytes).map(|_| ())
    })?;
    for (address, bytes) in &encoded.chunks {
        batch.add(address, bytes)?;
    }
    batch.add(&signed.verified.release().bundle, &encoded.top)?;
    batch.commit()?;
    commit_head(repo, chain, &signed)?;
    Ok(signed.verified)
}

/// What [`promote`] did.
#[derive(Clone, Debug)]
pub struct Promotion {
    /// The source channel's head that was promoted (verified).
    pub from: VerifiedRelease,
    /// The new release on the target channel.
    pub to: VerifiedRelease,
}

/// Signs the bundle of `from`'s head into `req.channel` (one sequence
/// above that channel's head) without rebuilding it. The source head is
/// verified first like `cairn verify` does (signatures against the chain's
/// current root, expiry, the manifest and every object present with the
/// right hash); nothing is written unless it passes.
pub fn promote(
    repo: &RepoDir,
    chain: &TrustChain,
    from: &str,
    keys: &[KeyPair],
    req: &ReleaseRequest,
    limits: &Limits,
) -> Result<Promotion> {
    validate_channel(from).map_err(Error::InvalidRelease)?;
    if from == req.channel {
        return Err(Error::InvalidRelease(format!(
            "cannot promote channel `{from}` into itself; pass another --to channel"
        )));
    }
    let source = crate::check::ChannelCheck {
        repo,
        fallback: None,
        root: chain.current().root(),
        now: req.now,
        limits,
        threads: 2,
    }
    .verify(from)?;
    let signed = sign_release(
        repo,
        chain,
        &source.release.release().bundle,
        keys,
        req,
        limits,
    )?;
    commit_head(repo, chain, &signed)?;
    Ok(Promotion {
        from: source.release,
        to: signed.verified,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let s = parse_selector("region=eu, tier=edge").unwrap();
        assert_eq!(s.get("region").map(String::as_str), Some("eu"));
        assert_eq!(s.len(), 2);
        assert!(parse_selector("").unwrap().is_empty());
        assert!(parse_selector("region").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_selector("a=1,a=2").unwrap_err().contains("twice"));
        assert!(parse_selector("=x").is_err());
    }
}
