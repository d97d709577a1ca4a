//! The verification pipeline: a pure state machine that turns untrusted
//! bytes (roots, a release, a bundle manifest, objects) into an adoption or a
//! rejection with a reason.
//!
//! ```text
//! roots/<v+1>  --check_root-->  VerifiedRoot (persist, then follow on)
//! channels/<c> --Ingest::start--> UpToDate | Ingest (release verified)
//! Ingest::want()  -> Manifest{address,limit} | Objects[(address,limit)] | Complete
//! Ingest::handle_manifest / handle_object / mark_present
//! Ingest::finish(ctx) -> Adoption   (re-checked against the head at commit time)
//! ```
//!
//! **Architecture invariant:** this module knows neither sources, sled,
//! tokio nor the clock. Time (`now`), the trusted root and the last adopted
//! release arrive as arguments. The agent's sync loop and the mesh feed it
//! the same way, and unit tests drive it directly.
//!
//! What it checks: the root chain (each new root signed by a threshold of the
//! previous root's root keys and of its own), the release (signatures and
//! threshold by the current root's release keys, channel, sequence strictly
//! above the last adopted one, not expired, root not expired), the bundle
//! manifest (hash equals the bundle id, canonical, within limits) and every
//! object (hash equals its address, size equals the manifest's). Nothing of a
//! rejected release becomes adoptable: an [`Adoption`] only exists once every
//! check passed.

use crate::bundle::{verify_object, Assembly, Entry, Head, Manifest};
use crate::ids::{Address, BundleId};
use crate::limits::Limits;
use crate::rollout::{self, Decision, FleetReports};
use crate::verify::{binding_floor_with, ReleaseCheck, SignatureMemo, VerifiedRelease};
use cairn_keys::{Root, VerifiedRoot};
use std::collections::BTreeMap;
use std::fmt;

/// Which part of a candidate was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// A new root offered by a source.
    Root,
    /// The channel's release envelope.
    Release,
    /// The bundle manifest the release names.
    Manifest,
    /// One of the bundle's objects.
    Object,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Root => "root",
            Stage::Release => "release",
            Stage::Manifest => "bundle manifest",
            Stage::Object => "object",
        })
    }
}

/// Why a candidate was refused: the stage and the concrete error.
#[derive(Debug)]
pub struct Rejection {
    /// Where it failed.
    pub stage: Stage,
    /// The verification error (its [`crate::Error::reason`] is the
    /// metric label, see [`Rejection::reason`]).
    pub error: crate::Error,
}

impl Rejection {
    /// A rejection at `stage` for `error`.
    pub fn new(stage: Stage, error: impl Into<crate::Error>) -> Self {
        Self {
            stage,
            error: error.into(),
        }
    }

    /// The short, stable reason used as the `reason` label of
    /// `cairn_release_rejections_total` and in status. It is
    /// [`crate::Error::reason`], except that every failure of a new
    /// root is `root_rotation` (the message has the detail).
    pub fn reason(&self) -> &'static str {
        match self.stage {
            Stage::Root => "root_rotation",
            _ => self.error.reason(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rejected ({}): {}",
            self.stage,
            self.reason(),
            self.error
        )
    }
}

impl std::error::Error for Rejection {}

/// Verifies the next root offered by a source against the current one.
/// Expiry is not checked here: an expired root is still a valid link in the
/// chain (a later one may follow); release checks refuse to adopt under an
/// expired root.
pub fn check_root(current: &VerifiedRoot, bytes: &[u8]) -> Result<VerifiedRoot, Rejection> {
    current
        .verify_next(bytes)
        .map_err(|e| Rejection::new(Stage::Root, e))
}

/// The release adopted on the channel, as the pipeline needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedRef<'a> {
    /// Its sequence.
    pub sequence: u64,
    /// Its exact envelope bytes.
    pub bytes: &'a [u8],
}

/// Everything a decision depends on besides the candidate's bytes.
#[derive(Clone, Debug)]
pub struct Context<'a> {
    /// The current trusted root (end of the verified chain).
    pub root: &'a Root,
    /// The roots of the current release epoch, `root` last
    /// ([`cairn_keys::RootChain::release_epoch`]): the adopted release's
    /// sequence is a rollback floor only if one of them signed it, so a
    /// rotation to new release keys recovers a channel that a stolen key
    /// pushed to 2^64 − 1 ([`crate::verify::binding_floor`]).
    pub epoch: &'a [Root],
    /// The channel this agent follows.
    pub channel: &'a str,
    /// The release adopted on that channel, if any.
    pub adopted: Option<AdoptedRef<'a>>,
    /// Now, Unix seconds.
    pub now: u64,
    /// Size limits.
    pub limits: &'a Limits,
    /// Release signature checks already passed ([`SignatureMemo`]), if
    /// the caller keeps them: the candidate's and the adopted release's
    /// signatures are then checked once per envelope and root; every
    /// other check runs every time. `None`: check every time.
    pub memo: Option<&'a SignatureMemo>,
}

impl Context<'_> {
    fn release_check(&self) -> ReleaseCheck<'_> {
        ReleaseCheck {
            root: self.root,
            channel: self.channel,
            last_sequence: binding_floor_with(
                self.epoch,
                self.adopted.as_ref().map(|a| (a.sequence, a.bytes)),
                self.limits,
                self.memo,
            ),
            now: self.now,
            limits: self.limits,
        }
    }
}

/// What an [`Ingest`] needs next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// The bundle manifest (format 2: its top document), stored as an
    /// object at the bundle id.
    Manifest {
        /// The bundle id.
        address: BundleId,
        /// Largest acceptable size.
        limit: u64,
    },
    /// Format 2: manifest chunks not yet present, each with its exact size
    /// (the fetch limit). They are objects like any other (fetched as
    /// `Item::Object`, stored by address); hand each to
    /// [`Ingest::handle_object`], whether fetched or read from the store.
    Chunks(Vec<(Address, u64)>),
    /// Objects not yet present, each with its exact size (the fetch limit).
    Objects(Vec<(Address, u64)>),
    /// Everything is present and verified: call [`Ingest::finish`].
    Complete,
}

/// A release that passed verification, with its verified manifest: the
/// only value the store accepts for adoption.
///
/// **Architecture invariant:** only verification makes a `Verified*` (and
/// an `Adoption`): the fields are private and only [`Ingest::finish`]
/// constructs one, after every object arrived and verified.
#[derive(Clone, Debug)]
pub struct Adoption {
    release: VerifiedRelease,
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
}

impl Adoption {
    /// The verified release.
    pub fn release(&self) -> &VerifiedRelease {
        &self.release
    }

    /// The verified bundle manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest's exact bytes (hash = bundle id).
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The bundle id (the manifest's address, named by the release).
    pub fn bundle_id(&self) -> &BundleId {
        &self.release.release().bundle
    }

    /// The channel the release is for.
    pub fn channel(&self) -> &str {
        &self.release.release().channel
    }
}

/// The result of looking at a channel's release.
#[derive(Debug)]
pub enum Start {
    /// The bytes are exactly the adopted release: nothing to do.
    UpToDate,
    /// A newer, valid release: fetch what it needs (after asking
    /// [`rollout_gate`] whether it is for this agent now).
    Candidate(Box<Ingest>),
}

/// Who is asking, for the rollout decision.
#[derive(Clone, Copy, Debug)]
pub struct Audience<'a> {
    /// This agent's id (its rollout bucket).
    pub agent_id: &'a crate::ids::AgentId,
    /// This agent's labels (matched against the release's selector).
    pub labels: &'a BTreeMap<String, String>,
    /// What gossip says about the release's bundle (circuit breaker);
    /// default (nothing known) without a mesh.
    pub reports: FleetReports,
}

/// Whether a verified candidate is for this agent now: `None` to go ahead,
/// or the deferring decision (selector does not match, rollout wave not open
/// yet, circuit breaker tripped). A deferred release is not a rejection: the
/// adopted one stays, and the next sync asks again. Pure.
pub fn rollout_gate(release: &VerifiedRelease, who: &Audience<'_>, now: u64) -> Option<Decision> {
    let decision = rollout::decide(
        release.release(),
        who.agent_id,
        who.labels,
        who.reports,
        now,
    );
    match decision {
        Decision::Adopt { .. } => None,
        other => Some(other),
    }
}

/// A one-line explanation of a deferring rollout decision.
pub fn describe_decision(d: &Decision) -> String {
    match d {
        Decision::Adopt { wave } => format!("adopt (wave {wave})"),
        Decision::NotSelected { missing } => {
            format!("not selected: the release requires {missing}")
        }
        Decision::WaitForWave { wave, opens_at } => {
            format!("waiting for rollout wave {wave}, which opens at {opens_at} (Unix seconds)")
        }
        Decision::BreakerTripped { failed, adopted } => {
            format!("held: {failed} of {adopted} adopters report this release failed")
        }
    }
}

/// Why a verified, newer release is not adopted now. Not a rejection: the
/// adopted release stays enforced and the question is asked again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deferral {
    /// A local hold (`cairn-agent hold`) is in force.
    Held {
        /// When it ends, Unix seconds; `None`: until released.
        until: Option<u64>,
    },
    /// The rollout decision: selector, wave not open, or breaker tripped
    /// (never [`Decision::Adopt`]).
    Rollout(Decision),
}

impl Deferral {
    /// A short, stable name: `held`, `not-selected`, `waiting` or `breaker`
    /// (status documents and the gossiped status record).
    pub fn state(&self) -> &'static str {
        match self {
            Deferral::Held { .. } => "held",
            Deferral::Rollout(Decision::NotSelected { .. }) => "not-selected",
            Deferral::Rollout(Decision::WaitForWave { .. }) => "waiting",
            Deferral::Rollout(Decision::BreakerTripped { .. }) => "breaker",
            Deferral::Rollout(Decision::Adopt { .. }) => "adopt",
        }
    }

    /// One line for humans, times rendered with `fmt_time`, e.g. `waiting
    /// for wave 2 (opens at 2026-12-01T06:00:00Z)`.
    pub fn describe(&self, fmt_time: impl Fn(u64) -> String) -> String {
        match self {
            Deferral::Held { until: None } => {
                "held locally until released (cairn-agent release-hold)".into()
            }
            Deferral::Held { until: Some(t) } => format!("held locally until {}", fmt_time(*t)),
            Deferral::Rollout(Decision::WaitForWave { wave, opens_at }) => {
                format!("waiting for wave {wave} (opens at {})", fmt_time(*opens_at))
            }
            Deferral::Rollout(d) => describe_decision(d),
        }
    }
}

/// A site operator's local hold on adoption (the agent's `hold.json`), as
/// the gate sees it. The agent's hold type implements it; the file IO stays
/// in the agent.
pub trait LocalHold {
    /// Whether the hold is in force at `now` (Unix seconds).
    fn active(&self, now: u64) -> bool;
    /// When it ends by itself, Unix seconds; `None`: until released.
    fn until(&self) -> Option<u64>;
}

/// The adoption gate: a local hold first, then [`rollout::decide`]. `None`
/// to adopt now. Pure.
pub fn adoption_gate(
    release: &crate::release::Release,
    who: &Audience<'_>,
    hold: Option<&impl LocalHold>,
    now: u64,
) -> Option<Deferral> {
    if let Some(h) = hold.filter(|h| h.active(now)) {
        return Some(Deferral::Held { until: h.until() });
    }
    match rollout::decide(release, who.agent_id, who.labels, who.reports, now) {
        Decision::Adopt { .. } => None,
        other => Some(Deferral::Rollout(other)),
    }
}

/// One candidate release being ingested: tracks what is still missing and
/// verifies everything that arrives.
#[derive(Debug)]
pub struct Ingest {
    release: VerifiedRelease,
    limits: Limits,
    manifest: Option<(Manifest, Vec<u8>)>,
    /// Format 2, between the top document and the last chunk: the
    /// assembly and the top document's bytes.
    chunks: Option<(Assembly, Vec<u8>)>,
    /// Objects still missing: address → size.
    missing: BTreeMap<Address, u64>,
}

impl Ingest {
    /// Verifies a channel's release envelope against `ctx`. Returns
    /// [`Start::UpToDate`] when the bytes are the adopted release itself.
    pub fn start(ctx: &Context<'_>, release_bytes: &[u8]) -> Result<Start, Rejection> {
        if ctx
            .adopted
            .as_ref()
            .is_some_and(|a| a.bytes == release_bytes)
        {
            return Ok(Start::UpToDate);
        }
        let release = ctx
            .release_check()
            .verify_with(release_bytes, ctx.memo)
            .map_err(|e| Rejection::new(Stage::Release, e))?;
        Ok(Start::Candidate(Box::new(Ingest {
            release,
            limits: ctx.limits.clone(),
            manifest: None,
            chunks: None,
            missing: BTreeMap::new(),
        })))
    }

    /// The verified release being ingested.
    pub fn release(&self) -> &VerifiedRelease {
        &self.release
    }

    /// The verified manifest, once [`Ingest::handle_manifest`] accepted it.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref().map(|(m, _)| m)
    }

    /// The verified manifest's exact bytes, once accepted.
    pub fn manifest_bytes(&self) -> Option<&[u8]> {
        self.manifest.as_ref().map(|(_, b)| b.as_slice())
    }

    /// What is needed next.
    pub fn want(&self) -> Want {
        if let Some((a, _)) = &self.chunks {
            return Want::Chunks(a.missing());
        }
        match &self.manifest {
            None => Want::Manifest {
                address: self.release.release().bundle.clone(),
                limit: self.limits.max_manifest_bytes,
            },
            Some(_) if self.missing.is_empty() => Want::Complete,
            Some(_) => Want::Objects(self.missing.iter().map(|(a, s)| (a.clone(), *s)).collect()),
        }
    }

    /// Verifies the document at the bundle id: its hash is the release's
    /// bundle id, its format one this build reads, it is canonical and
    /// within the limits. Format 1: all its objects become missing until
    /// fetched or marked present. Format 2: its chunks become wanted
    /// ([`Want::Chunks`]) and the objects follow once every chunk is in.
    pub fn handle_manifest(&mut self, bytes: &[u8]) -> Result<(), Rejection> {
        if self.manifest.is_some() || self.chunks.is_some() {
            return Ok(());
        }
        let head = Head::decode(bytes, Some(&self.release.release().bundle), &self.limits)
            .map_err(|e| Rejection::new(Stage::Manifest, e))?;
        match head {
            Head::Whole(m) => self.accept_manifest(m, bytes.to_vec()),
            Head::Chunked(top) => {
                self.chunks = Some((Assembly::new(top), bytes.to_vec()));
                self.complete_chunks()?;
            }
        }
        Ok(())
    }

    fn accept_manifest(&mut self, m: Manifest, bytes: Vec<u8>) {
        self.missing = m
            .entries
            .iter()
            .map(|e| (e.object.clone(), e.size))
            .collect();
        self.manifest = Some((m, bytes));
    }

    /// Once every chunk is in: the whole manifest is checked and its
    /// objects become missing.
    fn complete_chunks(&mut self) -> Result<(), Rejection> {
        if !self.chunks.as_ref().is_some_and(|(a, _)| a.is_complete()) {
            return Ok(());
        }
        let Some((a, top)) = self.chunks.take() else {
            return Ok(());
        };
        let m = a
            .finish(&self.limits)
            .map_err(|e| Rejection::new(Stage::Manifest, e))?;
        self.accept_manifest(m, top);
        Ok(())
    }

    /// Whether `address` is a format 2 manifest chunk this ingest still
    /// needs (fetch limit: its listed size).
    pub fn wants_chunk(&self, address: &str) -> Option<u64> {
        self.chunks.as_ref().and_then(|(a, _)| a.wants(address))
    }

    /// Verifies one object against the manifest: its address must be one
    /// the manifest lists, its size the listed size and its hash the
    /// address. While a format 2 manifest's chunks are wanted, the object
    /// must be one of them and is checked as a chunk (listed, size, hash,
    /// canonical, entry count; the whole manifest once the last arrives).
    pub fn handle_object(&mut self, address: &str, bytes: &[u8]) -> Result<(), Rejection> {
        if let Some((a, _)) = &mut self.chunks {
            a.add(address, bytes, &self.limits)
                .map_err(|e| Rejection::new(Stage::Manifest, e))?;
            return self.complete_chunks();
        }
        let expected = self.expected_size(address)?;
        check_object_bytes(address, expected, bytes)?;
        self.missing.remove(address);
        Ok(())
    }

    /// Marks an object the store already holds (the store verifies hashes
    /// on write and on start-up, so its objects need no second check).
    pub fn mark_present(&mut self, address: &str) {
        self.missing.remove(address);
    }

    fn expected_size(&self, address: &str) -> Result<u64, Rejection> {
        match self.manifest() {
            Some(m) => m
                .entries
                .iter()
                .find(|e| e.object == address)
                .map(|e| e.size)
                .ok_or_else(|| {
                    Rejection::new(
                        Stage::Object,
                        crate::Error::InvalidManifest(format!(
                            "object {address} is not listed in bundle {}",
                            self.release.release().bundle
                        )),
                    )
                }),
            None => Err(Rejection::new(
                Stage::Object,
                crate::Error::InvalidManifest("object before its manifest".into()),
            )),
        }
    }

    /// Completes the ingest. `ctx` must describe the state *at commit time*
    /// (another source may have adopted something meanwhile): the release
    /// is checked again, so a concurrent newer adoption turns this one
    /// into a rollback, and an expiry passed during the fetch is caught.
    pub fn finish(self, ctx: &Context<'_>) -> Result<Adoption, Rejection> {
        if let Some((a, _)) = &self.chunks {
            let address = a.missing().into_iter().next().map(|(a, _)| a.to_string());
            return Err(Rejection::new(
                Stage::Manifest,
                crate::Error::ObjectMissing {
                    address: address.unwrap_or_default(),
                    what: "bundle manifest chunk".into(),
                },
            ));
        }
        let Some((manifest, manifest_bytes)) = self.manifest else {
            return Err(Rejection::new(
                Stage::Manifest,
                crate::Error::ObjectMissing {
                    address: self.release.release().bundle.to_string(),
                    what: "bundle manifest".into(),
                },
            ));
        };
        if let Some((address, _)) = self.missing.iter().next() {
            let what = manifest
                .entries
                .iter()
                .find(|e| &e.object == address)
                .map(Entry::display_name)
                .unwrap_or_default();
            return Err(Rejection::new(
                Stage::Object,
                crate::Error::ObjectMissing {
                    address: address.to_string(),
                    what,
                },
            ));
        }
        let release = ctx
            .release_check()
            .verify_with(self.release.bytes(), ctx.memo)
            .map_err(|e| Rejection::new(Stage::Release, e))?;
        Ok(Adoption {
            release,
            manifest,
            manifest_bytes,
        })
    }
}

/// Checks object bytes against an address and an exact size.
pub fn check_object_bytes(address: &str, size: u64, bytes: &[u8]) -> Result<(), Rejection> {
    if bytes.len() as u64 > size {
        return Err(Rejection::new(
            Stage::Object,
            crate::Error::TooLarge {
                what: format!("object {address}"),
                limit: size,
                actual: bytes.len() as u64,
            },
        ));
    }
    verify_object(address, bytes).map_err(|e| Rejection::new(Stage::Object, e))?;
    if bytes.len() as u64 != size {
        return Err(Rejection::new(
            Stage::Object,
            crate::Error::InvalidManifest(format!(
                "object {address} is {} bytes, the manifest says {size}",
                bytes.len()
            )),
        ));
    }
    Ok(())
}

/// Re-verifies stored state at start-up: the adopted release's signatures
/// and channel against a root of the verified chain `roots` (oldest first;
/// no rollback or expiry check: the last-good release keeps being enforced
/// after it expires, and after a rotation to new release keys until a
/// release signed by them arrives), and the stored manifest against the
/// release's bundle id (format 2: with its chunks, read through `chunk`
/// as in [`Manifest::load`]). The error, if every root refuses, is the
/// newest root's.
pub fn reverify_adopted(
    roots: &[Root],
    channel: &str,
    limits: &Limits,
    now: u64,
    release_bytes: &[u8],
    manifest_bytes: &[u8],
    chunk: impl FnMut(&Address, u64) -> crate::Result<Option<Vec<u8>>>,
) -> Result<(VerifiedRelease, Manifest), Rejection> {
    let mut newest_error = None;
    let mut verified = None;
    for root in roots.iter().rev() {
        let check = ReleaseCheck {
            root,
            channel,
            last_sequence: None,
            now,
            limits,
        };
        match check.reverify_adopted(release_bytes) {
            Ok(v) => {
                verified = Some(v);
                break;
            }
            Err(e) => {
                newest_error.get_or_insert(e);
            }
        }
    }
    let release = match (verified, newest_error) {
        (Some(v), _) => v,
        (None, Some(e)) => return Err(Rejection::new(Stage::Release, e)),
        (None, None) => {
            return Err(Rejection::new(
                Stage::Release,
                crate::Error::Repository("no trusted root to verify against".into()),
            ))
        }
    };
    let manifest = Manifest::load(
        manifest_bytes,
        Some(&release.release().bundle),
        limits,
        chunk,
    )
    .map_err(|e| Rejection::new(Stage::Manifest, e))?;
    Ok((release, manifest))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::release::{Release, Rollout, RELEASE_FORMAT};
    use cairn_keys::{KeyPair, Role};

    pub(crate) const NOW: u64 = 1_800_000_000;

    pub(crate) fn dev_key(name: &str) -> KeyPair {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../keys/trust/dev")
            .join(format!("{name}.key"));
        cairn_keys::keyfile::read_private(&p).unwrap()
    }

    pub(crate) use crate::testing::{manifest, object};

    fn no_chunks(_: &Address, _: u64) -> crate::Result<Option<Vec<u8>>> {
        Ok(None)
    }

    pub(crate) fn release(channel: &str, sequence: u64, bundle: &str, expires: u64) -> Release {
        Release {
            format: RELEASE_FORMAT,
            channel: channel.parse().unwrap(),
            sequence,
            bundle: bundle.parse().unwrap(),
            created: NOW - 100,
            expires,
            rollout: Rollout::default(),
            selector: Default::default(),
        }
    }

    fn root() -> VerifiedRoot {
        cairn_keys::embedded::root().unwrap()
    }

    fn ctx<'a>(root: &'a Root, limits: &'a Limits, adopted: Option<AdoptedRef<'a>>) -> Context<'a> {
        Context {
            root,
            epoch: std::slice::from_ref(root),
            channel: "stable",
            adopted,
            now: NOW,
            limits,
            memo: None,
        }
    }

    fn signed(r: &Release) -> Vec<u8> {
        r.sign(&[&dev_key("dev-release-1")]).encode()
    }

    fn start_err(ctx: &Context<'_>, bytes: &[u8]) -> Rejection {
        match Ingest::start(ctx, bytes) {
            Err(r) => r,
            Ok(s) => panic!("expected a rejection, got {s:?}"),
        }
    }

    #[test]
    fn full_ingest_adopts() {
        let r = root();
        let limits = Limits::default();
        let objs = [object("a", "one", "1"), object("a", "two", "2")];
        let m = manifest(&objs);
        let rel = signed(&release("stable", 1, &m.id(), NOW + 1000));
        let c = ctx(r.root(), &limits, None);
        let Start::Candidate(mut ing) = Ingest::start(&c, &rel).unwrap() else {
            panic!("not a candidate")
        };
        assert!(matches!(ing.want(), Want::Manifest { .. }));
        ing.handle_manifest(&m.encode()).unwrap();
        let Want::Objects(w) = ing.want() else {
            panic!()
        };
        assert_eq!(w.len(), 2);
        ing.handle_object(&objs[0].0.object, &objs[0].1).unwrap();
        ing.mark_present(&objs[1].0.object);
        assert_eq!(ing.want(), Want::Complete);
        let a = ing.finish(&c).unwrap();
        assert_eq!(a.release.release().sequence, 1);
        // The same bytes again are up to date, not a rollback.
        let adopted = AdoptedRef {
            sequence: 1,
            bytes: &rel,
        };
        let c2 = ctx(r.root(), &limits, Some(adopted));
        assert!(matches!(Ingest::start(&c2, &rel), Ok(Start::UpToDate)));
    }

    #[test]
    fn rollback_is_rejected() {
        let r = root();
        let limits = Limits::default();
        let m = manifest(&[object("a", "one", "1")]);
        let newer = signed(&release("stable", 5, &m.id(), NOW + 1000));
        let older = signed(&release("stable", 4, &m.id(), NOW + 1000));
        let same_seq_other_bytes = signed(&release("stable", 5, &m.id(), NOW + 2000));
        let adopted = AdoptedRef {
            sequence: 5,
            bytes: &newer,
        };
        let c = ctx(r.root(), &limits, Some(adopted));
        let e = start_err(&c, &older);
        assert!(
            matches!(
                e.error,
                crate::Error::Rollback {
                    last: 5,
                    found: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.reason(), "rollback");
        assert_eq!(start_err(&c, &same_seq_other_bytes).reason(), "rollback");
    }

    #[test]
    fn expired_release_is_rejected() {
        let r = root();
        let limits = Limits::default();
        let m = manifest(&[object("a", "one", "1")]);
        let rel = signed(&release("stable", 1, &m.id(), NOW - 1));
        let e = start_err(&ctx(r.root(), &limits, None), &rel);
        assert!(matches!(e.error, crate::Error::Expired { .. }), "{e}");
        assert_eq!(e.reason(), "expired");
    }

    #[test]
    fn wrong_channel_is_rejected() {
        let r = root();
        let limits = Limits::default();
        let m = manifest(&[object("a", "one", "1")]);
        let rel = signed(&release("beta", 1, &m.id(), NOW + 100));
        let e = start_err(&ctx(r.root(), &limits, None), &rel);
        assert!(matches!(e.error, crate::Error::WrongChannel { .. }), "{e}");
        assert_eq!(e.reason(), "wrong_channel");
    }

    #[test]
    fn unsigned_unknown_key_and_root_key_are_below_threshold() {
        let r = root();
        let limits = Limits::default();
        let m = manifest(&[object("a", "one", "1")]);
        let doc = release("stable", 1, &m.id(), NOW + 100);
        let stranger = KeyPair::generate().unwrap();
        for env in [
            doc.sign(&[]),
            doc.sign(&[&stranger]),
            doc.sign(&[&dev_key("dev-root-1")]),
        ] {
            let e = start_err(&ctx(r.root(), &limits, None), &env.encode());
            assert!(
                matches!(
                    e.error,
                    crate::Error::Keys(cairn_keys::Error::Threshold {
                        role: Role::Release,
                        valid: 0,
                        ..
                    })
                ),
                "{e}"
            );
            assert_eq!(e.reason(), "signature_threshold");
        }
    }

    #[test]
    fn garbage_and_truncation_are_malformed() {
        let r = root();
        let limits = Limits::default();
        let m = manifest(&[object("a", "one", "1")]);
        let rel = signed(&release("stable", 1, &m.id(), NOW + 100));
        let c = ctx(r.root(), &limits, None);
        assert_eq!(
            start_err(&c, b"<html>not found</html>").reason(),
            "malformed"
        );
        assert_eq!(start_err(&c, &rel[..rel.len() / 2]).reason(), "malformed");
        let mut big = rel.clone();
        big.resize(limits.max_release_bytes as usize + 1, 0);
        assert_eq!(start_err(&c, &big).reason(), "too_large");
    }

    #[test]
    fn root_expired_blocks_new_adoption() {
        let mut r = root().root().clone();
        r.expires = NOW - 1;
        let limits = Limits::default();
        let m = manifest(&[object("a", "one", "1")]);
        let rel = signed(&release("stable", 1, &m.id(), NOW + 100));
        assert_eq!(
            start_err(&ctx(&r, &limits, None), &rel).reason(),
            "root_expired"
        );
    }

    fn candidate(objs: &[(Entry, Vec<u8>)]) -> (Ingest, Manifest) {
        let r = root();
        let limits = Limits::default();
        let m = manifest(objs);
        let rel = signed(&release("stable", 1, &m.id(), NOW + 100));
        match Ingest::start(&ctx(r.root(), &limits, None), &rel).unwrap() {
            Start::Candidate(i) => (*i, m),
            Start::UpToDate => panic!(),
        }
    }

    #[test]
    fn format_2_moves_top_then_chunks_then_objects() {
        let objs: Vec<_> = (0..400)
            .map(|i| object("a", &format!("o{i:04}"), "1"))
            .collect();
        let m = crate::testing::manifest_v2(&objs);
        let enc = m.encode_all();
        let r = root();
        let limits = Limits::default();
        let rel = signed(&release("stable", 1, &enc.id(), NOW + 100));
        let Start::Candidate(mut ing) = Ingest::start(&ctx(r.root(), &limits, None), &rel).unwrap()
        else {
            panic!()
        };
        assert!(matches!(ing.want(), Want::Manifest { .. }));
        ing.handle_manifest(&enc.top).unwrap();
        let Want::Chunks(wanted) = ing.want() else {
            panic!("{:?}", ing.want())
        };
        assert_eq!(wanted.len(), enc.chunks.len());
        // An object before the chunks is refused; a bad chunk too, and
        // nothing changes.
        let e = ing
            .handle_object(&objs[0].0.object, &objs[0].1)
            .unwrap_err();
        assert_eq!(e.stage, Stage::Manifest);
        let mut bad = enc.chunks[0].1.clone();
        bad[5] ^= 1;
        let e = ing.handle_object(&enc.chunks[0].0, &bad).unwrap_err();
        assert_eq!(e.reason(), "object_hash_mismatch");
        assert_eq!(ing.wants_chunk(&enc.chunks[0].0), Some(bad.len() as u64));
        for (a, b) in &enc.chunks {
            ing.handle_object(a, b).unwrap();
        }
        let Want::Objects(list) = ing.want() else {
            panic!()
        };
        assert_eq!(list.len(), 400);
        for (e, b) in &objs {
            ing.handle_object(&e.object, b).unwrap();
        }
        let adoption = ing.finish(&ctx(r.root(), &limits, None)).unwrap();
        assert_eq!(adoption.manifest(), &m);
        assert_eq!(adoption.manifest_bytes(), enc.top.as_slice());
    }

    #[test]
    fn manifest_hash_mismatch_is_rejected() {
        let objs = [object("a", "one", "1")];
        let (mut ing, _) = candidate(&objs);
        let other = manifest(&[object("a", "one", "2")]);
        let e = ing.handle_manifest(&other.encode()).unwrap_err();
        assert_eq!(e.stage, Stage::Manifest);
        assert_eq!(e.reason(), "object_hash_mismatch");
        assert!(matches!(ing.want(), Want::Manifest { .. }));
    }

    #[test]
    fn flipped_byte_object_is_rejected() {
        let objs = [object("a", "one", "1")];
        let (mut ing, m) = candidate(&objs);
        ing.handle_manifest(&m.encode()).unwrap();
        let mut bad = objs[0].1.clone();
        bad[3] ^= 1;
        let e = ing.handle_object(&objs[0].0.object, &bad).unwrap_err();
        assert_eq!(e.reason(), "object_hash_mismatch");
        let mut long = objs[0].1.clone();
        long.push(b' ');
        assert_eq!(
            ing.handle_object(&objs[0].0.object, &long)
                .unwrap_err()
                .reason(),
            "too_large"
        );
        let e = ing
            .handle_object(&objs[0].0.object, &objs[0].1[..4])
            .unwrap_err();
        assert_eq!(e.reason(), "object_hash_mismatch");
        // Nothing of it is adoptable: finishing now names the missing object.
        let r = root();
        let limits = Limits::default();
        let e = ing.finish(&ctx(r.root(), &limits, None)).unwrap_err();
        assert_eq!(e.reason(), "object_missing");
    }

    #[test]
    fn unlisted_object_is_rejected() {
        let objs = [object("a", "one", "1")];
        let (mut ing, m) = candidate(&objs);
        ing.handle_manifest(&m.encode()).unwrap();
        let (e2, b2) = object("a", "two", "2");
        assert_eq!(
            ing.handle_object(&e2.object, &b2).unwrap_err().reason(),
            "invalid_bundle"
        );
    }

    #[test]
    fn concurrent_newer_adoption_turns_finish_into_rollback() {
        let objs = [object("a", "one", "1")];
        let (mut ing, m) = candidate(&objs);
        ing.handle_manifest(&m.encode()).unwrap();
        ing.mark_present(&objs[0].0.object);
        let r = root();
        let limits = Limits::default();
        let other = signed(&release("stable", 3, &m.id(), NOW + 100));
        let adopted = AdoptedRef {
            sequence: 3,
            bytes: &other,
        };
        let e = ing
            .finish(&ctx(r.root(), &limits, Some(adopted)))
            .unwrap_err();
        assert_eq!(e.reason(), "rollback");
    }

    #[test]
    fn root_rotation_not_signed_by_previous_root_is_rejected() {
        let current = root();
        let newkey = KeyPair::generate().unwrap();
        let mut next = current.root().clone();
        next.version = 2;
        next = Root::new(
            2,
            next.expires,
            &[newkey.public_key()],
            1,
            &[dev_key("dev-release-1").public_key()],
            1,
        )
        .unwrap();
        let only_new = next.sign(&[&newkey]).encode();
        let e = check_root(&current, &only_new).unwrap_err();
        assert_eq!(e.reason(), "root_rotation");
        assert!(e.to_string().contains("by root v1"), "{e}");
        let both = next.sign(&[&newkey, &dev_key("dev-root-1")]).encode();
        assert_eq!(check_root(&current, &both).unwrap().root().version, 2);
    }

    #[test]
    fn selector_wave_and_breaker_defer_without_rejecting() {
        use crate::release::{FailureLimit, Wave};
        let r = root();
        let limits = Limits::default();
        let m = manifest(&[object("a", "one", "1")]);
        let c = ctx(r.root(), &limits, None);
        let labels: BTreeMap<String, String> = [("region".to_owned(), "eu".to_owned())].into();
        let agent = crate::ids::AgentId::parse("agent-test").unwrap();
        let mut who = Audience {
            agent_id: &agent,
            labels: &labels,
            reports: FleetReports::default(),
        };
        let gate = |doc: &Release, who: &Audience<'_>| {
            let verified = match Ingest::start(&c, &signed(doc)).unwrap() {
                Start::Candidate(i) => i.release().clone(),
                Start::UpToDate => panic!(),
            };
            rollout_gate(&verified, who, NOW)
        };
        let mut doc = release("stable", 1, &m.id(), NOW + 1000);
        doc.selector.insert("region".into(), "us".into());
        assert_eq!(
            gate(&doc, &who),
            Some(Decision::NotSelected {
                missing: "region=us".into()
            })
        );
        doc.selector.insert("region".into(), "eu".into());
        assert_eq!(gate(&doc, &who), None);
        // A wave covering everyone that opens far in the future.
        doc.rollout.waves = vec![Wave {
            basis_points: 10_000,
            delay_secs: 1_000_000,
        }];
        assert!(matches!(
            gate(&doc, &who),
            Some(Decision::WaitForWave { wave: 1, .. })
        ));
        doc.rollout.waves.clear();
        doc.rollout.max_failures = Some(FailureLimit::Count(2));
        who.reports = FleetReports {
            adopted: 5,
            failed: 2,
        };
        assert!(matches!(
            gate(&doc, &who),
            Some(Decision::BreakerTripped { .. })
        ));
    }

    #[test]
    fn local_hold_defers_before_rollout_and_ends_by_itself() {
        let m = manifest(&[object("a", "one", "1")]);
        let doc = release("stable", 1, &m.id(), NOW + 1000);
        let labels = BTreeMap::new();
        let agent = crate::ids::AgentId::parse("agent-test").unwrap();
        let who = Audience {
            agent_id: &agent,
            labels: &labels,
            reports: FleetReports::default(),
        };
        struct TestHold(Option<u64>);
        impl LocalHold for TestHold {
            fn active(&self, now: u64) -> bool {
                self.0.is_none_or(|u| now < u)
            }
            fn until(&self) -> Option<u64> {
                self.0
            }
        }
        let hold = TestHold(Some(NOW + 60));
        let d = adoption_gate(&doc, &who, Some(&hold), NOW).unwrap();
        assert_eq!(
            d,
            Deferral::Held {
                until: Some(NOW + 60)
            }
        );
        assert_eq!(d.state(), "held");
        assert_eq!(adoption_gate(&doc, &who, Some(&hold), NOW + 60), None);
        assert_eq!(adoption_gate(&doc, &who, None::<&TestHold>, NOW), None);
        let wait = Deferral::Rollout(Decision::WaitForWave {
            wave: 2,
            opens_at: 0,
        });
        assert_eq!(
            wait.describe(|t| format!("T{t}")),
            "waiting for wave 2 (opens at T0)"
        );
        assert_eq!(wait.state(), "waiting");
    }

    /// Root v2 after the development root, with `release` as its only
    /// release key (threshold 1).
    fn root_v2_releasing(release: &KeyPair) -> Root {
        Root::new(
            2,
            root().root().expires,
            &[dev_key("dev-root-1").public_key()],
            1,
            &[release.public_key()],
            1,
        )
        .unwrap()
    }

    #[test]
    fn a_new_release_epoch_recovers_a_channel_pushed_to_the_maximum() {
        let v1 = root().root().clone();
        let limits = Limits::default();
        let m = manifest(&[object("a", "one", "1")]);
        // A stolen development release key signs the largest sequence.
        let max = signed(&release("stable", u64::MAX, &m.id(), NOW + 1000));
        let adopted = || {
            Some(AdoptedRef {
                sequence: u64::MAX,
                bytes: &max,
            })
        };
        let next = signed(&release("stable", 1, &m.id(), NOW + 1000));
        let e = start_err(&ctx(&v1, &limits, adopted()), &next);
        assert_eq!(e.reason(), "rollback");

        // A rotation that keeps the release keys changes nothing.
        let mut same = v1.clone();
        same.version = 2;
        let chain = [v1.clone(), same.clone()];
        let c = Context {
            root: &same,
            epoch: cairn_keys::root::release_epoch(&chain),
            ..ctx(&same, &limits, adopted())
        };
        assert_eq!(start_err(&c, &next).reason(), "rollback");

        // A rotation to a new release key starts an epoch.
        let new_key = KeyPair::generate().unwrap();
        let v2 = root_v2_releasing(&new_key);
        let chain = [v1.clone(), v2.clone()];
        let c = Context {
            root: &v2,
            epoch: cairn_keys::root::release_epoch(&chain),
            ..ctx(&v2, &limits, adopted())
        };
        // The adopted maximum itself is still "up to date" (kept enforced).
        assert!(matches!(Ingest::start(&c, &max), Ok(Start::UpToDate)));
        // The old key can no longer sign anything, whatever the sequence.
        assert_eq!(start_err(&c, &next).reason(), "signature_threshold");
        // Sequence 1 under the new key is adopted.
        let fresh = release("stable", 1, &m.id(), NOW + 1000)
            .sign(&[&new_key])
            .encode();
        let Start::Candidate(ing) = Ingest::start(&c, &fresh).unwrap() else {
            panic!("not a candidate")
        };
        assert_eq!(ing.release().release().sequence, 1);
        // After it, the old maximum replayed is refused, and the floor
        // binds again inside the new epoch.
        let after = Context {
            adopted: Some(AdoptedRef {
                sequence: 1,
                bytes: &fresh,
            }),
            ..c.clone()
        };
        assert_eq!(start_err(&after, &max).reason(), "signature_threshold");
        let again = release("stable", 1, &m.id(), NOW + 2000)
            .sign(&[&new_key])
            .encode();
        assert_eq!(start_err(&after, &again).reason(), "rollback");
        let jump = release("stable", u64::MAX, &m.id(), NOW + 1000)
            .sign(&[&new_key])
            .encode();
        assert_eq!(start_err(&after, &jump).reason(), "sequence_jump");

        // At start-up the old-epoch release is still re-verified against
        // the chain (kept enforced), but not against the new root alone.
        reverify_adopted(&chain, "stable", &limits, NOW, &max, &m.encode(), no_chunks).unwrap();
        let e = reverify_adopted(
            &chain[1..],
            "stable",
            &limits,
            NOW,
            &max,
            &m.encode(),
            no_chunks,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "signature_threshold");
    }

    #[test]
    fn reverify_catches_tampered_manifest() {
        let r = root();
        let limits = Limits::default();
        let objs = [object("a", "one", "1")];
        let m = manifest(&objs);
        let rel = signed(&release("stable", 1, &m.id(), NOW - 5));
        // Expired is fine for re-verification.
        reverify_adopted(
            std::slice::from_ref(r.root()),
            "stable",
            &limits,
            NOW,
            &rel,
            &m.encode(),
            no_chunks,
        )
        .unwrap();
        let mut bad = m.encode();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let e = reverify_adopted(
            std::slice::from_ref(r.root()),
            "stable",
            &limits,
            NOW,
            &rel,
            &bad,
            no_chunks,
        )
        .unwrap_err();
        assert_eq!(e.stage, Stage::Manifest);
    }
}
