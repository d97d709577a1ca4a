//! The `cairn` command line: argument definitions and dispatch. Each
//! subcommand lives in its own module and returns `anyhow::Result`; this
//! module turns errors into one `cairn: ...` line and an exit code.

use clap::{Parser, Subcommand};

mod bundle;
#[cfg(feature = "demo")]
mod demo;
mod diff;
mod fleet;
pub mod generate;
mod keys;
mod mesh;
mod oci;
mod promote;
mod release;
mod root;
mod secret;

/// Exit code for a failed command (bad input, failed verification).
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for a usage error (unknown flag, missing argument).
pub const EXIT_USAGE: i32 = 2;

/// Cairn: signed, content-addressed GitOps bundles for edge and air-gapped fleets.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate and inspect signing keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Create, rotate and verify trust roots.
    #[command(subcommand)]
    Root(root::RootCommand),
    /// Build bundles from Git, inspect and compare them.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Sign a bundle into a channel of a bundle repository.
    Release(release::ReleaseArgs),
    /// Sign the bundle of one channel's head into another channel (e.g.
    /// beta to stable) without rebuilding, after verifying it. The new release has its own
    /// expiry, rollout and selector: none are copied from the source release.
    Promote(promote::PromoteArgs),
    /// Verify a channel of a bundle repository: root chain, release
    /// signatures and expiry, and every object.
    Verify(release::VerifyArgs),
    /// Export channels of a bundle repository into a tar archive.
    Export(release::ExportArgs),
    /// Import a tar archive into a bundle repository, verifying everything first.
    Import(release::ImportArgs),
    /// Push a channel to an OCI registry (oci://HOST[:PORT]/NAME), tagged by channel.
    Push(oci::PushArgs),
    /// Pull a channel from an OCI registry into a bundle repository, verified like import.
    Pull(oci::PullArgs),
    /// The mesh's certificates: a fleet CA, agent and operator certificates.
    #[command(subcommand)]
    Mesh(mesh::MeshCommand),
    /// Show what applying a bundle would change on a live cluster: objects
    /// created, fields changed (server-side apply dry run), objects pruned.
    /// Exit code 0: no changes; 1: changes; 2: error.
    Diff(diff::DiffArgs),
    /// Look at the fleet through the mesh.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// The whole loop on one machine: a Git repository, a signed release,
    /// agents meshing in a line, a change moving as a delta.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Kubernetes Secrets encrypted to sites' age keys.
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Print a shell completion script (for packagers; see
    /// docs/OPERATIONS.md).
    #[command(hide = true)]
    Completions(generate::CompletionsArgs),
    /// Write man pages (for packagers; see docs/OPERATIONS.md).
    #[command(hide = true)]
    Man(generate::ManArgs),
}

/// Runs the CLI with the process arguments and returns the exit code.
pub fn main() -> i32 {
    reset_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let result = match cli.command {
        Command::Keys(c) => keys::run(c),
        Command::Root(c) => root::run(c),
        Command::Bundle(c) => bundle::run(c),
        Command::Release(a) => release::release(a),
        Command::Promote(a) => promote::run(a),
        Command::Verify(a) => release::verify(a),
        Command::Export(a) => release::export(a),
        Command::Import(a) => release::import(a),
        Command::Push(a) => oci::push(a),
        Command::Pull(a) => oci::pull(a),
        Command::Mesh(c) => mesh::run(c),
        // Its own exit codes (0 none, 1 changes, 2 error), as diff(1).
        Command::Diff(a) => return diff::run(a),
        Command::Fleet(c) => fleet::run(c),
        #[cfg(feature = "demo")]
        Command::Demo(a) => demo::run(a),
        Command::Secret(c) => secret::run(c),
        Command::Completions(a) => generate::run_completions(a),
        Command::Man(a) => generate::run_man(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            // Errors may quote unverified input (names from an archive or
            // a repository): no control sequences reach the terminal.
            eprintln!(
                "cairn: {}",
                cairn_keys::text::escape_untrusted(&error_chain(&e))
            );
            EXIT_FAILURE
        }
    }
}

/// One line: the error and its causes, joined by `: `.
pub(crate) fn error_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// A broken pipe (`cairn ... | head`) ends the process quietly, as Unix
/// tools do, instead of panicking in `println!`.
fn reset_sigpipe() {
    #[cfg(unix)]
    // SAFETY: resetting a signal disposition to its default at start-up,
    // before any threads exist.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
