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

/// The length of [`encode`]'s output for `value`, counted without
/// building it (the same serializer writes into a counter).
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
            self.0 += buf.len();
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // As in `encode`: counting cannot fail.
    #[allow(clippy::expect_used)]
    serde_cbor::to_writer(&mut count, value).expect("CBOR encoding to a counter cannot fail");
    count.0
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
