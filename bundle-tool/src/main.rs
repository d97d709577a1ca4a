//! `cairn`: the release engineer's and operator's command line.
#![cfg_attr(test, allow(clippy::unwrap_used))]

/// mimalloc instead of glibc's malloc: the build allocates per YAML event
/// and per object, and glibc's allocator was about 29 % of its samples
/// (docs/PERFORMANCE.md, "Build").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(cairn_bundle::cli::main());
}
