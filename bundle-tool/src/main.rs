//! `cairn`: the release engineer's and operator's command line.

fn main() {
    std::process::exit(cairn_bundle::cli::main());
}
