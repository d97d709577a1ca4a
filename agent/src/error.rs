use crate::config::ConfigError;
use crate::store::StoreError;
use crate::targets::TargetError;
use std::path::PathBuf;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that stops the agent or a command. Each message is one line
/// (configuration errors: one line per field) that says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store failed or is locked.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The trust root compiled into this binary does not verify.
    #[error("embedded trust root: {0}; this binary is broken, rebuild it")]
    EmbeddedRoot(cairn_keys::Error),
    /// Stored state fails verification against the trust root.
    #[error("data dir {}: stored state fails verification: {detail}; restore the data dir from a backup, or move it aside to start fresh (the agent never wipes it)", dir.display())]
    CorruptState {
        /// The data directory.
        dir: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The target failed.
    #[error("target: {0}")]
    Target(#[from] TargetError),
    /// No release has been adopted on the channel, so nothing is enforced.
    #[error("no release adopted on channel `{channel}`: {detail}")]
    NoRelease {
        /// The channel.
        channel: String,
        /// Why (source errors, last rejection).
        detail: String,
    },
    /// The target does not match the adopted release.
    #[error("target does not match release {sequence} on channel `{channel}`: {detail}")]
    NotInSync {
        /// The channel.
        channel: String,
        /// The adopted sequence.
        sequence: u64,
        /// What differs.
        detail: String,
    },
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A local hold file is unreadable or cannot be written.
    #[error("hold: {0}")]
    Hold(String),
    /// `status` found nothing to show.
    #[error("{0}")]
    Status(String),
}
