//! Container images carried by a release: the image list document and
//! image references.
//!
//! A bundle that carries images points (by address) at one **image list**:
//! a deterministic CBOR document naming every image the bundle's workloads
//! reference, the platform-specific manifest chosen for each platform, and
//! every blob (manifest, config, layers; the image index when the
//! reference resolved to one) with its digest, size and media type.
//! Every blob is stored in the bundle repository as an ordinary object at
//! its digest (`objects/sha256/..`), so the signed release → bundle
//! manifest → image list → blob chain verifies an image's bytes exactly
//! like a Kubernetes object's. Byte layout: `docs/FORMATS.md`, "Image
//! list"; behaviour: `docs/IMAGES.md`.
//!
//! **The seam to the bundle manifest** is [`list_address`]: the one place
//! that says where a bundle names its image list.

use crate::bundle::Manifest;
use crate::ids::Address;
use crate::{Error, Result};
use cairn_keys::{codec, sha256_address};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Image list format version written by this build.
pub const IMAGES_FORMAT: u32 = 1;
/// Largest image list document (bytes).
pub const MAX_LIST_BYTES: u64 = 8 << 20;
/// Most images (reference × platform) in one list.
pub const MAX_IMAGES: usize = 4096;
/// Most blobs (config and layers) of one image.
pub const MAX_BLOBS_PER_IMAGE: usize = 512;
/// Largest image manifest or index blob (as registries refuse larger).
pub const MAX_MANIFEST_BLOB_BYTES: u64 = 4 << 20;
/// Default largest single blob (layer) a builder writes and an agent
/// fetches.
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 8 << 30;
/// Default largest sum of distinct blob sizes of one image list.
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 64 << 30;

/// OCI image manifest.
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Whether `mt` is an image manifest media type Cairn carries.
pub fn is_manifest_type(mt: &str) -> bool {
    mt == MT_OCI_MANIFEST || mt == MT_DOCKER_MANIFEST
}

/// Whether `mt` is an image index media type Cairn carries.
pub fn is_index_type(mt: &str) -> bool {
    mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST
}

/// Where a bundle names its image list. **The seam**: bundle format 2
/// carries the address in its manifest's `images` field; this function is
/// the only reader of that field, so builder, `cairn release`, `cairn
/// bundle inspect` and the agent all follow it.
pub fn list_address(manifest: &Manifest) -> Option<&Address> {
    manifest.images.as_ref()
}

/// [`list_address`] from the document at the bundle id alone (no chunk
/// needed): what the agent's image fetch reads.
pub fn head_list_address(head: &crate::bundle::Head) -> Option<&Address> {
    match head {
        crate::bundle::Head::Whole(m) => list_address(m),
        crate::bundle::Head::Chunked(top) => top.images.as_ref(),
    }
}

/// One content-addressed blob of an image.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Blob {
    /// `sha256:<hex>` of the bytes.
    pub digest: Address,
    /// Bytes.
    pub size: u64,
    /// Its media type (as the manifest names it).
    pub media_type: String,
}

/// One image (reference × platform) of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The reference as written in the first object that names it.
    pub reference: String,
    /// The registry host (`docker.io` for short names).
    pub registry: String,
    /// The repository path in the registry (`library/nginx`).
    pub repository: String,
    /// The tag as written (`""` when the reference is by digest only).
    pub tag: String,
    /// `os/architecture[/variant]` of the chosen manifest.
    pub platform: String,
    /// The image index the reference resolved to, when it was one (served
    /// under the tag and its digest; a runtime picks its platform from it).
    pub index: Option<Blob>,
    /// The platform's image manifest.
    pub manifest: Blob,
    /// Config first, then layers in manifest order.
    pub blobs: Vec<Blob>,
}

impl Image {
    /// The digest the reference resolves to: the index's, else the
    /// manifest's (what `--pin-digests` writes).
    pub fn resolved_digest(&self) -> &Address {
        self.index
            .as_ref()
            .map_or(&self.manifest.digest, |i| &i.digest)
    }

    /// `registry/repository`, as a runtime names it.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Every blob of the image: index (if any), manifest, config, layers.
    pub fn all_blobs(&self) -> impl Iterator<Item = &Blob> {
        self.index
            .iter()
            .chain(std::iter::once(&self.manifest))
            .chain(self.blobs.iter())
    }
}

/// The image list document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageList {
    /// [`IMAGES_FORMAT`].
    pub format: u32,
    /// Sorted by (registry, repository, tag, platform, manifest digest),
    /// no two equal.
    pub images: Vec<Image>,
}

impl ImageList {
    /// Canonical bytes (deterministic CBOR).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Sorts the images into canonical order.
    pub fn sort(&mut self) {
        self.images.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    }

    /// Distinct blobs, each once, by digest order.
    pub fn distinct_blobs(&self) -> Vec<&Blob> {
        let mut seen = BTreeSet::new();
        let mut out: Vec<&Blob> = self
            .images
            .iter()
            .flat_map(Image::all_blobs)
            .filter(|b| seen.insert(b.digest.as_str()))
            .collect();
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        out
    }

    /// Sum of the distinct blobs' sizes.
    pub fn total_bytes(&self) -> u64 {
        self.distinct_blobs()
            .iter()
            .fold(0u64, |t, b| t.saturating_add(b.size))
    }

    /// Decodes an image list, checking it hashes to `expected`, is
    /// canonical and valid, and that no blob is over `max_blob_bytes` nor
    /// the distinct blobs together over `max_total_bytes`.
    pub fn decode(
        bytes: &[u8],
        expected: &Address,
        max_blob_bytes: u64,
        max_total_bytes: u64,
    ) -> Result<Self> {
        if bytes.len() as u64 > MAX_LIST_BYTES {
            return Err(Error::TooLarge {
                what: "image list".into(),
                limit: MAX_LIST_BYTES,
                actual: bytes.len() as u64,
            });
        }
        let actual = sha256_address(bytes);
        if actual != expected.as_str() {
            return Err(Error::ObjectMismatch {
                address: expected.to_string(),
                actual,
            });
        }
        let l: ImageList = codec::decode("image list", bytes, bytes.len())?;
        l.validate(max_blob_bytes, max_total_bytes)?;
        if l.encode() != bytes {
            return Err(bad("not in canonical encoding".into()));
        }
        Ok(l)
    }

    /// Checks format, limits, names, media types, order and uniqueness.
    pub fn validate(&self, max_blob_bytes: u64, max_total_bytes: u64) -> Result<()> {
        if self.format != IMAGES_FORMAT {
            return Err(bad(format!(
                "format version {} (this build understands {IMAGES_FORMAT})",
                self.format
            )));
        }
        if self.images.len() > MAX_IMAGES {
            return Err(bad(format!(
                "{} images, limit {MAX_IMAGES}",
                self.images.len()
            )));
        }
        for (i, im) in self.images.iter().enumerate() {
            let at = || format!("image {i} (`{}`)", shown(&im.reference));
            if im.reference.is_empty() || im.reference.len() > 512 {
                return Err(bad(format!("{}: reference of 1-512 bytes", at())));
            }
            check_registry(&im.registry).map_err(|e| bad(format!("{}: {e}", at())))?;
            check_repository(&im.repository).map_err(|e| bad(format!("{}: {e}", at())))?;
            if !im.tag.is_empty() {
                check_tag(&im.tag).map_err(|e| bad(format!("{}: {e}", at())))?;
            }
            check_platform(&im.platform).map_err(|e| bad(format!("{}: {e}", at())))?;
            if let Some(ix) = &im.index {
                if !is_index_type(&ix.media_type) || ix.size > MAX_MANIFEST_BLOB_BYTES {
                    return Err(bad(format!("{}: index `{}`", at(), shown(&ix.media_type))));
                }
            }
            if !is_manifest_type(&im.manifest.media_type)
                || im.manifest.size > MAX_MANIFEST_BLOB_BYTES
            {
                return Err(bad(format!(
                    "{}: manifest media type `{}` or size {}",
                    at(),
                    shown(&im.manifest.media_type),
                    im.manifest.size
                )));
            }
            if im.blobs.is_empty() || im.blobs.len() > MAX_BLOBS_PER_IMAGE {
                return Err(bad(format!(
                    "{}: {} blobs (1-{MAX_BLOBS_PER_IMAGE})",
                    at(),
                    im.blobs.len()
                )));
            }
            for b in im.all_blobs() {
                if b.media_type.is_empty()
                    || b.media_type.len() > 255
                    || !b.media_type.bytes().all(|c| c.is_ascii_graphic())
                {
                    return Err(bad(format!("{}: blob {}: bad media type", at(), b.digest)));
                }
                if b.size > max_blob_bytes {
                    return Err(Error::TooLarge {
                        what: format!("image blob {} of `{}`", b.digest, shown(&im.reference)),
                        limit: max_blob_bytes,
                        actual: b.size,
                    });
                }
            }
            if i > 0 && sort_key(&self.images[i - 1]) >= sort_key(im) {
                return Err(bad("images are not sorted or not distinct".into()));
            }
        }
        let total = self.total_bytes();
        if total > max_total_bytes {
            return Err(Error::TooLarge {
                what: "images of the bundle".into(),
                limit: max_total_bytes,
                actual: total,
            });
        }
        Ok(())
    }
}

fn sort_key(i: &Image) -> (&str, &str, &str, &str, &str) {
    (
        &i.registry,
        &i.repository,
        &i.tag,
        &i.platform,
        i.manifest.digest.as_str(),
    )
}

fn bad(reason: String) -> Error {
    Error::InvalidManifest(format!("image list: {reason}"))
}

fn shown(s: &str) -> String {
    let t: String = s.chars().take(80).collect();
    cairn_keys::text::escape_untrusted(&t)
}

/// A parsed image reference (the Docker/OCI reference grammar, with the
/// usual normalisation: no registry means `docker.io`, a one-component
/// name on `docker.io` gets `library/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// The reference as written.
    pub written: String,
    /// Registry host (`docker.io`, `registry.example:5000`).
    pub registry: String,
    /// Repository path (`library/nginx`).
    pub repository: String,
    /// The tag (`latest` when neither tag nor digest is written).
    pub tag: Option<String>,
    /// The digest, when written.
    pub digest: Option<Address>,
}

impl ImageRef {
    /// Parses a reference as a container runtime does.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if s.is_empty() || s.len() > 512 {
            return Err("an image reference has 1-512 characters".into());
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(
                    Address::parse(d)
                        .map_err(|_| format!("`{}`: bad digest (sha256 only)", shown(s)))?,
                ),
            ),
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_owned()),
            ),
            None => (rest, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, p))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), p.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        let registry = if registry == "index.docker.io" {
            "docker.io".to_owned()
        } else {
            registry
        };
        let path = if registry == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        check_registry(&registry).map_err(|e| format!("`{}`: {e}", shown(s)))?;
        check_repository(&path).map_err(|e| format!("`{}`: {e}", shown(s)))?;
        if let Some(t) = &tag {
            check_tag(t).map_err(|e| format!("`{}`: {e}", shown(s)))?;
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            _ => tag,
        };
        Ok(Self {
            written: s.to_owned(),
            registry,
            repository: path,
            tag,
            digest,
        })
    }

    /// `registry/repository`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The reference pinned to `digest`: `name@digest` (the tag dropped, as
    /// a runtime ignores it next to a digest).
    pub fn pinned(&self, digest: &Address) -> String {
        let name = self
            .written
            .split_once('@')
            .map_or(self.written.as_str(), |(n, _)| n);
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let name = match name[last_slash..].rfind(':') {
            Some(i) => &name[..last_slash + i],
            None => name,
        };
        format!("{name}@{digest}")
    }
}

/// A registry host: `a-z A-Z 0-9 . -`, an optional `:port`, or an IPv6
/// literal in brackets; 1-255 bytes.
pub fn check_registry(h: &str) -> std::result::Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        && !h.starts_with(['-', '.', ':']);
    if ok {
        Ok(())
    } else {
        Err(format!("bad registry host `{}`", shown(h)))
    }
}

/// A repository path: components of `a-z 0-9` separated by `.`, `_`,
/// `__` or `-`, joined by `/`; at most 255 bytes.
pub fn check_repository(p: &str) -> std::result::Result<(), String> {
    let comp_ok = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.as_bytes()[0].is_ascii_alphanumeric()
            && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
    };
    if p.is_empty() || p.len() > 255 || !p.split('/').all(comp_ok) {
        return Err(format!("bad repository name `{}`", shown(p)));
    }
    Ok(())
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn check_tag(t: &str) -> std::result::Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("bad tag `{}`", shown(t)))
    }
}

/// A platform: `os/arch` or `os/arch/variant`, each `a-z 0-9 . _ -`.
pub fn check_platform(p: &str) -> std::result::Result<(), String> {
    let parts: Vec<&str> = p.split('/').collect();
    let ok = (2..=3).contains(&parts.len())
        && p.len() <= 64
        && parts.iter().all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("bad platform `{}` (os/arch[/variant])", shown(p)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn blob(n: u8, mt: &str, size: u64) -> Blob {
        Blob {
            digest: Address::of(&[n]),
            size,
            media_type: mt.into(),
        }
    }

    fn list() -> ImageList {
        let mut l = ImageList {
            format: IMAGES_FORMAT,
            images: vec![
                Image {
                    reference: "registry.example:5000/app:v1".into(),
                    registry: "registry.example:5000".into(),
                    repository: "app".into(),
                    tag: "v1".into(),
                    platform: "linux/amd64".into(),
                    index: None,
                    manifest: blob(1, MT_OCI_MANIFEST, 400),
                    blobs: vec![
                        blob(2, "application/vnd.oci.image.config.v1+json", 300),
                        blob(3, "application/vnd.oci.image.layer.v1.tar+gzip", 1000),
                    ],
                },
                Image {
                    reference: "nginx:1.25".into(),
                    registry: "docker.io".into(),
                    repository: "library/nginx".into(),
                    tag: "1.25".into(),
                    platform: "linux/arm64/v8".into(),
                    index: Some(blob(9, MT_OCI_INDEX, 700)),
                    manifest: blob(4, MT_DOCKER_MANIFEST, 400),
                    blobs: vec![blob(3, "application/vnd.oci.image.layer.v1.tar+gzip", 1000)],
                },
            ],
        };
        l.sort();
        l
    }

    #[test]
    fn image_lists_round_trip_and_count_shared_blobs_once() {
        let l = list();
        let bytes = l.encode();
        let a = Address::of(&bytes);
        let back = ImageList::decode(&bytes, &a, u64::MAX, u64::MAX).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.images[0].registry, "docker.io", "sorted");
        // blob 3 is shared: counted once.
        assert_eq!(l.total_bytes(), 400 + 300 + 1000 + 400 + 700);
        let e = ImageList::decode(&bytes, &a, 999, u64::MAX).unwrap_err();
        assert!(e.to_string().contains("image blob"), "{e}");
        let e = ImageList::decode(&bytes, &a, u64::MAX, 1000).unwrap_err();
        assert!(e.to_string().contains("images of the bundle"), "{e}");
        let e = ImageList::decode(&bytes, &Address::of(b"x"), u64::MAX, u64::MAX).unwrap_err();
        assert!(matches!(e, Error::ObjectMismatch { .. }), "{e}");
    }

    #[test]
    fn invalid_lists_are_refused() {
        let mut l = list();
        l.images.swap(0, 1);
        let e = l.validate(u64::MAX, u64::MAX).unwrap_err();
        assert!(e.to_string().contains("not sorted"), "{e}");
        let mut l = list();
        l.images[0].manifest.media_type = "text/html".into();
        assert!(l.validate(u64::MAX, u64::MAX).is_err());
        let mut l = list();
        l.images[0].repository = "../etc".into();
        assert!(l.validate(u64::MAX, u64::MAX).is_err());
        let mut l = list();
        l.images[0].tag = "-x".into();
        assert!(l.validate(u64::MAX, u64::MAX).is_err());
        let mut l = list();
        l.format = 2;
        assert!(l.validate(u64::MAX, u64::MAX).is_err());
    }

    #[test]
    fn references_normalise_like_a_runtime() {
        let r = ImageRef::parse("nginx").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/nginx", Some("latest"))
        );
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1.2").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/app", Some("v1.2"))
        );
        let d = Address::of(b"m");
        let r = ImageRef::parse(&format!("ghcr.io/o/app:v1@{d}")).unwrap();
        assert_eq!(r.digest.as_ref(), Some(&d));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.pinned(&d), format!("ghcr.io/o/app@{d}"));
        let r = ImageRef::parse("localhost/app").unwrap();
        assert_eq!(r.registry, "localhost");
        assert_eq!(
            ImageRef::parse("h:5000/app:v1").unwrap().pinned(&d),
            format!("h:5000/app@{d}")
        );
        for bad in ["", "UPPER/x", "x@sha256:zz", "x:-t", "a//b", "x:"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
