//! Shell completions and man pages for a clap command line (`cairn` and
//! `cairn-agent`), with clap's companion crates `clap_complete` and
//! `clap_mangen`. Both binaries expose them as hidden subcommands:
//!
//! * `completions bash|zsh|fish|elvish|powershell`: the script on stdout;
//! * `man [DIR]`: with DIR, one page per (non-hidden) subcommand,
//!   `DIR/cairn.1`, `DIR/cairn-keys.1`, `DIR/cairn-keys-generate.1`, ...;
//!   without, the top-level page on stdout.
//!
//! A crate of its own so that `cairn-agent` gets them without linking the
//! bundle builder.
//!
//! Packagers run them at build time (deploy/container/Containerfile) and
//! install the results under /usr/share (docs/OPERATIONS.md).
#![cfg_attr(test, allow(clippy::unwrap_used))]

use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// `completions SHELL`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// `man [DIR]`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write one page per subcommand into this directory (created if
    /// missing) instead of the top-level page to stdout.
    pub dir: Option<PathBuf>,
}

/// Writes the completion script of `cmd` for `shell` to `out`.
pub fn completions(
    mut cmd: clap::Command,
    shell: Shell,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, out);
    out.flush()
}

/// Writes the man pages of `cmd`: every page into `dir`, or the top-level
/// page to `out`. Returns the files written.
pub fn man_pages(
    cmd: clap::Command,
    dir: Option<&Path>,
    out: &mut dyn Write,
) -> std::io::Result<Vec<PathBuf>> {
    // As `clap_mangen::generate_to`, but returning what it wrote.
    fn pages(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages(sub.clone(), dir, written)?;
        }
        written.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
        Ok(())
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(out)?;
        out.flush()?;
        return Ok(Vec::new());
    };
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    pages(cmd, dir, &mut written)?;
    written.sort();
    Ok(written)
}
