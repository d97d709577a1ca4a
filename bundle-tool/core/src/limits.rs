//! Size limits applied to untrusted input before it is allocated.

/// Limits on bundles, objects and releases. The defaults suit fleets of
/// thousands of objects; every read from a source, peer or file checks
/// against them before allocating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest single Kubernetes object (default 2 MiB; the API server's own
    /// limit is about 1.5 MiB).
    pub max_object_bytes: u64,
    /// Largest bundle manifest (default 16 MiB, about 80,000 entries).
    pub max_manifest_bytes: u64,
    /// Most entries in one bundle (default 100,000).
    pub max_entries: usize,
    /// Largest bundle in total (default 1 GiB).
    pub max_bundle_bytes: u64,
    /// Largest release envelope (default 64 KiB).
    pub max_release_bytes: u64,
    /// Most chunks a format 2 bundle lists (default 4096).
    pub max_chunks: usize,
    /// Largest format 2 manifest chunk (default 1 MiB; the builder cuts
    /// chunks at 256 KiB).
    pub max_chunk_bytes: u64,
    /// The newest bundle format accepted (default
    /// [`crate::bundle::MAX_BUNDLE_FORMAT`], 2). Setting 1 makes a reader
    /// behave as one that only understands format 1: a format 2 bundle is
    /// refused with [`crate::Error::BundleFormat`], the message an agent
    /// built before format 2 should have given (docs/BUNDLES.md, "Bundle
    /// formats"; the core tests use it).
    pub max_bundle_format: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_object_bytes: 2 << 20,
            max_manifest_bytes: 16 << 20,
            max_entries: 100_000,
            max_bundle_bytes: 1 << 30,
            max_release_bytes: 64 << 10,
            max_chunks: 4096,
            max_chunk_bytes: 1 << 20,
            max_bundle_format: crate::bundle::MAX_BUNDLE_FORMAT,
        }
    }
}
