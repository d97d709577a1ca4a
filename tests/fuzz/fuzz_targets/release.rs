//! Release decoding and verification (`ReleaseCheck`) on untrusted bytes.
//!
//! Properties: decoding never panics; a decoded release is valid by its
//! own rules and survives an encode/decode round trip; verification against
//! the embedded (development) root accepts nothing the development release
//! keys did not sign; and an accepted release is refused as a rollback at
//! its own sequence, refused on another channel, and refused once expired.
#![no_main]

use cairn_bundle::limits::Limits;
use cairn_bundle::release::Release;
use cairn_bundle::verify::ReleaseCheck;
use cairn_bundle::Error;
use cairn_fuzz::{assert_envelope_round_trip, was_signed};
use cairn_keys::{codec, embedded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let (env, release) = match Release::decode_envelope(data, limits.max_release_bytes) {
        Ok(decoded) => decoded,
        Err(_) => return,
    };
    if let Err(e) = release.validate() {
        panic!("decode_envelope returned a release that does not validate: {e}");
    }
    assert_envelope_round_trip(&env);
    let encoded = codec::encode(&release);
    match codec::decode::<Release>("release", &encoded, encoded.len()) {
        Ok(back) => assert_eq!(back, release, "release changed in a round trip"),
        Err(e) => panic!("re-encoded release does not decode: {e}"),
    }

    let root = match embedded::root() {
        Ok(r) => r.root().clone(),
        Err(e) => panic!("embedded root does not verify: {e}"),
    };
    // A moment at which neither the release nor the root has expired, if
    // there is one, so that the signature check decides.
    let now = release
        .created
        .min(release.expires.saturating_sub(1))
        .min(root.expires.saturating_sub(1));
    let check = ReleaseCheck {
        root: &root,
        channel: &release.channel,
        last_sequence: None,
        now,
        limits: &limits,
    };
    let verified = match check.verify(data) {
        Ok(v) => v,
        Err(_) => {
            // Without the expiry and rollback checks it may still pass, but
            // only if the development keys signed it.
            if check.reverify_adopted(data).is_ok() {
                assert!(
                    was_signed(&env),
                    "adopted release re-verified but nobody signed it"
                );
            }
            return;
        }
    };
    assert!(
        was_signed(&env),
        "release {} verified but nobody signed it",
        release.sequence
    );
    assert_eq!(verified.release(), &release);
    assert_eq!(verified.bytes(), data);
    assert!(!verified.signers().is_empty());
    assert!(check.reverify_adopted(data).is_ok());

    let rollback = ReleaseCheck {
        last_sequence: Some(release.sequence),
        ..check.clone()
    };
    assert!(matches!(rollback.verify(data), Err(Error::Rollback { .. })));
    let other = if release.channel == "other" {
        "another"
    } else {
        "other"
    };
    let elsewhere = ReleaseCheck {
        channel: other,
        ..check.clone()
    };
    assert!(matches!(
        elsewhere.verify(data),
        Err(Error::WrongChannel { .. })
    ));
    let late = ReleaseCheck {
        now: release.expires,
        ..check
    };
    assert!(late.verify(data).is_err(), "an expired release verified");
});
