//! Container images of adopted and staged releases: fetched from the
//! sources as verified blobs, and served to the cluster's container
//! runtime as a read-only OCI distribution registry (`listen.registry`;
//! `docs/IMAGES.md`).
//!
//! **Fetch.** For each bundle the agent adopted or staged, the bundle's
//! image list (`cairn_core::images`, found through
//! [`cairn_core::images::list_address`]) is read from the sources and
//! verified against its signed address; then every blob it names that
//! is not on disk is streamed from a source into
//! `<dataDir>/images/sha256/<2 hex>/<64 hex>`, hashed while written on a
//! blocking thread ([`cairn_oci::blobfile`]), and renamed into place only
//! when it matches. A tampered blob never reaches the directory.
//!
//! **Mesh.** With a mesh configured, a blob (or image list) no source
//! has is fetched from meshed peers (protocol version 4, `Item::Blob`) in
//! ranges of at most 1 MiB, written to a temporary file and hashed while
//! written on a blocking thread, and renamed into place only when digest
//! and size match ([`BlobRequest`], carried out by the mesh driver). A
//! peer is served only blobs this agent holds for the verified image
//! lists of its adopted and staged releases ([`Images::read_range`]).
//!
//! **Serve.** `GET`/`HEAD` of `/v2/`, `/v2/<name>/manifests/<tag|digest>`
//! and `/v2/<name>/blobs/<digest>`, where `<name>` is an image's
//! repository path and `<tag>` one the bundle recorded; only content of an
//! image whose every blob is on disk, of a bundle adopted or staged now.
//! Everything else is 404 (405 for other methods). Blob bytes are read
//! from disk on a blocking thread and streamed. The `ns` query parameter
//! containerd adds for mirrors (`?ns=docker.io`) selects the registry when
//! two registries have the same repository path.

use crate::agent::AdoptedHead;
use crate::ingest::Item;
use crate::source::SourceSet;
use crate::Agent;
use bytes::Bytes;
use cairn_core::images::{ImageList, DEFAULT_MAX_BLOB_BYTES, DEFAULT_MAX_TOTAL_BYTES};
use cairn_core::layout::object_path;
use cairn_core::Address;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The image metrics (`cairn_image_*`).
#[derive(Clone, Debug, Default)]
pub struct ImageMetrics {
    /// Bytes of image blobs on disk that are served now.
    pub bytes_held: Gauge,
    /// Bytes of blobs and manifests sent to clients.
    pub bytes_served: Counter,
    /// Bytes of blobs fetched from sources.
    pub bytes_fetched: Counter,
    /// Blobs refused because they did not match their digest (or limit).
    pub blobs_refused: Counter,
    /// Bytes of blobs (and image lists) fetched from mesh peers.
    pub peer_bytes: Counter,
}

impl ImageMetrics {
    /// Registers the metrics.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "cairn_image_bytes_held",
            "Bytes of container image blobs on disk served for adopted and staged releases",
            self.bytes_held.clone(),
        );
        r.register(
            "cairn_image_bytes_served",
            "Bytes of image manifests and blobs sent by the agent's registry",
            self.bytes_served.clone(),
        );
        r.register(
            "cairn_image_bytes_fetched",
            "Bytes of image blobs fetched from sources",
            self.bytes_fetched.clone(),
        );
        r.register(
            "cairn_image_blobs_refused",
            "Image blobs refused from a source (wrong digest or over the limit)",
            self.blobs_refused.clone(),
        );
        r.register(
            "cairn_image_peer_bytes",
            "Bytes of image blobs and image lists fetched from mesh peers",
            self.peer_bytes.clone(),
        );
    }
}

/// What one repository path serves.
#[derive(Clone, Debug, Default)]
struct RepoContent {
    /// tag → manifest or index digest.
    tags: BTreeMap<String, String>,
    /// manifest/index digest → media type.
    manifests: BTreeMap<String, String>,
    /// blob digests.
    blobs: BTreeSet<String>,
}

/// What the registry serves now: (registry, repository) → content.
#[derive(Debug, Default)]
pub struct Catalog {
    repos: BTreeMap<(String, String), RepoContent>,
}

impl Catalog {
    /// Adds every image of `list` whose blobs are all in `dir`.
    fn add(&mut self, list: &ImageList, present: &dyn Fn(&Address) -> bool) -> usize {
        let mut n = 0;
        for im in &list.images {
            if !im.all_blobs().all(|b| present(&b.digest)) {
                continue;
            }
            n += 1;
            let rc = self
                .repos
                .entry((im.registry.clone(), im.repository.clone()))
                .or_default();
            let top = im.index.as_ref().unwrap_or(&im.manifest);
            if !im.tag.is_empty() {
                rc.tags.insert(im.tag.clone(), top.digest.to_string());
            }
            if let Some(ix) = &im.index {
                rc.manifests
                    .insert(ix.digest.to_string(), ix.media_type.clone());
            }
            rc.manifests.insert(
                im.manifest.digest.to_string(),
                im.manifest.media_type.clone(),
            );
            for b in &im.blobs {
                rc.blobs.insert(b.digest.to_string());
            }
        }
        n
    }

    fn repos<'a>(
        &'a self,
        name: &'a str,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = &'a RepoContent> + 'a {
        self.repos
            .iter()
            .filter(move |((reg, repo), _)| repo == name && ns.is_none_or(|n| n == reg))
            .map(|(_, c)| c)
    }

    /// Digest and media type of a manifest `reference` (tag or digest).
    fn manifest(&self, name: &str, ns: Option<&str>, reference: &str) -> Option<(String, String)> {
        self.repos(name, ns).find_map(|rc| {
            let d = if cairn_core::bundle::is_address(reference) {
                reference.to_owned()
            } else {
                rc.tags.get(reference)?.clone()
            };
            rc.manifests.get(&d).map(|mt| (d.clone(), mt.clone()))
        })
    }

    fn has_blob(&self, name: &str, ns: Option<&str>, digest: &str) -> bool {
        self.repos(name, ns)
            .any(|rc| rc.blobs.contains(digest) || rc.manifests.contains_key(digest))
    }
}

/// How many bytes a blob fetched from a peer must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobSize {
    /// Exactly this many (a blob named by a verified image list).
    Exact(u64),
    /// At most this many (an image list, whose size the manifest does not
    /// give).
    AtMost(u64),
}

/// A blob to fetch from mesh peers into `dest`, verified against
/// `digest` and `size`; the answer is its size or why not.
#[derive(Debug)]
pub struct BlobRequest {
    /// The digest (from a verified image list or bundle manifest).
    pub digest: Address,
    /// Its size.
    pub size: BlobSize,
    /// Where it goes (renamed into place only when it matches).
    pub dest: PathBuf,
    /// The answer.
    pub reply: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// The mesh's side of the images: blob requests to carry out, and the
/// images to serve peers from.
#[derive(Debug)]
pub struct MeshLink {
    /// Blobs to fetch from peers.
    pub requests: tokio::sync::mpsc::Receiver<BlobRequest>,
    /// The images (what may be served, and the metrics).
    pub images: Images,
}

/// The agent's images: blob directory, catalog, metrics.
#[derive(Clone, Debug)]
pub struct Images {
    dir: PathBuf,
    catalog: Arc<RwLock<Catalog>>,
    metrics: ImageMetrics,
    max_blob_bytes: u64,
    max_total_bytes: u64,
    /// Digests a peer may be served: blobs on disk of the verified image
    /// lists of adopted and staged releases, and those lists.
    servable: Arc<RwLock<BTreeSet<String>>>,
    /// Blob requests to the mesh, if one runs.
    peers: Option<tokio::sync::mpsc::Sender<BlobRequest>>,
}

impl Images {
    /// Images under `<data_dir>/images`.
    pub fn new(data_dir: &Path, metrics: ImageMetrics) -> Self {
        Self {
            dir: data_dir.join("images"),
            catalog: Default::default(),
            metrics,
            max_blob_bytes: DEFAULT_MAX_BLOB_BYTES,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            servable: Default::default(),
            peers: None,
        }
    }

    /// Connects the images to the mesh: blobs no source has are asked of
    /// peers, and peers are served what [`Images::read_range`] allows.
    pub fn link_mesh(&mut self) -> MeshLink {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        self.peers = Some(tx);
        MeshLink {
            requests: rx,
            images: self.clone(),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &ImageMetrics {
        &self.metrics
    }

    /// Up to `length` bytes of blob `digest` from `offset`, for a peer:
    /// `None` unless the blob belongs to the verified image list of a
    /// release adopted or staged now (or is that list) and is on disk.
    ///
    /// Blocking: runs on a blocking thread.
    pub fn read_range(&self, digest: &str, offset: u64, length: u32) -> Option<Vec<u8>> {
        use std::io::{Read, Seek};
        if !self.servable.read().ok()?.contains(digest) {
            return None;
        }
        let a = Address::parse(digest).ok()?;
        let mut f = std::fs::File::open(self.blob_path(&a)).ok()?;
        let len = f.metadata().ok()?.len();
        let n = len.saturating_sub(offset).min(u64::from(length)) as usize;
        f.seek(std::io::SeekFrom::Start(offset.min(len))).ok()?;
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf).ok()?;
        Some(buf)
    }

    /// Fetches `digest` from mesh peers into `dest` (no mesh: an error).
    async fn fetch_from_peers(
        &self,
        digest: &Address,
        size: BlobSize,
        dest: &Path,
    ) -> Result<u64, String> {
        let Some(peers) = &self.peers else {
            return Err(format!("image blob {digest}: no source has it"));
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let req = BlobRequest {
            digest: digest.clone(),
            size,
            dest: dest.to_path_buf(),
            reply,
        };
        peers
            .send(req)
            .await
            .map_err(|_| format!("image blob {digest}: the mesh is not running"))?;
        let n = answer
            .await
            .map_err(|_| format!("image blob {digest}: the mesh is not running"))??;
        self.metrics.peer_bytes.inc_by(n);
        tracing::info!(blob = %digest, bytes = n, "image blob fetched from a mesh peer");
        Ok(n)
    }

    fn blob_path(&self, a: &Address) -> PathBuf {
        // objects/sha256/<2>/<64> → <dir>/sha256/<2>/<64>
        let rel = object_path(a);
        let rel = rel.strip_prefix("objects/").unwrap_or(&rel);
        self.dir.join(rel)
    }

    /// Removes image blobs not kept ([`Pass::Unused`]) from
    /// `<dataDir>/images`, or the temporary files of blob fetches
    /// ([`Pass::Temporaries`]: names starting with `.`; only at start-up,
    /// before any fetch runs). Only
    /// regular files directly in `sha256/<2 hex>/` are removed: nothing
    /// outside the images directory, no symbolic link followed or
    /// removed, no file of another name. Runs on a blocking thread.
    async fn collect_garbage(&self, pass: Pass) {
        let dir = self.dir.join("sha256");
        let done = tokio::task::spawn_blocking(move || collect_garbage(&dir, &pass)).await;
        match done {
            Ok(g) if g.blobs + g.temporaries > 0 => tracing::info!(
                blobs = g.blobs,
                bytes = g.bytes,
                temporaries = g.temporaries,
                "image blobs no adopted or staged release names removed"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "image garbage collection failed"),
        }
    }

    /// Keeps the images of the adopted and staged bundles fetched and
    /// served, re-checking on every change of either and retrying failed
    /// fetches with backoff. At start, first removes the temporary files
    /// an interrupted fetch left; unused blobs go after every complete
    /// pass (start-up and each adoption).
    pub async fn sync_loop(self, agent: Agent) {
        self.collect_garbage(Pass::Temporaries).await;
        let mut adopted = agent.subscribe();
        let mut relay = agent.subscribe_relay();
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_secs(1), agent.config().max_backoff);
        loop {
            let heads: Vec<Option<AdoptedHead>> =
                vec![adopted.borrow().clone(), relay.borrow().clone()];
            let bundles: BTreeSet<String> = heads.into_iter().flatten().map(|h| h.bundle).collect();
            let ok = match self.sync(&agent, &bundles).await {
                Ok(()) => {
                    backoff.reset();
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "images: not every image is available yet");
                    false
                }
            };
            let wait = if ok {
                Duration::from_secs(3600)
            } else {
                backoff.next_delay()
            };
            tokio::select! {
                _ = adopted.changed() => {}
                _ = relay.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Fetches what `bundles` need and publishes the catalog (images whose
    /// blobs are all present are served even when others fail).
    async fn sync(&self, agent: &Agent, bundles: &BTreeSet<String>) -> Result<(), String> {
        let mut lists = Vec::new();
        let mut list_addrs = Vec::new();
        let mut errors = Vec::new();
        for b in bundles {
            match self.list_of(agent, b).await {
                Ok(Some((addr, l))) => {
                    list_addrs.push(addr.to_string());
                    lists.push(l)
                }
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        // Garbage collection needs every list: a list not read now would
        // make its blobs look unused.
        let every_list = errors.is_empty();
        // Fetch each missing blob once.
        let mut wanted: BTreeMap<String, (Address, u64)> = BTreeMap::new();
        for l in &lists {
            for b in l.distinct_blobs() {
                wanted.insert(b.digest.to_string(), (b.digest.clone(), b.size));
            }
        }
        for (a, size) in wanted.values() {
            let dest = self.blob_path(a);
            if is_file(&dest).await {
                continue;
            }
            if let Err(e) = self.fetch_blob(agent.sources(), a, *size, &dest).await {
                errors.push(e);
            }
        }
        let mut catalog = Catalog::default();
        let mut present = BTreeSet::new();
        for (k, (a, _)) in &wanted {
            if is_file(&self.blob_path(a)).await {
                present.insert(k.clone());
            }
        }
        let mut held = 0u64;
        for l in &lists {
            catalog.add(l, &|a| present.contains(a.as_str()));
        }
        for (k, (_, size)) in &wanted {
            if present.contains(k) {
                held += size;
            }
        }
        self.metrics.bytes_held.set(held as i64);
        if let Ok(mut s) = self.servable.write() {
            *s = present
                .iter()
                .cloned()
                .chain(list_addrs.iter().cloned())
                .collect();
        }
        if let Ok(mut c) = self.catalog.write() {
            *c = catalog;
        }
        if every_list {
            // Nothing serves the others any more (catalog and servable set
            // replaced above): remove them from disk.
            let keep: BTreeSet<String> = wanted.into_keys().chain(list_addrs).collect();
            self.collect_garbage(Pass::Unused(keep)).await;
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// The verified image list of `bundle`, if it names one.
    async fn list_of(
        &self,
        agent: &Agent,
        bundle: &str,
    ) -> Result<Option<(Address, ImageList)>, String> {
        let b = bundle.to_owned();
        let bytes = agent
            .store()
            .call(move |s| s.bundle(&b))
            .await
            .map_err(|e| format!("bundle {bundle}: {e}"))?
            .ok_or_else(|| format!("bundle {bundle}: manifest not in the store"))?;
        let limits = cairn_core::limits::Limits::default();
        let head = cairn_core::bundle::Head::decode(&bytes, Some(bundle), &limits)
            .map_err(|e| format!("bundle {bundle}: {e}"))?;
        let Some(addr) = cairn_core::images::head_list_address(&head).cloned() else {
            return Ok(None);
        };
        let path = self.blob_path(&addr);
        let p = path.clone();
        let local = tokio::task::spawn_blocking(move || {
            crate::fsread::read_regular_file_capped(&p, cairn_core::images::MAX_LIST_BYTES).ok()
        })
        .await
        .ok()
        .flatten();
        let bytes = match local {
            Some(b) => b,
            None => match agent
                .sources()
                .get_any(
                    &Item::Object(addr.to_string()),
                    cairn_core::images::MAX_LIST_BYTES,
                )
                .await
            {
                Ok(Some(b)) => b,
                from_sources => {
                    // No source has it: a peer that holds the release may.
                    let max = cairn_core::images::MAX_LIST_BYTES;
                    match self
                        .fetch_from_peers(&addr, BlobSize::AtMost(max), &path)
                        .await
                    {
                        Ok(_) => {
                            let p = path.clone();
                            tokio::task::spawn_blocking(move || {
                                crate::fsread::read_regular_file_capped(&p, max)
                            })
                            .await
                            .map_err(|e| format!("image list {addr}: {e}"))?
                            .map_err(|e| format!("image list {addr}: {e}"))?
                        }
                        Err(peers) => {
                            let sources = match from_sources {
                                Err(e) => e.to_string(),
                                _ => "no source has it".into(),
                            };
                            return Err(format!("image list {addr}: {sources}; {peers}"));
                        }
                    }
                }
            },
        };
        let list = ImageList::decode(&bytes, &addr, self.max_blob_bytes, self.max_total_bytes)
            .map_err(|e| format!("image list {addr} of bundle {bundle}: {e}"))?;
        let a = addr.clone();
        tokio::task::spawn_blocking(move || {
            cairn_oci::blobfile::copy_verified(
                &mut &bytes[..],
                a.as_str(),
                bytes.len() as u64,
                &path,
                "image list",
            )
        })
        .await
        .map_err(|e| format!("image list {addr}: {e}"))?
        .map_err(|e| format!("image list {addr}: {e}"))?;
        Ok(Some((addr, list)))
    }

    async fn fetch_blob(
        &self,
        sources: &SourceSet,
        a: &Address,
        size: u64,
        dest: &Path,
    ) -> Result<(), String> {
        let mut last = None;
        for s in sources.iter() {
            match s.fetch_to_file(a.as_str(), size, dest).await {
                Ok(Some(n)) => {
                    if n != size {
                        let d = dest.to_path_buf();
                        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(d)).await;
                        self.metrics.blobs_refused.inc();
                        last = Some(format!(
                            "{}: image blob {a}: {n} bytes, the image list says {size}",
                            s.name()
                        ));
                        continue;
                    }
                    self.metrics.bytes_fetched.inc_by(n);
                    tracing::info!(source = s.name(), blob = %a, bytes = n, "image blob fetched");
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => {
                    if !matches!(e, crate::source::SourceError::Unavailable { .. }) {
                        self.metrics.blobs_refused.inc();
                        tracing::warn!(error = %e, blob = %a, "image blob refused");
                    }
                    last = Some(e.to_string());
                }
            }
        }
        // No source has it (or none is reachable): the mesh peers.
        match self.fetch_from_peers(a, BlobSize::Exact(size), dest).await {
            Ok(_) => Ok(()),
            Err(peers) => Err(match last {
                Some(l) => format!("{l}; {peers}"),
                None => peers,
            }),
        }
    }
}

async fn is_file(p: &Path) -> bool {
    let p = p.to_path_buf();
    tokio::task::spawn_blocking(move || p.is_file())
        .await
        .unwrap_or(false)
}

mod gc;
mod serve;
use gc::{collect_garbage, Pass};

#[cfg(test)]
mod tests;
