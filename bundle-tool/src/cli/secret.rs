//! `cairn secret`: Kubernetes Secrets encrypted to sites' age keys
//! ([`crate::secret`]).

use crate::secret::{self, Identities};
use anyhow::{Context, Result};
use clap::Subcommand;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub(super) enum SecretCommand {
    /// Encrypt a Secret manifest to one or more sites' age recipients; the
    /// result (an AgeSecret document: name and namespace in clear, the
    /// Secret as an armored age file) is what goes into Git.
    Encrypt {
        /// A site's (or region's) age recipient, `age1...` (repeatable).
        #[arg(short = 'r', long = "recipient", value_name = "AGE1...")]
        recipients: Vec<String>,
        /// A file of recipients, one per line (`#` comments), as `age -R`.
        #[arg(short = 'R', long = "recipients-file", value_name = "FILE")]
        recipients_files: Vec<PathBuf>,
        /// The Secret manifest (one `v1` Secret; `-` for stdin).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Write here instead of stdout.
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Decrypt an AgeSecret with an identity file and print the Secret
    /// manifest (to check what a site will apply).
    Decrypt {
        /// An age identity file (`AGE-SECRET-KEY-1...`, from `age-keygen`
        /// or `cairn secret keygen`).
        #[arg(short = 'i', long = "identity", value_name = "FILE")]
        identity: PathBuf,
        /// The AgeSecret document (`-` for stdin).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Create a site's age identity file (mode 0600; the same format as
    /// `age-keygen`) and print its recipient.
    Keygen {
        /// The identity file to create (refuses to overwrite).
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: PathBuf,
    },
}

/// Reads a file or stdin (`-`), at most `max` bytes (one more is read to
/// tell a too-large input).
fn read_input(path: &Path, max: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let limit = max as u64 + 1;
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(limit)
            .read_to_end(&mut buf)
            .context("reading stdin")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut buf))
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(buf)
}

pub(super) fn run(cmd: SecretCommand) -> Result<()> {
    match cmd {
        SecretCommand::Encrypt {
            mut recipients,
            recipients_files,
            file,
            out,
        } => {
            for f in &recipients_files {
                let text = read_input(f, secret::MAX_IDENTITY_FILE_BYTES)?;
                let text = String::from_utf8(text)
                    .with_context(|| format!("{}: not UTF-8", f.display()))?;
                recipients.extend(secret::recipients_from_text(&text));
            }
            let recipients = secret::parse_recipients(&recipients)?;
            let shown = file.display().to_string();
            let plain = read_input(&file, secret::MAX_SECRET_BYTES)?;
            let doc = secret::encrypt(&plain, &shown, &recipients)?;
            match out {
                Some(o) => {
                    std::fs::write(&o, doc).with_context(|| format!("writing {}", o.display()))?;
                    eprintln!(
                        "encrypted {shown} to {} recipient(s) into {}",
                        recipients.len(),
                        o.display()
                    );
                }
                None => {
                    let mut so = std::io::stdout().lock();
                    so.write_all(doc.as_bytes())
                        .and_then(|()| so.flush())
                        .context("writing to stdout")?;
                }
            }
        }
        SecretCommand::Decrypt { identity, file } => {
            let ids = Identities::read(&identity)?;
            let shown = file.display().to_string();
            let doc = read_input(&file, secret::MAX_DOCUMENT_BYTES)?;
            let s = secret::parse(&doc, &shown)?;
            let plain = secret::decrypt(&s, &shown, &ids)?;
            let mut so = std::io::stdout().lock();
            so.write_all(&plain)
                .and_then(|()| so.flush())
                .context("writing to stdout")?;
        }
        SecretCommand::Keygen { out } => {
            let (text, public) = Identities::generate();
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            opts.open(&out)
                .and_then(|mut f| {
                    f.write_all(text.as_bytes())?;
                    f.sync_all()
                })
                .with_context(|| format!("creating {}", out.display()))?;
            eprintln!("wrote {}", out.display());
            println!("{public}");
        }
    }
    Ok(())
}
