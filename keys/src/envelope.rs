//! Signed envelopes: payload bytes plus signatures over a domain-separated
//! message.
//!
//! The signed message is never a re-encoding of decoded data: it is built
//! from the exact payload bytes, prefixed with a fixed context string, the
//! payload type and the envelope format version, each length-prefixed. A
//! signature over a release therefore can never be replayed as a root, and
//! a signature for format 1 never verifies as format 2.

use crate::codec;
use crate::key::{KeyId, KeyPair};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Envelope format version written by this build.
pub const ENVELOPE_FORMAT: u32 = 1;

/// Largest envelope accepted by [`Envelope::decode`] (1 MiB).
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;

/// Most signatures one envelope may carry.
pub const MAX_SIGNATURES: usize = 64;

const CONTEXT: &[u8] = b"cairn-signed-envelope";

/// The kinds of document Cairn signs. The name is part of the signed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadType {
    /// A trust root ([`crate::Root`]).
    Root,
    /// A channel release.
    Release,
}

impl PayloadType {
    /// The name written into envelopes.
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadType::Root => "cairn.root",
            PayloadType::Release => "cairn.release",
        }
    }
}

/// One signature in an envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// The signing key's id.
    pub key_id: KeyId,
    /// The Ed25519 signature over [`Envelope::signed_message`].
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// Payload bytes with the signatures over them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope format version ([`ENVELOPE_FORMAT`]).
    pub format: u32,
    /// The payload's type name ([`PayloadType::as_str`]).
    pub payload_type: String,
    /// The exact bytes that were signed (a CBOR document).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Signatures, in the order they were added.
    pub signatures: Vec<Signature>,
}

impl Envelope {
    /// A new, unsigned envelope.
    pub fn new(payload_type: PayloadType, payload: Vec<u8>) -> Self {
        Self {
            format: ENVELOPE_FORMAT,
            payload_type: payload_type.as_str().to_owned(),
            payload,
            signatures: Vec::new(),
        }
    }

    /// The message a signature covers: context, format, type and payload,
    /// each length-prefixed so no two inputs produce the same message.
    pub fn signed_message(format: u32, payload_type: &str, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(CONTEXT.len() + payload_type.len() + payload.len() + 28);
        for part in [
            CONTEXT,
            &format.to_be_bytes(),
            payload_type.as_bytes(),
            payload,
        ] {
            m.extend_from_slice(&(part.len() as u64).to_be_bytes());
            m.extend_from_slice(part);
        }
        m
    }

    /// Adds a signature by `key` (replacing an earlier one by the same key).
    pub fn sign(&mut self, key: &KeyPair) {
        let msg = Self::signed_message(self.format, &self.payload_type, &self.payload);
        let key_id = key.key_id();
        self.signatures.retain(|s| s.key_id != key_id);
        self.signatures.push(Signature {
            key_id,
            sig: key.sign(&msg),
        });
    }

    /// Encodes the envelope as CBOR.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Decodes an envelope, refusing more than [`MAX_ENVELOPE_BYTES`] or
    /// [`MAX_SIGNATURES`], or an unknown format version.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let env: Envelope = codec::decode("envelope", bytes, MAX_ENVELOPE_BYTES)?;
        if env.format != ENVELOPE_FORMAT {
            return Err(Error::UnsupportedFormat {
                what: "envelope",
                found: env.format,
                supported: ENVELOPE_FORMAT,
            });
        }
        if env.signatures.len() > MAX_SIGNATURES {
            return Err(Error::TooLarge {
                what: "envelope signature list",
                limit: MAX_SIGNATURES,
                actual: env.signatures.len(),
            });
        }
        Ok(env)
    }

    /// Checks the payload type before anything else looks at the payload.
    pub fn expect_type(&self, expected: PayloadType) -> Result<()> {
        if self.payload_type != expected.as_str() {
            return Err(Error::WrongPayloadType {
                expected: expected.as_str().to_owned(),
                found: self.payload_type.clone(),
            });
        }
        Ok(())
    }

    /// The ids of keys whose signature verifies under `lookup`, each counted
    /// once however often it signed. Unknown keys and bad signatures are
    /// returned separately so errors can name them.
    pub fn valid_signers<'a>(
        &self,
        lookup: impl Fn(&KeyId) -> Option<&'a crate::PublicKey>,
    ) -> SignerReport {
        let msg = Self::signed_message(self.format, &self.payload_type, &self.payload);
        let mut report = SignerReport::default();
        for s in &self.signatures {
            match lookup(&s.key_id) {
                None => report.unknown.push(s.key_id.clone()),
                Some(pk) if pk.verify(&msg, &s.sig) => {
                    if !report.valid.contains(&s.key_id) {
                        report.valid.push(s.key_id.clone());
                    }
                }
                Some(_) => report.bad.push(s.key_id.clone()),
            }
        }
        report
    }
}

/// Which signatures of an envelope verified.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SignerReport {
    /// Distinct keys with a valid signature.
    pub valid: Vec<KeyId>,
    /// Keys not known to the verifier.
    pub unknown: Vec<KeyId>,
    /// Known keys whose signature did not verify.
    pub bad: Vec<KeyId>,
}

impl SignerReport {
    /// A short description of what did not count, for error messages.
    pub fn detail(&self) -> String {
        let mut d = String::new();
        if !self.unknown.is_empty() {
            let ids: Vec<_> = self.unknown.iter().map(|k| k.short().to_owned()).collect();
            d.push_str(&format!("; unknown key(s) {}", ids.join(", ")));
        }
        if !self.bad.is_empty() {
            let ids: Vec<_> = self.bad.iter().map(|k| k.short().to_owned()).collect();
            d.push_str(&format!("; invalid signature(s) by {}", ids.join(", ")));
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_separation_rejects_other_type() {
        let k = KeyPair::generate().unwrap();
        let pk = k.public_key();
        let mut env = Envelope::new(PayloadType::Release, b"payload".to_vec());
        env.sign(&k);
        assert_eq!(env.valid_signers(|_| Some(&pk)).valid.len(), 1);
        // Relabel the same signed bytes as a root: the signature must fail.
        env.payload_type = PayloadType::Root.as_str().to_owned();
        let r = env.valid_signers(|_| Some(&pk));
        assert!(r.valid.is_empty());
        assert_eq!(r.bad, vec![k.key_id()]);
    }

    #[test]
    fn tampered_payload_fails() {
        let k = KeyPair::generate().unwrap();
        let pk = k.public_key();
        let mut env = Envelope::new(PayloadType::Root, b"payload".to_vec());
        env.sign(&k);
        env.payload[0] ^= 1;
        assert!(env.valid_signers(|_| Some(&pk)).valid.is_empty());
    }

    #[test]
    fn duplicate_signatures_count_once() {
        let k = KeyPair::generate().unwrap();
        let pk = k.public_key();
        let mut env = Envelope::new(PayloadType::Root, b"p".to_vec());
        env.sign(&k);
        let dup = env.signatures[0].clone();
        env.signatures.push(dup);
        assert_eq!(env.valid_signers(|_| Some(&pk)).valid.len(), 1);
    }

    #[test]
    fn round_trip_and_wrong_type() {
        let k = KeyPair::generate().unwrap();
        let mut env = Envelope::new(PayloadType::Root, b"p".to_vec());
        env.sign(&k);
        let back = Envelope::decode(&env.encode()).unwrap();
        assert_eq!(back, env);
        assert!(matches!(
            back.expect_type(PayloadType::Release),
            Err(Error::WrongPayloadType { .. })
        ));
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let big = vec![0u8; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(
            Envelope::decode(&big),
            Err(Error::TooLarge { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Envelope::decode(&bytes);
        }

        #[test]
        fn truncation_is_an_error(cut in 0usize..100) {
            let k = KeyPair::generate().unwrap();
            let mut env = Envelope::new(PayloadType::Root, vec![7; 40]);
            env.sign(&k);
            let bytes = env.encode();
            let cut = cut.min(bytes.len() - 1);
            proptest::prop_assert!(Envelope::decode(&bytes[..cut]).is_err());
        }
    }
}
