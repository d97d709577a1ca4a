//! Root decoding and rotation on untrusted bytes.
//!
//! Properties: decoding never panics; a decoded root is valid by its own
//! rules and survives an encode/decode round trip; `verify_initial` accepts
//! exactly what `decode_envelope` plus a self-signature threshold accepts;
//! and `verify_next` from the embedded (development) root accepts nothing
//! the development root keys did not sign, and only version 2.
#![no_main]

use cairn_fuzz::{assert_envelope_round_trip, was_signed};
use cairn_keys::root::MAX_ROOT_BYTES;
use cairn_keys::{codec, embedded, Error, Role, Root, VerifiedRoot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (env, root) = match Root::decode_envelope(data) {
        Ok(decoded) => decoded,
        Err(Error::TooLarge { .. }) => {
            assert!(data.len() > MAX_ROOT_BYTES);
            return;
        }
        Err(_) => {
            assert!(VerifiedRoot::verify_initial(data).is_err());
            return;
        }
    };
    if let Err(e) = root.validate() {
        panic!("decode_envelope returned a root that does not validate: {e}");
    }
    assert_envelope_round_trip(&env);
    let encoded = codec::encode(&root);
    match codec::decode::<Root>("root", &encoded, MAX_ROOT_BYTES) {
        Ok(back) => assert_eq!(back, root, "root changed in a round trip"),
        Err(e) => panic!("re-encoded root does not decode: {e}"),
    }

    // Self-signed: accepted exactly when a threshold of its own root keys
    // signed it. (A self-signed root is trusted only because the caller
    // chose it, so there is no "nobody signed it" property here.)
    let self_signed = root.check_threshold(Role::Root, &env, "fuzz").is_ok();
    match VerifiedRoot::verify_initial(data) {
        Ok(v) => {
            assert!(self_signed);
            assert_eq!(v.root(), &root);
            assert_eq!(v.bytes(), data);
        }
        Err(_) => assert!(!self_signed),
    }

    // Rotation from the embedded root: needs the development root keys.
    let first = match embedded::root() {
        Ok(r) => r,
        Err(e) => panic!("embedded root does not verify: {e}"),
    };
    if let Ok(next) = first.verify_next(data) {
        assert!(
            was_signed(&env),
            "root v{} verified as the next root but nobody signed it",
            next.root().version
        );
        assert_eq!(next.root().version, first.root().version + 1);
        assert!(
            self_signed,
            "next root accepted without its own keys' threshold"
        );
        assert_eq!(next.root(), &root);
    }
});
