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
use cairn_keys::{sha256_address, Root};

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
        let mut objects = vec![id.to_string()];
        objects.extend(chunks.iter().map(|(a, _)| a.clone()));
        objects.extend(entries.iter().map(|e| e.object.to_string()));
        let bytes = mbytes.len() as u64
            + chunks.iter().map(|(_, s)| s).sum::<u64>()
            + entries.iter().map(|e| e.size).sum::<u64>();
        Ok(VerifiedChannel {
            release,
            manifest,
            objects,
            bytes,
            manifest_size: mbytes.len() as u64,
            chunks,
        })
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
