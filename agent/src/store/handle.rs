//! [`StoreHandle`]: the store for async code.

use super::{Store, StoreError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// At most this many store calls of one store run at once, each on a
/// blocking thread; further calls wait (in async code, on no thread) for a
/// free slot. Without a bound a sync ran one blocking thread per object in
/// flight and left 25–42 of them alive, each with its stack and malloc
/// state (docs/PERFORMANCE.md, "Memory"). Two, not one: a flush waiting
/// on a slow fsync does not stop every read (the mesh serving objects).
pub const STORE_THREADS: usize = 2;

/// The bound on a store's concurrent calls, shared by all its handles.
pub(super) struct CallGate {
    permits: Arc<Semaphore>,
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl Default for CallGate {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(STORE_THREADS)),
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }
}

/// Counts one running call while alive.
struct Running<'a>(&'a CallGate);

impl<'a> Running<'a> {
    fn start(gate: &'a CallGate) -> Self {
        let now = gate.running.fetch_add(1, Ordering::SeqCst) + 1;
        gate.peak.fetch_max(now, Ordering::SeqCst);
        Self(gate)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The store as async code uses it: every call that may touch the disk
/// (sled reads and writes, fsync, object files) runs on a blocking thread
/// (`spawn_blocking`), never on a runtime worker, so a slow or failing
/// disk cannot stall `/readyz`, the mesh or SIGTERM; at most
/// [`STORE_THREADS`] at once per store. Cheap to clone.
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

    /// Runs `f` with the store on a blocking thread, once fewer than
    /// [`STORE_THREADS`] calls of this store are running.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let failed = |reason: String| StoreError::Db {
            dir: self.store.dir().to_path_buf(),
            reason,
        };
        // The semaphore is never closed.
        let permit = Arc::clone(&self.store.inner.calls.permits)
            .acquire_owned()
            .await
            .map_err(|e| failed(format!("store call slots: {e}")))?;
        let store = self.store.clone();
        // The permit moves into the closure: a caller that stops waiting
        // does not free the slot while the call still runs.
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _running = Running::start(&store.inner.calls);
            f(&store)
        });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(failed(format!("store task failed: {e}"))),
        }
    }

    /// The most store calls that ran at once since the store was opened
    /// (at most [`STORE_THREADS`]).
    pub fn peak_calls(&self) -> usize {
        self.store.inner.calls.peak.load(Ordering::SeqCst)
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
