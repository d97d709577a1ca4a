//! `cairn bundle build --images FROM`: the container images a bundle's
//! workloads reference, resolved to digests, copied as content-addressed
//! blobs into an image store next to the bundle file, and listed in the
//! bundle's signed image list (`cairn_core::images`, `docs/IMAGES.md`).
//!
//! Images are found in the pod templates of the workload kinds
//! ([`WORKLOAD_POD_SPECS`]) and of a documented list of custom resources
//! ([`CRD_POD_SPECS`]): every `containers`, `initContainers` and
//! `ephemeralContainers` entry's `image`. Blobs are streamed to disk and
//! hashed while written (`cairn_oci::blobfile`), never held in memory.

use anyhow::{bail, Context, Result};
use cairn_core::bundle::Manifest;
use cairn_core::images::{
    check_platform, is_index_type, is_manifest_type, Blob, Image, ImageList, ImageRef,
    IMAGES_FORMAT, MAX_MANIFEST_BLOB_BYTES,
};
use cairn_core::layout::object_path;
use cairn_core::Address;
use cairn_keys::text::escape_untrusted;
use cairn_oci::{Client, NetSettings, OciRef};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Pod spec locations of the built-in workload kinds (group, kind, path of
/// keys to the pod spec).
pub const WORKLOAD_POD_SPECS: &[(&str, &str, &[&str])] = &[
    ("", "Pod", &["spec"]),
    ("", "ReplicationController", &["spec", "template", "spec"]),
    ("apps", "Deployment", &["spec", "template", "spec"]),
    ("apps", "StatefulSet", &["spec", "template", "spec"]),
    ("apps", "DaemonSet", &["spec", "template", "spec"]),
    ("apps", "ReplicaSet", &["spec", "template", "spec"]),
    ("batch", "Job", &["spec", "template", "spec"]),
    (
        "batch",
        "CronJob",
        &["spec", "jobTemplate", "spec", "template", "spec"],
    ),
];

/// Pod spec locations in custom resources Cairn knows (documented in
/// `docs/IMAGES.md`).
pub const CRD_POD_SPECS: &[(&str, &str, &[&str])] = &[
    ("argoproj.io", "Rollout", &["spec", "template", "spec"]),
    (
        "serving.knative.dev",
        "Service",
        &["spec", "template", "spec"],
    ),
    (
        "keda.sh",
        "ScaledJob",
        &["spec", "jobTargetRef", "template", "spec"],
    ),
];

const CONTAINER_LISTS: &[&str] = &["containers", "initContainers", "ephemeralContainers"];

/// Where `--images` reads images from.
#[derive(Clone, Debug)]
pub enum ImagesFrom {
    /// An OCI image layout directory (`index.json`, `blobs/sha256/..`),
    /// images found by their `org.opencontainers.image.ref.name`.
    Layout(PathBuf),
    /// A registry (`oci://HOST[:PORT]`, HTTPS): every image is looked up
    /// by its repository path in this registry, whatever registry its
    /// reference names (the build machine's mirror).
    Registry {
        /// `host[:port]`.
        host: String,
        /// CA, client certificate and credentials.
        settings: NetSettings,
    },
}

impl ImagesFrom {
    /// `oci://HOST[:PORT]` or a directory.
    pub fn parse(s: &str, settings: NetSettings) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("oci://") {
            let host = rest.trim_end_matches('/');
            cairn_core::images::check_registry(host)
                .map_err(|e| anyhow::anyhow!("--images {s}: {e} (expected oci://HOST[:PORT])"))?;
            return Ok(Self::Registry {
                host: host.to_owned(),
                settings,
            });
        }
        let p = PathBuf::from(s);
        if !p.join("index.json").is_file() {
            bail!("--images {s}: neither oci://HOST[:PORT] nor an OCI layout directory (no index.json)");
        }
        Ok(Self::Layout(p))
    }
}

/// Options of the image step.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// Where images come from.
    pub from: ImagesFrom,
    /// Platforms to carry (`os/arch[/variant]`).
    pub platforms: Vec<String>,
    /// Rewrite tags to `name@sha256:…` in the built objects.
    pub pin_digests: bool,
    /// Largest blob.
    pub max_blob_bytes: u64,
    /// Largest sum of distinct blobs.
    pub max_total_bytes: u64,
    /// The image store directory (repository layout: `objects/sha256/..`).
    pub store: PathBuf,
}

/// The image store written next to a bundle file: `FILE.images`.
pub fn default_store(bundle_file: &Path) -> PathBuf {
    let mut s = bundle_file.as_os_str().to_owned();
    s.push(".images");
    PathBuf::from(s)
}

/// The build machine's platform, as containers name it.
pub fn default_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        a => a,
    };
    format!("linux/{arch}")
}

/// Checks a `--platform` value.
pub fn parse_platform(s: &str) -> std::result::Result<String, String> {
    check_platform(s).map(|()| s.to_owned())
}

/// One image reference found in an object.
#[derive(Clone, Debug)]
pub struct Found {
    /// The reference as written.
    pub reference: String,
    /// `Kind namespace/name` of the (first) object naming it.
    pub object: String,
    /// Its file in the tree.
    pub path: String,
}

fn pod_spec_path(group: &str, kind: &str) -> Option<&'static [&'static str]> {
    WORKLOAD_POD_SPECS
        .iter()
        .chain(CRD_POD_SPECS)
        .find(|(g, k, _)| *g == group && *k == kind)
        .map(|(_, _, p)| *p)
}

/// Visits every container `image` string of an object (mutably, so
/// `--pin-digests` can rewrite them).
fn for_each_image(
    group: &str,
    kind: &str,
    obj: &mut serde_json::Value,
    f: &mut dyn FnMut(&mut String) -> Result<()>,
) -> Result<()> {
    let Some(path) = pod_spec_path(group, kind) else {
        return Ok(());
    };
    let mut cur = obj;
    for k in path {
        match cur.get_mut(*k) {
            Some(v) => cur = v,
            None => return Ok(()),
        }
    }
    for list in CONTAINER_LISTS {
        let Some(serde_json::Value::Array(cs)) = cur.get_mut(*list) else {
            continue;
        };
        for c in cs {
            if let Some(serde_json::Value::String(s)) = c.get_mut("image") {
                f(s)?;
            }
        }
    }
    Ok(())
}

/// Every image reference in the bundle's objects, each once, with the
/// first object naming it.
pub fn find_images(manifest: &Manifest, objects: &BTreeMap<String, Vec<u8>>) -> Result<Vec<Found>> {
    let mut out: BTreeMap<String, Found> = BTreeMap::new();
    for e in &manifest.entries {
        if pod_spec_path(e.group(), &e.kind).is_none() {
            continue;
        }
        let Some(bytes) = objects.get(e.object.as_str()) else {
            continue;
        };
        let mut v: serde_json::Value = serde_json::from_slice(bytes)
            .with_context(|| format!("{}: not JSON", e.display_name()))?;
        for_each_image(e.group(), &e.kind, &mut v, &mut |s| {
            out.entry(s.clone()).or_insert_with(|| Found {
                reference: s.clone(),
                object: e.display_name(),
                path: e.path.clone(),
            });
            Ok(())
        })?;
    }
    Ok(out.into_values().collect())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Desc {
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl Platform {
    fn name(&self) -> String {
        match &self.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", self.os, self.architecture),
            _ => format!("{}/{}", self.os, self.architecture),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Desc>>,
    #[serde(default)]
    config: Option<Desc>,
    #[serde(default)]
    layers: Option<Vec<Desc>>,
}

#[derive(Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

/// Reads manifests and copies blobs from a layout or a registry.
enum Reader {
    Layout(PathBuf),
    Registry {
        host: String,
        settings: NetSettings,
        clients: BTreeMap<String, Client>,
    },
}

impl Reader {
    fn client(&mut self, repository: &str) -> Result<&Client> {
        let Reader::Registry {
            host,
            settings,
            clients,
        } = self
        else {
            bail!("not a registry");
        };
        if !clients.contains_key(repository) {
            let c = Client::new(
                OciRef {
                    host: host.clone(),
                    name: repository.to_owned(),
                },
                settings,
                Duration::from_secs(10),
                Duration::from_secs(3600),
            )
            .map_err(anyhow::Error::msg)?;
            clients.insert(repository.to_owned(), c);
        }
        clients
            .get(repository)
            .ok_or_else(|| anyhow::anyhow!("client"))
    }

    /// The top manifest a reference names: bytes, media type.
    async fn resolve(&mut self, r: &ImageRef) -> Result<Option<(Vec<u8>, String)>> {
        let reference = match (&r.digest, &r.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        };
        match self {
            Reader::Layout(dir) => {
                let index = read_limited(&dir.join("index.json"), MAX_MANIFEST_BLOB_BYTES)?;
                let index: ManifestDoc = serde_json::from_slice(&index)
                    .with_context(|| format!("{}/index.json: not an OCI index", dir.display()))?;
                let tag = r.tag.clone().unwrap_or_default();
                let names = [
                    r.written.clone(),
                    format!("{}:{tag}", r.full_name()),
                    format!("{}:{tag}", r.repository),
                ];
                let found =
                    index
                        .manifests
                        .unwrap_or_default()
                        .into_iter()
                        .find(|d| match &r.digest {
                            Some(dg) => d.digest == dg.as_str(),
                            None => d
                                .annotations
                                .get("org.opencontainers.image.ref.name")
                                .or_else(|| d.annotations.get("io.containerd.image.name"))
                                .is_some_and(|n| names.contains(n)),
                        });
                let Some(d) = found else {
                    return Ok(None);
                };
                let bytes = self
                    .manifest_by_digest(&r.repository, &d.digest, d.size)
                    .await?;
                Ok(Some((bytes, d.media_type.unwrap_or_default())))
            }
            Reader::Registry { .. } => {
                let c = self.client(&r.repository)?;
                Ok(c.get_image_manifest(&reference, MAX_MANIFEST_BLOB_BYTES)
                    .await?)
            }
        }
    }

    async fn manifest_by_digest(
        &mut self,
        repository: &str,
        digest: &str,
        size: u64,
    ) -> Result<Vec<u8>> {
        if size > MAX_MANIFEST_BLOB_BYTES {
            bail!("manifest {digest}: {size} bytes, over {MAX_MANIFEST_BLOB_BYTES}");
        }
        let addr = Address::parse(digest)
            .map_err(|_| anyhow::anyhow!("malformed digest `{}`", escape_untrusted(digest)))?;
        let bytes = match self {
            Reader::Layout(dir) => {
                let p = layout_blob(dir, &addr);
                let b = read_limited(&p, size)?;
                if cairn_keys::sha256_address(&b) != digest {
                    bail!("{}: content does not match its digest", p.display());
                }
                b
            }
            Reader::Registry { .. } => {
                let c = self.client(repository)?;
                c.get_image_manifest(digest, size)
                    .await?
                    .map(|(b, _)| b)
                    .ok_or_else(|| anyhow::anyhow!("manifest {digest} not found"))?
            }
        };
        if bytes.len() as u64 != size {
            bail!(
                "manifest {digest}: {} bytes, its descriptor says {size}",
                bytes.len()
            );
        }
        Ok(bytes)
    }

    /// Copies a blob into the store (skipped when present), verified.
    async fn copy_blob(&mut self, repository: &str, b: &Blob, store: &Path) -> Result<u64> {
        let dest = store.join(object_path(&b.digest));
        if dest.is_file() {
            return Ok(0);
        }
        let what = format!("blob {} of {repository}", b.digest);
        let n = match self {
            Reader::Layout(dir) => {
                let src = layout_blob(dir, &b.digest);
                let (exp, size, w) = (b.digest.to_string(), b.size, what.clone());
                tokio::task::spawn_blocking(move || -> Result<u64> {
                    let mut f =
                        std::fs::File::open(&src).with_context(|| format!("{}", src.display()))?;
                    Ok(cairn_oci::blobfile::copy_verified(
                        &mut f, &exp, size, &dest, &w,
                    )?)
                })
                .await??
            }
            Reader::Registry { .. } => {
                let c = self.client(repository)?;
                let resp = c
                    .blob_response(b.digest.as_str())
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("{what}: not in the registry"))?;
                cairn_oci::blobfile::download_verified(
                    resp,
                    b.digest.as_str(),
                    b.size,
                    &dest,
                    &what,
                )
                .await?
            }
        };
        if n != b.size {
            let _ = std::fs::remove_file(store.join(object_path(&b.digest)));
            bail!("{what}: {n} bytes, its descriptor says {}", b.size);
        }
        Ok(n)
    }
}

fn layout_blob(dir: &Path, a: &Address) -> PathBuf {
    let hex = a.as_str().trim_start_matches("sha256:");
    dir.join("blobs").join("sha256").join(hex)
}

fn write_small(store: &Path, bytes: &[u8]) -> Result<Address> {
    let a = Address::of(bytes);
    let dest = store.join(object_path(&a));
    if !dest.is_file() {
        cairn_oci::blobfile::copy_verified(
            &mut &bytes[..],
            a.as_str(),
            bytes.len() as u64,
            &dest,
            "image store",
        )?;
    }
    Ok(a)
}

fn blob_of(d: &Desc, what: &str) -> Result<Blob> {
    Ok(Blob {
        digest: Address::parse(&d.digest).map_err(|_| {
            anyhow::anyhow!("{what}: malformed digest `{}`", escape_untrusted(&d.digest))
        })?,
        size: d.size,
        media_type: d.media_type.clone().unwrap_or_default(),
    })
}

/// What the image step did.
#[derive(Clone, Debug, Default)]
pub struct ImageSummary {
    /// Images (reference × platform) listed.
    pub images: usize,
    /// Distinct blobs and their bytes.
    pub blobs: usize,
    /// Bytes of the distinct blobs.
    pub bytes: u64,
    /// Bytes copied now (blobs already in the store are skipped).
    pub copied: u64,
}

/// Finds, resolves and copies the bundle's images; sets the manifest's
/// image list address and, with `pin_digests`, rewrites the objects.
pub fn add_images(
    built: &mut crate::build::BuiltBundle,
    opts: &ImageOptions,
    limits: &cairn_core::limits::Limits,
) -> Result<ImageSummary> {
    // Format 1 has no place for the image list's address.
    if built.manifest.format == cairn_core::bundle::FORMAT_1 {
        anyhow::bail!(
            "--images needs bundle format 2 (the image list is named by the top document); drop --format 1"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(add_images_async(built, opts, limits))
}

async fn add_images_async(
    built: &mut crate::build::BuiltBundle,
    opts: &ImageOptions,
    limits: &cairn_core::limits::Limits,
) -> Result<ImageSummary> {
    let found = find_images(&built.manifest, &built.objects)?;
    let mut reader = match &opts.from {
        ImagesFrom::Layout(p) => Reader::Layout(p.clone()),
        ImagesFrom::Registry { host, settings } => Reader::Registry {
            host: host.clone(),
            settings: settings.clone(),
            clients: BTreeMap::new(),
        },
    };
    let mut summary = ImageSummary::default();
    let mut images = Vec::new();
    let mut resolved: BTreeMap<String, Address> = BTreeMap::new();
    for f in &found {
        let at = format!(
            "image `{}` of {} in {}",
            escape_untrusted(&f.reference),
            f.object,
            escape_untrusted(&f.path)
        );
        let r = ImageRef::parse(&f.reference).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        let (top, mt) = reader
            .resolve(&r)
            .await
            .with_context(|| at.clone())?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{at}: cannot be resolved: {} not found in {}",
                    r.tag
                        .as_deref()
                        .map_or_else(|| "digest".to_owned(), |t| format!("tag `{t}`")),
                    match &opts.from {
                        ImagesFrom::Layout(p) => p.display().to_string(),
                        ImagesFrom::Registry { host, .. } =>
                            format!("oci://{host}/{}", r.repository),
                    }
                )
            })?;
        let top_digest = Address::of(&top);
        if let Some(d) = &r.digest {
            if *d != top_digest {
                bail!("{at}: the source's manifest has digest {top_digest}");
            }
        }
        let doc: ManifestDoc =
            serde_json::from_slice(&top).with_context(|| format!("{at}: not an image manifest"))?;
        let mt = doc
            .media_type
            .clone()
            .filter(|m| !m.is_empty())
            .unwrap_or(mt);
        let top_blob = Blob {
            digest: top_digest.clone(),
            size: top.len() as u64,
            media_type: mt.clone(),
        };
        write_small(&opts.store, &top)?;
        let mut chosen: Vec<(Option<Blob>, Blob, ManifestDoc, Option<String>)> = Vec::new();
        if is_index_type(&mt) {
            let entries = doc.manifests.unwrap_or_default();
            for want in &opts.platforms {
                let d = entries
                    .iter()
                    .find(|d| d.platform.as_ref().is_some_and(|p| &p.name() == want))
                    .ok_or_else(|| {
                        let have: Vec<String> = entries
                            .iter()
                            .filter_map(|d| d.platform.as_ref().map(Platform::name))
                            .collect();
                        anyhow::anyhow!(
                            "{at}: no manifest for platform {want} (the index has {})",
                            escape_untrusted(&have.join(", "))
                        )
                    })?;
                let bytes = reader
                    .manifest_by_digest(&r.repository, &d.digest, d.size)
                    .await
                    .with_context(|| at.clone())?;
                let m: ManifestDoc = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{at}: {}: not an image manifest", d.digest))?;
                write_small(&opts.store, &bytes)?;
                let mut b = blob_of(d, &at)?;
                if b.media_type.is_empty() {
                    b.media_type = m.media_type.clone().unwrap_or_default();
                }
                chosen.push((Some(top_blob.clone()), b, m, Some(want.clone())));
            }
        } else if is_manifest_type(&mt) {
            chosen.push((None, top_blob.clone(), doc, None));
        } else {
            bail!(
                "{at}: unsupported manifest media type `{}`",
                escape_untrusted(&mt)
            );
        }
        for (index, manifest, m, from_index) in chosen {
            let config = m
                .config
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("{at}: manifest without config"))?;
            let mut blobs = vec![blob_of(config, &at)?];
            for l in m.layers.iter().flatten() {
                blobs.push(blob_of(l, &at)?);
            }
            for b in &blobs {
                if b.size > opts.max_blob_bytes {
                    bail!(
                        "{at}: blob {} is {} bytes, over the limit of {} (--max-image-blob-bytes)",
                        b.digest,
                        b.size,
                        opts.max_blob_bytes
                    );
                }
                summary.copied += reader
                    .copy_blob(&r.repository, b, &opts.store)
                    .await
                    .with_context(|| at.clone())?;
            }
            let platform = if let Some(p) = from_index {
                p
            } else {
                let cfg_path = opts.store.join(object_path(&blobs[0].digest));
                let cfg = read_limited(&cfg_path, MAX_MANIFEST_BLOB_BYTES)?;
                let c: ConfigDoc = serde_json::from_slice(&cfg)
                    .with_context(|| format!("{at}: config is not an image config"))?;
                let p = Platform {
                    os: c.os,
                    architecture: c.architecture,
                    variant: c.variant,
                }
                .name();
                if !opts.platforms.contains(&p) {
                    bail!(
                        "{at}: the image is for {}, not {} (--platform)",
                        escape_untrusted(&p),
                        opts.platforms.join(", ")
                    );
                }
                p
            };
            images.push(Image {
                reference: f.reference.clone(),
                registry: r.registry.clone(),
                repository: r.repository.clone(),
                tag: r.tag.clone().unwrap_or_default(),
                platform,
                index,
                manifest,
                blobs,
            });
        }
        resolved.insert(f.reference.clone(), top_digest);
    }
    let mut list = ImageList {
        format: IMAGES_FORMAT,
        images,
    };
    list.sort();
    // Two references to the same image and tag (`nginx` and
    // `docker.io/library/nginx`) list it once.
    list.images.dedup_by(|a, b| {
        (&a.registry, &a.repository, &a.tag, &a.platform, &a.manifest)
            == (&b.registry, &b.repository, &b.tag, &b.platform, &b.manifest)
    });
    list.validate(opts.max_blob_bytes, opts.max_total_bytes)
        .map_err(|e| anyhow::anyhow!("{e} (--max-images-bytes / --max-image-blob-bytes)"))?;
    summary.images = list.images.len();
    let distinct = list.distinct_blobs();
    summary.blobs = distinct.len();
    summary.bytes = list.total_bytes();
    let bytes = list.encode();
    let addr = write_small(&opts.store, &bytes)?;
    if opts.pin_digests {
        pin(built, &resolved, limits)?;
    }
    built.manifest.images = Some(addr);
    built.manifest.validate(limits)?;
    Ok(summary)
}

/// Rewrites every found reference to `name@digest` and re-addresses the
/// changed objects.
fn pin(
    built: &mut crate::build::BuiltBundle,
    resolved: &BTreeMap<String, Address>,
    limits: &cairn_core::limits::Limits,
) -> Result<()> {
    let mut used = BTreeSet::new();
    for e in built.manifest.entries.iter_mut() {
        if pod_spec_path(e.group(), &e.kind).is_none() {
            continue;
        }
        let Some(bytes) = built.objects.get(e.object.as_str()) else {
            continue;
        };
        let mut v: serde_json::Value = serde_json::from_slice(bytes)?;
        let mut changed = false;
        for_each_image(e.group(), &e.kind.clone(), &mut v, &mut |s| {
            if let Some(d) = resolved.get(s.as_str()) {
                let r = ImageRef::parse(s).map_err(anyhow::Error::msg)?;
                let p = r.pinned(d);
                if p != *s {
                    *s = p;
                    changed = true;
                }
            }
            Ok(())
        })?;
        if !changed {
            continue;
        }
        let nb = serde_json::to_vec(&v)?;
        if nb.len() as u64 > limits.max_object_bytes {
            bail!("{}: over the object limit after pinning", e.display_name());
        }
        let a = Address::of(&nb);
        e.object = a.clone();
        e.size = nb.len() as u64;
        used.insert(a.to_string());
        built.objects.insert(a.into_string(), nb);
    }
    let live: BTreeSet<String> = built
        .manifest
        .entries
        .iter()
        .map(|e| e.object.to_string())
        .collect();
    built.objects.retain(|k, _| live.contains(k));
    Ok(())
}

/// `cairn release`: copies a bundle's images from its image store into
/// the repository's objects, verifying the list and every blob (streamed,
/// hashed while written). Returns (blobs copied, bytes copied).
pub fn publish_images(
    manifest: &Manifest,
    store: &Path,
    repo_root: &Path,
    max_blob_bytes: u64,
    max_total_bytes: u64,
) -> Result<(usize, u64)> {
    let Some(addr) = cairn_core::images::list_address(manifest) else {
        return Ok((0, 0));
    };
    let list_path = store.join(object_path(addr));
    let bytes =
        read_limited(&list_path, cairn_core::images::MAX_LIST_BYTES).with_context(|| {
            format!(
                "the bundle's image list {addr} (image store {})",
                store.display()
            )
        })?;
    let list = ImageList::decode(&bytes, addr, max_blob_bytes, max_total_bytes)?;
    let mut copied = (0usize, 0u64);
    let mut todo: Vec<(Address, u64)> = vec![(addr.clone(), bytes.len() as u64)];
    todo.extend(
        list.distinct_blobs()
            .iter()
            .map(|b| (b.digest.clone(), b.size)),
    );
    for (a, size) in todo {
        let dest = repo_root.join(object_path(&a));
        if dest.is_file() {
            continue;
        }
        let src = store.join(object_path(&a));
        let mut f = std::fs::File::open(&src).with_context(|| {
            format!("image blob {a}: not in the image store {}", store.display())
        })?;
        let n = cairn_oci::blobfile::copy_verified(
            &mut f,
            a.as_str(),
            size,
            &dest,
            &format!("image blob {a}"),
        )?;
        if n != size {
            let _ = std::fs::remove_file(&dest);
            bail!("image blob {a}: {n} bytes, the image list says {size}");
        }
        copied.0 += 1;
        copied.1 += n;
    }
    Ok(copied)
}

fn read_limited(p: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(p).with_context(|| p.display().to_string())?;
    let mut b = Vec::new();
    f.take(limit + 1).read_to_end(&mut b)?;
    if b.len() as u64 > limit {
        bail!("{}: over {limit} bytes", p.display());
    }
    Ok(b)
}

/// Reads and verifies a bundle's image list from a directory in
/// repository layout (an image store or a repository).
pub fn read_list(manifest: &Manifest, root: &Path) -> Result<Option<ImageList>> {
    let Some(addr) = cairn_core::images::list_address(manifest) else {
        return Ok(None);
    };
    let bytes = read_limited(
        &root.join(object_path(addr)),
        cairn_core::images::MAX_LIST_BYTES,
    )
    .with_context(|| format!("image list {addr}"))?;
    Ok(Some(ImageList::decode(&bytes, addr, u64::MAX, u64::MAX)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cairn_core::bundle::{Entry, Source, BUNDLE_FORMAT};

    fn bundle(objs: &[(&str, &str, serde_json::Value)]) -> crate::build::BuiltBundle {
        let mut entries = Vec::new();
        let mut objects = BTreeMap::new();
        for (i, (api, kind, v)) in objs.iter().enumerate() {
            let bytes = serde_json::to_vec(v).unwrap();
            let a = Address::of(&bytes);
            entries.push(Entry {
                path: format!("f{i}.yaml"),
                document: 0,
                api_version: (*api).into(),
                kind: (*kind).into(),
                namespace: "ns".into(),
                name: format!("o{i}"),
                object: a.clone(),
                size: bytes.len() as u64,
            });
            objects.insert(a.into_string(), bytes);
        }
        crate::build::BuiltBundle {
            manifest: Manifest {
                format: BUNDLE_FORMAT,
                source: Source {
                    repository: String::new(),
                    commit: "0".repeat(40),
                    path: String::new(),
                    rendered: Vec::new(),
                },
                entries,
                images: None,
            },
            objects,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn images_are_found_in_every_workload_kind_and_listed_crds() {
        let pod = |img: &str| {
            serde_json::json!({"containers": [{"image": img}],
                "initContainers": [{"image": format!("{img}-init")}],
                "ephemeralContainers": [{"image": format!("{img}-debug")}]})
        };
        let b = bundle(&[
            ("v1", "Pod", serde_json::json!({"spec": pod("pod")})),
            (
                "batch/v1",
                "CronJob",
                serde_json::json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": pod("cron")}}}}}),
            ),
            (
                "apps/v1",
                "StatefulSet",
                serde_json::json!({"spec": {"template": {"spec": pod("sts")}}}),
            ),
            (
                "argoproj.io/v1alpha1",
                "Rollout",
                serde_json::json!({"spec": {"template": {"spec": pod("rollout")}}}),
            ),
            // Not a workload: its `image` fields are not images.
            (
                "example.com/v1",
                "Thing",
                serde_json::json!({"spec": {"template": {"spec": pod("thing")}}}),
            ),
        ]);
        let found: Vec<String> = find_images(&b.manifest, &b.objects)
            .unwrap()
            .into_iter()
            .map(|f| f.reference)
            .collect();
        for want in ["pod", "cron-init", "sts-debug", "rollout"] {
            assert!(found.contains(&want.to_owned()), "{want}: {found:?}");
        }
        assert_eq!(found.len(), 12, "{found:?}");
        assert!(!found.iter().any(|f| f.starts_with("thing")));
    }

    #[test]
    fn pinning_rewrites_references_and_re_addresses_objects() {
        let mut b = bundle(&[(
            "apps/v1",
            "Deployment",
            serde_json::json!({"spec": {"template": {"spec": {"containers": [{"image": "h:5000/app:v1"}]}}}}),
        )]);
        let old = b.manifest.entries[0].object.clone();
        let d = Address::of(b"manifest");
        let resolved = BTreeMap::from([("h:5000/app:v1".to_owned(), d.clone())]);
        pin(&mut b, &resolved, &cairn_core::limits::Limits::default()).unwrap();
        let e = &b.manifest.entries[0];
        assert_ne!(e.object, old);
        let bytes = &b.objects[e.object.as_str()];
        assert_eq!(e.size, bytes.len() as u64);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains(&format!("\"h:5000/app@{d}\"")), "{text}");
        assert_eq!(b.objects.len(), 1, "the old object is dropped");
    }
}
