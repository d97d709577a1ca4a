//! Workspace-level end-to-end tests: one test binary (`--test
//! integration`), one module per area. They run the real binaries, so
//! build them first (`cargo build --workspace --bins`, as `tests/run`
//! does); a test never builds them itself. A test's name is its module
//! path, e.g. `readme::...`. New tests go here as modules. See
//! docs/TESTING.md.
#![allow(clippy::unwrap_used)]

mod bench_quick;
mod demo;
mod deploy;
mod readme;
