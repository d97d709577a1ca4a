//! `cairn completions` and `cairn man`: thin wrappers around the
//! `cairn-cli-docs` crate (shared with `cairn-agent`).

use clap::CommandFactory;

pub use cairn_cli_docs::{completions, man_pages, CompletionsArgs, ManArgs, Shell};

/// `cairn completions SHELL`.
pub(crate) fn run_completions(a: CompletionsArgs) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    completions(super::Cli::command(), a.shell, &mut stdout)
        .map_err(|e| anyhow::anyhow!("writing the completion script: {e}"))
}

/// `cairn man [DIR]`.
pub(crate) fn run_man(a: ManArgs) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let written = man_pages(super::Cli::command(), a.dir.as_deref(), &mut stdout).map_err(|e| {
        match &a.dir {
            Some(d) => anyhow::anyhow!("writing man pages into {}: {e}", d.display()),
            None => anyhow::anyhow!("writing the man page: {e}"),
        }
    })?;
    if let Some(d) = &a.dir {
        eprintln!("wrote {} man page(s) into {}", written.len(), d.display());
    }
    Ok(())
}
