//! YAML manifest text to canonical objects (what `cairn bundle build`
//! parses from an untrusted Git tree).
//!
//! Properties: parsing never panics; every object it returns is within the
//! size limit, has canonical bytes that are compact JSON with sorted keys
//! (parsing them as JSON and writing them again gives the same bytes) and
//! that still validate as the same Kubernetes object.
//!
//! The call into the parser is one line (`parse`), so that a rename of the
//! public entry point touches only it.
#![no_main]

use cairn_bundle::manifests::{parse_file, validate_object, ParsedObject};
use libfuzzer_sys::fuzz_target;

const MAX_OBJECT_BYTES: u64 = 64 << 10;

fn parse(bytes: &[u8]) -> cairn_bundle::Result<Vec<ParsedObject>> {
    parse_file("fuzz.yaml", bytes, MAX_OBJECT_BYTES)
}

fuzz_target!(|data: &[u8]| {
    let Ok(objects) = parse(data) else { return };
    let mut last_document = None;
    for obj in objects {
        assert!(obj.bytes.len() as u64 <= MAX_OBJECT_BYTES);
        assert!(
            last_document < Some(obj.document),
            "document indices not increasing"
        );
        last_document = Some(obj.document);
        let json: serde_json::Value = match serde_json::from_slice(&obj.bytes) {
            Ok(json) => json,
            Err(e) => panic!("canonical bytes are not JSON: {e}"),
        };
        match serde_json::to_vec(&json) {
            Ok(again) => assert_eq!(
                String::from_utf8_lossy(&again),
                String::from_utf8_lossy(&obj.bytes),
                "canonical bytes are not a fixed point"
            ),
            Err(e) => panic!("{e}"),
        }
        let again = match validate_object(&json) {
            Ok(again) => again,
            Err(e) => panic!("canonical object no longer validates: {e}"),
        };
        assert_eq!(
            (
                &again.api_version,
                &again.kind,
                &again.namespace,
                &again.name
            ),
            (&obj.api_version, &obj.kind, &obj.namespace, &obj.name)
        );
    }
});
