//! Deterministic CBOR with size limits.
//!
//! Every signed Cairn document is encoded here. Determinism comes from the
//! types: structs with fixed field order, `BTreeMap` only, no floats, no
//! flattening, no skipped fields. This module is the one place that names
//! `serde_cbor`, so a later move to another CBOR crate touches one file.

use crate::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};

/// Encodes `value` as CBOR.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising to memory only fails for I/O errors or a Serialize impl
    // that reports one; Cairn's document types have neither.
    #[allow(clippy::expect_used)]
    serde_cbor::to_vec(value).expect("CBOR encoding to memory cannot fail")
}

/// Decodes `bytes` as `what`, refusing input larger than `limit` bytes
/// before any decoding happens.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8], limit: usize) -> Result<T> {
    if bytes.len() > limit {
        return Err(Error::TooLarge {
            what,
            limit,
            actual: bytes.len(),
        });
    }
    serde_cbor::from_slice(bytes).map_err(|e| Error::Decode {
        what,
        // serde names unknown fields and variants from the input verbatim.
        reason: crate::text::escape_untrusted(&e.to_string()),
    })
}
