//! What the fuzz targets share: the set of messages the development keys
//! really signed.
//!
//! The seed corpora (`corpus/<target>/seed-*`, written by
//! `examples/make_seeds.rs`) hold envelopes signed with the checked-in
//! development keys. A fuzzer cannot make an Ed25519 signature, so any
//! envelope that verifies against the embedded (development) root must
//! carry exactly the signed message (format, payload type, payload) of one
//! of those seeds, however its bytes were mutated around it. The targets
//! assert that; a failure means a decoder or verifier accepted something
//! nobody signed.

use cairn_keys::Envelope;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

/// Seed corpora that hold signed envelopes.
const SIGNED_SEED_DIRS: &[&str] = &["envelope", "root", "release"];

/// The fuzz crate's directory (seeds are read from here at run time, so a
/// new seed needs no rebuild).
pub fn fuzz_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether the development keys signed exactly this message for one of the
/// seed envelopes.
pub fn was_signed(env: &Envelope) -> bool {
    static SIGNED: OnceLock<BTreeSet<Vec<u8>>> = OnceLock::new();
    let signed = SIGNED.get_or_init(|| {
        let mut set = BTreeSet::new();
        for dir in SIGNED_SEED_DIRS {
            let Ok(entries) = std::fs::read_dir(fuzz_dir().join("corpus").join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_name().to_string_lossy().starts_with("seed-") {
                    continue;
                }
                let Ok(bytes) = std::fs::read(entry.path()) else {
                    continue;
                };
                if let Ok(seed) = Envelope::decode(&bytes) {
                    if !seed.signatures.is_empty() {
                        set.insert(message(&seed));
                    }
                }
            }
        }
        set
    });
    signed.contains(&message(env))
}

fn message(env: &Envelope) -> Vec<u8> {
    Envelope::signed_message(env.format, &env.payload_type, &env.payload)
}

/// Asserts that a decoded envelope re-encodes to bytes that decode to the
/// same envelope, and that the re-encoding is a fixed point (the encoding
/// of a decoded document is canonical).
pub fn assert_envelope_round_trip(env: &Envelope) {
    let encoded = env.encode();
    let back = match Envelope::decode(&encoded) {
        Ok(back) => back,
        Err(e) => panic!("re-encoded envelope does not decode: {e}"),
    };
    assert_eq!(&back, env, "envelope changed in a decode/encode round trip");
    assert_eq!(back.encode(), encoded, "envelope encoding is not canonical");
}
