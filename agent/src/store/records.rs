//! The typed records: roots, heads, bundles and objects, last-good,
//! inventory, sync status, meta, peers.

use super::*;

impl Store {
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
                bundle: rel.bundle.into(),
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
    /// [`Store::put_object`]) and the release passed the pipeline.
    pub fn adopt(&self, adoption: &Adoption) -> StoreResult<()> {
        let channel = adoption.channel();
        let release_bytes = adoption.release().bytes();
        let bundle_id = adoption.bundle_id();
        let manifest_bytes = adoption.manifest_bytes();
        verify_object(bundle_id, manifest_bytes).map_err(|e| self.invalid(e.to_string()))?;
        let _g = self.lock_values();
        let manifest_rec = self.record(T::Bundles, manifest_bytes)?;
        let head_rec = self.record(T::Heads, release_bytes)?;
        // The pack (objects, chunks) and its index, durable before the head.
        self.inner
            .pack
            .write_index()
            .map_err(|e| self.pack_err(e))?;
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

    /// Reads format 2 manifest chunks from the object store, for
    /// [`cairn_core::bundle::Manifest::load`] (which checks each against
    /// its address and size).
    pub fn chunk_reader(
        &self,
    ) -> impl FnMut(&cairn_core::Address, u64) -> cairn_core::Result<Option<Vec<u8>>> + '_ {
        move |address, _| {
            self.get_object(address)
                .map_err(|e| cairn_core::Error::Repository(e.to_string()))
        }
    }

    /// Whether an object is stored: in the object pack, or (stores written
    /// by format 2 builds) in the `objects` tree. A format 2 record whose
    /// file a power cut lost (written, never flushed) is dropped and
    /// reported absent, so the object is fetched again; content is checked
    /// on read.
    pub fn has_object(&self, address: &str) -> StoreResult<bool> {
        if let Some(d) = pack::digest_of(address) {
            if self.inner.pack.contains(&d).map_err(|e| self.pack_err(e))? {
                return Ok(true);
            }
        }
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

    /// Reads an object and checks it against its address: a mismatch, a
    /// lost object file or a damaged pack is [`StoreError::Corrupt`]
    /// naming the file.
    pub fn get_object(&self, address: &str) -> StoreResult<Option<Vec<u8>>> {
        let packed = match pack::digest_of(address) {
            Some(d) => self.inner.pack.get(&d).map_err(|e| self.pack_err(e))?,
            None => None,
        };
        let (bytes, from) = match packed {
            Some(b) => (b, "object pack"),
            None => match self.get(T::Objects, address.as_bytes())? {
                Some(b) => (b, "objects tree"),
                None => return Ok(None),
            },
        };
        verify_object(address, &bytes).map_err(|e| {
            let file = if from == "object pack" {
                self.inner.pack.files().0.display().to_string()
            } else {
                from.to_owned()
            };
            self.corrupt(format!("stored {e} (in {file})"))
        })?;
        Ok(Some(bytes))
    }

    /// Stores an object after checking it against its address, appended to
    /// the object pack unless present (durable at the next flush;
    /// [`Store::adopt`] flushes).
    pub fn put_object(&self, address: &str, bytes: &[u8]) -> StoreResult<()> {
        verify_object(address, bytes).map_err(|e| self.invalid(e.to_string()))?;
        let d = pack::digest_of(address)
            .ok_or_else(|| self.invalid(format!("bad address {address}")))?;
        self.pack_object(&d, bytes)
    }

    /// Appends `bytes` to the pack under `d` (a copy already there wins),
    /// writing the index when the pending table is full.
    fn pack_object(&self, d: &[u8; 32], bytes: &[u8]) -> StoreResult<()> {
        let index_now = self
            .inner
            .pack
            .put(d, bytes, false)
            .map_err(|e| self.pack_err(e))?;
        if index_now {
            self.inner
                .pack
                .write_index()
                .map_err(|e| self.pack_err(e))?;
        }
        Ok(())
    }

    /// Removes an object (used to drop a corrupt copy before re-fetching
    /// it): from the pack (its bytes are garbage until a compaction) and
    /// from a format 2 store's tree, with its file.
    pub fn remove_object(&self, address: &str) -> StoreResult<()> {
        if let Some(d) = pack::digest_of(address) {
            self.inner.pack.remove(&d).map_err(|e| self.pack_err(e))?;
        }
        self.remove(T::Objects, address.as_bytes())?;
        if let Some(p) = self.file_path(T::Objects, address) {
            // Only a corrupt copy is removed; a manifest sharing the file
            // would be just as corrupt.
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// Moves the objects of a store written before format 3 (inline in
    /// the `objects` tree, or files under `objects/sha256/`) into the pack,
    /// so sled stops holding them: copied as they are (a damaged one stays
    /// damaged and is caught on read; one whose file is lost, or over the
    /// size limit, is left out and so fetched again), the pack and its
    /// index made durable, and only then the tree cleared, sled flushed and
    /// the object files no bundle record names removed. A crash on the way
    /// leaves the old records in place and the next open repeats it.
    pub(super) fn migrate_objects(&self) -> StoreResult<()> {
        let tree = self.tree(T::Objects)?;
        if tree.is_empty() {
            return Ok(());
        }
        let mut files = Vec::new();
        for r in tree.iter() {
            let (k, raw) = r.map_err(|e| self.db_err(e))?;
            let Some(d) = std::str::from_utf8(&k).ok().and_then(pack::digest_of) else {
                continue;
            };
            let bytes = match decode(&raw) {
                Stored::Inline(v) => v,
                Stored::File { len, address } => {
                    let Some(path) = self.file_path(T::Objects, &address) else {
                        continue;
                    };
                    let ok = std::fs::metadata(&path).is_ok_and(|m| m.len() == len);
                    if !ok || len > pack::MAX_OBJECT_BYTES {
                        continue;
                    }
                    let b = std::fs::read(&path)
                        .map_err(|e| self.io_fail(format!("reading {}", path.display()), e))?;
                    files.push(path);
                    b
                }
            };
            if bytes.len() as u64 > pack::MAX_OBJECT_BYTES {
                continue;
            }
            // Not `replace`: a copy already in the pack (an earlier,
            // interrupted migration) wins.
            self.pack_object(&d, &bytes)?;
        }
        self.inner
            .pack
            .write_index()
            .map_err(|e| self.pack_err(e))?;
        tree.clear().map_err(|e| self.db_err(e))?;
        self.flush()?;
        // Large manifests share the directory: keep the files they name.
        let mut manifests = std::collections::BTreeSet::new();
        for r in self.tree(T::Bundles)?.iter() {
            let (_, v) = r.map_err(|e| self.db_err(e))?;
            if let Stored::File { address, .. } = decode(&v) {
                manifests.extend(self.file_path(T::Bundles, &address));
            }
        }
        for f in files.iter().filter(|f| !manifests.contains(*f)) {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }

    /// Number of stored objects (packed, plus a format 2 store's).
    pub fn object_count(&self) -> usize {
        let legacy = self.tree(T::Objects).map(|t| t.len()).unwrap_or(0);
        usize::try_from(self.inner.pack.count()).unwrap_or(usize::MAX) + legacy
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

    pub(super) fn meta_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(T::Meta, key.as_bytes())
    }

    pub(super) fn meta_put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
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
