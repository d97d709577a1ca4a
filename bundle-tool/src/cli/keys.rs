//! `cairn keys`: key generation.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub(super) enum KeysCommand {
    /// Generate an Ed25519 key pair: DIR/NAME.key (private, mode 0600) and
    /// DIR/NAME.pub. Prints the key id.
    Generate {
        /// Base name of the key files.
        name: String,
        /// Directory to write into (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Print the key id of a public or private key file.
    Id {
        /// A .pub or .key file.
        file: PathBuf,
    },
}

pub(super) fn run(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Generate { name, dir } => {
            let (kp, key, public) = cairn_keys::keyfile::generate(&dir, &name)?;
            eprintln!("wrote {} and {}", key.display(), public.display());
            println!("{}", kp.key_id());
        }
        KeysCommand::Id { file } => {
            let id = match cairn_keys::keyfile::read_public(&file) {
                Ok(pk) => pk.key_id(),
                Err(_) => cairn_keys::keyfile::read_private(&file)?.key_id(),
            };
            println!("{id}");
        }
    }
    Ok(())
}
