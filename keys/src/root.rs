//! The trust root: keys, roles with thresholds, version and expiry, and
//! TUF-style rotation.
//!
//! Root N+1 is accepted only if a threshold of root N's `root` keys **and** a
//! threshold of its own `root` keys signed it, and its version is exactly
//! N+1. Expiry is reported, never decided here: the caller applies the
//! freeze rule (keep enforcing what it has, adopt nothing new).

use crate::codec;
use crate::envelope::{Envelope, PayloadType};
use crate::key::{KeyId, KeyPair, PublicKey};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Root format version written by this build.
pub const ROOT_FORMAT: u32 = 1;
/// Largest root envelope accepted (256 KiB).
pub const MAX_ROOT_BYTES: usize = 256 << 10;
/// Most keys one root may list.
pub const MAX_KEYS: usize = 64;

/// A role in the trust root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Signs new roots.
    Root,
    /// Signs releases.
    Release,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Root => "root",
            Role::Release => "release",
        })
    }
}

/// The keys of one role and how many of them must sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKeys {
    /// Distinct valid signatures required (at least 1).
    pub threshold: u32,
    /// Authorised key ids, sorted, without duplicates.
    pub key_ids: Vec<KeyId>,
}

/// The trust root document (the payload of a `cairn.root` envelope).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    /// Format version ([`ROOT_FORMAT`]).
    pub format: u32,
    /// Root version, starting at 1, growing by exactly 1 per rotation.
    pub version: u64,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// Every key any role names, by key id.
    pub keys: BTreeMap<KeyId, PublicKey>,
    /// Keys that sign roots.
    pub root: RoleKeys,
    /// Keys that sign releases.
    pub release: RoleKeys,
}

impl Root {
    /// Builds and validates a root from public keys and thresholds.
    pub fn new(
        version: u64,
        expires: u64,
        root_keys: &[PublicKey],
        root_threshold: u32,
        release_keys: &[PublicKey],
        release_threshold: u32,
    ) -> Result<Self> {
        let mut keys = BTreeMap::new();
        let mut role = |ks: &[PublicKey], threshold| {
            let mut ids: Vec<KeyId> = ks
                .iter()
                .map(|k| {
                    keys.insert(k.key_id(), k.clone());
                    k.key_id()
                })
                .collect();
            ids.sort();
            ids.dedup();
            RoleKeys {
                threshold,
                key_ids: ids,
            }
        };
        let root = role(root_keys, root_threshold);
        let release = role(release_keys, release_threshold);
        let r = Root {
            format: ROOT_FORMAT,
            version,
            expires,
            keys,
            root,
            release,
        };
        r.validate()?;
        Ok(r)
    }

    /// Checks internal consistency: format, version, thresholds between 1
    /// and the number of keys, sorted distinct key ids that all resolve.
    pub fn validate(&self) -> Result<()> {
        if self.format != ROOT_FORMAT {
            return Err(Error::UnsupportedFormat {
                what: "root",
                found: self.format,
                supported: ROOT_FORMAT,
            });
        }
        if self.version == 0 {
            return Err(Error::InvalidRoot("version must be at least 1".into()));
        }
        if self.keys.len() > MAX_KEYS {
            return Err(Error::InvalidRoot(format!(
                "{} keys, at most {MAX_KEYS} allowed",
                self.keys.len()
            )));
        }
        for (id, pk) in &self.keys {
            if pk.0.len() != 32 || &pk.key_id() != id {
                return Err(Error::InvalidRoot(format!(
                    "key {} does not match its public key",
                    id.short()
                )));
            }
        }
        for role in [Role::Root, Role::Release] {
            let rk = self.role(role);
            if rk.threshold == 0 {
                return Err(Error::InvalidRoot(format!("{role} threshold is 0")));
            }
            if rk.threshold as usize > rk.key_ids.len() {
                return Err(Error::InvalidRoot(format!(
                    "{role} threshold {} is above its {} key(s)",
                    rk.threshold,
                    rk.key_ids.len()
                )));
            }
            if rk.key_ids.windows(2).any(|w| w[0] >= w[1]) {
                return Err(Error::InvalidRoot(format!(
                    "{role} key ids are not sorted and distinct"
                )));
            }
            if let Some(missing) = rk.key_ids.iter().find(|k| !self.keys.contains_key(*k)) {
                return Err(Error::InvalidRoot(format!(
                    "{role} names key {} that the root does not list",
                    missing.short()
                )));
            }
        }
        Ok(())
    }

    /// The keys of `role`.
    pub fn role(&self, role: Role) -> &RoleKeys {
        match role {
            Role::Root => &self.root,
            Role::Release => &self.release,
        }
    }

    /// Whether `key_id` is one of `role`'s keys.
    pub fn authorises(&self, role: Role, key_id: &KeyId) -> bool {
        self.role(role).key_ids.contains(key_id)
    }

    /// Whether this root starts a new *release epoch* after `earlier` (every
    /// root before it in the chain): fewer than this root's release
    /// threshold of its release keys were release keys of any earlier root.
    /// Then no release signed only by keys that were ever release keys
    /// before can reach this root's threshold, so the rollback floor set by
    /// releases of the earlier epoch stops binding (TUF's fast-forward
    /// recovery; `docs/SECURITY.md`, "a release key was stolen").
    pub fn starts_release_epoch<'a>(&self, earlier: impl IntoIterator<Item = &'a Root>) -> bool {
        let mut retired: Vec<&KeyId> = Vec::new();
        for r in earlier {
            retired.extend(r.release.key_ids.iter());
        }
        let shared = self
            .release
            .key_ids
            .iter()
            .filter(|k| retired.contains(k))
            .count();
        shared < self.release.threshold as usize
    }

    /// Whether the root has expired at `now` (Unix seconds).
    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires
    }

    /// Checks that a threshold of distinct `role` keys signed `envelope`.
    /// Returns the keys that counted.
    pub fn check_threshold(
        &self,
        role: Role,
        envelope: &Envelope,
        what: &str,
    ) -> Result<Vec<KeyId>> {
        let rk = self.role(role);
        let report = envelope.valid_signers(|id| {
            if rk.key_ids.contains(id) {
                self.keys.get(id)
            } else {
                None
            }
        });
        if report.valid.len() < rk.threshold as usize {
            return Err(Error::Threshold {
                what: what.to_owned(),
                role,
                valid: report.valid.len(),
                threshold: rk.threshold,
                detail: report.detail(),
            });
        }
        Ok(report.valid)
    }

    /// Encodes this root into an envelope signed by `keys`.
    pub fn sign(&self, keys: &[&KeyPair]) -> Envelope {
        let mut env = Envelope::new(PayloadType::Root, codec::encode(self));
        for k in keys {
            env.sign(k);
        }
        env
    }

    /// Decodes a root envelope and its payload without checking signatures.
    pub fn decode_envelope(bytes: &[u8]) -> Result<(Envelope, Root)> {
        if bytes.len() > MAX_ROOT_BYTES {
            return Err(Error::TooLarge {
                what: "root file",
                limit: MAX_ROOT_BYTES,
                actual: bytes.len(),
            });
        }
        let env = Envelope::decode(bytes)?;
        env.expect_type(PayloadType::Root)?;
        let root: Root = codec::decode("root", &env.payload, MAX_ROOT_BYTES)?;
        root.validate()?;
        Ok((env, root))
    }
}

/// A root whose signatures have been verified, with its exact signed bytes
/// (kept so it can be stored and served onward unchanged).
///
/// **Architecture invariant:** only verification makes a `Verified*`. The
/// fields are private and the only constructors are
/// [`VerifiedRoot::verify_initial`] and [`VerifiedRoot::verify_next`], so a
/// `VerifiedRoot` in hand is proof that its signatures were checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedRoot {
    root: Root,
    bytes: Vec<u8>,
}

impl VerifiedRoot {
    /// The root document.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The exact envelope bytes it was verified from.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Verifies a first root, trusted because the caller chose it (the
    /// embedded root, or a file an operator names): it must be signed by a
    /// threshold of its own root keys.
    pub fn verify_initial(bytes: &[u8]) -> Result<Self> {
        let (env, root) = Root::decode_envelope(bytes)?;
        root.check_threshold(Role::Root, &env, &format!("root v{}", root.version))?;
        Ok(Self {
            root,
            bytes: bytes.to_vec(),
        })
    }

    /// Verifies the next root in the chain against this one.
    pub fn verify_next(&self, bytes: &[u8]) -> Result<Self> {
        let (env, next) = Root::decode_envelope(bytes)?;
        let expected = self.root.version + 1;
        if next.version != expected {
            return Err(Error::VersionGap {
                expected,
                found: next.version,
            });
        }
        let what = format!("root v{} (by root v{})", next.version, self.root.version);
        self.root.check_threshold(Role::Root, &env, &what)?;
        let what = format!("root v{} (by its own keys)", next.version);
        next.check_threshold(Role::Root, &env, &what)?;
        Ok(Self {
            root: next,
            bytes: bytes.to_vec(),
        })
    }
}

/// The outcome of following a root chain.
#[derive(Clone, Debug)]
pub struct RootChain {
    /// The newest verified root.
    pub current: VerifiedRoot,
    /// Whether `current` has expired at the time given.
    pub expired: bool,
    /// Every root of the chain, oldest first (`current` last).
    pub roots: Vec<Root>,
}

/// The current release epoch of a chain (oldest first, consecutive
/// versions): the suffix that starts at the last root for which
/// [`Root::starts_release_epoch`] holds against every root before it (the
/// first root starts the first epoch). A release adopted in this epoch
/// verifies under one of these roots; one that verifies under none of them
/// was signed by a release role the chain has since replaced.
pub fn release_epoch(chain: &[Root]) -> &[Root] {
    let start = (1..chain.len())
        .rev()
        .find(|&i| chain[i].starts_release_epoch(&chain[..i]))
        .unwrap_or(0);
    &chain[start..]
}

impl RootChain {
    /// Follows `rest` in order from `first` (already trusted) and reports
    /// the current root and whether it has expired at `now`.
    pub fn follow<'a>(
        first: VerifiedRoot,
        rest: impl IntoIterator<Item = &'a [u8]>,
        now: u64,
    ) -> Result<Self> {
        let mut roots = vec![first.root.clone()];
        let mut current = first;
        for bytes in rest {
            current = current.verify_next(bytes)?;
            roots.push(current.root.clone());
        }
        let expired = current.root.is_expired(now);
        Ok(Self {
            current,
            expired,
            roots,
        })
    }

    /// The roots of the chain's current release epoch ([`release_epoch`]).
    pub fn release_epoch(&self) -> &[Root] {
        release_epoch(&self.roots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<KeyPair> {
        (0..n).map(|_| KeyPair::generate().unwrap()).collect()
    }

    fn pubs(ks: &[KeyPair]) -> Vec<PublicKey> {
        ks.iter().map(|k| k.public_key()).collect()
    }

    const FAR: u64 = 4_000_000_000;

    fn root_with(version: u64, rk: &[KeyPair], t: u32) -> Root {
        let rel = keys(1);
        Root::new(version, FAR, &pubs(rk), t, &pubs(&rel), 1).unwrap()
    }

    #[test]
    fn threshold_two_of_three() {
        let ks = keys(3);
        let root = root_with(1, &ks, 2);
        let ok = root.sign(&[&ks[0], &ks[2]]).encode();
        assert_eq!(VerifiedRoot::verify_initial(&ok).unwrap().root, root);
        let one = root.sign(&[&ks[1]]);
        let mut twice = one.clone();
        twice.signatures.push(one.signatures[0].clone());
        let err = VerifiedRoot::verify_initial(&twice.encode()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Threshold {
                    valid: 1,
                    threshold: 2,
                    role: Role::Root,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_does_not_count() {
        let ks = keys(2);
        let outsider = keys(1);
        let root = root_with(1, &ks, 2);
        let env = root.sign(&[&ks[0], &outsider[0]]);
        let err = VerifiedRoot::verify_initial(&env.encode()).unwrap_err();
        assert!(err.to_string().contains("unknown key"), "{err}");
    }

    #[test]
    fn rotation_chain() {
        let k1 = keys(2);
        let k2 = keys(2);
        let k3 = keys(2);
        let r1 = root_with(1, &k1, 2);
        let r2 = root_with(2, &k2, 2);
        let r3 = root_with(3, &k3, 2);
        let b1 = r1.sign(&[&k1[0], &k1[1]]).encode();
        let b2 = r2.sign(&[&k1[0], &k1[1], &k2[0], &k2[1]]).encode();
        let b3 = r3.sign(&[&k2[0], &k2[1], &k3[0], &k3[1]]).encode();
        let first = VerifiedRoot::verify_initial(&b1).unwrap();
        let chain = RootChain::follow(first.clone(), [&b2[..], &b3[..]], 0).unwrap();
        assert_eq!(chain.current.root.version, 3);
        assert!(!chain.expired);
        // A gap: v1 -> v3.
        let err = RootChain::follow(first.clone(), [&b3[..]], 0).unwrap_err();
        assert!(matches!(
            err,
            Error::VersionGap {
                expected: 2,
                found: 3
            }
        ));
        // v2 signed only by its new keys.
        let only_new = r2.sign(&[&k2[0], &k2[1]]).encode();
        let err = first.verify_next(&only_new).unwrap_err();
        assert!(err.to_string().contains("by root v1"), "{err}");
        // v2 signed only by the old keys.
        let only_old = r2.sign(&[&k1[0], &k1[1]]).encode();
        let err = first.verify_next(&only_old).unwrap_err();
        assert!(err.to_string().contains("by its own keys"), "{err}");
    }

    #[test]
    fn release_epochs_start_when_fewer_than_threshold_keys_carry_over() {
        let rk = pubs(&keys(1));
        let rel = pubs(&keys(5));
        let (a, b, c, d, e) = (&rel[0], &rel[1], &rel[2], &rel[3], &rel[4]);
        let v = |n: u64, ks: &[&PublicKey], t: u32| {
            let owned: Vec<PublicKey> = ks.iter().map(|k| (*k).clone()).collect();
            Root::new(n, FAR, &rk, 1, &owned, t).unwrap()
        };
        let r1 = v(1, &[a, b], 1);
        // Only the expiry or root keys change: same epoch.
        let r2 = v(2, &[a, b], 1);
        assert!(!r2.starts_release_epoch([&r1]));
        // One key dropped, one kept at threshold 1: the kept key alone can
        // still sign, so old releases still verify: same epoch.
        let r3 = v(3, &[a, c], 1);
        assert!(!r3.starts_release_epoch([&r1, &r2]));
        // Threshold raised to 2 with one old key: an old key alone is below
        // threshold: new epoch.
        let r4 = v(4, &[a, d], 2);
        assert!(r4.starts_release_epoch([&r1, &r2, &r3]));
        // Every key replaced: new epoch.
        let r5 = v(5, &[d, e], 1);
        assert!(!r5.starts_release_epoch([&r4]), "d was a key of r4");
        let r5 = v(5, &[e], 1);
        assert!(r5.starts_release_epoch([&r1, &r2, &r3, &r4]));
        // Re-adding a key retired long ago does not start an epoch.
        let r6 = v(6, &[b], 1);
        assert!(!r6.starts_release_epoch([&r1, &r2, &r3, &r4, &r5]));

        let chain = [r1.clone(), r2.clone(), r3.clone()];
        assert_eq!(release_epoch(&chain), &chain[..]);
        let chain = [r1, r2, r3, r4.clone(), r5.clone(), r6.clone()];
        let epoch = release_epoch(&chain);
        assert_eq!(
            epoch.iter().map(|r| r.version).collect::<Vec<_>>(),
            vec![5, 6]
        );
        assert!(release_epoch(&[]).is_empty());
    }

    #[test]
    fn expiry_is_reported() {
        let ks = keys(1);
        let mut r = root_with(1, &ks, 1);
        r.expires = 100;
        let b = r.sign(&[&ks[0]]).encode();
        let first = VerifiedRoot::verify_initial(&b).unwrap();
        assert!(RootChain::follow(first.clone(), [], 100).unwrap().expired);
        assert!(!RootChain::follow(first, [], 99).unwrap().expired);
    }

    #[test]
    fn bad_thresholds_are_refused() {
        let ks = keys(2);
        let p = pubs(&ks);
        assert!(Root::new(1, FAR, &p, 0, &p, 1).is_err());
        assert!(Root::new(1, FAR, &p, 3, &p, 1).is_err());
        assert!(Root::new(1, FAR, &p, 1, &p[..1], 2).is_err());
        assert!(Root::new(0, FAR, &p, 1, &p, 1).is_err());
    }

    #[test]
    fn release_envelope_is_not_a_root() {
        let ks = keys(1);
        let r = root_with(1, &ks, 1);
        let mut env = Envelope::new(PayloadType::Release, codec::encode(&r));
        env.sign(&ks[0]);
        let err = VerifiedRoot::verify_initial(&env.encode()).unwrap_err();
        assert!(matches!(err, Error::WrongPayloadType { .. }));
    }

    #[test]
    fn encoding_is_deterministic() {
        let ks = keys(3);
        let r = root_with(1, &ks, 2);
        let again = Root::decode_envelope(&r.sign(&[]).encode()).unwrap().1;
        assert_eq!(codec::encode(&r), codec::encode(&again));
    }

    proptest::proptest! {
        #[test]
        fn garbage_root_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            let _ = VerifiedRoot::verify_initial(&bytes);
        }
    }

    #[test]
    fn truncated_root_is_an_error() {
        let ks = keys(2);
        let b = root_with(1, &ks, 1).sign(&[&ks[0]]).encode();
        for cut in 0..b.len() {
            assert!(
                VerifiedRoot::verify_initial(&b[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
}
