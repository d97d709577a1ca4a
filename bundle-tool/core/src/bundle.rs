//! The bundle manifest and the object checks.
//!
//! A bundle manifest lists one entry per Kubernetes object: where it came
//! from, what it is, and the address and size of its canonical bytes
//! (compact JSON with sorted keys). The bundle id is the address of the
//! manifest's canonical CBOR bytes, so the same tree always gives the same
//! id. The bundle file (manifest followed by every object) is file IO and
//! lives in `cairn_bundle::bundle`.

use crate::ids::{Address, BundleId};
use crate::limits::Limits;
use crate::{Error, Result};
use cairn_keys::{codec, sha256_address};
use serde::{Deserialize, Serialize};

/// Bundle manifest format version written by this build.
pub const BUNDLE_FORMAT: u32 = 1;

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
    /// The image list's address (`cairn_core::images`); omitted when the bundle carries no images, so other bundles keep their ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<Address>,
}

impl Manifest {
    /// Canonical bytes (deterministic CBOR).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// The bundle id: the address of the canonical bytes.
    pub fn id(&self) -> BundleId {
        BundleId::of_manifest(&self.encode())
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
