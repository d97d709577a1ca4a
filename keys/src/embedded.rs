//! The trust root compiled into every Cairn binary.
//!
//! `build.rs` copies `keys/trust/root.v1` (the development root) or, when
//! the environment variable `CAIRN_TRUST_ROOT` names a file at build time,
//! that organisation's root. Agents trust nothing else as a starting point:
//! newer roots must chain from this one.
//!
//! The development root's private keys are public (`keys/trust/dev/`).
//! Agents refuse to run with it unless explicitly allowed
//! (`insecureAllowDevelopmentRoot`), and the development release key used
//! by `cairn demo` is compiled in only when the embedded root is the
//! development one (`development_release_key`, behind the crate feature `development-key`).

use crate::root::VerifiedRoot;
use crate::Result;

/// The embedded root envelope bytes.
pub const ROOT_BYTES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/embedded-root"));

/// [`ORIGIN`] of the checked-in development root.
pub const DEVELOPMENT: &str = "development";

/// `development` for the checked-in development root (also when
/// `CAIRN_TRUST_ROOT` named a copy of it), otherwise the path given in
/// `CAIRN_TRUST_ROOT` at build time.
pub const ORIGIN: &str = env!("CAIRN_EMBEDDED_ROOT_ORIGIN");

/// Whether the embedded root is the development root, whose private keys
/// anyone can read.
pub const fn is_development() -> bool {
    #[cfg(cairn_dev_root)]
    {
        true
    }
    #[cfg(not(cairn_dev_root))]
    {
        false
    }
}

/// Verifies and returns the embedded root (self-signed by a threshold of
/// its own root keys).
pub fn root() -> Result<VerifiedRoot> {
    VerifiedRoot::verify_initial(ROOT_BYTES)
}

/// The development release key (`keys/trust/dev/dev-release-1.key`,
/// PKCS#8) when the embedded root is the development root; `None` in a
/// binary built for any other root, which does not contain the key bytes.
/// Only with the feature `development-key` (which `cairn-bundle`'s `demo`
/// feature turns on): a build without it has no such function at all.
#[cfg(feature = "development-key")]
pub fn development_release_key() -> Option<&'static [u8]> {
    #[cfg(cairn_dev_root)]
    {
        Some(include_bytes!("../trust/dev/dev-release-1.key"))
    }
    #[cfg(not(cairn_dev_root))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_root_verifies() {
        let r = super::root().unwrap();
        assert_eq!(r.root().version, 1);
        assert!(r.root().release.threshold >= 1);
    }

    #[test]
    #[cfg(feature = "development-key")]
    fn the_development_key_comes_only_with_the_development_root() {
        assert_eq!(super::is_development(), super::ORIGIN == super::DEVELOPMENT);
        assert_eq!(
            super::development_release_key().is_some(),
            super::is_development()
        );
    }
}
