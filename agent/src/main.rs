//! `cairn-agent`: see `cairn-agent --help` and docs/OPERATIONS.md.
fn main() {
    std::process::exit(cairn_agent::cli::main());
}
