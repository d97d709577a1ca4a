//! The `cairn` CLI's integration tests: one test binary (`--test
//! integration`), one module per area, as ripgrep lays out its tests. A
//! test's name is its module path, e.g. `cli_release::release_threshold_two_needs_two_keys`.
//! New tests go here as modules, not as new files in `bundle-tool/tests/`.
//! See docs/TESTING.md.
#![allow(clippy::unwrap_used)]

mod support;

mod builder;
mod cli_bundle;
mod cli_keys_root;
mod cli_release;
mod cli_secret;
mod conventions;
mod helm;
mod oci;
