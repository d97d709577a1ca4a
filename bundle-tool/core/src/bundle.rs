//! The bundle manifest and the object checks.
//!
//! A bundle manifest lists one entry per Kubernetes object: where it came
//! from, what it is, and the address and size of its canonical bytes
//! (compact JSON with sorted keys). The bundle id is the address of the
//! canonical CBOR bytes of the document stored at it, so the same tree
//! always gives the same id. The bundle file (manifest followed by every
//! object) is file IO and lives in `cairn_bundle::bundle`.
//!
//! Two formats (docs/FORMATS.md, "Bundle manifest"):
//!
//! * **format 1**: one document, `{format: 1, source, entries}`, stored at
//!   the bundle id;
//! * **format 2** (written by default): a small *top document*
//!   `{format: 2, source, chunks, [images]}` stored at the bundle id,
//!   listing *chunks* `{entries}` by address, size and entry count. Chunks
//!   are content-addressed objects (`objects/sha256/..`), so a one-object
//!   change rewrites the top and one chunk ([`Chunker`]).
//!
//! Either way the logical view is one [`Manifest`] with the entries in the
//! same order (so entry indices are the same in both formats of one tree).
//! Readers decode the `format` field first ([`bundle_format`]) and refuse a
//! format they do not understand with [`Error::BundleFormat`]; format 2 is
//! read with [`Head::decode`] and an [`Assembly`] (or [`Manifest::load`]
//! when the chunks are at hand), which check every invariant of format 1
//! across the chunk boundaries.

use crate::ids::{Address, BundleId};
use crate::limits::Limits;
use crate::{Error, Result};
use cairn_keys::{codec, sha256_address};
use serde::{Deserialize, Serialize};

/// Bundle manifest format written by default (`cairn bundle build`).
pub const BUNDLE_FORMAT: u32 = FORMAT_2;

/// Format 1: the whole manifest in one document.
pub const FORMAT_1: u32 = 1;

/// Format 2: a top document listing content-addressed manifest chunks.
pub const FORMAT_2: u32 = 2;

/// The newest format this build reads (the default of
/// [`Limits::max_bundle_format`]).
pub const MAX_BUNDLE_FORMAT: u32 = FORMAT_2;

/// Where a bundle was built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The repository as the release engineer named it (path or URL).
    pub repository: String,
    /// The resolved commit id (hex).
    pub commit: String,
    /// The directory inside the tree (`""` for the whole tree).
    pub path: String,
    /// Renders that took inputs besides the tree (Helm charts: the Helm
    /// version and the values used); omitted when empty, so bundles
    /// without charts keep their ids. Built by `cairn_bundle::helm`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rendered: Vec<Rendered>,
}

/// A render whose output depends on more than the tree: the tool and its
/// version, and the inputs given to it (part of the bundle id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendered {
    /// The chart directory or kustomization file in the tree.
    pub path: String,
    /// The renderer and its version, e.g. `helm v3.17.3`.
    pub tool: String,
    /// Values files in the order applied (later ones win).
    pub values: Vec<RenderedValues>,
    /// Every other setting, in the order given: `release=NAME`,
    /// `namespace=NS`, `set=KEY=VALUE`, `kube-version=V`,
    /// `api-versions=A`, `include-crds=BOOL`.
    pub settings: Vec<String>,
}

/// One values file used by a render.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedValues {
    /// Its path in the tree, or `--helm-values` for a file given on the
    /// command line (its local path is not recorded: the id must not
    /// depend on where a file lies on the build machine).
    pub file: String,
    /// The address of its bytes.
    pub digest: Address,
}

/// One Kubernetes object in a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File path in the tree, relative to the repository root.
    pub path: String,
    /// Index of the YAML document within that file.
    pub document: u32,
    /// `apiVersion` of the object.
    pub api_version: String,
    /// `kind` of the object.
    pub kind: String,
    /// `metadata.namespace`, empty for cluster-scoped objects.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// Address of the canonical object bytes.
    pub object: Address,
    /// Size of the canonical object bytes.
    pub size: u64,
}

impl Entry {
    /// The API group (`""` for core).
    pub fn group(&self) -> &str {
        self.api_version
            .rsplit_once('/')
            .map(|(g, _)| g)
            .unwrap_or("")
    }

    /// `group/Kind/namespace/name`: unique within a bundle.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.group(),
            self.kind,
            self.namespace,
            self.name
        )
    }

    /// `Kind namespace/name` or `Kind name`, for humans.
    pub fn display_name(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The bundle manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version ([`BUNDLE_FORMAT`]).
    pub format: u32,
    /// Where it came from.
    pub source: Source,
    /// Entries sorted by (path, document).
    pub entries: Vec<Entry>,
    /// Format 2 only: the address of the bundle's list of container
    /// images (`images` in the top document, left out when `None`;
    /// `cairn_core::images`). Not part of format 1's encoding.
    #[serde(skip)]
    pub images: Option<Address>,
}

/// The documents a manifest is stored as: the one at the bundle id, and
/// (format 2) the chunks it lists, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// The document at the bundle id (format 1: the whole manifest;
    /// format 2: the top document).
    pub top: Vec<u8>,
    /// Format 2: each chunk's address and bytes, in entry order (empty for
    /// format 1).
    pub chunks: Vec<(Address, Vec<u8>)>,
}

impl Encoded {
    /// The bundle id: the address of [`Encoded::top`].
    pub fn id(&self) -> BundleId {
        BundleId::of_manifest(&self.top)
    }

    /// Bytes of the top document and every chunk.
    pub fn len(&self) -> u64 {
        self.top.len() as u64 + self.chunks.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
    }

    /// Whether there is nothing (never: a top document is never empty).
    pub fn is_empty(&self) -> bool {
        self.top.is_empty()
    }
}

impl Manifest {
    /// The bytes stored at the bundle id (deterministic CBOR): format 1
    /// the whole manifest, format 2 the top document (see
    /// [`Manifest::encode_all`] for its chunks).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_all().top
    }

    /// Every document of the manifest in its format: the top one and
    /// (format 2) its chunks, grouped by [`Chunker::DEFAULT`].
    pub fn encode_all(&self) -> Encoded {
        self.encode_with(&Chunker::DEFAULT)
    }

    /// [`Manifest::encode_all`] with another grouping (for measurements).
    pub fn encode_with(&self, chunker: &Chunker) -> Encoded {
        if self.format == FORMAT_1 {
            return Encoded {
                top: codec::encode(self),
                chunks: Vec::new(),
            };
        }
        // Each entry is encoded once: its size decides the grouping, and a
        // chunk's bytes are its entries' bytes after the chunk's own
        // header, exactly what encoding `Chunk` as a whole gives
        // (`chunks_are_their_entries_encoded_once` compares the two).
        let encoded: Vec<Vec<u8>> = self.entries.iter().map(codec::encode).collect();
        let sizes: Vec<usize> = encoded.iter().map(Vec::len).collect();
        let mut refs = Vec::new();
        let mut chunks = Vec::new();
        for range in chunker.split_sizes(&self.entries, &sizes) {
            let entries = &self.entries[range.clone()];
            let body: usize = sizes[range.clone()].iter().sum();
            let mut bytes = Vec::with_capacity(CHUNK_HEADER.len() + 5 + body);
            bytes.extend_from_slice(CHUNK_HEADER);
            cbor_array_header(&mut bytes, entries.len());
            for e in &encoded[range] {
                bytes.extend_from_slice(e);
            }
            let address = Address::of(&bytes);
            refs.push(ChunkRef {
                address: address.clone(),
                size: bytes.len() as u64,
                entries: entries.len() as u32,
            });
            chunks.push((address, bytes));
        }
        let top = Top {
            format: self.format,
            source: self.source.clone(),
            chunks: refs,
            images: self.images.clone(),
        };
        Encoded {
            top: codec::encode(&top),
            chunks,
        }
    }

    /// The bundle id: the address of the document stored at it.
    pub fn id(&self) -> BundleId {
        BundleId::of_manifest(&self.encode())
    }

    /// Decodes and validates a **format 1** manifest, checking it hashes
    /// to `id` when one is given. A format 2 top document is refused
    /// here (its chunks are needed: [`Manifest::load`], [`Head::decode`]).
    pub fn decode(bytes: &[u8], expected_id: Option<&str>, limits: &Limits) -> Result<Self> {
        match Head::decode(bytes, expected_id, limits)? {
            Head::Whole(m) => Ok(m),
            Head::Chunked(_) => Err(Error::InvalidManifest(
                "a format 2 top document needs its chunks to be read".into(),
            )),
        }
    }

    /// Decodes and validates the document at a bundle id, of any format
    /// this build understands, taking a format 2 bundle's chunks from
    /// `chunk` (address and exact size in, bytes out, `None` when absent).
    /// Every chunk is checked against its address and size; the result is
    /// the same logical manifest as format 1's.
    pub fn load(
        bytes: &[u8],
        expected_id: Option<&str>,
        limits: &Limits,
        mut chunk: impl FnMut(&Address, u64) -> Result<Option<Vec<u8>>>,
    ) -> Result<Self> {
        match Head::decode(bytes, expected_id, limits)? {
            Head::Whole(m) => Ok(m),
            Head::Chunked(top) => {
                let mut a = Assembly::new(top);
                for (i, (address, size)) in a.missing().into_iter().enumerate() {
                    let b = chunk(&address, size)?.ok_or_else(|| Error::ObjectMissing {
                        address: address.to_string(),
                        what: format!("bundle manifest chunk {}", i + 1),
                    })?;
                    a.add(&address, &b, limits)?;
                }
                a.finish(limits)
            }
        }
    }

    /// Checks format, limits, addresses, order and uniqueness.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        check_format(self.format, limits)?;
        if self.format == FORMAT_1 && self.images.is_some() {
            return Err(Error::InvalidManifest(
                "`images` needs bundle format 2".into(),
            ));
        }
        if self.entries.len() > limits.max_entries {
            return Err(Error::InvalidManifest(format!(
                "{} entries, limit {}",
                self.entries.len(),
                limits.max_entries
            )));
        }
        let mut total = 0u64;
        let mut keys = std::collections::BTreeSet::new();
        for (i, e) in self.entries.iter().enumerate() {
            if e.size > limits.max_object_bytes {
                return Err(Error::TooLarge {
                    what: format!("object {} ({})", e.object, e.display_name()),
                    limit: limits.max_object_bytes,
                    actual: e.size,
                });
            }
            total = total.saturating_add(e.size);
            if !keys.insert(e.key()) {
                return Err(Error::InvalidManifest(format!(
                    "duplicate object {}",
                    e.display_name()
                )));
            }
            if i > 0 {
                let p = &self.entries[i - 1];
                if (&p.path, p.document) >= (&e.path, e.document) {
                    return Err(Error::InvalidManifest("entries are not sorted".into()));
                }
            }
        }
        if total > limits.max_bundle_bytes {
            return Err(Error::TooLarge {
                what: "bundle".into(),
                limit: limits.max_bundle_bytes,
                actual: total,
            });
        }
        Ok(())
    }

    /// Total size of all objects.
    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

pub use crate::ids::is_address;

/// A format 2 top document: the document at the bundle id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Top {
    /// `2`.
    pub format: u32,
    /// Where the bundle came from.
    pub source: Source,
    /// The manifest chunks, in entry order.
    pub chunks: Vec<ChunkRef>,
    /// Reserved (issue 20): the address of the bundle's container image
    /// list. Omitted when `None`, so bundles without images never depend
    /// on it; validated as an address when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<Address>,
}

/// One chunk as the top document lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Address of the chunk's bytes.
    pub address: Address,
    /// Exact size of the chunk's bytes.
    pub size: u64,
    /// Number of entries in the chunk (at least 1).
    pub entries: u32,
}

/// The bytes of a `Chunk` before its array of entries: a map of one
/// entry (`a1`) and the key `"entries"` (`67 "entries"`).
const CHUNK_HEADER: &[u8] = b"\xa1\x67entries";

/// Appends the CBOR header of an array of `n` items (major type 4, the
/// shortest form, as serde_cbor writes a slice's length).
fn cbor_array_header(out: &mut Vec<u8>, n: usize) {
    match n {
        0..=23 => out.push(0x80 | n as u8),
        24..=0xff => out.extend_from_slice(&[0x98, n as u8]),
        0x100..=0xffff => {
            out.push(0x99);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0x9a);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(0x9b);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
}

/// A chunk as one value (tests compare [`Manifest::encode_with`]'s
/// chunks with it).
#[cfg(test)]
#[derive(Serialize)]
struct ChunkOut<'a> {
    entries: &'a [Entry],
}

#[derive(Serialize, Deserialize)]
struct ChunkDoc {
    entries: Vec<Entry>,
}

#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

/// Reads only the `format` field of a bundle manifest or top document, so
/// a format this build does not know gets [`Error::BundleFormat`] rather
/// than a decoding error about the fields it does not know.
pub fn bundle_format(bytes: &[u8]) -> Result<u32> {
    let f: FormatOnly = codec::decode("bundle manifest", bytes, bytes.len())
        .map_err(|e| Error::InvalidManifest(format!("no readable `format` field ({e})")))?;
    Ok(f.format)
}

/// Refuses a bundle format this build (or these limits) does not read.
pub fn check_format(format: u32, limits: &Limits) -> Result<()> {
    let max = limits.max_bundle_format.min(MAX_BUNDLE_FORMAT);
    if (FORMAT_1..=max).contains(&format) {
        Ok(())
    } else {
        Err(Error::BundleFormat { found: format, max })
    }
}

/// The document at a bundle id, decoded and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    /// Format 1: the whole manifest.
    Whole(Manifest),
    /// Format 2: the top document; its chunks are still to be read.
    Chunked(Top),
}

impl Head {
    /// Decodes the document at a bundle id: size limit first, then the
    /// hash against `expected_id`, then the `format` field, then the
    /// document of that format, which must be canonical and within the
    /// limits (format 2: chunk count, chunk sizes, total entries and bytes,
    /// no chunk listed twice, no empty chunk — all before any chunk is
    /// read).
    pub fn decode(bytes: &[u8], expected_id: Option<&str>, limits: &Limits) -> Result<Self> {
        if bytes.len() as u64 > limits.max_manifest_bytes {
            return Err(Error::TooLarge {
                what: "bundle manifest".into(),
                limit: limits.max_manifest_bytes,
                actual: bytes.len() as u64,
            });
        }
        if let Some(id) = expected_id {
            let actual = sha256_address(bytes);
            if actual != id {
                return Err(Error::ObjectMismatch {
                    address: id.to_owned(),
                    actual,
                });
            }
        }
        let format = bundle_format(bytes)?;
        check_format(format, limits)?;
        if format == FORMAT_1 {
            let m: Manifest = codec::decode("bundle manifest", bytes, bytes.len())?;
            m.validate(limits)?;
            if codec::encode(&m) != bytes {
                return Err(Error::InvalidManifest("not in canonical encoding".into()));
            }
            return Ok(Head::Whole(m));
        }
        let top: Top = codec::decode("bundle top document", bytes, bytes.len())?;
        top.validate(limits)?;
        if codec::encode(&top) != bytes {
            return Err(Error::InvalidManifest(
                "top document not in canonical encoding".into(),
            ));
        }
        Ok(Head::Chunked(top))
    }
}

impl Top {
    /// The checks possible before any chunk is read.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        check_format(self.format, limits)?;
        if self.format != FORMAT_2 {
            return Err(Error::InvalidManifest(format!(
                "a top document of format {}",
                self.format
            )));
        }
        if self.chunks.len() > limits.max_chunks {
            return Err(Error::InvalidManifest(format!(
                "{} chunks, limit {}",
                self.chunks.len(),
                limits.max_chunks
            )));
        }
        let (mut entries, mut bytes) = (0u64, 0u64);
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.chunks.iter().enumerate() {
            let n = i + 1;
            if c.entries == 0 || c.size == 0 {
                return Err(Error::InvalidManifest(format!(
                    "chunk {n} ({}) is empty",
                    c.address
                )));
            }
            if c.size > limits.max_chunk_bytes {
                return Err(Error::TooLarge {
                    what: format!("bundle manifest chunk {n} ({})", c.address),
                    limit: limits.max_chunk_bytes,
                    actual: c.size,
                });
            }
            if !seen.insert(&c.address) {
                return Err(Error::InvalidManifest(format!(
                    "chunk {} is listed twice",
                    c.address
                )));
            }
            entries += u64::from(c.entries);
            bytes = bytes.saturating_add(c.size);
        }
        if entries > limits.max_entries as u64 {
            return Err(Error::InvalidManifest(format!(
                "{entries} entries, limit {}",
                limits.max_entries
            )));
        }
        if bytes > limits.max_manifest_bytes {
            return Err(Error::TooLarge {
                what: "bundle manifest chunks".into(),
                limit: limits.max_manifest_bytes,
                actual: bytes,
            });
        }
        Ok(())
    }
}

/// A format 2 manifest being put together from its chunks, which may
/// arrive in any order; each is checked on arrival (address, exact size,
/// canonical encoding, entry count) and [`Assembly::finish`] checks the
/// whole (order and uniqueness across chunks, object sizes, totals).
#[derive(Clone, Debug)]
pub struct Assembly {
    top: Top,
    chunks: Vec<Option<Vec<Entry>>>,
    index: std::collections::BTreeMap<Address, usize>,
    received: usize,
}

impl Assembly {
    /// Starts from a validated top document ([`Head::decode`]).
    pub fn new(top: Top) -> Self {
        let index = top
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (c.address.clone(), i))
            .collect();
        Self {
            chunks: vec![None; top.chunks.len()],
            top,
            index,
            received: 0,
        }
    }

    /// The top document.
    pub fn top(&self) -> &Top {
        &self.top
    }

    /// Chunks not yet added, in order, with their exact sizes.
    pub fn missing(&self) -> Vec<(Address, u64)> {
        self.top
            .chunks
            .iter()
            .zip(&self.chunks)
            .filter(|(_, got)| got.is_none())
            .map(|(c, _)| (c.address.clone(), c.size))
            .collect()
    }

    /// The exact size of `address` if it is a chunk still missing.
    pub fn wants(&self, address: &str) -> Option<u64> {
        let i = *self.index.get(address)?;
        self.chunks[i].is_none().then(|| self.top.chunks[i].size)
    }

    /// Whether `address` is one of the chunks.
    pub fn lists(&self, address: &str) -> bool {
        self.index.contains_key(address)
    }

    /// Every chunk is in.
    pub fn is_complete(&self) -> bool {
        self.received == self.chunks.len()
    }

    /// Checks and adds one chunk: it must be listed, `bytes` no longer
    /// than its listed size (checked before hashing or decoding), hash to
    /// its address, be canonical and hold exactly the listed number of
    /// entries. Adding a chunk twice is a no-op.
    pub fn add(&mut self, address: &str, bytes: &[u8], limits: &Limits) -> Result<()> {
        let Some(&i) = self.index.get(address) else {
            return Err(Error::InvalidManifest(format!(
                "{} is not a chunk of this bundle",
                cairn_keys::text::escape_untrusted(&address.chars().take(80).collect::<String>())
            )));
        };
        if self.chunks[i].is_some() {
            return Ok(());
        }
        let c = &self.top.chunks[i];
        let n = i + 1;
        let limit = c.size.min(limits.max_chunk_bytes);
        if bytes.len() as u64 > limit {
            return Err(Error::TooLarge {
                what: format!("bundle manifest chunk {n} ({})", c.address),
                limit,
                actual: bytes.len() as u64,
            });
        }
        verify_object(address, bytes)?;
        if bytes.len() as u64 != c.size {
            return Err(Error::InvalidManifest(format!(
                "chunk {n} ({address}) is {} bytes, the top document says {}",
                bytes.len(),
                c.size
            )));
        }
        let doc: ChunkDoc = codec::decode("bundle manifest chunk", bytes, bytes.len())?;
        if doc.entries.len() != c.entries as usize {
            return Err(Error::InvalidManifest(format!(
                "chunk {n} ({address}) has {} entries, the top document says {}",
                doc.entries.len(),
                c.entries
            )));
        }
        if codec::encode(&doc) != bytes {
            return Err(Error::InvalidManifest(format!(
                "chunk {n} ({address}) not in canonical encoding"
            )));
        }
        self.chunks[i] = Some(doc.entries);
        self.received += 1;
        Ok(())
    }

    /// The logical manifest, once every chunk is in, validated as a whole
    /// exactly as a format 1 manifest is (entries sorted by (path,
    /// document) across chunk boundaries, one entry per object identity
    /// in the whole bundle, object and bundle sizes, entry count).
    pub fn finish(self, limits: &Limits) -> Result<Manifest> {
        if let Some(i) = self.chunks.iter().position(Option::is_none) {
            let c = &self.top.chunks[i];
            return Err(Error::ObjectMissing {
                address: c.address.to_string(),
                what: format!("bundle manifest chunk {}", i + 1),
            });
        }
        let total: usize = self.top.chunks.iter().map(|c| c.entries as usize).sum();
        let mut entries = Vec::with_capacity(total.min(limits.max_entries));
        for c in self.chunks.into_iter().flatten() {
            entries.extend(c);
        }
        let m = Manifest {
            format: self.top.format,
            source: self.top.source,
            entries,
            images: self.top.images,
        };
        m.validate(limits)?;
        Ok(m)
    }
}

/// How a format 2 manifest's entries are grouped into chunks. Any grouping
/// verifies (the verifier checks chunks, not how they were cut); this one
/// decides how much a change rewrites. See docs/BUNDLES.md ("Manifest
/// chunks") for the measurement behind [`Chunker::DEFAULT`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunker {
    /// Fixed runs of `entries` entries in entry order: an edit in place
    /// rewrites one chunk, but an added or removed entry shifts every
    /// later boundary.
    Fixed {
        /// Entries per chunk.
        entries: usize,
    },
    /// Content-defined boundaries: a chunk ends after an entry whose
    /// [`boundary_hash`] has its low `bits` bits zero, once it holds
    /// `min` entries, and always at `max` entries; boundaries depend only
    /// on the (path, document) of nearby entries, so an edit, addition or
    /// removal rewrites the chunk it falls in (rarely two).
    ContentDefined {
        /// Fewest entries before a content boundary counts.
        min: usize,
        /// Low bits that must be zero (2^bits entries on average).
        bits: u32,
        /// Most entries in one chunk.
        max: usize,
    },
}

/// The builder's bound on one chunk's bytes (the verifier's limit,
/// [`Limits::max_chunk_bytes`], is larger).
pub const CHUNK_TARGET_MAX_BYTES: usize = 256 << 10;

impl Chunker {
    /// What `cairn bundle build` uses.
    pub const DEFAULT: Chunker = Chunker::ContentDefined {
        min: 16,
        bits: 6,
        max: 256,
    };

    /// Splits `entries` into chunk ranges (never empty ones), also cutting
    /// before an entry that would take a chunk over
    /// [`CHUNK_TARGET_MAX_BYTES`].
    pub fn split(&self, entries: &[Entry]) -> Vec<std::ops::Range<usize>> {
        let sizes: Vec<usize> = entries.iter().map(|e| codec::encode(e).len()).collect();
        self.split_sizes(entries, &sizes)
    }

    /// [`Chunker::split`] with each entry's encoded size given
    /// (`sizes[i]` for `entries[i]`; the same length).
    fn split_sizes(&self, entries: &[Entry], sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0usize, 0usize);
        for (i, (e, &size)) in entries.iter().zip(sizes).enumerate() {
            if i > start && bytes + size > CHUNK_TARGET_MAX_BYTES {
                out.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes += size;
            let n = i + 1 - start;
            let cut = match *self {
                Chunker::Fixed { entries } => n >= entries.max(1),
                Chunker::ContentDefined { min, bits, max } => {
                    n >= max.max(1)
                        || (n >= min && (boundary_hash(e) & ((1u64 << bits.min(63)) - 1)) == 0)
                }
            };
            if cut {
                out.push(start..i + 1);
                (start, bytes) = (i + 1, 0);
            }
        }
        if start < entries.len() {
            out.push(start..entries.len());
        }
        out
    }
}

/// The content-defined boundary hash of an entry: the first 8 bytes, big
/// endian, of SHA-256(path ‖ 0x00 ‖ document as u32 big endian). It uses
/// only the entry's position in the tree, so changing an object's content
/// never moves a boundary.
pub fn boundary_hash(e: &Entry) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(e.path.as_bytes());
    ctx.update(&[0]);
    ctx.update(&e.document.to_be_bytes());
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b)
}

/// Checks that `bytes` hash to `address`.
pub fn verify_object(address: &str, bytes: &[u8]) -> Result<()> {
    let actual = sha256_address(bytes);
    if actual != address {
        return Err(Error::ObjectMismatch {
            address: address.to_owned(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{manifest_format, object};

    /// A bundle of `n` ConfigMaps in `n` files (as the bench's fixture:
    /// one object per file), `skip` left out, `changed` with other data.
    fn objs(n: usize, skip: Option<usize>, changed: Option<usize>) -> Vec<(Entry, Vec<u8>)> {
        (0..n)
            .filter(|i| Some(*i) != skip)
            .map(|i| {
                let data = if Some(i) == changed { "changed" } else { "v1" };
                object("ns", &format!("app{i:05}"), data)
            })
            .collect()
    }

    fn v2(objs: &[(Entry, Vec<u8>)]) -> Manifest {
        manifest_format(FORMAT_2, objs)
    }

    fn chunk_bytes(entries: &[Entry]) -> Vec<u8> {
        codec::encode(&ChunkOut { entries })
    }

    fn top_of(m: &Manifest, chunks: &[Vec<u8>]) -> Vec<u8> {
        let refs = chunks
            .iter()
            .map(|b| ChunkRef {
                address: Address::of(b),
                size: b.len() as u64,
                entries: codec::decode::<ChunkDoc>("c", b, b.len())
                    .unwrap()
                    .entries
                    .len() as u32,
            })
            .collect();
        codec::encode(&Top {
            format: FORMAT_2,
            source: m.source.clone(),
            chunks: refs,
            images: None,
        })
    }

    /// Decodes a top document and adds `chunks` in order; the first error.
    fn assemble(top: &[u8], chunks: &[Vec<u8>], limits: &Limits) -> Result<Manifest> {
        let Head::Chunked(t) = Head::decode(top, None, limits)? else {
            panic!("not a top document")
        };
        let mut a = Assembly::new(t);
        for c in chunks {
            a.add(&Address::of(c), c, limits)?;
        }
        a.finish(limits)
    }

    #[test]
    fn chunks_are_their_entries_encoded_once() {
        // Chunks of 1 to 300 entries cover the array headers 0x80+n, 0x98
        // and 0x99; each must be exactly `Chunk` encoded as a whole.
        for n in [1, 2, 23, 24, 25, 255, 256, 257, 300] {
            let m = v2(&objs(n, None, None));
            for chunker in [
                Chunker::DEFAULT,
                Chunker::Fixed { entries: 1 },
                Chunker::Fixed { entries: 24 },
                Chunker::Fixed { entries: 1000 },
            ] {
                let enc = m.encode_with(&chunker);
                let ranges = chunker.split(&m.entries);
                assert_eq!(enc.chunks.len(), ranges.len());
                for ((address, bytes), range) in enc.chunks.iter().zip(ranges) {
                    assert_eq!(bytes, &chunk_bytes(&m.entries[range]), "{n} entries");
                    assert_eq!(address, &Address::of(bytes));
                }
            }
        }
        let mut h = Vec::new();
        for n in [0usize, 23, 24, 255, 256, 65535, 65536, 1 << 32] {
            h.clear();
            cbor_array_header(&mut h, n);
            let want: &[u8] = match n {
                0 => &[0x80],
                23 => &[0x97],
                24 => &[0x98, 24],
                255 => &[0x98, 0xff],
                256 => &[0x99, 1, 0],
                65535 => &[0x99, 0xff, 0xff],
                65536 => &[0x9a, 0, 1, 0, 0],
                _ => &[0x9b, 0, 0, 0, 1, 0, 0, 0, 0],
            };
            assert_eq!(h, want, "{n}");
        }
    }

    #[test]
    fn format_2_round_trips_with_the_entry_order_of_format_1() {
        let o = objs(1000, None, None);
        let (m1, m2) = (manifest_format(FORMAT_1, &o), v2(&o));
        let enc = m2.encode_all();
        assert!(enc.chunks.len() > 4, "{} chunks", enc.chunks.len());
        assert!(enc.top.len() < 8 * 1024, "top {} bytes", enc.top.len());
        let limits = Limits::default();
        let back = Manifest::load(&enc.top, Some(&m2.id()), &limits, |a, _| {
            Ok(enc
                .chunks
                .iter()
                .find(|(c, _)| c == a)
                .map(|(_, b)| b.clone()))
        })
        .unwrap();
        assert_eq!(back, m2);
        assert_eq!(back.entries, m1.entries);
        assert_ne!(m1.id(), m2.id());
        // Chunks in any order assemble to the same manifest.
        let mut rev: Vec<Vec<u8>> = enc.chunks.iter().map(|(_, b)| b.clone()).collect();
        rev.reverse();
        assert_eq!(assemble(&enc.top, &rev, &limits).unwrap(), m2);
        // A missing chunk is named.
        let e = Manifest::load(&enc.top, None, &limits, |_, _| Ok(None)).unwrap_err();
        assert!(e.to_string().contains("bundle manifest chunk 1"), "{e}");
    }

    fn differing(a: &Manifest, b: &Manifest, c: &Chunker) -> usize {
        let old: std::collections::BTreeSet<Address> = a
            .encode_with(c)
            .chunks
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        b.encode_with(c)
            .chunks
            .iter()
            .filter(|(a, _)| !old.contains(a))
            .count()
    }

    #[test]
    fn one_change_rewrites_one_chunk() {
        let base = v2(&objs(3000, None, None));
        let c = Chunker::DEFAULT;
        // One object changed: exactly one chunk differs.
        for i in [0, 1234, 2999] {
            let changed = v2(&objs(3000, None, Some(i)));
            assert_eq!(differing(&base, &changed, &c), 1, "change at {i}");
        }
        // One object added or removed: the chunk it falls in (rarely the
        // next one too, when the edit is a boundary).
        let mut worst = 0;
        for i in [7, 1500, 2998] {
            let removed = v2(&objs(3000, Some(i), None));
            let added = v2(&objs(3001, None, None));
            worst = worst.max(differing(&base, &removed, &c));
            worst = worst.max(differing(&base, &added, &c));
        }
        assert!(worst <= 2, "{worst} chunks rewritten");
        // Fixed-size chunks shift every later boundary on a removal.
        let fixed = Chunker::Fixed { entries: 64 };
        let removed = v2(&objs(3000, Some(7), None));
        assert!(differing(&base, &removed, &fixed) > 40);
    }

    #[test]
    fn hostile_chunks_are_refused() {
        let limits = Limits::default();
        let o = objs(300, None, None);
        let m = v2(&o);
        let enc = m.encode_all();
        let chunks: Vec<Vec<u8>> = enc.chunks.iter().map(|(_, b)| b.clone()).collect();
        assert!(chunks.len() >= 3);
        let err = |top: &[u8], chunks: &[Vec<u8>]| {
            assemble(top, chunks, &limits).unwrap_err().to_string()
        };

        // Wrong hash: a chunk whose bytes are not its address.
        let Head::Chunked(t) = Head::decode(&enc.top, None, &limits).unwrap() else {
            panic!()
        };
        let mut a = Assembly::new(t.clone());
        let mut bad = chunks[0].clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let e = a.add(&enc.chunks[0].0, &bad, &limits).unwrap_err();
        assert!(matches!(e, Error::ObjectMismatch { .. }), "{e}");
        // Longer than listed: refused before hashing.
        let mut long = chunks[0].clone();
        long.push(0);
        let e = a.add(&enc.chunks[0].0, &long, &limits).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        // Not a chunk of this bundle.
        let stranger = chunk_bytes(&o[..1].iter().map(|x| x.0.clone()).collect::<Vec<_>>());
        let e = a
            .add(&Address::of(&stranger), &stranger, &limits)
            .unwrap_err();
        assert!(e.to_string().contains("not a chunk of this bundle"), "{e}");
        assert!(!a.is_complete());

        // Unsorted across chunks: two chunks swapped in the top document.
        let mut swapped = chunks.clone();
        swapped.swap(0, 1);
        let e = err(&top_of(&m, &swapped), &swapped);
        assert!(e.contains("not sorted"), "{e}");

        // The same object identity in two chunks (sorted by path).
        let entries: Vec<Entry> = o.iter().map(|x| x.0.clone()).collect();
        let mut dup = entries[150].clone();
        dup.path = format!("{}-again.yaml", entries[299].path);
        let c1 = chunk_bytes(&entries[..200]);
        let mut tail = entries[200..].to_vec();
        tail.push(dup);
        let c2 = chunk_bytes(&tail);
        let e = err(&top_of(&m, &[c1.clone(), c2.clone()]), &[c1.clone(), c2]);
        assert!(e.contains("duplicate object"), "{e}");

        // A chunk listed twice.
        let twice = [c1.clone(), c1.clone()];
        let e = Head::decode(&top_of(&m, &twice), None, &limits).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");

        // An empty chunk.
        let empty = chunk_bytes(&[]);
        let e = Head::decode(&top_of(&m, &[c1.clone(), empty]), None, &limits).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");

        // Oversize: a chunk listed over the chunk limit, and chunk counts
        // and entry totals over the limits, all before any chunk is read.
        let small = Limits {
            max_chunk_bytes: 1000,
            ..Limits::default()
        };
        let e = Head::decode(&enc.top, None, &small).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        let few = Limits {
            max_chunks: 2,
            ..Limits::default()
        };
        let e = Head::decode(&enc.top, None, &few).unwrap_err();
        assert!(e.to_string().contains("chunks, limit 2"), "{e}");
        let entries_limit = Limits {
            max_entries: 299,
            ..Limits::default()
        };
        let e = Head::decode(&enc.top, None, &entries_limit).unwrap_err();
        assert!(e.to_string().contains("300 entries, limit 299"), "{e}");

        // A listed entry count that does not match the chunk.
        let mut t2 = t.clone();
        t2.chunks[0].entries += 1;
        let e = err(&codec::encode(&t2), &chunks);
        assert!(e.contains("the top document says"), "{e}");

        // A wrong top document hash against the bundle id.
        let e = Head::decode(&enc.top, Some(&Address::of(b"other")), &limits).unwrap_err();
        assert!(matches!(e, Error::ObjectMismatch { .. }), "{e}");

        // The honest one still assembles.
        assert_eq!(assemble(&enc.top, &chunks, &limits).unwrap(), m);
    }

    #[test]
    fn unknown_formats_get_a_clear_message() {
        let o = objs(3, None, None);
        let m = v2(&o);
        let enc = m.encode_all();
        // A format 3 top document (with fields format 2 does not have).
        #[derive(Serialize)]
        struct Future {
            format: u32,
            layers: Vec<String>,
        }
        let f3 = codec::encode(&Future {
            format: 3,
            layers: vec![],
        });
        let e = Head::decode(&f3, None, &Limits::default()).unwrap_err();
        assert_eq!(e.reason(), "bundle_format");
        assert_eq!(
            e.to_string(),
            "bundle format 3; this build understands 1 and 2: upgrade it to one that understands format 3"
        );
        // Format 2 where only format 1 is understood.
        let only_1 = Limits {
            max_bundle_format: 1,
            ..Limits::default()
        };
        let e = Head::decode(&enc.top, None, &only_1)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("bundle format 2; this agent understands 1: upgrade it"),
            "{e}"
        );
        assert!(e.contains("cairn bundle build --format 1"), "{e}");
        let m1 = manifest_format(FORMAT_1, &o);
        assert!(Head::decode(&m1.encode(), None, &only_1).is_ok());
        // No format field at all.
        let e = Head::decode(&codec::encode(&o[0].0), None, &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("`format`"), "{e}");
    }

    #[test]
    fn images_is_an_optional_address_of_format_2_only() {
        let o = objs(3, None, None);
        let mut m = v2(&o);
        let plain = m.encode();
        m.images = Some(Address::of(b"image list"));
        let enc = m.encode_all();
        assert_ne!(enc.top, plain);
        let limits = Limits::default();
        let chunks: Vec<Vec<u8>> = enc.chunks.iter().map(|(_, b)| b.clone()).collect();
        assert_eq!(assemble(&enc.top, &chunks, &limits).unwrap(), m);
        // Without images the key is absent altogether.
        assert!(!plain.windows(6).any(|w| w == b"images"));
        // A malformed address is refused while decoding.
        #[derive(Serialize)]
        struct BadTop<'a> {
            format: u32,
            source: &'a Source,
            chunks: Vec<ChunkRef>,
            images: &'a str,
        }
        let Head::Chunked(t) = Head::decode(&enc.top, None, &limits).unwrap() else {
            panic!()
        };
        let bad = codec::encode(&BadTop {
            format: 2,
            source: &m.source,
            chunks: t.chunks,
            images: "sha256:../../x",
        });
        let e = Head::decode(&bad, None, &limits).unwrap_err();
        assert!(e.to_string().contains("bad address"), "{e}");
        // Format 1 has no images.
        let mut m1 = manifest_format(FORMAT_1, &o);
        m1.images = Some(Address::of(b"x"));
        assert!(m1.validate(&limits).is_err());
    }
}
