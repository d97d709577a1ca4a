//! The agent's local store: everything it needs to keep enforcing its
//! last-good state with no network, in `<dataDir>`: small records in one
//! sled database at `<dataDir>/db`, large values as files beside it.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `roots` | version (u64, big-endian) | root envelope bytes (verified before insert) |
//! | `heads` | channel | the adopted release envelope bytes |
//! | `bundles` | bundle id | bundle manifest bytes |
//! | `objects` | `sha256:<hex>` | object bytes (content-addressed) |
//! | `last_good` | channel | release envelope last reconciled successfully |
//! | `inventory` | target id | the target's inventory (opaque to the store) |
//! | `sync` | source name | last sync result of that source (opaque JSON) |
//! | `peers` | peer id | peer record (opaque; owned by the mesh) |
//! | `meta` | `format`, `agent_id`, `failed/<channel>` | store format, agent id, failed release |
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
//! Larger values are files beside sled:
//!
//! * content-addressed values (objects, manifests) in
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
//! release makes every file durable (fsync), then one transaction
//! inserts the manifest record and switches the channel head, then a
//! flush (fsync of sled's log) before the adoption is reported. A crash or
//! power cut at any point leaves either the old head or the new one, each
//! with all its objects. Objects of a release that was never adopted are
//! harmless: only a head makes anything enforceable.
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

use cairn_core::bundle::verify_object;
use cairn_core::pipeline::Adoption;
use cairn_core::release::Release;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

/// Store format written by this build (`meta/format`). Format 1 (all values
/// inside sled) is read and upgraded in place.
pub const STORE_FORMAT: u32 = 2;

/// Largest value kept inside sled; larger values are files (see the module
/// documentation for why).
pub const INLINE_MAX: usize = 4096;

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
}

impl T {
    const ALL: [T; 9] = [
        T::Roots,
        T::Heads,
        T::Bundles,
        T::Objects,
        T::LastGood,
        T::Inventory,
        T::Sync,
        T::Peers,
        T::Meta,
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
            }),
        };
        store.check_format()?;
        store.remove_temp_files();
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
            catch_panic(move || sled::Config::new().path(&path).open())
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
            // Format 1 kept everything in sled; its records read as they
            // are, so upgrading is just recording the new format.
            Some(v) if v == b"1" => self.meta_put("format", STORE_FORMAT.to_string().as_bytes()),
            Some(v) => Err(self.corrupt(format!(
                "store format `{}`, this build understands 1 and {STORE_FORMAT}",
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

    fn invalid(&self, reason: String) -> StoreError {
        StoreError::Db {
            dir: self.inner.dir.clone(),
            reason,
        }
    }

    // ---- value files -------------------------------------------------------

    fn file_path(&self, t: T, address: &str) -> Option<PathBuf> {
        let hex = address.strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let base = if t.content_addressed() {
            "objects"
        } else {
            "values"
        };
        Some(
            self.inner
                .dir
                .join(base)
                .join("sha256")
                .join(&hex[..2])
                .join(&hex[2..]),
        )
    }

    fn temp_path(&self, path: &Path) -> PathBuf {
        let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
    }

    /// Writes a file via a temporary name; `durable`: fsync the file before
    /// the rename and the directory after it.
    fn write_file(&self, path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = self.temp_path(path);
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            if durable {
                f.sync_all()?;
            }
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        if durable {
            fsync_dir(dir)?;
        }
        Ok(())
    }

    fn write_durable(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        self.write_file(path, bytes, true)
    }

    /// Stores `value` as a file (unless present) and returns its pointer.
    fn put_file(&self, t: T, value: &[u8]) -> StoreResult<Vec<u8>> {
        let address = cairn_keys::sha256_address(value);
        let path = self
            .file_path(t, &address)
            .ok_or_else(|| self.invalid(format!("bad address {address}")))?;
        let present = std::fs::metadata(&path).is_ok_and(|m| m.len() == value.len() as u64);
        let durable = !t.content_addressed();
        if !present {
            self.write_file(&path, value, durable)
                .map_err(|e| self.io_fail(format!("writing {}", path.display()), e))?;
        }
        if !durable {
            // Also when present: it may be an unsynced earlier write.
            self.lock_unsynced().push(path);
        }
        Ok(encode_pointer(value.len() as u64, &address))
    }

    /// Reads a value file and checks it against its address.
    fn read_file(&self, t: T, len: u64, address: &str) -> StoreResult<Vec<u8>> {
        let path = self
            .file_path(t, address)
            .ok_or_else(|| self.corrupt(format!("{}: bad file pointer {address}", t.name())))?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.corrupt(format!(
                    "{}: file {} is missing",
                    t.name(),
                    path.display()
                )))
            }
            Err(e) => return Err(self.io_fail(format!("reading {}", path.display()), e)),
        };
        if bytes.len() as u64 != len || verify_object(address, &bytes).is_err() {
            return Err(self.corrupt(format!(
                "{}: file {} does not match its address",
                t.name(),
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// Removes temporary files a crash left behind.
    fn remove_temp_files(&self) {
        for base in ["objects", "values"] {
            let root = self.inner.dir.join(base).join("sha256");
            let Ok(rd) = std::fs::read_dir(&root) else {
                continue;
            };
            for d in rd.flatten() {
                let Ok(files) = std::fs::read_dir(d.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    if f.file_name().to_string_lossy().contains(".tmp-") {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
        }
    }

    /// Removes value files no record points at. Called with `values_lock`
    /// held, right after a flush, so the flushed records are the current
    /// ones.
    fn collect_values(&self) -> StoreResult<()> {
        let mut referenced = std::collections::BTreeSet::new();
        for t in T::ALL.into_iter().filter(|t| !t.content_addressed()) {
            for r in self.tree(t)?.iter() {
                let (_, v) = r.map_err(|e| self.db_err(e))?;
                if let Stored::File { address, .. } = decode(&v) {
                    if let Some(p) = self.file_path(t, &address) {
                        referenced.insert(p);
                    }
                }
            }
        }
        let root = self.inner.dir.join("values").join("sha256");
        let Ok(rd) = std::fs::read_dir(&root) else {
            return Ok(());
        };
        for d in rd.flatten() {
            let Ok(files) = std::fs::read_dir(d.path()) else {
                continue;
            };
            for f in files.flatten() {
                if !referenced.contains(&f.path()) {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
        Ok(())
    }

    // ---- records -----------------------------------------------------------

    fn get(&self, t: T, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let raw = self.tree(t)?.get(key).map_err(|e| self.db_err(e))?;
        match raw.map(|iv| decode(&iv)) {
            None => Ok(None),
            Some(Stored::Inline(v)) => Ok(Some(v)),
            Some(Stored::File { len, address }) => self.read_file(t, len, &address).map(Some),
        }
    }

    fn lock_values(&self) -> MutexGuard<'_, ()> {
        self.inner
            .values_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The record to keep in sled for `value`: the value itself or a
    /// pointer to its file.
    fn record(&self, t: T, value: &[u8]) -> StoreResult<Vec<u8>> {
        if value.len() <= INLINE_MAX && !value.starts_with(POINTER_MAGIC) {
            Ok(value.to_vec())
        } else {
            self.put_file(t, value)
        }
    }

    fn put(&self, t: T, key: &[u8], value: &[u8]) -> StoreResult<()> {
        let _g = (!t.content_addressed()).then(|| self.lock_values());
        let rec = self.record(t, value)?;
        let old = self.tree(t)?.insert(key, rec).map_err(|e| self.db_err(e))?;
        self.note_replaced(t, old);
        Ok(())
    }

    fn remove(&self, t: T, key: &[u8]) -> StoreResult<()> {
        let _g = (!t.content_addressed()).then(|| self.lock_values());
        let old = self.tree(t)?.remove(key).map_err(|e| self.db_err(e))?;
        self.note_replaced(t, old);
        Ok(())
    }

    fn note_replaced(&self, t: T, old: Option<sled::IVec>) {
        if !t.content_addressed() && old.is_some_and(|o| o.starts_with(POINTER_MAGIC)) {
            self.inner.values_gc.store(true, Ordering::Release);
        }
    }

    fn list(&self, t: T) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for r in self.tree(t)?.iter() {
            let (k, v) = r.map_err(|e| self.db_err(e))?;
            let v = match decode(&v) {
                Stored::Inline(v) => v,
                Stored::File { len, address } => self.read_file(t, len, &address)?,
            };
            out.push((k.to_vec(), v));
        }
        Ok(out)
    }

    fn lock_unsynced(&self) -> MutexGuard<'_, Vec<PathBuf>> {
        self.inner
            .unsynced_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the object files written since the last flush durable: each
    /// file, then each directory that gained an entry, fsynced from a few
    /// threads at once (the file system commits concurrent fsyncs together).
    /// Only these files: a `syncfs` would also wait for every other
    /// writer's dirty data on a shared file system.
    fn sync_files(&self) -> StoreResult<()> {
        let files = std::mem::take(&mut *self.lock_unsynced());
        if files.is_empty() {
            return Ok(());
        }
        let mut dirs: std::collections::BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        // New fan-out directories are entries of these.
        for base in ["objects", "values"] {
            let sha = self.inner.dir.join(base).join("sha256");
            if sha.exists() {
                dirs.insert(sha);
                dirs.insert(self.inner.dir.join(base));
            }
        }
        dirs.insert(self.inner.dir.clone());
        let sync_all = |paths: Vec<PathBuf>, dir: bool| -> std::io::Result<()> {
            const THREADS: usize = 4;
            let chunk = paths.len().div_ceil(THREADS).max(1);
            std::thread::scope(|scope| {
                let handles: Vec<_> = paths
                    .chunks(chunk)
                    .map(|part| {
                        scope.spawn(move || -> std::io::Result<()> {
                            for p in part {
                                if dir {
                                    fsync_dir(p)?;
                                } else {
                                    std::fs::File::open(p)?.sync_data()?;
                                }
                            }
                            Ok(())
                        })
                    })
                    .collect();
                handles.into_iter().try_for_each(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("fsync thread panicked")))
                })
            })
        };
        let synced = sync_all(files.clone(), false)
            .and_then(|()| sync_all(dirs.into_iter().collect(), true));
        if let Err(e) = synced {
            self.lock_unsynced().extend(files);
            return Err(self.io_fail(format!("syncing files in {}", self.inner.dir.display()), e));
        }
        Ok(())
    }

    /// Makes every write so far durable: value files first, then sled's
    /// log, then unreferenced value files are removed.
    pub fn flush(&self) -> StoreResult<()> {
        let _g = self.lock_values();
        self.sync_files()?;
        let h = self.handles()?;
        h.db.flush().map_err(|e| self.db_err(e))?;
        // sled's flush only ran sync_file_range on its log: fsync it.
        let log = Self::db_path(&self.inner.dir).join("db");
        std::fs::File::open(&log)
            .and_then(|f| f.sync_all())
            .map_err(|e| self.io_fail(format!("syncing {}", log.display()), e))?;
        if self.inner.values_gc.swap(false, Ordering::AcqRel) {
            self.collect_values()?;
        }
        Ok(())
    }

    // ---- roots ----------------------------------------------------------

    /// Stored root envelopes, sorted by version. Each was verified against
    /// its predecessor before it was stored; callers re-verify the chain.
    pub fn roots(&self) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for (k, v) in self.list(T::Roots)? {
            let key: [u8; 8] = k
                .as_slice()
                .try_into()
                .map_err(|_| self.corrupt("roots: malformed key".into()))?;
            out.push((u64::from_be_bytes(key), v));
        }
        Ok(out)
    }

    /// Stores a verified root envelope and flushes.
    pub fn put_root(&self, version: u64, bytes: &[u8]) -> StoreResult<()> {
        self.put(T::Roots, &version.to_be_bytes(), bytes)?;
        self.flush()
    }

    // ---- heads ----------------------------------------------------------

    /// The adopted release envelope of `channel`.
    pub fn head(&self, channel: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(T::Heads, channel.as_bytes())
    }

    /// Every adopted channel head (for the mesh: what this agent can serve).
    pub fn heads(&self) -> StoreResult<Vec<Head>> {
        let mut out = Vec::new();
        for (k, bytes) in self.list(T::Heads)? {
            let channel = String::from_utf8_lossy(&k).into_owned();
            let (_, rel) = Release::decode_envelope(&bytes, u64::MAX)
                .map_err(|e| self.corrupt(format!("head of channel `{channel}`: {e}")))?;
            out.push(Head {
                channel,
                sequence: rel.sequence,
                bundle: rel.bundle,
                release_address: cairn_keys::sha256_address(&bytes),
                bytes,
            });
        }
        Ok(out)
    }

    /// Adopts a release durably: every value file (objects, the manifest) is
    /// made durable first, then one transaction stores the manifest record
    /// and switches the channel head, then sled's log is flushed. Only when
    /// this returns `Ok` is the adoption durable; report it only then. Call
    /// only after every object of the bundle is stored (see
    /// [`Store::put_object`]). Takes only an [`Adoption`]: the pipeline's
    /// proof that the release and its manifest verified (architecture
    /// invariant: only verification makes a `Verified*` or an `Adoption`).
    pub fn adopt(&self, adoption: &Adoption) -> StoreResult<()> {
        let channel = adoption.channel();
        let release_bytes = adoption.release().bytes();
        let bundle_id = adoption.bundle_id();
        let manifest_bytes = adoption.manifest_bytes();
        verify_object(bundle_id, manifest_bytes).map_err(|e| self.invalid(e.to_string()))?;
        let _g = self.lock_values();
        let manifest_rec = self.record(T::Bundles, manifest_bytes)?;
        let head_rec = self.record(T::Heads, release_bytes)?;
        self.sync_files()?;
        let h = self.handles()?;
        use sled::Transactional;
        let old = (h.tree(T::Bundles), h.tree(T::Heads))
            .transaction(|(bundles, heads)| {
                bundles.insert(bundle_id.as_bytes(), manifest_rec.clone())?;
                let old = heads.insert(channel.as_bytes(), head_rec.clone())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(old)
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => self.db_err(e),
                other => self.invalid(format!("{other:?}")),
            })?;
        self.note_replaced(T::Heads, old);
        drop(_g);
        self.flush()
    }

    // ---- bundles and objects -------------------------------------------

    /// A stored bundle manifest (checked against its id).
    pub fn bundle(&self, bundle_id: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(T::Bundles, bundle_id.as_bytes())
    }

    /// Whether an object is stored. A record whose file a power cut lost
    /// (written, never flushed) is dropped and reported absent, so the
    /// object is fetched again; content is checked on read.
    pub fn has_object(&self, address: &str) -> StoreResult<bool> {
        let tree = self.tree(T::Objects)?;
        let Some(raw) = tree.get(address.as_bytes()).map_err(|e| self.db_err(e))? else {
            return Ok(false);
        };
        match decode(&raw) {
            Stored::Inline(_) => Ok(true),
            Stored::File { len, address: a } => {
                let ok = self
                    .file_path(T::Objects, &a)
                    .and_then(|p| std::fs::metadata(p).ok())
                    .is_some_and(|m| m.len() == len);
                if !ok {
                    tree.remove(address.as_bytes())
                        .map_err(|e| self.db_err(e))?;
                }
                Ok(ok)
            }
        }
    }

    /// Reads an object and checks it against its address: a mismatch (or
    /// a lost object file) is [`StoreError::Corrupt`].
    pub fn get_object(&self, address: &str) -> StoreResult<Option<Vec<u8>>> {
        match self.get(T::Objects, address.as_bytes())? {
            Some(bytes) => {
                verify_object(address, &bytes).map_err(|e| self.corrupt(format!("stored {e}")))?;
                Ok(Some(bytes))
            }
            None => Ok(None),
        }
    }

    /// Stores an object after checking it against its address (durable at
    /// the next flush; [`Store::adopt`] flushes).
    pub fn put_object(&self, address: &str, bytes: &[u8]) -> StoreResult<()> {
        verify_object(address, bytes).map_err(|e| self.invalid(e.to_string()))?;
        self.put(T::Objects, address.as_bytes(), bytes)
    }

    /// Removes an object (used to drop a corrupt copy before re-fetching
    /// it), with its file.
    pub fn remove_object(&self, address: &str) -> StoreResult<()> {
        self.remove(T::Objects, address.as_bytes())?;
        if let Some(p) = self.file_path(T::Objects, address) {
            // Only a corrupt copy is removed; a manifest sharing the file
            // would be just as corrupt.
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// Number of stored objects.
    pub fn object_count(&self) -> usize {
        self.tree(T::Objects).map(|t| t.len()).unwrap_or(0)
    }

    // ---- last good, inventory, sync status -----------------------------

    /// The release last reconciled successfully on `channel`.
    pub fn last_good(&self, channel: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(T::LastGood, channel.as_bytes())
    }

    /// Records the release last reconciled successfully and flushes.
    pub fn set_last_good(&self, channel: &str, release_bytes: &[u8]) -> StoreResult<()> {
        if self.last_good(channel)?.as_deref() == Some(release_bytes) {
            return Ok(());
        }
        self.put(T::LastGood, channel.as_bytes(), release_bytes)?;
        self.flush()
    }

    /// The release on `channel` that failed its health checks and was rolled
    /// back, as the agent serialised it (JSON), if any.
    pub fn failed_release(&self, channel: &str) -> StoreResult<Option<Vec<u8>>> {
        self.meta_get(&format!("failed/{channel}"))
    }

    /// Records (or with `None` clears) the failed release of `channel`, and
    /// flushes: a restarted agent must not retry it.
    pub fn set_failed_release(&self, channel: &str, json: Option<&[u8]>) -> StoreResult<()> {
        let key = format!("failed/{channel}");
        match json {
            Some(j) => self.meta_put(&key, j)?,
            None => self.remove(T::Meta, key.as_bytes())?,
        }
        self.flush()
    }

    /// A target's inventory (what it owns), as the target serialised it.
    pub fn inventory(&self, target: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(T::Inventory, target.as_bytes())
    }

    /// Replaces a target's inventory and flushes (targets write their
    /// intent before acting, so it must be durable).
    pub fn set_inventory(&self, target: &str, bytes: &[u8]) -> StoreResult<()> {
        self.put(T::Inventory, target.as_bytes(), bytes)?;
        self.flush()
    }

    /// Records the last sync result of a source (JSON; not flushed).
    pub fn set_sync_status(&self, source: &str, json: &[u8]) -> StoreResult<()> {
        self.put(T::Sync, source.as_bytes(), json)
    }

    /// Every source's last sync result.
    pub fn sync_statuses(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        Ok(self
            .list(T::Sync)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    // ---- meta -----------------------------------------------------------

    fn meta_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(T::Meta, key.as_bytes())
    }

    fn meta_put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.put(T::Meta, key.as_bytes(), value)
    }

    /// The persisted agent id.
    pub fn agent_id(&self) -> StoreResult<Option<String>> {
        Ok(self
            .meta_get("agent_id")?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Persists the agent id and flushes.
    pub fn set_agent_id(&self, id: &str) -> StoreResult<()> {
        self.meta_put("agent_id", id.as_bytes())?;
        self.flush()
    }

    // ---- peers (owned by the mesh) --------------------------------------

    /// Every peer record.
    pub fn peers(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        Ok(self
            .list(T::Peers)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    /// Inserts or replaces a peer record (not flushed).
    pub fn put_peer(&self, id: &str, record: &[u8]) -> StoreResult<()> {
        self.put(T::Peers, id.as_bytes(), record)
    }

    /// Removes a peer record.
    pub fn remove_peer(&self, id: &str) -> StoreResult<()> {
        self.remove(T::Peers, id.as_bytes())
    }
}

/// Writes that bypass the store's checks, for tests that simulate a
/// damaged data directory. Never used by the agent itself.
pub mod dangerous {
    use super::{Store, StoreResult, T};

    /// Stores `bytes` under `address` without checking the hash.
    pub fn put_object_unchecked(store: &Store, address: &str, bytes: &[u8]) -> StoreResult<()> {
        store.put(T::Objects, address.as_bytes(), bytes)?;
        store.flush()
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
mod tests {
    use super::*;

    #[test]
    fn adopt_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let obj = b"{\"kind\":\"x\"}";
        let a = cairn_keys::sha256_address(obj);
        s.put_object(&a, obj).unwrap();
        assert!(s.put_object(&a, b"other").is_err());
        assert_eq!(s.get_object(&a).unwrap().unwrap(), obj);
        dangerous::put_object_unchecked(&s, &a, b"tampered").unwrap();
        assert!(matches!(s.get_object(&a), Err(StoreError::Corrupt { .. })));
        assert!(s.agent_id().unwrap().is_none());
        s.set_agent_id("x").unwrap();
        drop(s);
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.agent_id().unwrap().as_deref(), Some("x"));
    }

    #[test]
    fn large_values_are_files_and_sled_writes_no_blobs() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        // Many values just under and over the inline limit: sled must never
        // write a page as an (unsynced) blob file.
        let mut addrs = Vec::new();
        for i in 0..300u32 {
            let size = if i % 2 == 0 { INLINE_MAX } else { 200 << 10 };
            let mut v = vec![b'a' + (i % 26) as u8; size];
            v[..4].copy_from_slice(&i.to_be_bytes());
            let a = cairn_keys::sha256_address(&v);
            s.put_object(&a, &v).unwrap();
            addrs.push((a, v));
        }
        let inv = vec![b'i'; 1 << 20];
        s.set_inventory("t", &inv).unwrap();
        s.set_inventory("t", b"small").unwrap();
        s.flush().unwrap();
        let blobs = Store::db_path(d.path()).join("blobs");
        let n = std::fs::read_dir(&blobs).map(|r| r.count()).unwrap_or(0);
        assert_eq!(n, 0, "sled wrote blob files");
        // The replaced inventory's file is gone; objects are files.
        let values = d.path().join("values/sha256");
        let left: usize = std::fs::read_dir(&values)
            .map(|r| {
                r.flatten()
                    .map(|d| std::fs::read_dir(d.path()).unwrap().count())
                    .sum()
            })
            .unwrap_or(0);
        assert_eq!(left, 0, "unreferenced value file kept");
        drop(s);
        let s = Store::open(d.path()).unwrap();
        for (a, v) in &addrs {
            assert!(s.has_object(a).unwrap());
            assert_eq!(&s.get_object(a).unwrap().unwrap(), v);
        }
        assert_eq!(s.inventory("t").unwrap().unwrap(), b"small");
        // A lost object file (a power cut before the flush) reads as absent.
        let (a, _) = &addrs[1];
        std::fs::remove_file(s.file_path(T::Objects, a).unwrap()).unwrap();
        assert!(!s.has_object(a).unwrap());
    }

    #[test]
    fn pointer_lookalike_values_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut v = POINTER_MAGIC.to_vec();
        v.extend_from_slice(b"12345678sha256:00");
        s.put_peer("p", &v).unwrap();
        assert_eq!(s.peers().unwrap(), vec![("p".to_owned(), v)]);
    }

    #[test]
    fn read_only_data_dir_is_not_called_damaged() {
        if unsafe { libc::geteuid() } == 0 {
            // root ignores permissions; the read-only file system case is
            // covered by tests/reliability.rs.
            return;
        }
        let d = tempfile::tempdir().unwrap();
        drop(Store::open(d.path()).unwrap());
        use std::os::unix::fs::PermissionsExt;
        for p in [d.path().to_path_buf(), Store::db_path(d.path())] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o500)).unwrap();
        }
        let e = Store::open(d.path()).unwrap_err();
        assert!(matches!(e, StoreError::NotWritable { .. }), "{e}");
        assert!(!e.to_string().contains("backup"), "{e}");
    }

    #[test]
    fn second_open_is_locked() {
        let d = tempfile::tempdir().unwrap();
        let _s = Store::open(d.path()).unwrap();
        // sled's lock is per process file lock; a second open in the same
        // process may succeed on some platforms, so only check it does not
        // corrupt anything.
        let _ = Store::open(d.path());
    }

    #[test]
    fn garbage_database_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let db = Store::db_path(d.path());
        std::fs::create_dir_all(&db).unwrap();
        std::fs::write(db.join("conf"), b"garbage garbage garbage").unwrap();
        std::fs::write(db.join("db"), vec![0xffu8; 4096]).unwrap();
        let e = Store::open(d.path()).unwrap_err();
        assert!(
            matches!(e, StoreError::Open { .. } | StoreError::Corrupt { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("never wipes"), "{e}");
        assert!(db.join("db").exists(), "nothing deleted");
    }
}
