//! Cairn bundles and the `cairn` command line.
//!
//! A bundle is a Git tree's Kubernetes manifests, parsed and stored as one
//! canonical object per Kubernetes object, addressed by SHA-256. A release
//! signs a bundle id into a channel. This crate builds bundles from Git
//! (gix), lays out bundle repositories, signs and verifies releases, and
//! moves repositories across air gaps.
//!
//! Pure parts ([`verify`], [`bundle`], [`release`]) live in `cairn-core`
//! and take bytes and `now`; IO lives in the [`cli`] and the file modules
//! here.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod archive;
pub mod build;
mod bundle_file;
pub mod cairnignore;
pub mod check;
pub mod cli;
pub mod export;
pub mod git;
pub mod helm;
pub mod images;
pub mod libyaml;
pub mod manifests;
pub mod oci;
pub mod publish;
pub mod repo;
pub mod secret;
pub mod yaml;

// The pure parts live in `cairn-core` and the mesh protocol in
// `cairn-mesh`; these re-exports keep the crate's old paths working.
pub use cairn_core::{diff, duration, limits, release, rollout, trust, verify};
pub use cairn_core::{ids, Address, BundleId, ChannelName, Error, Result};
pub use cairn_mesh as mesh;

/// Bundle manifests and object checks ([`cairn_core::bundle`]) and the
/// bundle file (file IO, this crate).
pub mod bundle {
    pub use crate::bundle_file::{read_bundle_file, write_bundle_file};
    pub use cairn_core::bundle::*;
}

/// Seconds since the Unix epoch, from the system clock. The one place pure
/// code's `now` comes from in the CLI.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
