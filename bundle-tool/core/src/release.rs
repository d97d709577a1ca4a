//! Releases: a signed statement that a bundle is the head of a channel.

use crate::ids::{BundleId, ChannelName};
use crate::{Error, Result};
use cairn_keys::{codec, Envelope, KeyPair, PayloadType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Release format version written by this build.
pub const RELEASE_FORMAT: u32 = 1;

/// One rollout wave: this share of matching agents may adopt once the
/// release is `delay_secs` old.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// Share of agents, in basis points (10000 = 100%).
    pub basis_points: u32,
    /// Seconds after `created` when the wave opens.
    pub delay_secs: u64,
}

/// The circuit breaker limit on reported failures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureLimit {
    /// Hold after this many agents report the release failed.
    Count(u32),
    /// Hold after this share (basis points) of adopters report failure.
    BasisPoints(u32),
}

/// How a release rolls out. No waves means everyone at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Waves, in increasing order of delay and share.
    pub waves: Vec<Wave>,
    /// Circuit breaker limit, if any.
    pub max_failures: Option<FailureLimit>,
}

/// The release document (payload of a `cairn.release` envelope).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Format version ([`RELEASE_FORMAT`]).
    pub format: u32,
    /// Channel name.
    pub channel: ChannelName,
    /// Strictly increasing per channel.
    pub sequence: u64,
    /// The bundle id (address of the bundle manifest).
    pub bundle: BundleId,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// Rollout policy.
    pub rollout: Rollout,
    /// Agents must carry all these labels (empty: every agent).
    pub selector: BTreeMap<String, String>,
}

impl Release {
    /// Encodes the release and signs it with `keys`.
    pub fn sign(&self, keys: &[&KeyPair]) -> Envelope {
        let mut env = Envelope::new(PayloadType::Release, codec::encode(self));
        for k in keys {
            env.sign(k);
        }
        env
    }

    /// Decodes a release envelope and its payload, without checking
    /// signatures (see [`crate::verify`]).
    pub fn decode_envelope(bytes: &[u8], limit: u64) -> Result<(Envelope, Release)> {
        if bytes.len() as u64 > limit {
            return Err(Error::TooLarge {
                what: "release".into(),
                limit,
                actual: bytes.len() as u64,
            });
        }
        let env = Envelope::decode(bytes)?;
        env.expect_type(PayloadType::Release)?;
        let rel: Release = codec::decode("release", &env.payload, bytes.len())?;
        rel.validate()?;
        Ok((env, rel))
    }

    /// Checks the fields that need no keys.
    pub fn validate(&self) -> Result<()> {
        if self.format != RELEASE_FORMAT {
            return Err(Error::InvalidRelease(format!(
                "format version {} (this build understands {RELEASE_FORMAT})",
                self.format
            )));
        }
        if self.sequence == 0 {
            return Err(Error::InvalidRelease("sequence must be at least 1".into()));
        }
        Ok(())
    }
}

/// Channel names: 1 to 63 characters of `a-z`, `0-9` and `-`, starting
/// with a letter or digit (they are file names in a repository).
pub fn validate_channel(name: &str) -> std::result::Result<(), String> {
    if crate::ids::is_channel_name(name) {
        Ok(())
    } else {
        Err(format!(
            "channel `{}`: use 1-63 characters of a-z, 0-9 and '-', not starting with '-'",
            cairn_keys::text::escape_untrusted(name)
        ))
    }
}
