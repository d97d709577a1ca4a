//! `cairn-agent`: see `cairn-agent --help` and docs/OPERATIONS.md.
#![cfg_attr(test, allow(clippy::unwrap_used))]
fn main() {
    std::process::exit(cairn_agent::cli::main());
}
