//! The record layer: sled trees, inline values or pointers to value
//! files, IO errors recorded for `Store::failure`.

use super::*;

impl Store {
    // ---- records -----------------------------------------------------------

    pub(super) fn get(&self, t: T, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let raw = self.tree(t)?.get(key).map_err(|e| self.db_err(e))?;
        match raw.map(|iv| decode(&iv)) {
            None => Ok(None),
            Some(Stored::Inline(v)) => Ok(Some(v)),
            Some(Stored::File { len, address }) => self.read_file(t, len, &address).map(Some),
        }
    }

    pub(super) fn lock_values(&self) -> MutexGuard<'_, ()> {
        self.inner
            .values_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The record to keep in sled for `value`: the value itself or a
    /// pointer to its file.
    pub(super) fn record(&self, t: T, value: &[u8]) -> StoreResult<Vec<u8>> {
        if value.len() <= INLINE_MAX && !value.starts_with(POINTER_MAGIC) {
            Ok(value.to_vec())
        } else {
            self.put_file(t, value)
        }
    }

    pub(super) fn put(&self, t: T, key: &[u8], value: &[u8]) -> StoreResult<()> {
        let _g = (!t.content_addressed()).then(|| self.lock_values());
        let rec = self.record(t, value)?;
        let old = self.tree(t)?.insert(key, rec).map_err(|e| self.db_err(e))?;
        self.note_replaced(t, old);
        Ok(())
    }

    pub(super) fn remove(&self, t: T, key: &[u8]) -> StoreResult<()> {
        let _g = (!t.content_addressed()).then(|| self.lock_values());
        let old = self.tree(t)?.remove(key).map_err(|e| self.db_err(e))?;
        self.note_replaced(t, old);
        Ok(())
    }

    pub(super) fn note_replaced(&self, t: T, old: Option<sled::IVec>) {
        if !t.content_addressed() && old.is_some_and(|o| o.starts_with(POINTER_MAGIC)) {
            self.inner.values_gc.store(true, Ordering::Release);
        }
    }

    pub(super) fn list(&self, t: T) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
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

    pub(super) fn lock_unsynced(&self) -> MutexGuard<'_, Vec<PathBuf>> {
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
    pub(super) fn sync_files(&self) -> StoreResult<()> {
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
        self.inner
            .pack
            .write_index()
            .map_err(|e| self.pack_err(e))?;
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
        if self.inner.pack.wants_compaction() {
            self.compact_objects()?;
        }
        Ok(())
    }

    /// Rewrites the object pack without its garbage (removed and replaced
    /// objects; also any object whose bytes no longer match its address):
    /// see `store/pack.rs`. [`Store::flush`] does it when garbage is at
    /// least 1 MiB and more than the live bytes. Returns how many
    /// damaged objects were dropped (they read as absent, so are fetched
    /// again).
    pub fn compact_objects(&self) -> StoreResult<u64> {
        self.inner
            .pack
            .compact(|d, bytes| &cairn_keys::sha256(bytes) == d)
            .map_err(|e| self.pack_err(e))
    }
}
