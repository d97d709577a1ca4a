//! The agent's integration tests: one test binary (`--test integration`),
//! one module per area, as ripgrep lays out its tests. Most drive real
//! `cairn-agent` and `cairn` processes, so build the binaries first
//! (`cargo build --workspace --bins`, as `tests/run` does); a test never
//! builds them itself. A test's name is its module path, e.g.
//! `mesh::only_the_changed_object_moves_over_the_mesh`. New tests go here
//! as modules, not as new files in `agent/tests/`. See docs/TESTING.md.
#![allow(clippy::unwrap_used)]

mod support;

mod attacks;
mod conventions;
mod corrupt;
mod diff;
mod e2e;
mod images;
mod kubernetes;
mod mesh;
mod mesh_partition;
mod notify;
mod oci;
mod reliability;
mod rollout;
mod site_values;
mod target_recovery;
mod waves;
