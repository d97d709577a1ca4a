//! Cairn bundles and the `cairn` command line.
//!
//! A bundle is a Git tree's Kubernetes manifests, parsed and stored as one
//! canonical object per Kubernetes object, addressed by SHA-256. A release
//! signs a bundle id into a channel. This crate builds bundles from Git
//! (gix), lays out bundle repositories, signs and verifies releases, and
//! moves repositories across air gaps.
//!
//! Pure parts ([`verify`], [`bundle`], [`release`]) take bytes and `now`;
//! IO lives in the [`cli`] and the file modules.

pub mod archive;
pub mod build;
pub mod bundle;
pub mod cairnignore;
pub mod check;
pub mod cli;
pub mod diff;
pub mod duration;
mod error;
pub mod export;
pub mod git;
pub mod helm;
pub mod libyaml;
pub mod limits;
pub mod manifests;
pub mod mesh;
pub mod oci;
pub mod publish;
pub mod release;
pub mod repo;
pub mod rollout;
pub mod secret;
pub mod trust;
pub mod verify;
pub mod yaml;

pub use error::{Error, Result};

/// Seconds since the Unix epoch, from the system clock. The one place pure
/// code's `now` comes from in the CLI.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
