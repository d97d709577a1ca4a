//! What the mesh reads from and hands to the agent: items served to
//! peers, fetched files as a `Source` for the one adoption path.

use super::*;

/// Reads what a peer asked for from the store (roots, the channel's
/// release — the staged one if newer than the adopted one — objects and
/// manifests).
///
/// Blocking: runs on a blocking thread.
pub(super) fn read_item(agent: &Agent, item: &Item) -> Option<Vec<u8>> {
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
    }
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
