//! Sources: where the agent reads bundle repositories from.
//!
//! A source answers one question: "give me this item (root, release,
//! manifest, object), at most this many bytes" ([`Source::get`]). Its
//! paths ([`Item::path`]) are the repository
//! layout of [`cairn_core::layout`]: `roots/<v>`, `channels/<channel>`,
//! `objects/sha256/<2hex>/<hex>`. Implementations here: [`HttpSource`]
//! (HTTP(S) with rustls, timeouts and streamed size limits) and
//! [`DirSource`] (a local directory such as a mounted USB stick). A mesh
//! peer is just another `Source`; [`crate::Agent::sync_from`] runs any of
//! them through the same verification pipeline.
//!
//! **Architecture invariant:** a source is never trusted for content. It
//! returns bytes; the pipeline decides. A source never allocates more than
//! the limit it was given.

mod dir;
mod http;
mod oci;

pub use dir::DirSource;
pub use http::HttpSource;
pub use oci::OciSource;

use crate::ingest::Item;
use crate::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

/// Why a source could not deliver a file.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SourceError {
    /// The source could not be reached or failed (connection refused, DNS,
    /// timeout, HTTP 5xx, a directory that is not mounted). Retried with
    /// backoff; when every source is unavailable the agent is offline.
    #[error("{source_name}: unavailable: {reason}")]
    Unavailable {
        /// The source.
        source_name: String,
        /// What happened.
        reason: String,
    },
    /// The file is larger than the limit (by Content-Length, file size, or
    /// bytes actually streamed). Treated like a malicious mirror.
    #[error("{source_name}: {path} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The source.
        source_name: String,
        /// The repository path.
        path: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// The source answered, but not with a file (e.g. HTTP 403, a
    /// directory where a file should be).
    #[error("{source_name}: {path}: {reason}")]
    Invalid {
        /// The source.
        source_name: String,
        /// The repository path.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

impl SourceError {
    /// A short, stable label for metrics and status: `unavailable`,
    /// `too_large` or `invalid`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::Unavailable { .. } => "unavailable",
            SourceError::TooLarge { .. } => "too_large",
            SourceError::Invalid { .. } => "invalid",
        }
    }
}

/// A bundle repository the agent can read from: HTTP(S), a directory, or
/// (later) a mesh peer.
///
/// Implementations must:
/// * return `Ok(None)` when the file does not exist (HTTP 404),
/// * never return or allocate more than `limit` bytes (fail with
///   [`SourceError::TooLarge`] instead),
/// * bound the time a request can take,
/// * not retry internally (the caller retries with backoff).
pub trait Source: Send + Sync {
    /// A stable name for logs, metrics (`source` label) and status: the URL
    /// or directory path, or a peer id.
    fn name(&self) -> &str;

    /// Reads one repository item (its path: [`Item::path`]).
    fn get<'a>(
        &'a self,
        item: &'a Item,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>>;

    /// Streams the object at `address` (an image blob, possibly far larger
    /// than any Kubernetes object) into `dest`, hashing while writing on a
    /// blocking thread ([`cairn_oci::blobfile`]): `dest` appears only when
    /// the bytes hash to `address`, and never more than `limit` bytes are
    /// read. `Ok(None)`: the source does not have it (or cannot stream;
    /// the default).
    fn fetch_to_file<'a>(
        &'a self,
        address: &'a str,
        limit: u64,
        dest: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<Option<u64>, SourceError>> {
        let _ = (address, limit, dest);
        Box::pin(async { Ok(None) })
    }
}

/// A blob-stream error as a source error.
pub(crate) fn blob_error(source_name: &str, path: &str, e: cairn_oci::OciError) -> SourceError {
    match e {
        cairn_oci::OciError::TooLarge { limit, .. } => SourceError::TooLarge {
            source_name: source_name.to_owned(),
            path: path.to_owned(),
            limit,
        },
        cairn_oci::OciError::Invalid(reason) => SourceError::Invalid {
            source_name: source_name.to_owned(),
            path: path.to_owned(),
            reason,
        },
        cairn_oci::OciError::Unavailable(reason) | cairn_oci::OciError::Auth(reason) => {
            SourceError::Unavailable {
                source_name: source_name.to_owned(),
                reason,
            }
        }
    }
}

/// How the configured sources behave.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Upper bound for one request, start to last byte.
    pub request_timeout: Duration,
    /// Upper bound for establishing a connection.
    pub connect_timeout: Duration,
    /// Per HTTP source (keyed by its spec): other hosts it may redirect
    /// to. A source not listed follows redirects on its own host only.
    pub redirect_hosts: std::collections::BTreeMap<String, Vec<String>>,
    /// Per network source (keyed by its spec): CA bundle, client
    /// certificate and credentials.
    pub tls: std::collections::BTreeMap<String, cairn_oci::NetSettings>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            redirect_hosts: Default::default(),
            tls: Default::default(),
        }
    }
}

/// The agent's sources, in configuration order. Each is synced
/// independently; [`SourceSet::get_any`] asks each in turn.
#[derive(Clone, Default)]
pub struct SourceSet {
    sources: Vec<Arc<dyn Source>>,
}

impl std::fmt::Debug for SourceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.sources.iter().map(|s| s.name()))
            .finish()
    }
}

impl SourceSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds sources from configuration strings: `http://` and `https://`
    /// URLs become [`HttpSource`]s, `oci://` ones [`OciSource`]s,
    /// everything else a [`DirSource`].
    pub fn from_specs(specs: &[String], opts: &SourceOptions) -> Result<Self, String> {
        let mut set = Self::new();
        for spec in specs {
            let s: Arc<dyn Source> = if spec.starts_with("http://") || spec.starts_with("https://")
            {
                Arc::new(HttpSource::new(spec, opts)?)
            } else if spec.starts_with("oci://") {
                Arc::new(OciSource::new(spec, opts)?)
            } else {
                Arc::new(DirSource::new(spec))
            };
            set.push(s);
        }
        Ok(set)
    }

    /// Adds a source (e.g. a mesh peer).
    pub fn push(&mut self, source: Arc<dyn Source>) {
        self.sources.push(source);
    }

    /// The sources.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Source>> {
        self.sources.iter()
    }

    /// Number of sources.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether there are no sources.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Asks each source in turn for `item`; returns the first file
    /// found, `Ok(None)` if none has it, or the last error if none answered.
    /// The caller verifies the bytes (e.g. against an address).
    pub async fn get_any(&self, item: &Item, limit: u64) -> Result<Option<Vec<u8>>, SourceError> {
        let mut last_err = None;
        let mut answered = false;
        for s in &self.sources {
            match s.get(item, limit).await {
                Ok(Some(b)) => return Ok(Some(b)),
                Ok(None) => answered = true,
                Err(e) => last_err = Some(e),
            }
        }
        match last_err {
            Some(e) if !answered => Err(e),
            _ => Ok(None),
        }
    }
}
