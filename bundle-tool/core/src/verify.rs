//! Release verification: a pure function of (trusted root, last adopted
//! sequence, candidate bytes, channel, now).
//!
//! **Architecture invariant:** nothing here does IO. The CLI, the agent's
//! source pipeline, the mesh and the simulator all call the same checks.

use crate::limits::Limits;
use crate::release::Release;
use crate::{Error, Result};
use cairn_keys::{Envelope, KeyId, Role, Root};
use std::collections::HashMap;
use std::sync::Mutex;

/// A release whose envelope passed every check.
///
/// **Architecture invariant:** only verification makes a `Verified*`: the
/// fields are private and only [`ReleaseCheck::verify`] constructs one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedRelease {
    release: Release,
    bytes: Vec<u8>,
    signers: Vec<KeyId>,
}

impl VerifiedRelease {
    /// The release document.
    pub fn release(&self) -> &Release {
        &self.release
    }

    /// The exact envelope bytes (stored and served onward unchanged).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Release keys whose signatures counted.
    pub fn signers(&self) -> &[KeyId] {
        &self.signers
    }
}

/// The largest step a release's sequence may take above a binding
/// rollback floor: 2^32. `cairn release` always steps by one, so an honest
/// channel never comes near it; a forged jump (say to 2^64 − 1, which would
/// leave the channel no sequence above it) is refused as `sequence_jump`.
/// A first release, or the first under a new release epoch, has no floor
/// and so no bound.
pub const MAX_SEQUENCE_STEP: u64 = 1 << 32;

/// Release signature checks that passed: for an envelope (by the SHA-256
/// of its exact bytes) and a root (compared whole), the release keys whose
/// signatures counted. A fleet simulator (or anything verifying the same
/// envelope many times) shares one so that each distinct envelope's
/// Ed25519 signatures are checked once per root instead of at every offer,
/// ingest and commit.
///
/// Only a check that passed records anything, and only this module
/// records: a hit means *these exact bytes* passed *this exact root*'s
/// release threshold before, so trusting it is as strong as checking again
/// (given SHA-256's collision resistance, which every address in Cairn
/// already relies on). Everything else a release check does (decode,
/// channel, rollback floor, expiry, root expiry) runs every time. Failures
/// are not remembered: a forged envelope is refused by a full check each
/// time. Bounded: past [`SignatureMemo::CAPACITY`] envelopes it starts
/// over.
#[derive(Debug, Default)]
pub struct SignatureMemo {
    passed: Mutex<HashMap<[u8; 32], Passed>>,
}

/// The roots an envelope passed, each with the keys whose signatures
/// counted.
type Passed = Vec<(Root, Vec<KeyId>)>;

impl SignatureMemo {
    /// Most distinct envelopes remembered before the memo starts over.
    pub const CAPACITY: usize = 4096;

    /// An empty memo.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many distinct envelopes it remembers.
    pub fn len(&self) -> usize {
        self.passed.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether it remembers nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `root.check_threshold(Role::Release, env, what)` for the envelope
    /// `env` decoded from `bytes`, remembered when it passes.
    fn release_threshold(
        &self,
        root: &Root,
        bytes: &[u8],
        env: &Envelope,
        what: &str,
    ) -> Result<Vec<KeyId>> {
        let digest = cairn_keys::sha256(bytes);
        {
            let passed = self.passed.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, signers)) = passed
                .get(&digest)
                .and_then(|v| v.iter().find(|(r, _)| r == root))
            {
                return Ok(signers.clone());
            }
        }
        let signers = root.check_threshold(Role::Release, env, what)?;
        let mut passed = self.passed.lock().unwrap_or_else(|e| e.into_inner());
        if passed.len() >= Self::CAPACITY && !passed.contains_key(&digest) {
            passed.clear();
        }
        passed
            .entry(digest)
            .or_default()
            .push((root.clone(), signers.clone()));
        Ok(signers)
    }
}

/// A release threshold check of `root` over the envelope `env` decoded
/// from `bytes`, through `memo` if there is one.
fn release_threshold(
    root: &Root,
    bytes: &[u8],
    env: &Envelope,
    what: &str,
    memo: Option<&SignatureMemo>,
) -> Result<Vec<KeyId>> {
    match memo {
        Some(m) => m.release_threshold(root, bytes, env, what),
        None => Ok(root.check_threshold(Role::Release, env, what)?),
    }
}

/// Whether a threshold of release keys of one of `roots` signed the
/// release envelope `bytes` (garbage is simply `false`).
pub fn signed_under_any(roots: &[Root], bytes: &[u8], limits: &Limits) -> bool {
    signed_under_any_with(roots, bytes, limits, None)
}

/// [`signed_under_any`], remembering passed signature checks in `memo`.
pub fn signed_under_any_with(
    roots: &[Root],
    bytes: &[u8],
    limits: &Limits,
    memo: Option<&SignatureMemo>,
) -> bool {
    let Ok((env, release)) = Release::decode_envelope(bytes, limits.max_release_bytes) else {
        return false;
    };
    let what = format!("release {}", release.sequence);
    roots
        .iter()
        .any(|r| release_threshold(r, bytes, &env, &what, memo).is_ok())
}

/// The rollback floor that binds a candidate, from the release adopted (or
/// published) before it: its sequence if a threshold of release keys of a
/// root of the current release epoch (`epoch`, see
/// [`cairn_keys::root::release_epoch`]) signed it; `None` when the epoch
/// has replaced the release role that signed it, so that a rotation to new
/// release keys recovers a channel a stolen key pushed to 2^64 − 1 (TUF's
/// fast-forward recovery). Sound because no release signed only by keys of
/// an earlier epoch verifies under the epoch's first root, so nothing of the
/// old epoch can be replayed once the floor is dropped; inside the epoch
/// the floor binds as before.
pub fn binding_floor(
    epoch: &[Root],
    previous: Option<(u64, &[u8])>,
    limits: &Limits,
) -> Option<u64> {
    binding_floor_with(epoch, previous, limits, None)
}

/// [`binding_floor`], remembering passed signature checks in `memo`.
pub fn binding_floor_with(
    epoch: &[Root],
    previous: Option<(u64, &[u8])>,
    limits: &Limits,
    memo: Option<&SignatureMemo>,
) -> Option<u64> {
    let (sequence, bytes) = previous?;
    signed_under_any_with(epoch, bytes, limits, memo).then_some(sequence)
}

/// The sequence rule: strictly above a binding `floor` (rollback), and at
/// most [`MAX_SEQUENCE_STEP`] above it (a forged jump towards 2^64 − 1).
pub fn check_sequence(channel: &str, floor: Option<u64>, found: u64) -> Result<()> {
    let Some(last) = floor else {
        return Ok(());
    };
    if found <= last {
        return Err(Error::Rollback {
            channel: channel.to_owned(),
            last,
            found,
        });
    }
    if found - last > MAX_SEQUENCE_STEP {
        return Err(Error::SequenceJump {
            channel: channel.to_owned(),
            last,
            found,
            max_step: MAX_SEQUENCE_STEP,
        });
    }
    Ok(())
}

/// What to check a candidate release against.
#[derive(Clone, Debug)]
pub struct ReleaseCheck<'a> {
    /// The current trusted root.
    pub root: &'a Root,
    /// The channel the caller follows.
    pub channel: &'a str,
    /// The rollback floor: the sequence of the release adopted on that
    /// channel, if it binds ([`binding_floor`]: `None` when nothing was
    /// adopted or a new release epoch replaced the role that signed it).
    pub last_sequence: Option<u64>,
    /// Now, Unix seconds.
    pub now: u64,
    /// Size limits.
    pub limits: &'a Limits,
}

impl ReleaseCheck<'_> {
    /// Verifies a release envelope: size, type, format, signatures by a
    /// threshold of distinct release keys of the root, channel, sequence
    /// strictly above the last adopted and at most [`MAX_SEQUENCE_STEP`]
    /// above it ([`check_sequence`]), not expired (freeze), and the root
    /// itself not expired.
    pub fn verify(&self, bytes: &[u8]) -> Result<VerifiedRelease> {
        self.verify_with(bytes, None)
    }

    /// [`ReleaseCheck::verify`], with the signature check remembered in
    /// (and answered from) `memo`; every other check runs every time.
    pub fn verify_with(
        &self,
        bytes: &[u8],
        memo: Option<&SignatureMemo>,
    ) -> Result<VerifiedRelease> {
        let (env, release) = Release::decode_envelope(bytes, self.limits.max_release_bytes)?;
        let signers = self.check_signatures(bytes, &env, &release, memo)?;
        if release.channel != self.channel {
            return Err(Error::WrongChannel {
                expected: self.channel.to_owned(),
                found: release.channel.into(),
            });
        }
        check_sequence(&release.channel, self.last_sequence, release.sequence)?;
        if self.now >= release.expires {
            return Err(Error::Expired {
                channel: release.channel.into(),
                sequence: release.sequence,
                expires: release.expires,
                now: self.now,
            });
        }
        if self.root.is_expired(self.now) {
            return Err(Error::RootExpired {
                version: self.root.version,
                expires: self.root.expires,
            });
        }
        Ok(VerifiedRelease {
            release,
            bytes: bytes.to_vec(),
            signers,
        })
    }

    /// Re-verifies a release already adopted (start-up check of stored
    /// state): signatures, channel and format, but neither rollback nor
    /// expiry, because the last-good release keeps being enforced after it
    /// expires (with a warning).
    pub fn reverify_adopted(&self, bytes: &[u8]) -> Result<VerifiedRelease> {
        let (env, release) = Release::decode_envelope(bytes, self.limits.max_release_bytes)?;
        let signers = self.check_signatures(bytes, &env, &release, None)?;
        if release.channel != self.channel {
            return Err(Error::WrongChannel {
                expected: self.channel.to_owned(),
                found: release.channel.into(),
            });
        }
        Ok(VerifiedRelease {
            release,
            bytes: bytes.to_vec(),
            signers,
        })
    }

    fn check_signatures(
        &self,
        bytes: &[u8],
        env: &Envelope,
        release: &Release,
        memo: Option<&SignatureMemo>,
    ) -> Result<Vec<KeyId>> {
        let what = format!(
            "release {} on channel `{}`",
            release.sequence, release.channel
        );
        release_threshold(self.root, bytes, env, &what, memo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::{Rollout, RELEASE_FORMAT};
    use cairn_keys::root::release_epoch;
    use cairn_keys::KeyPair;

    const NOW: u64 = 1_800_000_000;
    const FAR: u64 = 4_000_000_000;

    fn root(version: u64, root_key: &KeyPair, release_keys: &[&KeyPair], t: u32) -> Root {
        let rel: Vec<_> = release_keys.iter().map(|k| k.public_key()).collect();
        Root::new(version, FAR, &[root_key.public_key()], 1, &rel, t).unwrap()
    }

    fn release(sequence: u64, keys: &[&KeyPair]) -> Vec<u8> {
        Release {
            format: RELEASE_FORMAT,
            channel: "stable".parse().unwrap(),
            sequence,
            bundle: format!("sha256:{}", "ab".repeat(32)).parse().unwrap(),
            created: NOW - 10,
            expires: NOW + 1000,
            rollout: Rollout::default(),
            selector: Default::default(),
        }
        .sign(keys)
        .encode()
    }

    fn check<'a>(root: &'a Root, floor: Option<u64>, limits: &'a Limits) -> ReleaseCheck<'a> {
        ReleaseCheck {
            root,
            channel: "stable",
            last_sequence: floor,
            now: NOW,
            limits,
        }
    }

    #[test]
    fn sequence_rule_refuses_rollback_and_absurd_jumps_and_never_wraps() {
        assert!(check_sequence("stable", None, u64::MAX).is_ok());
        assert!(check_sequence("stable", Some(5), 6).is_ok());
        let e = check_sequence("stable", Some(5), 5).unwrap_err();
        assert_eq!(e.reason(), "rollback");
        assert!(check_sequence("stable", Some(5), 5 + MAX_SEQUENCE_STEP).is_ok());
        let e = check_sequence("stable", Some(5), 6 + MAX_SEQUENCE_STEP).unwrap_err();
        assert_eq!(e.reason(), "sequence_jump");
        assert!(e.to_string().contains("a release key was stolen"), "{e}");
        let e = check_sequence("stable", Some(1), u64::MAX).unwrap_err();
        assert_eq!(e.reason(), "sequence_jump");
        // At the top nothing is above: every candidate is a rollback.
        for found in [0, 1, u64::MAX] {
            let e = check_sequence("stable", Some(u64::MAX), found).unwrap_err();
            assert_eq!(e.reason(), "rollback");
        }
        assert!(check_sequence("stable", Some(u64::MAX - 1), u64::MAX).is_ok());
    }

    #[test]
    fn a_new_release_epoch_drops_the_old_floor_and_refuses_old_releases() {
        let limits = Limits::default();
        let rk = KeyPair::generate().unwrap();
        let (old, new) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let v1 = root(1, &rk, &[&old], 1);
        // The stolen key pushes the channel to the top: an agent with a
        // floor refuses the jump, a fresh one (no floor) adopts it.
        let max = release(u64::MAX, &[&old]);
        let e = check(&v1, Some(3), &limits).verify(&max).unwrap_err();
        assert_eq!(e.reason(), "sequence_jump");
        let adopted = check(&v1, None, &limits).verify(&max).unwrap();
        assert_eq!(adopted.release.sequence, u64::MAX);

        // A rotation that keeps the release role (new expiry only) keeps
        // the floor: the channel stays frozen.
        let v2_same = root(2, &rk, &[&old], 1);
        let chain = [v1.clone(), v2_same.clone()];
        let epoch = release_epoch(&chain);
        let floor = binding_floor(epoch, Some((u64::MAX, &max)), &limits);
        assert_eq!(floor, Some(u64::MAX));
        let e = check(&v2_same, floor, &limits)
            .verify(&release(1, &[&old]))
            .unwrap_err();
        assert_eq!(e.reason(), "rollback");

        // A rotation to a new release key starts an epoch: the old floor no
        // longer binds and sequence 1 under the new key is adopted.
        let v2 = root(2, &rk, &[&new], 1);
        let chain = [v1.clone(), v2.clone()];
        let epoch = release_epoch(&chain);
        assert_eq!(epoch, std::slice::from_ref(&v2));
        let floor = binding_floor(epoch, Some((u64::MAX, &max)), &limits);
        assert_eq!(floor, None);
        let first = release(1, &[&new]);
        let adopted = check(&v2, floor, &limits).verify(&first).unwrap();
        assert_eq!(adopted.release.sequence, 1);

        // The old key's releases, replayed after the rotation, no longer
        // verify: neither the old maximum nor a fresh forgery.
        for forged in [max.clone(), release(2, &[&old])] {
            let e = check(&v2, floor, &limits).verify(&forged).unwrap_err();
            assert_eq!(e.reason(), "signature_threshold");
        }

        // Inside the new epoch the floor binds again.
        let floor = binding_floor(epoch, Some((1, &first)), &limits);
        assert_eq!(floor, Some(1));
        let e = check(&v2, floor, &limits)
            .verify(&release(1, &[&new]))
            .unwrap_err();
        assert_eq!(e.reason(), "rollback");
        assert!(check(&v2, floor, &limits)
            .verify(&release(2, &[&new]))
            .is_ok());
        // Garbage as the previous release never binds and never panics.
        assert_eq!(binding_floor(epoch, Some((9, b"junk")), &limits), None);
    }

    #[test]
    fn the_signature_memo_remembers_only_passed_checks_per_root_and_skips_no_other_check() {
        let limits = Limits::default();
        let rk = KeyPair::generate().unwrap();
        let (good, other) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let v1 = root(1, &rk, &[&good], 1);
        let v_other = root(1, &rk, &[&other], 1);
        let memo = SignatureMemo::new();
        let r5 = release(5, &[&good]);

        // A pass is remembered and answered the same way.
        let first = check(&v1, None, &limits)
            .verify_with(&r5, Some(&memo))
            .unwrap();
        assert_eq!(memo.len(), 1);
        let again = check(&v1, None, &limits)
            .verify_with(&r5, Some(&memo))
            .unwrap();
        assert_eq!(first, again);
        assert_eq!(again, check(&v1, None, &limits).verify(&r5).unwrap());

        // A remembered pass under one root counts for nothing under another.
        let e = check(&v_other, None, &limits)
            .verify_with(&r5, Some(&memo))
            .unwrap_err();
        assert_eq!(e.reason(), "signature_threshold");

        // Every other check still runs on a remembered envelope: rollback,
        // wrong channel, expiry.
        let e = check(&v1, Some(5), &limits)
            .verify_with(&r5, Some(&memo))
            .unwrap_err();
        assert_eq!(e.reason(), "rollback");
        let elsewhere = ReleaseCheck {
            channel: "beta",
            ..check(&v1, None, &limits)
        };
        assert_eq!(
            elsewhere
                .verify_with(&r5, Some(&memo))
                .unwrap_err()
                .reason(),
            "wrong_channel"
        );
        let late = ReleaseCheck {
            now: NOW + 5000,
            ..check(&v1, None, &limits)
        };
        assert_eq!(
            late.verify_with(&r5, Some(&memo)).unwrap_err().reason(),
            "expired"
        );

        // A failure is never remembered: a forged envelope (a key the root
        // does not name), and the good envelope with one byte of its
        // signature flipped, are refused every time.
        let forged = release(6, &[&other]);
        for _ in 0..2 {
            let e = check(&v1, Some(5), &limits)
                .verify_with(&forged, Some(&memo))
                .unwrap_err();
            assert_eq!(e.reason(), "signature_threshold");
        }
        let mut tampered = r5.clone();
        let last = tampered.len() - 2;
        tampered[last] ^= 1;
        for _ in 0..2 {
            assert!(check(&v1, None, &limits)
                .verify_with(&tampered, Some(&memo))
                .is_err());
        }
        assert_eq!(memo.len(), 1);

        // The floor check goes through the memo too, with the same answer.
        assert_eq!(
            binding_floor_with(
                std::slice::from_ref(&v1),
                Some((5, &r5)),
                &limits,
                Some(&memo)
            ),
            Some(5)
        );
        assert_eq!(
            binding_floor_with(
                std::slice::from_ref(&v_other),
                Some((5, &r5)),
                &limits,
                Some(&memo)
            ),
            None
        );
        assert_eq!(
            binding_floor_with(
                std::slice::from_ref(&v1),
                Some((6, &forged)),
                &limits,
                Some(&memo)
            ),
            None
        );
    }

    #[test]
    fn keeping_threshold_old_keys_keeps_the_epoch_and_the_floor() {
        let limits = Limits::default();
        let rk = KeyPair::generate().unwrap();
        let ks: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate().unwrap()).collect();
        let v1 = root(1, &rk, &[&ks[0], &ks[1]], 1);
        // Dropping ks[0] but keeping ks[1] at threshold 1: a release by
        // ks[1] alone still verifies, so the epoch (and its floor) stay.
        let v2 = root(2, &rk, &[&ks[1], &ks[2]], 1);
        let chain = [v1, v2];
        let epoch = release_epoch(&chain);
        assert_eq!(epoch.len(), 2);
        let by_dropped = release(7, &[&ks[0]]);
        // The floor release verifies under v1, a root of the epoch.
        assert_eq!(
            binding_floor(epoch, Some((7, &by_dropped)), &limits),
            Some(7)
        );
    }
}
