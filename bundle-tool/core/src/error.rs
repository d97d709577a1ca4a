//! The error type of `cairn-bundle`: every rejection names what was
//! rejected and why, and maps to a short stable reason for metrics.

use std::path::PathBuf;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors from building, reading and verifying bundles and releases.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A trust-layer error (signatures, roots, encodings).
    #[error(transparent)]
    Keys(#[from] cairn_keys::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An object's bytes do not hash to its address.
    #[error("object {address}: content hashes to {actual}")]
    ObjectMismatch {
        /// The address it was fetched or stored under.
        address: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// An object is missing from a bundle file or repository.
    #[error("object {address} ({what}) is missing")]
    ObjectMissing {
        /// Its address.
        address: String,
        /// What it is (entry path and name).
        what: String,
    },
    /// Input exceeded a limit.
    #[error("{what} is {actual} bytes, over the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: String,
        /// The limit.
        limit: u64,
        /// The actual size.
        actual: u64,
    },
    /// A bundle manifest is malformed.
    #[error("invalid bundle manifest: {0}")]
    InvalidManifest(String),
    /// A bundle of a format this build (or its configured limit) does not
    /// read.
    #[error("bundle format {found}; this {} understands {}: upgrade it to one that understands format {found}{}",
        if *max >= 2 { "build" } else { "agent" },
        crate::error::format_list(*max),
        if *found > *max && *found == 2 { " (or build bundles for it with `cairn bundle build --format 1`)" } else { "" })]
    BundleFormat {
        /// The format found in the document.
        found: u32,
        /// The newest format understood.
        max: u32,
    },
    /// A bundle file is malformed.
    #[error("{}: not a valid bundle file: {reason}", path.display())]
    InvalidBundleFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A release is malformed.
    #[error("invalid release: {0}")]
    InvalidRelease(String),
    /// A release for another channel.
    #[error("release is for channel `{found}`, expected `{expected}`")]
    WrongChannel {
        /// The channel asked for.
        expected: String,
        /// The channel in the release.
        found: String,
    },
    /// A release whose sequence is not above the last adopted one.
    #[error("rollback: release sequence {found} on channel `{channel}` is not above the last adopted {last}")]
    Rollback {
        /// The channel.
        channel: String,
        /// The last adopted sequence.
        last: u64,
        /// The sequence offered.
        found: u64,
    },
    /// A release whose sequence jumps implausibly far above the last
    /// adopted one (a forged fast-forward towards 2^64 − 1).
    #[error("sequence jump: release sequence {found} on channel `{channel}` is more than {max_step} above the last adopted {last} (a forged fast-forward? see docs/SECURITY.md, \"a release key was stolen\")")]
    SequenceJump {
        /// The channel.
        channel: String,
        /// The last adopted sequence.
        last: u64,
        /// The sequence offered.
        found: u64,
        /// The largest step allowed.
        max_step: u64,
    },
    /// No sequence is left above the channel's head.
    #[error("channel `{channel}` is exhausted: its head has sequence {sequence}, the largest there is, so no later release can follow it; if a release key was stolen, rotate the release keys (docs/SECURITY.md, \"a release key was stolen\") and release again: the sequence restarts at 1 under the new keys")]
    ChannelExhausted {
        /// The channel.
        channel: String,
        /// The head's sequence.
        sequence: u64,
    },
    /// An expired release (freeze attack or stale mirror).
    #[error("release {sequence} on channel `{channel}` expired at {expires} (now {now})")]
    Expired {
        /// The channel.
        channel: String,
        /// Its sequence.
        sequence: u64,
        /// Expiry, Unix seconds.
        expires: u64,
        /// The time of the check.
        now: u64,
    },
    /// The trust root in use has expired.
    #[error("trust root v{version} expired at {expires}; rotate the root")]
    RootExpired {
        /// Root version.
        version: u64,
        /// Its expiry.
        expires: u64,
    },
    /// A Kubernetes manifest in the source is invalid.
    #[error("{file}: {reason}")]
    Manifest {
        /// `path` or `path` + document index or line.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// Git could not resolve or read something.
    #[error("git: {0}")]
    Git(String),
    /// A bundle could not be built (duplicates, empty bundle, Kustomize).
    #[error("{0}")]
    Build(String),
    /// A repository check found bad or missing objects; every problem is
    /// listed, one per element, each naming the file.
    #[error("{}{}", problems.first().map(String::as_str).unwrap_or("verification failed"), if problems.len() > 1 { format!(" (and {} more problem(s))", problems.len() - 1) } else { String::new() })]
    Objects {
        /// One line per bad or missing object.
        problems: Vec<String>,
    },
    /// A repository directory is inconsistent.
    #[error("{0}")]
    Repository(String),
    /// An archive is unsafe or malformed.
    #[error("archive {}: {reason}", path.display())]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// A short, stable reason for metrics labels and status fields.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Keys(cairn_keys::Error::Threshold { .. }) => "signature_threshold",
            Error::Keys(cairn_keys::Error::VersionGap { .. }) => "root_version_gap",
            Error::Keys(cairn_keys::Error::WrongPayloadType { .. }) => "wrong_payload_type",
            Error::Keys(cairn_keys::Error::TooLarge { .. }) | Error::TooLarge { .. } => "too_large",
            Error::Keys(_) => "malformed",
            Error::Io { .. } => "io",
            Error::ObjectMismatch { .. } => "object_hash_mismatch",
            Error::ObjectMissing { .. } => "object_missing",
            Error::InvalidManifest(_) | Error::InvalidBundleFile { .. } => "invalid_bundle",
            Error::BundleFormat { .. } => "bundle_format",
            Error::InvalidRelease(_) => "invalid_release",
            Error::WrongChannel { .. } => "wrong_channel",
            Error::Rollback { .. } => "rollback",
            Error::SequenceJump { .. } => "sequence_jump",
            Error::ChannelExhausted { .. } => "channel_exhausted",
            Error::Expired { .. } => "expired",
            Error::RootExpired { .. } => "root_expired",
            Error::Manifest { .. } => "invalid_manifest",
            Error::Git(_) => "git",
            Error::Build(_) => "build",
            Error::Objects { .. } => "objects",
            Error::Repository(_) => "repository",
            Error::Archive { .. } => "archive",
        }
    }
}

/// `1`, `1 and 2`, `1, 2 and 3`: the formats up to `max`.
pub(crate) fn format_list(max: u32) -> String {
    match max {
        0 | 1 => "1".into(),
        n => {
            let head: Vec<String> = (1..n).map(|i| i.to_string()).collect();
            format!("{} and {n}", head.join(", "))
        }
    }
}
