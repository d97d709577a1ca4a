//! The desired state of a release, streamed from the store: one pass
//! reads each object once (verifying it and rendering it for the site)
//! and keeps only its entry; the target then reads the bodies it writes
//! again, in bounded batches, through [`StoreObjects`]. No pass holds more
//! than one body (or one [`crate::targets::READ_BATCH`]) at a time, so a
//! reconcile's memory does not grow with the bundle's bytes.

use super::*;
use crate::site::{self, One, Renderer, Site};
use crate::targets::plan::Digest;
use crate::targets::{DesiredEntries, ObjectReader, TargetError};
use cairn_core::bundle::Entry;

/// What one pass over a release's stored objects found.
pub(super) enum Prepare {
    /// Every object is stored and renders at this site.
    Ready(Box<Prepared>),
    /// These objects are missing or were corrupt (dropped): fetch them
    /// again, then pass again.
    Missing(Vec<Entry>),
    /// The release does not render at this site (or the site's files are
    /// unusable): nothing is applied.
    Invalid(String),
}

/// A release ready to apply at this site.
pub(super) struct Prepared {
    /// The entries to apply, as rendered (address and size of the rendered
    /// bytes), in manifest order.
    pub(super) entries: DesiredEntries,
    /// Reads their bodies from the store.
    pub(super) reader: StoreObjects,
    /// Objects not applied at this site, one line each.
    pub(super) object_errors: Vec<String>,
    /// The digest of the values in use.
    pub(super) values_digest: Option<String>,
}

/// Reads the desired objects' bodies from the store, rendered for the site
/// exactly as the pass that made the entries rendered them.
pub(super) struct StoreObjects {
    store: Store,
    site: Site,
    renderer: Renderer,
    decrypt: bool,
    /// Desired index → the stored entry it renders from, for the objects
    /// rendering changed (few: placeholders, decrypted Secrets); every
    /// other desired entry is its stored object.
    rendered_from: BTreeMap<usize, Entry>,
}

impl ObjectReader for StoreObjects {
    fn read(
        &self,
        entries: &DesiredEntries,
        indices: &[usize],
    ) -> Result<Vec<Vec<u8>>, TargetError> {
        let mut out = Vec::with_capacity(indices.len());
        for &i in indices {
            let Some(e) = entries.get(i) else {
                return Err(TargetError::Object {
                    address: String::new(),
                    reason: format!("no desired object {i}"),
                });
            };
            let source = match self.rendered_from.get(&i) {
                Some(s) => s.object.to_string(),
                None => e.address.to_string(),
            };
            let bytes = self
                .store
                .get_object(&source)?
                .ok_or_else(|| TargetError::Object {
                    address: source.clone(),
                    reason: "no longer in the store".into(),
                })?;
            let Some(from) = self.rendered_from.get(&i) else {
                out.push(bytes);
                continue;
            };
            let o = DesiredObject {
                entry: from.clone(),
                bytes,
            };
            match self.renderer.render_one(o, &self.site, self.decrypt) {
                One::Apply(o) if Digest::of_address(&o.entry.object) == e.address => {
                    out.push(o.bytes)
                }
                _ => {
                    return Err(TargetError::Object {
                        address: source,
                        reason: "rendered differently than when the reconcile started".into(),
                    })
                }
            }
        }
        Ok(out)
    }
}

/// The adopted manifest's entries read from the store one chunk at a time
/// (format 2), so a reconcile never holds every [`Entry`] of a large
/// bundle at once (at 30,003 objects the whole decoded manifest was the
/// reconcile's largest allocation, 13 MiB). The top document is checked
/// against the bundle id and each chunk as [`cairn_core::bundle::Assembly`]
/// checks it (listed, exact size, address, canonical, entry count, and its
/// entries sorted, unique and within the object limit); across chunks the
/// order, the entry count and the total size are checked as the entries
/// pass. Not re-checked: uniqueness of an object across two chunks, which
/// adoption checked over these same hash-checked bytes. A format 1
/// manifest is decoded whole, as before. Any failure ends the iteration
/// and leaves [`StoredEntries::failed`] set: the manifest is then treated
/// as unreadable, as before.
pub(super) struct StoredEntries<R> {
    /// Reads a chunk by address (`Ok(None)`: not stored).
    read_chunk: R,
    limits: Limits,
    top: Option<cairn_core::bundle::Top>,
    next_chunk: usize,
    current: std::vec::IntoIter<Entry>,
    prev: Option<(String, u32)>,
    count: usize,
    bytes: u64,
    failed: Option<String>,
}

type ReadChunk<'s> = Box<dyn FnMut(&cairn_core::Address) -> Result<Option<Vec<u8>>, String> + 's>;

impl<'s> StoredEntries<ReadChunk<'s>> {
    /// The entries of `release`'s manifest in `store`; `None` when the
    /// document at its bundle id is not stored or unreadable (blocking).
    pub(super) fn open(
        store: &'s Store,
        release: &Release,
        limits: &Limits,
    ) -> std::result::Result<Option<Self>, StoreError> {
        let Some(bytes) = store.bundle(&release.bundle)? else {
            return Ok(None);
        };
        let read: ReadChunk<'s> = Box::new(move |a| store.get_object(a).map_err(|e| e.to_string()));
        Ok(Self::of_document(&bytes, &release.bundle, limits, read))
    }
}

impl<R: FnMut(&cairn_core::Address) -> Result<Option<Vec<u8>>, String>> StoredEntries<R> {
    /// The entries of the document `bytes` at `bundle_id`, its chunks
    /// read by `read_chunk`; `None` when the document is unreadable.
    fn of_document(bytes: &[u8], bundle_id: &str, limits: &Limits, read_chunk: R) -> Option<Self> {
        use cairn_core::bundle::Head;
        let mut out = Self {
            read_chunk,
            limits: limits.clone(),
            top: None,
            next_chunk: 0,
            current: Vec::new().into_iter(),
            prev: None,
            count: 0,
            bytes: 0,
            failed: None,
        };
        match Head::decode(bytes, Some(bundle_id), limits) {
            Ok(Head::Whole(m)) => out.current = m.entries.into_iter(),
            Ok(Head::Chunked(top)) => out.top = Some(top),
            Err(_) => return None,
        }
        Some(out)
    }

    /// Why the iteration ended early, if it did.
    pub(super) fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The next chunk's entries, checked; `None` after the last one.
    fn next_chunk(&mut self) -> Result<Option<Vec<Entry>>, String> {
        use cairn_core::bundle::{Assembly, Top};
        let Some(top) = &self.top else {
            return Ok(None);
        };
        let Some(c) = top.chunks.get(self.next_chunk) else {
            return Ok(None);
        };
        self.next_chunk += 1;
        let n = self.next_chunk;
        let bytes = (self.read_chunk)(&c.address)?
            .ok_or_else(|| format!("bundle manifest chunk {n} ({}) is missing", c.address))?;
        // A one-chunk top document: `Assembly` checks the chunk and its
        // entries exactly as it does for the whole.
        let mut one = Assembly::new(Top {
            format: top.format,
            source: top.source.clone(),
            chunks: vec![c.clone()],
            images: None,
        });
        one.add(&c.address, &bytes, &self.limits)
            .and_then(|()| one.finish(&self.limits))
            .map(|m| Some(m.entries))
            .map_err(|e| format!("bundle manifest chunk {n}: {e}"))
    }

    fn check(&mut self, e: &Entry) -> Result<(), String> {
        if let Some((path, document)) = &self.prev {
            if (path, *document) >= (&e.path, e.document) {
                return Err("entries are not sorted".into());
            }
        }
        self.prev = Some((e.path.clone(), e.document));
        self.count += 1;
        self.bytes = self.bytes.saturating_add(e.size);
        if self.count > self.limits.max_entries {
            return Err(format!("more than {} entries", self.limits.max_entries));
        }
        if self.bytes > self.limits.max_bundle_bytes {
            return Err(format!(
                "the bundle exceeds {} bytes",
                self.limits.max_bundle_bytes
            ));
        }
        Ok(())
    }
}

impl<R: FnMut(&cairn_core::Address) -> Result<Option<Vec<u8>>, String>> Iterator
    for StoredEntries<R>
{
    type Item = Entry;

    fn next(&mut self) -> Option<Entry> {
        if self.failed.is_some() {
            return None;
        }
        loop {
            if let Some(e) = self.current.next() {
                if let Err(m) = self.check(&e) {
                    self.failed = Some(m);
                    return None;
                }
                return Some(e);
            }
            match self.next_chunk() {
                Ok(Some(entries)) => self.current = entries.into_iter(),
                Ok(None) => return None,
                Err(m) => {
                    self.failed = Some(m);
                    return None;
                }
            }
        }
    }
}

/// A stored object checked against its address; a corrupt copy is
/// dropped and reads as missing (blocking).
fn read_stored(store: &Store, e: &Entry) -> std::result::Result<Option<Vec<u8>>, StoreError> {
    match store.get_object(&e.object) {
        Ok(b) => Ok(b),
        Err(StoreError::Corrupt { reason, .. }) => {
            tracing::warn!(object = %e.object, %reason, "corrupt object in the store; re-fetching");
            store.remove_object(&e.object)?;
            Ok(None)
        }
        Err(other) => Err(other),
    }
}

/// One pass over a release's objects (blocking): reads each from the
/// store once, renders it for `site` and keeps its (rendered) entry.
/// `values` are the release's `CairnValues` entries (read first: the
/// variables must be known before any object renders), `entries` every
/// entry in manifest order.
pub(super) fn prepare(
    store: &Store,
    values: &[Entry],
    entries: impl Iterator<Item = Entry>,
    site: Site,
    decrypt: bool,
) -> std::result::Result<Prepare, StoreError> {
    let mut lines = Vec::new();
    let mut missing = Vec::new();
    let renderer = {
        let mut objects = Vec::new();
        for e in values {
            match read_stored(store, e)? {
                Some(bytes) => objects.push(DesiredObject {
                    entry: e.clone(),
                    bytes,
                }),
                None => missing.push(e.clone()),
            }
        }
        let refs: Vec<&DesiredObject> = objects.iter().collect();
        Renderer::new(&refs, &site, &mut lines)
    };
    let mut out = DesiredEntries::default();
    let mut rendered_from = BTreeMap::new();
    let mut object_errors = Vec::new();
    for e in entries {
        if site::is_values(&e) {
            continue;
        }
        let Some(bytes) = read_stored(store, &e)? else {
            missing.push(e);
            continue;
        };
        let source = e.clone();
        match renderer.render_one(DesiredObject { entry: e, bytes }, &site, decrypt) {
            One::Skip => {}
            One::Apply(o) => {
                if o.entry != source {
                    rendered_from.insert(out.len(), source);
                }
                out.push(&o.entry);
            }
            One::ObjectError(m) => object_errors.push(m),
            One::Errors(e) => lines.extend(e),
        }
    }
    if !missing.is_empty() {
        return Ok(Prepare::Missing(missing));
    }
    out.shrink_to_fit();
    if let Err(e) = site::finish(lines) {
        return Ok(Prepare::Invalid(e.to_string()));
    }
    Ok(Prepare::Ready(Box::new(Prepared {
        entries: out,
        values_digest: renderer.values_digest(),
        reader: StoreObjects {
            store: store.clone(),
            site,
            renderer,
            decrypt,
            rendered_from,
        },
        object_errors,
    })))
}

impl Agent {
    /// The site's files, read on the calling (blocking) thread.
    pub(super) fn site_loader(&self) -> impl FnOnce() -> std::result::Result<Site, String> {
        let labels = self.inner.config.labels.clone();
        let (values, identities) = crate::site::files(&self.inner.config);
        move || Site::load(&labels, values.as_deref(), identities.as_deref())
    }

    /// The desired state of `h` at this site, streamed from the store:
    /// missing or corrupt objects are fetched again from the sources (once).
    pub(super) async fn desired_state(
        &self,
        h: &HeadState,
        failed: Option<&FailedRelease>,
    ) -> Result<DesiredState> {
        let mut fetched_again = false;
        loop {
            let (release, limits) = (h.release.clone(), self.inner.limits.clone());
            let load_site = self.site_loader();
            let pass = self
                .blocking(move |store| {
                    // Two passes over the stored manifest, one chunk at a
                    // time: the values first (every object renders with
                    // them), then every entry.
                    let Some(mut first) = StoredEntries::open(store, &release, &limits)? else {
                        return Ok(None);
                    };
                    let values: Vec<Entry> = first.by_ref().filter(site::is_values).collect();
                    if let Some(reason) = first.failed() {
                        tracing::warn!(%reason, "the stored manifest is unreadable");
                        return Ok(None);
                    }
                    let site = match load_site() {
                        Ok(s) => s,
                        Err(m) => return Ok(Some(Prepare::Invalid(m))),
                    };
                    let Some(mut all) = StoredEntries::open(store, &release, &limits)? else {
                        return Ok(None);
                    };
                    let prepared = prepare(store, &values, &mut all, site, true)?;
                    if let Some(reason) = all.failed() {
                        tracing::warn!(%reason, "the stored manifest is unreadable");
                        return Ok(None);
                    }
                    Ok(Some(prepared))
                })
                .await?;
            let prepared = match pass {
                None => {
                    return Err(Error::CorruptState {
                        dir: self.inner.config.data_dir.clone(),
                        detail: format!(
                            "the manifest of bundle {} is missing or unreadable",
                            h.release.bundle
                        ),
                    })
                }
                Some(Prepare::Ready(p)) => *p,
                Some(Prepare::Invalid(m)) => {
                    self.state().site = Some(crate::site::SiteStatus {
                        error: Some(m.clone()),
                        ..Default::default()
                    });
                    return Err(Error::Status(m));
                }
                Some(Prepare::Missing(missing)) => {
                    for e in &missing {
                        if fetched_again || !self.fetch_object_anywhere(&e.object, e.size).await {
                            return Err(Error::CorruptState {
                                dir: self.inner.config.data_dir.clone(),
                                detail: format!(
                                    "object {} ({}) of the adopted release is missing and no source has it",
                                    e.object,
                                    e.display_name()
                                ),
                            });
                        }
                    }
                    fetched_again = true;
                    continue;
                }
            };
            for e in &prepared.object_errors {
                tracing::warn!(error = %e, "object not applied at this site");
            }
            self.state().site = Some(crate::site::SiteStatus {
                values_digest: prepared.values_digest,
                object_errors: prepared.object_errors,
                error: None,
            });
            let mut d = DesiredState::new(
                h.release.channel.to_string(),
                h.release.sequence,
                h.release.bundle.to_string(),
                prepared.entries,
                Arc::new(prepared.reader),
            );
            d.failed_release = failed.map(|f| (f.sequence, f.reason.clone()));
            return Ok(d);
        }
    }

    /// Before adoption: a release whose values do not fit this site (an
    /// undeclared variable, a value outside its pattern) is refused, with
    /// the reason in status. `None`: adopt. Streams the objects from the
    /// store like a reconcile.
    pub(super) async fn site_gate(
        &self,
        source: &str,
        adoption: &Arc<crate::pipeline::Adoption>,
    ) -> Option<SyncOutcome> {
        let load_site = self.site_loader();
        let a = adoption.clone();
        let pass = self
            .blocking(move |store| {
                let site = match load_site() {
                    Ok(s) => s,
                    Err(m) => return Ok(Prepare::Invalid(m)),
                };
                let entries = &a.manifest().entries;
                let values: Vec<Entry> = entries
                    .iter()
                    .filter(|e| site::is_values(e))
                    .cloned()
                    .collect();
                prepare(store, &values, entries.iter().cloned(), site, false)
            })
            .await;
        // Missing or damaged objects: the reconcile fetches them again
        // and renders then.
        let Ok(Prepare::Invalid(message)) = pass else {
            return None;
        };
        const REASON: &str = "site-values";
        tracing::warn!(source, reason = REASON, error = %message, "release not adopted at this site");
        let mut st = self.note_rejection(source, REASON, message.clone());
        st.site = Some(crate::site::SiteStatus {
            error: Some(message),
            ..Default::default()
        });
        Some(SyncOutcome::Rejected { reason: REASON })
    }
}

#[cfg(test)]
mod tests;
