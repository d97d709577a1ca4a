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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_object_bytes: 2 << 20,
            max_manifest_bytes: 16 << 20,
            max_entries: 100_000,
            max_bundle_bytes: 1 << 30,
            max_release_bytes: 64 << 10,
        }
    }
}
