//! Value and object files beside sled (see the durability decision in
//! docs/AGENT.md).

use super::*;

impl Store {
    // ---- value files -------------------------------------------------------

    pub(super) fn file_path(&self, t: T, address: &str) -> Option<PathBuf> {
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

    pub(super) fn temp_path(&self, path: &Path) -> PathBuf {
        let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
    }

    /// Writes a file via a temporary name; `durable`: fsync the file before
    /// the rename and the directory after it.
    pub(super) fn write_file(
        &self,
        path: &Path,
        bytes: &[u8],
        durable: bool,
    ) -> std::io::Result<()> {
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

    pub(super) fn write_durable(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        self.write_file(path, bytes, true)
    }

    /// Stores `value` as a file (unless present) and returns its pointer.
    pub(super) fn put_file(&self, t: T, value: &[u8]) -> StoreResult<Vec<u8>> {
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
    pub(super) fn read_file(&self, t: T, len: u64, address: &str) -> StoreResult<Vec<u8>> {
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
    pub(super) fn remove_temp_files(&self) {
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
    pub(super) fn collect_values(&self) -> StoreResult<()> {
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
}
