//! What the mesh reads from and hands to the agent: items served to
//! peers, fetched files as a `Source` for the one adoption path.

use super::*;

/// Reads what a peer asked for from the store (roots, the channel's
/// release — the staged one if newer than the adopted one — objects and
/// manifests).
///
/// Blocking: runs on a blocking thread.
fn read_item(agent: &Agent, item: &Item) -> Option<Vec<u8>> {
    let store = agent.store().blocking();
    match item {
        Item::Root(v) => store
            .roots()
            .ok()?
            .into_iter()
            .find(|(rv, _)| rv == v)
            .map(|(_, b)| b),
        Item::Release(c) => agent.relay_release_bytes(c),
        Item::Object(a) => match store.get_object(a) {
            Ok(Some(b)) => Some(b),
            _ => store.bundle(a).ok().flatten(),
        },
        // Resolved by `serve_items`; blobs by the driver.
        Item::Entries(_) | Item::Blob(_) => None,
    }
}

/// The object addresses of the bundle last served by index (a full
/// release is asked for in a few compact wants in a row: its manifest is
/// read and decoded once).
pub(super) type EntriesCache = Arc<std::sync::Mutex<Option<(String, Arc<Vec<String>>)>>>;

/// The object addresses of a bundle we hold (adopted, or staged and
/// stored as an object), in its entry order.
///
/// Blocking: runs on a blocking thread.
fn bundle_entries(
    agent: &Agent,
    bundle: &str,
    limits: &Limits,
    cache: &EntriesCache,
) -> Option<Arc<Vec<String>>> {
    if let Ok(c) = cache.lock() {
        if let Some((b, e)) = c.as_ref() {
            if b == bundle {
                return Some(e.clone());
            }
        }
    }
    let store = agent.store().blocking();
    let bytes = match store.bundle(bundle) {
        Ok(Some(m)) => m,
        _ => store.get_object(bundle).ok().flatten()?,
    };
    let manifest =
        cairn_core::bundle::Manifest::load(&bytes, Some(bundle), limits, store.chunk_reader())
            .ok()?;
    let entries: Arc<Vec<String>> = Arc::new(
        manifest
            .entries
            .iter()
            .map(|e| e.object.to_string())
            .collect(),
    );
    if let Ok(mut c) = cache.lock() {
        *c = Some((bundle.to_owned(), entries.clone()));
    }
    Some(entries)
}

/// What serving a want needs.
pub(super) struct ServeContext<'a> {
    pub(super) agent: &'a Agent,
    pub(super) tx: &'a mpsc::Sender<Input>,
    /// Object bytes per part handed to the endpoint.
    pub(super) part_bytes: usize,
    pub(super) limits: &'a Limits,
    pub(super) cache: &'a EntriesCache,
    /// Image blobs (protocol version 4), if the registry is on.
    pub(super) images: Option<&'a crate::images::Images>,
}

/// Answers a peer's want from the store: plain items, the entries of a
/// compact want through the manifest we hold, handed to the endpoint in
/// parts of about `part_bytes` (a peer asking for an index past the
/// bundle's end is refused), and a range of an image blob of a release we
/// adopted or staged ([`crate::images::Images::read_range`]; any other
/// digest is answered as not held).
///
/// Blocking: runs on a blocking thread.
pub(super) fn serve_items(ctx: &ServeContext<'_>, conn: ConnId, id: u64, items: Vec<Item>) {
    let (agent, tx, part_bytes, limits, cache) =
        (ctx.agent, ctx.tx, ctx.part_bytes, ctx.limits, ctx.cache);
    let mut found = Vec::new();
    let mut ranges = Vec::new();
    for item in items {
        match item {
            Item::Entries(e) => ranges.push(e),
            Item::Blob(b) => found.push(Found {
                bytes: ctx
                    .images
                    .and_then(|im| im.read_range(&b.digest, b.offset, b.length)),
                item: Item::Blob(b),
            }),
            item => found.push(Found {
                bytes: read_item(agent, &item),
                item,
            }),
        }
    }
    let mut entries = Vec::new();
    let mut part = 0usize;
    for e in ranges {
        let Some(addresses) = bundle_entries(agent, &e.bundle, limits, cache) else {
            found.push(Found {
                item: Item::Entries(e),
                bytes: None,
            });
            continue;
        };
        let indices = match e.indices(addresses.len()) {
            Ok(ix) => ix,
            Err(bad) => {
                let detail = format!(
                    "entries past the {} of bundle {}",
                    addresses.len(),
                    e.bundle
                );
                let _ = tx.blocking_send(Input::ServeRefused {
                    conn,
                    id,
                    bad,
                    detail,
                });
                return;
            }
        };
        let store = agent.store().blocking();
        for k in indices {
            let bytes = store.get_object(&addresses[k]).ok().flatten();
            part += bytes.as_ref().map_or(0, Vec::len);
            entries.push(EntryFound(k as u32, bytes));
            if part >= part_bytes {
                let (found, entries) = (std::mem::take(&mut found), std::mem::take(&mut entries));
                part = 0;
                let sent = tx.blocking_send(Input::Served {
                    conn,
                    id,
                    found,
                    entries,
                    last: false,
                });
                if sent.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.blocking_send(Input::Served {
        conn,
        id,
        found,
        entries,
        last: true,
    });
}

/// The files fetched from a peer, as a [`Source`] for
/// [`Agent::sync_from`]: roots and the release from memory, the manifest
/// from memory, objects from the store (where the mesh put them after the
/// pipeline checked them).
pub(super) struct StagedSource {
    pub(super) name: String,
    pub(super) roots: BTreeMap<u64, Vec<u8>>,
    pub(super) channel: String,
    pub(super) release: Vec<u8>,
    pub(super) manifest_address: String,
    pub(super) manifest: Vec<u8>,
    pub(super) store: StoreHandle,
}

impl Source for StagedSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn get<'a>(
        &'a self,
        item: &'a ingest::Item,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async move {
            let found = match item {
                ingest::Item::Release(c) if *c == self.channel => Some(self.release.clone()),
                ingest::Item::Root(v) => self.roots.get(v).cloned(),
                ingest::Item::Manifest(a) | ingest::Item::Object(a)
                    if *a == self.manifest_address && !self.manifest.is_empty() =>
                {
                    Some(self.manifest.clone())
                }
                ingest::Item::Manifest(a) | ingest::Item::Object(a) => {
                    let a = a.clone();
                    self.store
                        .call(move |s| s.get_object(&a))
                        .await
                        .ok()
                        .flatten()
                }
                ingest::Item::Release(_) => None,
            };
            match found {
                Some(b) if b.len() as u64 > limit => Err(SourceError::TooLarge {
                    source_name: self.name.clone(),
                    path: item.to_string(),
                    limit,
                }),
                other => Ok(other),
            }
        })
    }
}
