//! Release verification: a pure function of (trusted root, last adopted
//! sequence, candidate bytes, channel, now).
//!
//! **Architecture invariant:** nothing here does IO. The CLI, the agent's
//! source pipeline, the mesh and the simulator all call the same checks.

use crate::limits::Limits;
use crate::release::Release;
use crate::{Error, Result};
use cairn_keys::{Envelope, KeyId, Role, Root};

/// A release whose envelope passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedRelease {
    /// The release document.
    pub release: Release,
    /// The exact envelope bytes (stored and served onward unchanged).
    pub bytes: Vec<u8>,
    /// Release keys whose signatures counted.
    pub signers: Vec<KeyId>,
}

/// What to check a candidate release against.
#[derive(Clone, Debug)]
pub struct ReleaseCheck<'a> {
    /// The current trusted root.
    pub root: &'a Root,
    /// The channel the caller follows.
    pub channel: &'a str,
    /// The highest sequence already adopted on that channel, if any.
    pub last_sequence: Option<u64>,
    /// Now, Unix seconds.
    pub now: u64,
    /// Size limits.
    pub limits: &'a Limits,
}

impl ReleaseCheck<'_> {
    /// Verifies a release envelope: size, type, format, signatures by a
    /// threshold of distinct release keys of the root, channel, sequence
    /// strictly above the last adopted (rollback), not expired (freeze), and
    /// the root itself not expired.
    pub fn verify(&self, bytes: &[u8]) -> Result<VerifiedRelease> {
        let (env, release) = Release::decode_envelope(bytes, self.limits.max_release_bytes)?;
        let signers = self.check_signatures(&env, &release)?;
        if release.channel != self.channel {
            return Err(Error::WrongChannel {
                expected: self.channel.to_owned(),
                found: release.channel,
            });
        }
        if let Some(last) = self.last_sequence {
            if release.sequence <= last {
                return Err(Error::Rollback {
                    channel: release.channel,
                    last,
                    found: release.sequence,
                });
            }
        }
        if self.now >= release.expires {
            return Err(Error::Expired {
                channel: release.channel,
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
        let signers = self.check_signatures(&env, &release)?;
        if release.channel != self.channel {
            return Err(Error::WrongChannel {
                expected: self.channel.to_owned(),
                found: release.channel,
            });
        }
        Ok(VerifiedRelease {
            release,
            bytes: bytes.to_vec(),
            signers,
        })
    }

    fn check_signatures(&self, env: &Envelope, release: &Release) -> Result<Vec<KeyId>> {
        let what = format!(
            "release {} on channel `{}`",
            release.sequence, release.channel
        );
        Ok(self.root.check_threshold(Role::Release, env, &what)?)
    }
}
