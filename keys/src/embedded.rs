//! The trust root compiled into every Cairn binary.
//!
//! `build.rs` copies `keys/trust/root.v1` (the development root) or, when
//! the environment variable `CAIRN_TRUST_ROOT` names a file at build time,
//! that organisation's root. Agents trust nothing else as a starting point:
//! newer roots must chain from this one.

use crate::root::VerifiedRoot;
use crate::Result;

/// The embedded root envelope bytes.
pub const ROOT_BYTES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/embedded-root"));

/// `development` for the checked-in development root, otherwise the path
/// given in `CAIRN_TRUST_ROOT` at build time.
pub const ORIGIN: &str = env!("CAIRN_EMBEDDED_ROOT_ORIGIN");

/// Verifies and returns the embedded root (self-signed by a threshold of
/// its own root keys).
pub fn root() -> Result<VerifiedRoot> {
    VerifiedRoot::verify_initial(ROOT_BYTES)
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_root_verifies() {
        let r = super::root().unwrap();
        assert_eq!(r.root.version, 1);
        assert!(r.root.release.threshold >= 1);
    }
}
