//! Cairn's trust layer: Ed25519 keys, signed envelopes and the trust root.
//!
//! Everything here is pure except [`keyfile`] and [`fs`], which read and write
//! key files. Verification takes the bytes to check and `now` (Unix seconds)
//! as arguments, so the same code runs in the CLI, the agent and simulators.
//!
//! * [`codec`]: deterministic CBOR with a size limit on every decode.
//! * [`key`]: key pairs, public keys and key ids.
//! * [`envelope`]: signed, domain-separated envelopes.
//! * [`root`]: the trust root with roles and thresholds, and root rotation.
//! * [`embedded`]: the root compiled into every binary.
//! * [`text`]: escaping untrusted strings before they are shown.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod codec;
pub mod embedded;
pub mod envelope;
mod error;
pub mod fs;
pub mod key;
pub mod keyfile;
pub mod root;
pub mod text;

pub use envelope::{Envelope, PayloadType, Signature};
pub use error::{Error, Result};
pub use key::{KeyId, KeyPair, PublicKey};
pub use root::{Role, RoleKeys, Root, RootChain, VerifiedRoot};

/// Hex-encoded SHA-256 of `bytes`, prefixed `sha256:`: the address format
/// used for every content-addressed thing in Cairn.
pub fn sha256_address(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha256(bytes)))
}

/// The SHA-256 of `bytes`, as its 32 bytes (what [`sha256_address`]
/// writes in hex).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// [`sha256_address`] computed over a stream (for contents too large to
/// hold in memory, e.g. archive members written straight to disk).
pub struct AddressHasher(ring::digest::Context);

impl Default for AddressHasher {
    fn default() -> Self {
        Self(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl AddressHasher {
    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The `sha256:<hex>` address of everything added.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finish()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn streamed_address_equals_the_one_shot_address() {
        let data = b"hello, cairn".repeat(1000);
        let mut h = super::AddressHasher::default();
        for chunk in data.chunks(777) {
            h.update(chunk);
        }
        assert_eq!(h.finish(), super::sha256_address(&data));
    }
}
