//! The agent's local store: everything it needs to keep enforcing its
//! last-good state with no network, in `<dataDir>`: small records in one
//! sled database at `<dataDir>/db`, object bodies in an append-only object
//! pack with a sorted on-disk index (`store/pack.rs`:
//! `<dataDir>/objects/pack-<gen>.{pack,idx}`), other large values as files
//! beside them.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `roots` | version (u64, big-endian) | root envelope bytes (verified before insert) |
//! | `heads` | channel | the adopted release envelope bytes |
//! | `bundles` | bundle id | bundle manifest bytes (format 2: the top document; its chunks are objects) |
//! | `objects` | `sha256:<hex>` | object bytes; only in stores written before format 3, moved into the pack at open (read as a fallback, never written) |
//! | `last_good` | channel | release envelope last reconciled successfully |
//! | `inventory` | target id | the target's inventory (opaque to the store) |
//! | `sync` | source name | last sync result of that source (opaque JSON) |
//! | `peers` | peer id | peer record (opaque; owned by the mesh) |
//! | `meta` | `format`, `agent_id`, `failed/<channel>` | store format, agent id, failed release |
//! | `outbox` | event number (u64, big-endian); `c/<sink>`, `m/<marker>` | notification events not yet delivered, sink cursors, markers ([`outbox`]) |
//!
//! **Durability.** sled 0.34's flush is not durable on its own, for two
//! reasons found with the power-cut test (`tests/reliability.rs`):
//!
//! * On Linux it makes its log "stable" with `sync_file_range`, which
//!   writes the data pages but neither the file's metadata (its new size
//!   and extents) nor the device cache: the log tail holding an adoption
//!   was lost on a power cut although the flush had returned. So every
//!   [`Store::flush`] fsyncs the log file (`db/db`) after sled's flush.
//! * It writes any log message over about 128 KiB (a quarter of its
//!   512 KiB segment) as a separate "blob" file, and never fsyncs that file
//!   nor its `conf` file: a large manifest or inventory was not durable
//!   either (sled drops blobs newer than its stable log on recovery). So
//!   sled only ever holds values of at most [`INLINE_MAX`] bytes — with
//!   sled's split threshold of 16 entries per leaf no page it writes comes
//!   near the blob threshold (a unit test checks that `db/blobs` stays
//!   empty) — and `conf` and sled's directories are fsynced at open.
//!
//! Object bodies (objects and format 2 manifest chunks) are in the object
//! pack, never in sled: sled keeps a tree's values in its in-memory leaves,
//! and the agent's memory would grow with the bundle (docs/AGENT.md,
//! "Object pack decision"). Larger other values are files beside sled:
//!
//! * large manifests (and, in format 2 stores, large objects) in
//!   `<dataDir>/objects/sha256/<2 hex>/<62 hex>`, written to a temporary
//!   file and renamed, then fsynced together (files, then their
//!   directories, from a few threads) before the records that need them
//!   are flushed;
//! * other large values (inventories, large envelopes) in
//!   `<dataDir>/values/sha256/<2 hex>/<62 hex>`, written to a temporary
//!   file, fsynced, renamed and the directory fsynced before the record
//!   pointing at them is inserted; unreferenced ones are removed after the
//!   flush that dropped their last reference.
//!
//! sled then holds a small pointer record (`\0cairn-file\0`, length,
//! address). Values of stores written before this scheme (format 1) are
//! read as they are.
//!
//! **Crash safety.** Objects and the manifest are written first; adopting a
//! release makes the object pack and its index durable (pack fsync, then
//! the index: temporary file, fsync, rename, directory fsync) and every
//! file durable (fsync), then one transaction
//! inserts the manifest record and switches the channel head, then a
//! flush (fsync of sled's log) before the adoption is reported. A crash or
//! power cut at any point leaves either the old head or the new one, each
//! with all its objects. Objects of a release that was never adopted are
//! harmless: only a head makes anything enforceable; pack bytes appended
//! after the last index write are cut off at the next open.
//!
//! **IO errors.** sled keeps its first IO error (a full disk, say) and
//! fails every later call with it. The store records such an error
//! ([`Store::failure`]) and [`Store::recover`] reopens the database once a
//! probe write succeeds again, so a freed disk needs no restart.
//!
//! **Architecture invariant:** this is the only module that names sled.
//! Every call may block on disk: the agent calls it from blocking threads.
//! It verifies hashes but knows nothing of signatures, channels or policy;
//! [`crate::agent`] re-verifies stored state against the trust root at
//! start-up.

mod files;
mod handle;
mod kv;
pub mod outbox;
mod pack;
mod records;
pub use handle::{StoreHandle, STORE_THREADS};
pub use pack::MAX_OBJECT_BYTES;

use cairn_core::bundle::verify_object;
use cairn_core::pipeline::Adoption;
use cairn_core::release::Release;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

/// Store format written by this build (`meta/format`). Format 1 (all values
/// inside sled) and format 2 (objects in sled's `objects` tree or as files
/// under `objects/sha256/`) are marked format 3 and their objects moved
/// into the object pack at open; new objects go to the pack only.
pub const STORE_FORMAT: u32 = 3;

/// Largest value kept inside sled; larger values are files (see the module
/// documentation for why).
pub const INLINE_MAX: usize = 4096;

/// sled's page cache: sled's own default (1 GiB). Smaller caps were
/// measured (4 MiB, 1 MiB) and did not lower idle RSS at 9,003 or 30,003
/// objects, and raised the peak (sled then evicts and re-reads pages):
/// docs/PERFORMANCE.md, "Memory".
pub const CACHE_BYTES: u64 = 1 << 30;

/// [`CACHE_BYTES`], or `CAIRN_STORE_CACHE_BYTES` from the environment
/// (1 MiB to 1 GiB; for measuring, docs/PERFORMANCE.md).
fn cache_bytes() -> u64 {
    std::env::var("CAIRN_STORE_CACHE_BYTES")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(CACHE_BYTES, |v| v.clamp(1 << 20, 1 << 30))
}

/// Prefix of a sled record that points at a value file.
const POINTER_MAGIC: &[u8] = b"\0cairn-file\0";

/// Errors from the store. Each names the data directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (normally a running agent) holds the database lock.
    #[error("data dir {}: the store is locked by another process (is a cairn-agent already running with this data dir?)", dir.display())]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
    /// The data directory takes no writes (read-only file system,
    /// permissions, full). The store itself may well be intact.
    #[error("data dir {}: {reason}; the store in it is not damaged by this, nothing needs restoring", dir.display())]
    NotWritable {
        /// The data directory.
        dir: PathBuf,
        /// What is wrong, e.g. `the data directory is read-only`.
        reason: String,
    },
    /// The database could not be opened.
    #[error("data dir {}: cannot open the store: {reason}; restore the data dir from a backup or move it aside (the agent never wipes it)", dir.display())]
    Open {
        /// The data directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// A read or write failed.
    #[error("data dir {}: store error: {reason}", dir.display())]
    Db {
        /// The data directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// Stored data failed a check.
    #[error("data dir {}: corrupt store: {reason}; restore the data dir from a backup or move it aside (the agent never wipes it)", dir.display())]
    Corrupt {
        /// The data directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Result with [`StoreError`].
pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// One adopted channel head, as the mesh advertises it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The channel.
    pub channel: String,
    /// The adopted release's sequence.
    pub sequence: u64,
    /// The adopted release's bundle id.
    pub bundle: String,
    /// `sha256:` address of the release envelope bytes.
    pub release_address: String,
    /// The release envelope bytes (serve them unchanged).
    pub bytes: Vec<u8>,
}

/// Which tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum T {
    Roots,
    Heads,
    Bundles,
    Objects,
    LastGood,
    Inventory,
    Sync,
    Peers,
    Meta,
    Outbox,
}

impl T {
    const ALL: [T; 10] = [
        T::Roots,
        T::Heads,
        T::Bundles,
        T::Objects,
        T::LastGood,
        T::Inventory,
        T::Sync,
        T::Peers,
        T::Meta,
        T::Outbox,
    ];

    fn name(self) -> &'static str {
        match self {
            T::Roots => "roots",
            T::Heads => "heads",
            T::Bundles => "bundles",
            T::Objects => "objects",
            T::LastGood => "last_good",
            T::Inventory => "inventory",
            T::Sync => "sync",
            T::Peers => "peers",
            T::Meta => "meta",
            T::Outbox => "outbox",
        }
    }

    /// Values keyed by their own address: large ones go to `objects/`,
    /// written once, fsynced together by the next flush.
    fn content_addressed(self) -> bool {
        matches!(self, T::Objects | T::Bundles)
    }
}

/// The open database.
#[derive(Clone)]
struct Handles {
    db: sled::Db,
    trees: Vec<sled::Tree>,
}

impl Handles {
    fn tree(&self, t: T) -> &sled::Tree {
        // `trees` is built from `T::ALL` in order.
        &self.trees[t as usize]
    }
}

struct Shared {
    dir: PathBuf,
    /// `None` while the database is being reopened after an IO error (or a
    /// reopen failed).
    handles: RwLock<Option<Handles>>,
    /// Serialises writes to non-content trees with the removal of value
    /// files, so a file is only removed when no flushed record needs it.
    values_lock: Mutex<()>,
    /// A value file lost its last reference: collect after the next flush.
    values_gc: AtomicBool,
    /// Object files written since the last flush, not yet fsynced.
    unsynced_files: Mutex<Vec<PathBuf>>,
    /// The IO error that put the store out of service, if any.
    failure: Mutex<Option<String>>,
    /// IO errors seen since start (`cairn_store_errors_total`).
    errors: AtomicU64,
    tmp_counter: AtomicU64,
    /// The bound on concurrent [`StoreHandle::call`]s.
    calls: handle::CallGate,
    /// Object bodies ([`pack`]).
    pack: pack::Pack,
}

/// The agent's store. Cheap to clone (all clones share one database, also
/// across a [`Store::recover`]).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// A stored value: inline bytes or a pointer to a value file.
enum Stored {
    Inline(Vec<u8>),
    File { len: u64, address: String },
}

fn encode_pointer(len: u64, address: &str) -> Vec<u8> {
    let mut v = POINTER_MAGIC.to_vec();
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(address.as_bytes());
    v
}

fn decode(raw: &[u8]) -> Stored {
    if let Some(rest) = raw.strip_prefix(POINTER_MAGIC) {
        if rest.len() > 8 {
            let (len, addr) = rest.split_at(8);
            if let (Ok(len), Ok(addr)) = (<[u8; 8]>::try_from(len), std::str::from_utf8(addr)) {
                return Stored::File {
                    len: u64::from_be_bytes(len),
                    address: addr.to_owned(),
                };
            }
        }
    }
    Stored::Inline(raw.to_vec())
}

/// Whether an IO error means the directory takes no writes (rather than a
/// damaged store), and what to do about it.
fn not_writable(e: &std::io::Error) -> Option<String> {
    match e.raw_os_error() {
        Some(libc::EROFS) => {
            Some("the data directory is on a read-only file system (make it writable)".into())
        }
        Some(libc::EACCES) | Some(libc::EPERM) => Some(format!(
            "the data directory is not writable by uid {} (make it writable: {e})",
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() }
        )),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            Some("the data directory's file system is full (free space)".into())
        }
        _ => None,
    }
}

fn sled_io(e: &sled::Error) -> Option<&std::io::Error> {
    match e {
        sled::Error::Io(io) => Some(io),
        _ => None,
    }
}

/// Runs `f` with sled's panics (on some corrupt files) turned into `None`.
fn catch_panic<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Option<R> {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(f);
    std::panic::set_hook(prev);
    r.ok()
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Store {
    /// The database directory inside a data directory.
    pub fn db_path(data_dir: &Path) -> PathBuf {
        data_dir.join("db")
    }

    /// Opens (creating if needed) the store in `data_dir`. Fails with
    /// [`StoreError::Locked`] while another process holds it,
    /// [`StoreError::NotWritable`] on a read-only or foreign-owned
    /// directory, and [`StoreError::Open`] or [`StoreError::Corrupt`] for a
    /// damaged or foreign database; it never deletes anything but its own
    /// temporary and unreferenced value files.
    pub fn open(data_dir: &Path) -> StoreResult<Self> {
        let dir = data_dir.to_path_buf();
        let handles = Self::open_handles(&dir)?;
        let pack = pack::Pack::open(&dir.join("objects")).map_err(|e| match e {
            pack::PackError::Io(what, e) => match not_writable(&e) {
                Some(reason) => StoreError::NotWritable {
                    dir: dir.clone(),
                    reason: format!("{reason}: {what}"),
                },
                None => StoreError::Open {
                    dir: dir.clone(),
                    reason: format!("{what}: {e}"),
                },
            },
            pack::PackError::Corrupt(reason) => StoreError::Corrupt {
                dir: dir.clone(),
                reason,
            },
        })?;
        let store = Store {
            inner: Arc::new(Shared {
                dir,
                handles: RwLock::new(Some(handles)),
                values_lock: Mutex::new(()),
                values_gc: AtomicBool::new(true),
                unsynced_files: Mutex::new(Vec::new()),
                failure: Mutex::new(None),
                errors: AtomicU64::new(0),
                tmp_counter: AtomicU64::new(0),
                calls: handle::CallGate::default(),
                pack,
            }),
        };
        store.check_format()?;
        store.remove_temp_files();
        store.migrate_objects()?;
        // Files an earlier process wrote but never synced (it was killed
        // before its flush) may still be only in the page cache: make them
        // durable once, before anything new can depend on them.
        if let Ok(d) = std::fs::File::open(data_dir) {
            use std::os::fd::AsRawFd;
            // SAFETY: syncfs on a valid open descriptor; no memory is shared.
            unsafe { libc::syncfs(d.as_raw_fd()) };
        }
        store.flush()?;
        Ok(store)
    }

    /// Closes the store and waits (up to 10 s) until the database lock is
    /// free, so the directory can be opened again at once. Dropping a
    /// `Store` closes it too, but sled's background threads let go of the
    /// lock a moment later: an open in the same process right after a drop
    /// can see [`StoreError::Locked`]. `Locked` here means another handle
    /// (a clone of this store, another process) still holds it.
    ///
    /// Blocking.
    pub fn close(self) -> StoreResult<()> {
        use std::os::fd::AsRawFd;
        let dir = self.inner.dir.clone();
        let lock_file = Self::db_path(&dir).join("db");
        drop(self);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            // A new open file description: its flock conflicts with
            // sled's until sled's last descriptor is closed.
            let Ok(f) = std::fs::OpenOptions::new().read(true).open(&lock_file) else {
                return Ok(());
            };
            // SAFETY: flock on a valid open descriptor; no memory is shared.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(()); // released when `f` closes
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Locked { dir });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn open_handles(dir: &Path) -> StoreResult<Handles> {
        let io_err = |e: &std::io::Error, what: String| match not_writable(e) {
            Some(reason) => StoreError::NotWritable {
                dir: dir.to_path_buf(),
                reason: format!("{reason}: {what}"),
            },
            None => StoreError::Open {
                dir: dir.to_path_buf(),
                reason: format!("{what}: {e}"),
            },
        };
        std::fs::create_dir_all(dir).map_err(|e| io_err(&e, "creating it".into()))?;
        let path = Self::db_path(dir);
        let opened = {
            let path = path.clone();
            catch_panic(move || {
                sled::Config::new()
                    .path(&path)
                    .cache_capacity(cache_bytes())
                    .open()
            })
        };
        let db = match opened {
            Some(Ok(db)) => db,
            Some(Err(e)) => {
                let reason = e.to_string();
                if reason.contains("could not acquire lock") {
                    return Err(StoreError::Locked {
                        dir: dir.to_path_buf(),
                    });
                }
                if let Some(io) = sled_io(&e) {
                    return Err(io_err(io, format!("opening {}", path.display())));
                }
                return Err(StoreError::Open {
                    dir: dir.to_path_buf(),
                    reason,
                });
            }
            None => {
                return Err(StoreError::Open {
                    dir: dir.to_path_buf(),
                    reason: format!("the database in {} is unreadable", path.display()),
                })
            }
        };
        let mut trees = Vec::new();
        for t in T::ALL {
            trees.push(db.open_tree(t.name()).map_err(|e| StoreError::Open {
                dir: dir.to_path_buf(),
                reason: format!("tree {}: {e}", t.name()),
            })?);
        }
        // sled never fsyncs its `conf` file or the directories it creates:
        // do it once, so a power cut cannot lose the database itself.
        let sync = |p: &Path, is_dir: bool| -> std::io::Result<()> {
            if is_dir {
                fsync_dir(p)
            } else {
                std::fs::File::open(p)?.sync_all()
            }
        };
        for (p, is_dir) in [
            (path.join("conf"), false),
            (path.join("blobs"), true),
            (path.clone(), true),
            (dir.to_path_buf(), true),
        ] {
            match sync(&p, is_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&e, format!("syncing {}", p.display()))),
            }
        }
        Ok(Handles { db, trees })
    }

    fn check_format(&self) -> StoreResult<()> {
        match self.meta_get("format")? {
            None => self.meta_put("format", STORE_FORMAT.to_string().as_bytes()),
            Some(v) if v == STORE_FORMAT.to_string().as_bytes() => Ok(()),
            // Format 1 kept everything in sled, format 2 objects in sled or
            // files: both read as they are (objects: pack first, then the
            // `objects` tree), so upgrading is just recording the new format.
            Some(v) if v == b"1" || v == b"2" => {
                self.meta_put("format", STORE_FORMAT.to_string().as_bytes())
            }
            Some(v) => Err(self.corrupt(format!(
                "store format `{}`, this build understands 1 to {STORE_FORMAT}",
                String::from_utf8_lossy(&v)
            ))),
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    // ---- health -----------------------------------------------------------

    /// The IO error that put the store out of service (a full or failing
    /// disk), until [`Store::recover`] succeeds.
    pub fn failure(&self) -> Option<String> {
        self.lock_failure().clone()
    }

    /// IO errors seen since the store was opened.
    pub fn error_count(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    fn lock_failure(&self) -> MutexGuard<'_, Option<String>> {
        self.inner.failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After an IO error: reopens the database (sled keeps its first IO
    /// error for ever) and checks with a durable probe write that the data
    /// directory takes writes again. On success the failure is cleared and
    /// every clone uses the new database. Blocks; call from a blocking
    /// thread.
    pub fn recover(&self) -> StoreResult<()> {
        if self.failure().is_none() {
            return Ok(());
        }
        {
            let mut h = self
                .inner
                .handles
                .write()
                .unwrap_or_else(|p| p.into_inner());
            // Dropping the last handle closes the database and releases its
            // lock; calls still running hold clones for a moment, so the
            // reopen below retries while the lock is held.
            *h = None;
        }
        let mut opened = Err(StoreError::Locked {
            dir: self.inner.dir.clone(),
        });
        for _ in 0..50 {
            opened = Self::open_handles(&self.inner.dir);
            match &opened {
                Err(StoreError::Locked { .. }) => std::thread::sleep(Duration::from_millis(100)),
                _ => break,
            }
        }
        let handles = opened?;
        *self
            .inner
            .handles
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(handles);
        // The probe: a record and a file, both made durable.
        let probe = crate::unix_now().to_string();
        self.meta_put("probe", probe.as_bytes())?;
        let probe_file = self.inner.dir.join(".store-probe");
        self.write_durable(&probe_file, &[0u8; 4096])
            .map_err(|e| self.io_fail(format!("writing {}", probe_file.display()), e))?;
        let _ = std::fs::remove_file(&probe_file);
        self.flush()?;
        *self.lock_failure() = None;
        Ok(())
    }

    fn handles(&self) -> StoreResult<Handles> {
        let h = self.inner.handles.read().unwrap_or_else(|p| p.into_inner());
        h.clone().ok_or_else(|| StoreError::Db {
            dir: self.inner.dir.clone(),
            reason: format!(
                "the store is closed after an IO error ({}); retrying",
                self.failure().unwrap_or_default()
            ),
        })
    }

    fn tree(&self, t: T) -> StoreResult<sled::Tree> {
        Ok(self.handles()?.tree(t).clone())
    }

    /// Records an IO failure (the store stays out of service until
    /// [`Store::recover`]) and builds its error.
    fn record_failure(&self, reason: String) -> StoreError {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
        let mut f = self.lock_failure();
        if f.is_none() {
            *f = Some(reason.clone());
        }
        StoreError::Db {
            dir: self.inner.dir.clone(),
            reason,
        }
    }

    fn db_err(&self, e: sled::Error) -> StoreError {
        match &e {
            sled::Error::Io(_) => self.record_failure(e.to_string()),
            sled::Error::Corruption { .. } => self.corrupt(e.to_string()),
            _ => StoreError::Db {
                dir: self.inner.dir.clone(),
                reason: e.to_string(),
            },
        }
    }

    fn io_fail(&self, what: String, e: std::io::Error) -> StoreError {
        self.record_failure(format!("{what}: {e}"))
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            dir: self.inner.dir.clone(),
            reason,
        }
    }

    fn pack_err(&self, e: pack::PackError) -> StoreError {
        match e {
            pack::PackError::Io(what, e) => self.io_fail(what, e),
            pack::PackError::Corrupt(reason) => self.corrupt(reason),
        }
    }

    fn invalid(&self, reason: String) -> StoreError {
        StoreError::Db {
            dir: self.inner.dir.clone(),
            reason,
        }
    }
}

/// Writes that bypass the store's checks, for tests that simulate a
/// damaged data directory. Never used by the agent itself.
pub mod dangerous {
    use super::{Store, StoreResult, T};

    /// Stores `bytes` under `address` without checking the hash
    /// (replacing any stored copy).
    pub fn put_object_unchecked(store: &Store, address: &str, bytes: &[u8]) -> StoreResult<()> {
        let d = super::pack::digest_of(address)
            .ok_or_else(|| store.invalid(format!("bad address {address}")))?;
        store
            .inner
            .pack
            .put(&d, bytes, true)
            .map_err(|e| store.pack_err(e))?;
        store.flush()
    }

    /// Stores `bytes` under `address` the way a format 2 store did (in
    /// sled's `objects` tree, or as a file if large), without a check: for
    /// tests of stores written by earlier builds.
    pub fn put_object_format2(store: &Store, address: &str, bytes: &[u8]) -> StoreResult<()> {
        store.put(T::Objects, address.as_bytes(), bytes)?;
        store.flush()
    }

    /// Rewrites the store in the layout of format 2 (every object moved
    /// from the pack into sled's `objects` tree or a file, `meta/format`
    /// 2): for tests that an upgraded agent reads an old store.
    pub fn rewrite_as_format2(store: &Store) -> StoreResult<()> {
        let digests = store.inner.pack.digests().map_err(|e| store.pack_err(e))?;
        for d in digests {
            let address = format!("sha256:{}", hex_of(&d));
            let bytes = store
                .get_object(&address)?
                .ok_or_else(|| store.corrupt(format!("{address} vanished")))?;
            store.put(T::Objects, address.as_bytes(), &bytes)?;
            store.inner.pack.remove(&d).map_err(|e| store.pack_err(e))?;
        }
        store.meta_put("format", b"2")?;
        store.flush()?;
        store.compact_objects().map(|_| ())
    }

    fn hex_of(d: &[u8; 32]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The current object pack and index files (for tests that damage
    /// them).
    pub fn pack_files(store: &Store) -> (std::path::PathBuf, std::path::PathBuf) {
        store.inner.pack.files()
    }

    /// Replaces a channel head without any check.
    pub fn put_head_unchecked(store: &Store, channel: &str, bytes: &[u8]) -> StoreResult<()> {
        store.put(T::Heads, channel.as_bytes(), bytes)?;
        store.flush()
    }

    /// Removes an object without any check.
    pub fn remove_object(store: &Store, address: &str) -> StoreResult<()> {
        store.remove_object(address)?;
        store.flush()
    }
}

#[cfg(test)]
mod tests;
