//! The bundle manifest and the self-contained bundle file.
//!
//! A bundle manifest lists one entry per Kubernetes object: where it came
//! from, what it is, and the address and size of its canonical bytes
//! (compact JSON with sorted keys). The bundle id is the address of the
//! manifest's canonical CBOR bytes, so the same tree always gives the same
//! id. A bundle file is the manifest followed by every object, in entry
//! order, and is verified on every read.

use crate::limits::Limits;
use crate::{Error, Result};
use cairn_keys::{codec, sha256_address};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::Path;

/// Bundle manifest format version written by this build.
pub const BUNDLE_FORMAT: u32 = 1;

const FILE_MAGIC: &[u8; 8] = b"CAIRNBDL";

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
    pub digest: String,
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
    pub object: String,
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
}

impl Manifest {
    /// Canonical bytes (deterministic CBOR).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// The bundle id: the address of the canonical bytes.
    pub fn id(&self) -> String {
        sha256_address(&self.encode())
    }

    /// Decodes and validates manifest bytes, checking they hash to `id`
    /// when one is given.
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
        let m: Manifest = codec::decode("bundle manifest", bytes, bytes.len())?;
        m.validate(limits)?;
        if m.encode() != bytes {
            return Err(Error::InvalidManifest("not in canonical encoding".into()));
        }
        Ok(m)
    }

    /// Checks format, limits, addresses, order and uniqueness.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        if self.format != BUNDLE_FORMAT {
            return Err(Error::InvalidManifest(format!(
                "format version {} (this build understands {BUNDLE_FORMAT})",
                self.format
            )));
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
            if !is_address(&e.object) {
                return Err(Error::InvalidManifest(format!(
                    "entry {i} ({}): bad object address `{}`",
                    e.display_name(),
                    e.object
                )));
            }
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

/// Whether `s` is a well-formed `sha256:<64 lower-case hex>` address.
pub fn is_address(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
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

/// Writes a bundle file: magic, format, manifest length and bytes, then
/// each entry's object bytes in entry order. `object` returns the bytes of
/// an entry.
pub fn write_bundle_file(
    path: &Path,
    manifest: &Manifest,
    mut object: impl FnMut(&Entry) -> Result<Vec<u8>>,
) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        let m = manifest.encode();
        w.write_all(FILE_MAGIC).map_err(io)?;
        w.write_all(&BUNDLE_FORMAT.to_be_bytes()).map_err(io)?;
        w.write_all(&(m.len() as u64).to_be_bytes()).map_err(io)?;
        w.write_all(&m).map_err(io)?;
        for e in &manifest.entries {
            let bytes = object(e)?;
            verify_object(&e.object, &bytes)?;
            w.write_all(&bytes).map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Reads a bundle file, verifying the manifest and every object, and calls
/// `each` with every verified entry and its bytes. Returns the manifest.
/// Nothing larger than the limits is allocated.
pub fn read_bundle_file(
    path: &Path,
    limits: &Limits,
    mut each: impl FnMut(&Entry, Vec<u8>) -> Result<()>,
) -> Result<Manifest> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: String| Error::InvalidBundleFile {
        path: path.to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut r = std::io::BufReader::new(f);
    let mut head = [0u8; 20];
    r.read_exact(&mut head)
        .map_err(|_| bad("truncated header".into()))?;
    if &head[..8] != FILE_MAGIC {
        return Err(bad("wrong magic (not a cairn bundle file)".into()));
    }
    let format = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if format != BUNDLE_FORMAT {
        return Err(bad(format!("format {format}, expected {BUNDLE_FORMAT}")));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&head[12..20]);
    let mlen = u64::from_be_bytes(len8);
    if mlen > limits.max_manifest_bytes {
        return Err(bad(format!(
            "manifest of {mlen} bytes is over the limit of {}",
            limits.max_manifest_bytes
        )));
    }
    let mut mbytes = vec![0u8; mlen as usize];
    r.read_exact(&mut mbytes)
        .map_err(|_| bad("truncated manifest".into()))?;
    let manifest = Manifest::decode(&mbytes, None, limits).map_err(|e| bad(e.to_string()))?;
    for e in &manifest.entries {
        let mut buf = vec![0u8; e.size as usize];
        r.read_exact(&mut buf).map_err(|_| {
            bad(format!(
                "truncated at object {} ({})",
                e.object,
                e.display_name()
            ))
        })?;
        verify_object(&e.object, &buf)?;
        each(e, buf)?;
    }
    let mut extra = [0u8; 1];
    if r.read(&mut extra).map_err(io)? != 0 {
        return Err(bad("trailing bytes after the last object".into()));
    }
    Ok(manifest)
}
