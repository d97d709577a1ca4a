//! Envelope decoding and signature checking on untrusted bytes.
//!
//! Properties: decoding never panics; a decoded envelope keeps its limits
//! (format 1, at most MAX_SIGNATURES) and survives an encode/decode round
//! trip; and no signature verifies under any key of the embedded root
//! unless the development keys signed exactly that message for a seed.
#![no_main]

use cairn_fuzz::{assert_envelope_round_trip, was_signed};
use cairn_keys::envelope::{ENVELOPE_FORMAT, MAX_ENVELOPE_BYTES, MAX_SIGNATURES};
use cairn_keys::{embedded, Envelope, Error, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let env = match Envelope::decode(data) {
        Ok(env) => env,
        Err(Error::TooLarge { .. }) => {
            assert!(data.len() > MAX_ENVELOPE_BYTES);
            return;
        }
        Err(_) => return,
    };
    assert!(data.len() <= MAX_ENVELOPE_BYTES);
    assert_eq!(env.format, ENVELOPE_FORMAT);
    assert!(env.signatures.len() <= MAX_SIGNATURES);
    assert_envelope_round_trip(&env);

    let root = match embedded::root() {
        Ok(r) => r.root().clone(),
        Err(e) => panic!("embedded root does not verify: {e}"),
    };
    for role in [Role::Root, Role::Release] {
        let keys = root.role(role);
        let report = env.valid_signers(|id| {
            if keys.key_ids.contains(id) {
                root.keys.get(id)
            } else {
                None
            }
        });
        assert!(
            report.valid.is_empty() || was_signed(&env),
            "a signature by {role} key(s) {:?} verified over a message nobody signed",
            report.valid
        );
        // Each counted signer is distinct and really present.
        for (i, id) in report.valid.iter().enumerate() {
            assert!(
                !report.valid[..i].contains(id),
                "signer {id:?} counted twice"
            );
            assert!(env.signatures.iter().any(|s| &s.key_id == id));
        }
    }
});
