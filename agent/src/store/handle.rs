//! [`StoreHandle`]: the store for async code.

use super::{Store, StoreError};

/// The store as async code uses it: every call that may touch the disk
/// (sled reads and writes, fsync, object files) runs on a blocking thread
/// (`spawn_blocking`), never on a runtime worker, so a slow or failing
/// disk cannot stall `/readyz`, the mesh or SIGTERM. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    store: Store,
}

impl StoreHandle {
    /// Wraps an open store.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The store itself, for code that already runs on a blocking thread
    /// (start-up, `spawn_blocking` closures, the target's apply).
    pub fn blocking(&self) -> &Store {
        &self.store
    }

    /// Runs `f` with the store on a blocking thread.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Db {
                dir: self.store.dir().to_path_buf(),
                reason: format!("store task failed: {e}"),
            }),
        }
    }

    /// The first IO error the store hit and has not recovered from (no
    /// IO: an in-memory flag).
    pub fn failure(&self) -> Option<String> {
        self.store.failure()
    }

    /// IO errors seen so far (no IO).
    pub fn error_count(&self) -> u64 {
        self.store.error_count()
    }
}
