//! `cairn`: the release engineer's and operator's command line.
#![cfg_attr(test, allow(clippy::unwrap_used))]

fn main() {
    std::process::exit(cairn_bundle::cli::main());
}
