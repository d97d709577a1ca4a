//! Verifying a channel of a bundle repository directory: the release
//! envelope (signatures and threshold against a trusted root, channel,
//! expiry), the bundle manifest, and every object by address.
//!
//! Used by `cairn verify`, `cairn export` (never export what does not
//! verify) and `cairn import` (on the staged archive before anything is
//! written). Objects are hashed on a few threads; every bad or missing
//! object is reported, each named by its repository path and the entry it
//! belongs to.

use crate::bundle::{Entry, Manifest};
use crate::limits::Limits;
use crate::repo::{channel_path, object_path_str, RepoDir};
use crate::verify::{ReleaseCheck, VerifiedRelease};
use crate::{Error, Result};
use cairn_core::images::{
    Blob, ImageList, DEFAULT_MAX_BLOB_BYTES, DEFAULT_MAX_TOTAL_BYTES, MAX_LIST_BYTES,
};
use cairn_keys::{sha256_address, Root};
use std::io::Read;

/// What to verify a channel against.
#[derive(Clone, Debug)]
pub struct ChannelCheck<'a> {
    /// Where the channel head and objects are read.
    pub repo: &'a RepoDir,
    /// Objects missing from `repo` may be taken from here (import checks a
    /// staged archive against what the target repository already holds).
    pub fallback: Option<&'a RepoDir>,
    /// The trusted root (newest of the chain).
    pub root: &'a Root,
    /// Now, Unix seconds.
    pub now: u64,
    /// Size limits.
    pub limits: &'a Limits,
    /// Hashing threads (at least 1).
    pub threads: usize,
}

/// A channel whose release and every object verified.
#[derive(Clone, Debug)]
pub struct VerifiedChannel {
    /// The verified release.
    pub release: VerifiedRelease,
    /// The bundle manifest.
    pub manifest: Manifest,
    /// Addresses of every object the release needs: the manifest (format
    /// 2: its top document) first, then (format 2) its chunks in order,
    /// then the entries' objects (deduplicated, in entry order).
    pub objects: Vec<String>,
    /// Total bytes of those objects (manifest included).
    pub bytes: u64,
    /// Size of the document at the bundle id.
    pub manifest_size: u64,
    /// Format 2: each manifest chunk's address and size, in order.
    pub chunks: Vec<(String, u64)>,
    /// The bundle's image list, when it carries images (its address is
    /// also the last of [`VerifiedChannel::objects`]). Its blobs are not
    /// checked by [`ChannelCheck::verify`]: see
    /// [`ChannelCheck::check_image_blobs`].
    pub images: Option<VerifiedImages>,
}

/// A bundle's image list, read and verified against the address in its
/// manifest (`cairn_core::images`).
#[derive(Clone, Debug)]
pub struct VerifiedImages {
    /// The list's address.
    pub address: cairn_core::Address,
    /// Its size in bytes.
    pub size: u64,
    /// The list.
    pub list: ImageList,
}

impl VerifiedImages {
    /// Every distinct blob (digest order) with the reference of the first
    /// image naming it, for messages.
    pub fn blobs(&self) -> Vec<(&Blob, &str)> {
        self.list
            .distinct_blobs()
            .into_iter()
            .map(|b| {
                let reference = self
                    .list
                    .images
                    .iter()
                    .find(|i| i.all_blobs().any(|x| x.digest == b.digest))
                    .map_or("", |i| i.reference.as_str());
                (b, reference)
            })
            .collect()
    }

    /// Adds every blob of the list to `blobs` (digest → size and a
    /// description naming the image and `channel`, escaped for a
    /// terminal), keeping the first description of a blob two channels
    /// share.
    pub fn note_blobs(
        &self,
        channel: &str,
        blobs: &mut std::collections::BTreeMap<String, (u64, String)>,
    ) {
        for (b, reference) in self.blobs() {
            blobs.entry(b.digest.to_string()).or_insert_with(|| {
                (
                    b.size,
                    format!(
                        "image blob {} of `{}` (channel `{channel}`)",
                        b.digest,
                        cairn_keys::text::escape_untrusted(reference)
                    ),
                )
            });
        }
    }
}

impl ChannelCheck<'_> {
    /// Verifies `channel`. Errors: the channel head missing, unreadable or
    /// failing [`ReleaseCheck::verify`] (returned as is; callers add the
    /// `channels/NAME` context); or [`Error::Objects`] listing every
    /// missing or mismatched object.
    pub fn verify(&self, channel: &str) -> Result<VerifiedChannel> {
        let head = self
            .repo
            .channel(channel, self.limits.max_release_bytes)?
            .ok_or_else(|| {
                Error::Repository(format!(
                    "channel `{channel}` not found: no {} in {}",
                    channel_path(channel),
                    self.repo.path().display()
                ))
            })?;
        let release = ReleaseCheck {
            root: self.root,
            channel,
            last_sequence: None,
            now: self.now,
            limits: self.limits,
        }
        .verify(&head)?;
        let id = release.release().bundle.clone();
        let mpath = object_path_str(&id).unwrap_or_default();
        let mbytes = match self.read(&id, self.limits.max_manifest_bytes) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(Error::Objects {
                    problems: vec![format!("{mpath}: missing (bundle manifest {id})")],
                })
            }
            Err(e) => {
                return Err(Error::Objects {
                    problems: vec![format!("{mpath}: {e} (bundle manifest)")],
                })
            }
        };
        if sha256_address(&mbytes) != id {
            return Err(Error::Objects {
                problems: vec![format!(
                    "{mpath}: content hashes to {} (bundle manifest)",
                    sha256_address(&mbytes)
                )],
            });
        }
        let mut chunks = Vec::new();
        let manifest = Manifest::load(&mbytes, Some(&id), self.limits, |a, size| {
            let path = object_path_str(a).unwrap_or_default();
            let n = chunks.len() + 1;
            let b = self.read(a, size).map_err(|e| Error::Objects {
                problems: vec![format!("{path}: {e} (bundle manifest chunk {n})")],
            })?;
            let b = b.ok_or_else(|| Error::Objects {
                problems: vec![format!("{path}: missing (bundle manifest chunk {n})")],
            })?;
            let actual = sha256_address(&b);
            if actual != a.as_str() {
                return Err(Error::Objects {
                    problems: vec![format!(
                        "{path}: content hashes to {actual} (bundle manifest chunk {n})"
                    )],
                });
            }
            chunks.push((a.to_string(), b.len() as u64));
            Ok(Some(b))
        })?;
        let mut seen = std::collections::BTreeSet::new();
        let entries: Vec<&Entry> = manifest
            .entries
            .iter()
            .filter(|e| seen.insert(e.object.clone()))
            .collect();
        let problems = self.check_objects(&entries);
        if !problems.is_empty() {
            return Err(Error::Objects { problems });
        }
        let images = self.image_list(&manifest)?;
        let mut objects = vec![id.to_string()];
        objects.extend(chunks.iter().map(|(a, _)| a.clone()));
        objects.extend(entries.iter().map(|e| e.object.to_string()));
        if let Some(i) = &images {
            objects.push(i.address.to_string());
        }
        let bytes = mbytes.len() as u64
            + chunks.iter().map(|(_, s)| s).sum::<u64>()
            + entries.iter().map(|e| e.size).sum::<u64>()
            + images.as_ref().map_or(0, |i| i.size);
        Ok(VerifiedChannel {
            release,
            manifest,
            objects,
            bytes,
            manifest_size: mbytes.len() as u64,
            chunks,
            images,
        })
    }

    /// Reads and verifies the manifest's image list, if it names one
    /// (default limits: `cairn_core::images::DEFAULT_MAX_*`).
    fn image_list(&self, manifest: &Manifest) -> Result<Option<VerifiedImages>> {
        let Some(addr) = cairn_core::images::list_address(manifest) else {
            return Ok(None);
        };
        let path = object_path_str(addr).unwrap_or_default();
        let problem = |p: String| Error::Objects { problems: vec![p] };
        let bytes = match self.read(addr.as_str(), MAX_LIST_BYTES) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(problem(format!("{path}: missing (image list {addr})"))),
            Err(e) => return Err(problem(format!("{path}: {e} (image list {addr})"))),
        };
        let list = ImageList::decode(
            &bytes,
            addr,
            DEFAULT_MAX_BLOB_BYTES,
            DEFAULT_MAX_TOTAL_BYTES,
        )
        .map_err(|e| problem(format!("{path}: {e} (image list {addr})")))?;
        Ok(Some(VerifiedImages {
            address: addr.clone(),
            size: bytes.len() as u64,
            list,
        }))
    }

    /// Checks every blob of a verified image list: present (in the
    /// repository or the fallback) as a regular file of exactly the
    /// list's size, and hashing to its digest (streamed, never held in
    /// memory). Returns one line per problem, each naming the blob's file,
    /// digest and image; empty when all are good.
    pub fn check_image_blobs(&self, images: &VerifiedImages) -> Vec<String> {
        let blobs = images.blobs();
        let threads = self.threads.clamp(1, 64).min(blobs.len().max(1));
        let mut found: Vec<(usize, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let blobs = &blobs;
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for (i, (b, r)) in blobs.iter().enumerate().skip(t).step_by(threads) {
                            if let Some(p) = self.check_blob(b, r) {
                                out.push((i, p));
                            }
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec![(0, "image blob check thread panicked".into())])
                })
                .collect()
        });
        found.sort();
        found.into_iter().map(|(_, p)| p).collect()
    }

    fn check_blob(&self, b: &Blob, reference: &str) -> Option<String> {
        let rel = object_path_str(b.digest.as_str())?;
        let what = format!(
            "image blob {} of `{}`",
            b.digest,
            cairn_keys::text::escape_untrusted(reference)
        );
        let mut dirs = vec![self.repo];
        dirs.extend(self.fallback);
        for dir in dirs {
            let p = dir.path().join(&rel);
            let meta = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Some(format!("{rel}: {e} ({what})")),
            };
            if !meta.is_file() {
                return Some(format!("{rel}: not a regular file ({what})"));
            }
            if meta.len() != b.size {
                return Some(format!(
                    "{rel}: {} bytes, the image list says {} ({what})",
                    meta.len(),
                    b.size
                ));
            }
            return match hash_file(&p, b.size) {
                Ok(actual) if actual == b.digest.as_str() => None,
                Ok(actual) => Some(format!("{rel}: content hashes to {actual} ({what})")),
                Err(e) => Some(format!("{rel}: {e} ({what})")),
            };
        }
        Some(format!("{rel}: missing ({what})"))
    }

    fn read(&self, address: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let rel = object_path_str(address)
            .ok_or_else(|| Error::Repository(format!("malformed object address `{address}`")))?;
        match self.repo.read(&rel, limit)? {
            Some(b) => Ok(Some(b)),
            None => match self.fallback {
                Some(f) => f.read(&rel, limit),
                None => Ok(None),
            },
        }
    }

    /// Checks every entry's object; returns one line per problem, in entry
    /// order.
    fn check_objects(&self, entries: &[&Entry]) -> Vec<String> {
        let threads = self.threads.clamp(1, 64).min(entries.len().max(1));
        let mut found: Vec<(usize, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for (i, e) in entries.iter().enumerate().skip(t).step_by(threads) {
                            if let Some(p) = self.check_object(e) {
                                out.push((i, p));
                            }
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec![(0, "object check thread panicked".into())])
                })
                .collect()
        });
        found.sort();
        found.into_iter().map(|(_, p)| p).collect()
    }

    fn check_object(&self, e: &Entry) -> Option<String> {
        let what = format!(
            "{} from {} document {}",
            e.display_name(),
            e.path,
            e.document
        );
        let Some(rel) = object_path_str(&e.object) else {
            return Some(format!("malformed object address `{}` ({what})", e.object));
        };
        match self.read(&e.object, self.limits.max_object_bytes) {
            Ok(None) => Some(format!("{rel}: missing ({what})")),
            Err(err) => Some(format!("{rel}: {err} ({what})")),
            Ok(Some(bytes)) => {
                let actual = sha256_address(&bytes);
                (actual != e.object).then(|| format!("{rel}: content hashes to {actual} ({what})"))
            }
        }
    }
}

/// The `sha256:` address of at most `limit` bytes of the file at `p`,
/// streamed (`O_NOFOLLOW`: a symbolic link is an error).
pub(crate) fn hash_file(p: &std::path::Path, limit: u64) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)?;
    let mut r = f.take(limit);
    let mut h = cairn_keys::AddressHasher::default();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => h.update(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(h.finish())
}
