//! Mesh frame decoding on an untrusted byte stream.
//!
//! The input is read as a peer's stream of frames. Properties: the header
//! check refuses exactly the lengths over the limit; the blocking reader
//! and the header/body path the agent uses agree on the first frame; every
//! message that decodes is valid and survives an encode/decode round trip
//! whose encoding is canonical.
#![no_main]

use cairn_bundle::mesh::wire::{
    body_len, decode_body, encode_frame, read_frame, WireError, HEADER_BYTES,
};
use cairn_bundle::mesh::MeshLimits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = MeshLimits::default();

    // The blocking reader (CLI) on the first frame.
    let first = read_frame(&mut &data[..], &limits);

    // The agent's path: header, then body, frame after frame.
    let mut rest = data;
    let mut index = 0;
    while rest.len() >= HEADER_BYTES {
        let mut header = [0u8; HEADER_BYTES];
        header.copy_from_slice(&rest[..HEADER_BYTES]);
        let announced = u32::from_be_bytes(header);
        let len = match body_len(header, limits.max_frame_bytes) {
            Ok(len) => {
                assert!(announced <= limits.max_frame_bytes);
                len
            }
            Err(WireError::Oversized { actual, .. }) => {
                assert!(announced > limits.max_frame_bytes);
                assert_eq!(actual, u64::from(announced));
                if index == 0 {
                    assert!(matches!(first, Err(WireError::Oversized { .. })));
                }
                return;
            }
            Err(e) => panic!("header check failed other than oversized: {e}"),
        };
        let Some(body) = rest.get(HEADER_BYTES..HEADER_BYTES + len) else {
            // Truncated body: the reader reports an IO error.
            if index == 0 {
                assert!(matches!(first, Err(WireError::Io(_))));
            }
            return;
        };
        rest = &rest[HEADER_BYTES + len..];
        let decoded = decode_body(body, &limits);
        if index == 0 {
            match (&first, &decoded) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                _ => panic!("read_frame and decode_body disagree: {first:?} vs {decoded:?}"),
            }
        }
        index += 1;
        let Ok(msg) = decoded else { continue };
        if let Err(e) = msg.validate(&limits) {
            panic!("decoded message does not validate: {e}");
        }
        let frame = match encode_frame(&msg, limits.max_frame_bytes) {
            Ok(frame) => frame,
            Err(e) => panic!("decoded {} message does not re-encode: {e}", msg.kind()),
        };
        let back = match decode_body(&frame[HEADER_BYTES..], &limits) {
            Ok(back) => back,
            Err(e) => panic!("re-encoded {} message does not decode: {e}", msg.kind()),
        };
        assert_eq!(back, msg, "message changed in a round trip");
        match encode_frame(&back, limits.max_frame_bytes) {
            Ok(again) => assert_eq!(again, frame, "frame encoding is not canonical"),
            Err(e) => panic!("{e}"),
        }
    }
    if data.len() < HEADER_BYTES {
        assert!(matches!(
            first,
            Err(WireError::Closed) | Err(WireError::Io(_))
        ));
    }
});
