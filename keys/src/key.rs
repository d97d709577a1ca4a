//! Ed25519 key pairs, public keys and key ids (ring).

use crate::{Error, Result};
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The id of a key: lower-case hex SHA-256 of the raw 32-byte public key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub String);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl KeyId {
    /// The first 12 hex digits, for log lines and tables.
    pub fn short(&self) -> &str {
        self.0.get(..12).unwrap_or(&self.0)
    }
}

/// An Ed25519 public key (32 raw bytes).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl PublicKey {
    /// Parses 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != 32 {
            return Err(Error::InvalidRoot(format!(
                "an Ed25519 public key is 32 bytes, got {}",
                bytes.len()
            )));
        }
        Ok(Self(bytes.to_vec()))
    }

    /// The key id of this key.
    pub fn key_id(&self) -> KeyId {
        KeyId(hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            &self.0,
        )))
    }

    /// Whether `signature` is a valid signature of `message` by this key.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

/// An Ed25519 key pair that can sign.
pub struct KeyPair {
    inner: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("key_id", &self.public_key().key_id())
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// Generates a new key pair from the system's secure random source.
    pub fn generate() -> Result<Self> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| Error::Sign)?;
        Self::from_pkcs8(doc.as_ref()).map_err(|_| Error::Sign)
    }

    /// Parses a PKCS#8 document (as written by [`KeyPair::pkcs8`]).
    pub fn from_pkcs8(der: &[u8]) -> std::result::Result<Self, String> {
        let inner = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| format!("not an Ed25519 PKCS#8 private key ({e})"))?;
        Ok(Self {
            inner,
            pkcs8: der.to_vec(),
        })
    }

    /// The PKCS#8 encoding of the private key.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.inner.public_key().as_ref().to_vec())
    }

    /// The key id of the public half.
    pub fn key_id(&self) -> KeyId {
        self.public_key().key_id()
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.inner.sign(message).as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_round_trip() {
        let k = KeyPair::generate().unwrap();
        let sig = k.sign(b"hello");
        assert!(k.public_key().verify(b"hello", &sig));
        assert!(!k.public_key().verify(b"hellp", &sig));
        let other = KeyPair::generate().unwrap();
        assert!(!other.public_key().verify(b"hello", &sig));
    }

    #[test]
    fn pkcs8_round_trip_keeps_key_id() {
        let k = KeyPair::generate().unwrap();
        let k2 = KeyPair::from_pkcs8(k.pkcs8()).unwrap();
        assert_eq!(k.key_id(), k2.key_id());
        assert_eq!(k.key_id().0.len(), 64);
    }

    #[test]
    fn garbage_is_not_a_private_key() {
        assert!(KeyPair::from_pkcs8(b"garbage").is_err());
    }
}
