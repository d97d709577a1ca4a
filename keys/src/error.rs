use std::path::PathBuf;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the trust layer. Variants carry the
/// values a user needs to act: which file, which key, which threshold.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key file exists but does not hold what it should.
    #[error("{}: {reason}", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes could not be decoded as the named document.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded (`root`, `envelope`, ...).
        what: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// Input exceeded a size limit before it was decoded.
    #[error("{what} is {actual} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The limit in bytes.
        limit: usize,
        /// The actual size in bytes.
        actual: usize,
    },
    /// A document carries a format version this build does not know.
    #[error("{what} has format version {found}, this build understands {supported}")]
    UnsupportedFormat {
        /// Which document.
        what: &'static str,
        /// The version found.
        found: u32,
        /// The version supported.
        supported: u32,
    },
    /// An envelope holds another kind of document than expected.
    #[error("envelope holds a {found:?} document, expected {expected:?}")]
    WrongPayloadType {
        /// The expected type.
        expected: String,
        /// The type found.
        found: String,
    },
    /// Fewer distinct authorised keys signed than the role's threshold.
    #[error("{what}: signed by {valid} valid {role} key(s), threshold is {threshold}{detail}")]
    Threshold {
        /// What was being verified, e.g. `root v2`.
        what: String,
        /// The role whose threshold applies.
        role: crate::Role,
        /// Distinct valid signatures counted.
        valid: usize,
        /// Signatures required.
        threshold: u32,
        /// Extra detail (unknown keys, bad signatures).
        detail: String,
    },
    /// A root document is internally inconsistent.
    #[error("invalid root: {0}")]
    InvalidRoot(String),
    /// A root chain skips or repeats a version.
    #[error("root chain: expected version {expected}, found version {found}")]
    VersionGap {
        /// The version that must come next.
        expected: u64,
        /// The version found.
        found: u64,
    },
    /// A signing key is not authorised for the role.
    #[error("key {key_id} is not a {role} key of root v{root_version}")]
    NotAuthorised {
        /// The key.
        key_id: String,
        /// The role.
        role: crate::Role,
        /// The root version consulted.
        root_version: u64,
    },
    /// Signing failed (should not happen with a valid key).
    #[error("signing failed")]
    Sign,
}
