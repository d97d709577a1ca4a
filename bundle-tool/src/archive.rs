//! Export and import: a bundle repository's channels as one tar archive,
//! for sneakernet into air-gapped sites.
//!
//! An archive holds the repository layout itself: `roots/<N>`,
//! `objects/sha256/<xx>/<hex>` and `channels/<name>`, in that order
//! (roots by version, objects and channels by path), then, for releases
//! that carry container images, every image blob as
//! `images/sha256/<xx>/<hex>` (by path), as regular files with mode 0644,
//! mtime 0, uid/gid 0 and no user names, so the same repository state
//! always gives the same archive bytes.
//!
//! Image blobs come last so that import verifies the releases and their
//! image lists before it reads a blob: a blob member is accepted only if
//! a verified image list names it with exactly the member's size, and it
//! is streamed (hashed while written, never held in memory) into a
//! temporary directory inside the target repository, from where it is
//! renamed into `objects/` when everything checked out.
//!
//! Import trusts nothing in the archive: every member's type, path and
//! size is checked before it is read (links, devices, GNU long names, PAX
//! headers, `..`, absolute or unexpected paths and oversized members are
//! refused), members are streamed to a temporary directory outside the
//! repository (only roots, boundedly, stay in memory), the root chain,
//! every release and every object are verified there, and only then are
//! objects written, then roots, then channel heads last.

use crate::check::ChannelCheck;
use crate::limits::Limits;
use crate::release::{validate_channel, Release};
use crate::repo::{channel_path, object_path_str, root_path, RepoDir};
use crate::trust::TrustChain;
use crate::verify::{binding_floor, check_sequence};
use crate::{Error, Result};
use cairn_keys::root::MAX_ROOT_BYTES;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    /// Channels and their release sequences.
    pub channels: Vec<(String, u64)>,
    /// Root versions included.
    pub roots: Vec<u64>,
    /// Objects included.
    pub objects: usize,
    /// Image blobs included.
    pub image_blobs: usize,
    /// Bytes of file contents in the archive (image blobs included).
    pub bytes: u64,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Channels whose head was written, with the new sequence.
    pub updated: Vec<(String, u64)>,
    /// Channels already at the archive's release.
    pub unchanged: Vec<String>,
    /// Objects written (absent before).
    pub objects_written: usize,
    /// Image blobs written (absent before; counted in `objects_written`
    /// too).
    pub image_blobs_written: usize,
    /// Objects the archive carried that no channel needs (not written).
    pub unreferenced: usize,
    /// Root versions written.
    pub roots_written: Vec<u64>,
}

/// Exports `channels` of `repo`: each channel is verified first (against
/// `chain`, extended with the repository's roots by the caller), then the
/// chain's roots, the objects the channels need and the channel heads are
/// written to `out` atomically.
pub fn export(
    repo: &RepoDir,
    chain: &TrustChain,
    channels: &[String],
    out: &Path,
    now: u64,
    limits: &Limits,
) -> Result<ExportSummary> {
    if channels.is_empty() {
        return Err(Error::Repository("no channel to export".into()));
    }
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut objects = BTreeSet::new();
    // digest → (size, what) of every image blob the channels carry.
    let mut blobs: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut heads = Vec::new();
    let mut summary_channels = Vec::new();
    for ch in channels {
        validate_channel(ch).map_err(Error::Repository)?;
        let v = ChannelCheck {
            repo,
            fallback: None,
            root: chain.current().root(),
            now,
            limits,
            threads: 2,
        }
        .verify(ch)
        .map_err(|e| Error::Repository(format!("channel `{ch}` does not verify: {e}")))?;
        objects.extend(v.objects.iter().cloned());
        if let Some(images) = &v.images {
            images.note_blobs(ch, &mut blobs);
        }
        summary_channels.push((ch.clone(), v.release.release().sequence));
        heads.push((channel_path(ch), v.release.bytes().to_vec()));
    }
    let roots: Vec<u64> = chain.roots().iter().map(|r| r.root().version).collect();
    for r in chain.roots() {
        files.push((root_path(r.root().version), r.bytes().to_vec()));
    }
    let mut object_paths: Vec<(String, String)> = objects
        .iter()
        .filter_map(|a| object_path_str(a).map(|p| (p, a.clone())))
        .collect();
    object_paths.sort();
    let io = |source| Error::Io {
        path: out.to_path_buf(),
        source,
    };
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let mut bytes = 0u64;
    {
        let mut tar = tar::Builder::new(std::io::BufWriter::new(tmp.as_file_mut()));
        let mut append = |path: &str, data: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_ustar();
            h.set_path(path).map_err(io)?;
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            bytes += data.len() as u64;
            tar.append(&h, data).map_err(io)
        };
        for (p, b) in &files {
            append(p, b)?;
        }
        for (p, address) in &object_paths {
            let data = repo
                .get_object(
                    address,
                    limits.max_object_bytes.max(limits.max_manifest_bytes),
                )?
                .ok_or_else(|| Error::ObjectMissing {
                    address: address.clone(),
                    what: p.clone(),
                })?;
            append(p, &data)?;
        }
        for (p, b) in &heads {
            append(p, b)?;
        }
        // Image blobs last, streamed from the repository and hashed on
        // the way: a blob that is missing, of another size than its list
        // says, or altered fails the export (the archive is not written).
        for (digest, (size, what)) in &blobs {
            let rel = object_path_str(digest)
                .ok_or_else(|| Error::Repository(format!("{what}: malformed digest")))?;
            let src = repo.path().join(&rel);
            let blob_err = |reason: String| {
                Error::Repository(format!(
                    "{what}: {} {reason}; not exported (cairn verify names every bad blob)",
                    src.display()
                ))
            };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&src)
                .map_err(|e| blob_err(format!("cannot be read: {e}")))?;
            let meta = file
                .metadata()
                .map_err(|e| blob_err(format!("cannot be read: {e}")))?;
            if !meta.is_file() || meta.len() != *size {
                return Err(blob_err(format!(
                    "is {} bytes, the image list says {size}",
                    meta.len()
                )));
            }
            let mut h = tar::Header::new_ustar();
            h.set_path(format!("images/{}", rel.trim_start_matches("objects/")))
                .map_err(io)?;
            h.set_size(*size);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            let mut r = HashingReader::new(file.take(*size));
            tar.append(&h, &mut r).map_err(io)?;
            let (n, actual) = r.finish();
            if n != *size {
                return Err(blob_err(format!("ended after {n} of {size} bytes")));
            }
            if actual != *digest {
                return Err(blob_err(format!("content hashes to {actual}")));
            }
            bytes += n;
        }
        let mut w = tar.into_inner().map_err(io)?;
        w.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(out).map_err(|e| io(e.error))?;
    Ok(ExportSummary {
        channels: summary_channels,
        roots,
        objects: object_paths.len(),
        image_blobs: blobs.len(),
        bytes,
    })
}

/// A reader that hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: cairn_keys::AddressHasher,
    n: u64,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: cairn_keys::AddressHasher::default(),
            n: 0,
        }
    }

    /// Bytes read and their `sha256:` address.
    fn finish(self) -> (u64, String) {
        (self.n, self.hasher.finish())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.hasher.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
}

/// A member path an archive may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Member {
    Root(u64),
    Channel(String),
    Object(String),
    /// An image blob (`images/sha256/XX/HEX`), by address.
    Blob(String),
    /// A directory entry on the way to the above (ignored).
    Dir,
}

fn classify(path: &str) -> Option<Member> {
    let parts: Vec<&str> = path.split('/').collect();
    let is_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match parts.as_slice() {
        ["roots"] | ["channels"] | ["objects"] | ["objects", "sha256"] => Some(Member::Dir),
        ["objects", "sha256", xx] if xx.len() == 2 && is_hex(xx) => Some(Member::Dir),
        ["images"] | ["images", "sha256"] => Some(Member::Dir),
        ["images", "sha256", xx] if xx.len() == 2 && is_hex(xx) => Some(Member::Dir),
        ["images", "sha256", xx, hex] => (hex.len() == 64 && is_hex(hex) && hex[..2] == **xx)
            .then(|| Member::Blob(format!("sha256:{hex}"))),
        ["roots", n] => {
            let v: u64 = n.parse().ok()?;
            (v >= 1 && n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0'))
                .then_some(Member::Root(v))
        }
        ["channels", name] => validate_channel(name)
            .ok()
            .map(|_| Member::Channel((*name).to_owned())),
        ["objects", "sha256", xx, hex] => (hex.len() == 64 && is_hex(hex) && hex[..2] == **xx)
            .then(|| Member::Object(format!("sha256:{hex}"))),
        _ => None,
    }
}

/// Most bytes of root members an archive may carry in total. Roots are
/// the only members held in memory until the chain is checked (a root is
/// about a kilobyte; this allows thousands of rotations).
pub const MAX_ARCHIVE_ROOT_BYTES: u64 = 4 << 20;

/// Copies at most `limit` bytes of `from` into a new file `to`, hashing
/// them; returns the byte count (`limit + 1` means "more than `limit`")
/// and the `sha256:` address of what was read.
fn copy_hashed(from: &mut impl Read, to: &Path, limit: u64) -> std::io::Result<(u64, String)> {
    let mut out = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(to)?,
    );
    let mut hasher = cairn_keys::AddressHasher::default();
    let mut from = from.take(limit.saturating_add(1));
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let k = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..k]);
        out.write_all(&buf[..k])?;
        n += k as u64;
    }
    out.flush()?;
    Ok((n, hasher.finish()))
}

/// Imports an archive into `repo`. `chain` is the trusted start (the
/// embedded root or `--root` files); it is extended with the archive's and
/// the repository's roots. See the module documentation for the checks.
///
/// Memory stays within fixed bounds whatever the archive holds: each
/// member's size is checked against its kind's limit before it is read,
/// objects and channel files are written to the staging directory as they
/// are read (objects hashed on the way), and only roots stay in memory, at
/// most [`MAX_ARCHIVE_ROOT_BYTES`] of them. The tar is read raw: GNU long
/// names and PAX headers, which the tar reader would otherwise buffer
/// whole, are refused like any other non-regular member.
///
/// Image blobs (`images/...`, after every other member) are read only
/// once the channels and their image lists verified: each must be named
/// by a verified list with exactly its member size, and is streamed into
/// a temporary directory inside `repo` (hashed while written). On any
/// error nothing is left in `repo` (a repository directory this import
/// created is removed again).
pub fn import(
    archive: &Path,
    repo: &RepoDir,
    chain: TrustChain,
    now: u64,
    limits: &Limits,
) -> Result<ImportSummary> {
    import_with_blobs(archive, repo, chain, now, limits, &BTreeMap::new())
}

/// [`import`], with image blobs the archive does not carry taken from
/// `prestaged` (digest → a file on `repo`'s file system that the caller
/// already verified against the digest, as `cairn pull` does while
/// downloading): each one a release's image list names is checked for
/// its listed size and moved into `objects/`; the others are left alone.
pub fn import_with_blobs(
    archive: &Path,
    repo: &RepoDir,
    chain: TrustChain,
    now: u64,
    limits: &Limits,
    prestaged: &BTreeMap<String, std::path::PathBuf>,
) -> Result<ImportSummary> {
    let existed = repo.path().exists();
    let r = import_inner(archive, repo, chain, now, limits, prestaged);
    if r.is_err() && !existed {
        // Only an empty directory: removing it fails otherwise.
        let _ = std::fs::remove_dir(repo.path());
    }
    r
}

/// The verified channels of a staged archive and what importing them
/// writes.
struct Checked {
    summary: ImportSummary,
    /// Objects the channels need (image lists included).
    needed: BTreeSet<String>,
    /// Channel heads to write, with their sequences.
    heads: Vec<(String, u64)>,
    /// Image blobs the channels need: digest → (size, what).
    blobs: BTreeMap<String, (u64, String)>,
}

fn import_inner(
    archive: &Path,
    repo: &RepoDir,
    mut chain: TrustChain,
    now: u64,
    limits: &Limits,
    prestaged: &BTreeMap<String, std::path::PathBuf>,
) -> Result<ImportSummary> {
    let bad = |reason: String| Error::Archive {
        path: archive.to_path_buf(),
        reason,
    };
    let io = |source| Error::Io {
        path: archive.to_path_buf(),
        source,
    };
    let staging_dir = tempfile::Builder::new()
        .prefix("cairn-import-")
        .tempdir()
        .map_err(|e| Error::Io {
            path: std::env::temp_dir(),
            source: e,
        })?;
    let stage = RepoDir::new(staging_dir.path());
    let stage_io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let file = std::fs::File::open(archive).map_err(io)?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let max_members = limits.max_entries.saturating_mul(4).saturating_add(1024);
    let max_total = limits.max_bundle_bytes.saturating_mul(4);
    let mut total = 0u64;
    let mut root_bytes = 0u64;
    let mut seen = BTreeSet::new();
    let mut roots: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut channels: BTreeSet<String> = BTreeSet::new();
    let mut archived_objects = BTreeSet::new();
    // Set when the first image blob member arrives: the channels verified.
    let mut checked: Option<Checked> = None;
    // Image blobs read so far, in a temporary directory inside `repo`.
    let mut blob_stage: Option<tempfile::TempDir> = None;
    let mut staged_blobs: BTreeMap<String, std::path::PathBuf> = BTreeMap::new();
    for (n, entry) in tar
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?
        .raw(true)
        .enumerate()
    {
        let mut entry = entry.map_err(|e| bad(format!("malformed tar member {n}: {e}")))?;
        if n >= max_members {
            return Err(bad(format!("more than {max_members} members")));
        }
        let raw = entry.path_bytes().into_owned();
        let path =
            String::from_utf8(raw).map_err(|_| bad(format!("member {n}: path is not UTF-8")))?;
        let shown = cairn_keys::text::escape_untrusted(&path);
        if path.starts_with('/') {
            return Err(bad(format!(
                "member `{shown}`: absolute paths are not allowed"
            )));
        }
        let trimmed = path.strip_suffix('/').unwrap_or(&path);
        if trimmed
            .split('/')
            .any(|c| c == ".." || c == "." || c.is_empty())
        {
            return Err(bad(format!(
                "member `{shown}`: path traversal (`..`, `.` or empty components) is not allowed"
            )));
        }
        let kind = entry.header().entry_type();
        let member = classify(trimmed).ok_or_else(|| {
            bad(format!(
                "unexpected member `{shown}`: an archive holds only roots/N, channels/NAME, objects/sha256/XX/HEX and images/sha256/XX/HEX"
            ))
        })?;
        match (kind, &member) {
            (tar::EntryType::Directory, Member::Dir) => continue,
            (tar::EntryType::Regular | tar::EntryType::Continuous, m) if *m != Member::Dir => {}
            (tar::EntryType::Regular | tar::EntryType::Continuous, _) => {
                return Err(bad(format!("member `{shown}`: expected a directory entry")))
            }
            (tar::EntryType::Symlink, _) => {
                return Err(bad(format!(
                    "member `{shown}`: symbolic links are not allowed"
                )))
            }
            (tar::EntryType::Link, _) => {
                return Err(bad(format!("member `{shown}`: hard links are not allowed")))
            }
            (t, _) => {
                return Err(bad(format!(
                    "member `{shown}`: {t:?} entries are not allowed (regular files only)"
                )))
            }
        }
        if !seen.insert(trimmed.to_owned()) {
            return Err(bad(format!("member `{shown}` appears twice")));
        }
        let size = entry
            .header()
            .size()
            .map_err(|e| bad(format!("member `{shown}`: {e}")))?;
        if let Member::Blob(address) = &member {
            // The releases and their image lists first (every other
            // member came before the blobs).
            let c = match &mut checked {
                Some(c) => c,
                None => checked.insert(verify_staged(
                    archive,
                    repo,
                    &stage,
                    &mut chain,
                    &roots,
                    &channels,
                    &archived_objects,
                    now,
                    limits,
                )?),
            };
            let Some((want, what)) = c.blobs.get(address) else {
                return Err(bad(format!(
                    "member `{shown}`: image blob {address} is not named by the image list of any release in the archive"
                )));
            };
            if size != *want {
                return Err(bad(format!(
                    "{what}: member `{shown}` is {size} bytes, the image list says {want}"
                )));
            }
            let dir = match &blob_stage {
                Some(d) => d.path().to_path_buf(),
                None => {
                    std::fs::create_dir_all(repo.path()).map_err(stage_io(repo.path()))?;
                    let d = tempfile::Builder::new()
                        .prefix(".cairn-import-")
                        .tempdir_in(repo.path())
                        .map_err(stage_io(repo.path()))?;
                    blob_stage.insert(d).path().to_path_buf()
                }
            };
            let dest = dir.join(address.trim_start_matches("sha256:"));
            let read = cairn_oci::blobfile::copy_verified(&mut entry, address, size, &dest, what)
                .map_err(|e| bad(format!("member `{shown}`: {e}")))?;
            if read != size {
                let _ = std::fs::remove_file(&dest);
                return Err(bad(format!("{what}: member `{shown}` is truncated")));
            }
            staged_blobs.insert(address.clone(), dest);
            continue;
        }
        if checked.is_some() {
            return Err(bad(format!(
                "member `{shown}` comes after the image blobs (images/... members are last)"
            )));
        }
        let limit = match &member {
            Member::Root(_) => MAX_ROOT_BYTES as u64,
            Member::Channel(_) => limits.max_release_bytes,
            _ => limits.max_object_bytes.max(limits.max_manifest_bytes),
        };
        if size > limit {
            return Err(bad(format!(
                "member `{shown}` is {size} bytes, over the limit of {limit}"
            )));
        }
        total = total.saturating_add(size);
        if total > max_total {
            return Err(bad(format!("archive contents exceed {max_total} bytes")));
        }
        match member {
            Member::Object(address) => {
                // Straight to the staging directory, hashed on the way.
                let rel = object_path_str(&address)
                    .ok_or_else(|| bad(format!("member `{shown}`: malformed object address")))?;
                let dest = staging_dir.path().join(rel);
                let dir = dest.parent().unwrap_or(staging_dir.path()).to_path_buf();
                std::fs::create_dir_all(&dir).map_err(stage_io(&dir))?;
                let tmp = dir.join(".partial");
                let (read, actual) =
                    copy_hashed(&mut entry, &tmp, limit).map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => {
                            bad(format!("member `{shown}` is truncated"))
                        }
                        _ => bad(format!("member `{shown}`: {e}")),
                    })?;
                if read != size {
                    return Err(bad(format!("member `{shown}` is truncated")));
                }
                if actual != address {
                    return Err(bad(format!("member `{shown}`: content hashes to {actual}")));
                }
                std::fs::rename(&tmp, &dest).map_err(stage_io(&dest))?;
                archived_objects.insert(address);
            }
            Member::Root(_) | Member::Channel(_) => {
                if let Member::Root(_) = member {
                    root_bytes = root_bytes.saturating_add(size);
                    if root_bytes > MAX_ARCHIVE_ROOT_BYTES {
                        return Err(bad(format!(
                            "root members exceed {MAX_ARCHIVE_ROOT_BYTES} bytes in total"
                        )));
                    }
                }
                // `size` is at most the member kind's small limit.
                let mut data = Vec::with_capacity(size as usize);
                (&mut entry)
                    .take(limit + 1)
                    .read_to_end(&mut data)
                    .map_err(|e| bad(format!("member `{shown}`: {e}")))?;
                if data.len() as u64 != size {
                    return Err(bad(format!("member `{shown}` is truncated")));
                }
                match member {
                    Member::Root(v) => roots.push((v, data)),
                    Member::Channel(name) => {
                        // Staged now; read back one at a time to verify.
                        let dest = staging_dir.path().join(channel_path(&name));
                        let dir = dest.parent().unwrap_or(staging_dir.path()).to_path_buf();
                        std::fs::create_dir_all(&dir).map_err(stage_io(&dir))?;
                        std::fs::write(&dest, &data).map_err(stage_io(&dest))?;
                        channels.insert(name);
                    }
                    _ => {}
                }
            }
            Member::Blob(_) | Member::Dir => {}
        }
    }
    let checked = match checked {
        Some(c) => c,
        None => verify_staged(
            archive,
            repo,
            &stage,
            &mut chain,
            &roots,
            &channels,
            &archived_objects,
            now,
            limits,
        )?,
    };
    let Checked {
        mut summary,
        needed,
        heads,
        blobs,
    } = checked;

    // Every image blob the releases name: from the archive, or already in
    // the repository (as a regular file of the listed size).
    for (digest, (size, what)) in &blobs {
        if staged_blobs.contains_key(digest) {
            continue;
        }
        if let Some(file) = prestaged.get(digest) {
            let len = std::fs::symlink_metadata(file)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len());
            if len != Some(*size) {
                return Err(bad(format!(
                    "{what}: {} is {len:?} bytes, the image list says {size}",
                    file.display()
                )));
            }
            staged_blobs.insert(digest.clone(), file.clone());
            continue;
        }
        let in_repo = object_path_str(digest)
            .and_then(|rel| std::fs::symlink_metadata(repo.path().join(rel)).ok())
            .is_some_and(|m| m.is_file() && m.len() == *size);
        if !in_repo {
            return Err(bad(format!(
                "{what}: missing from the archive (no member images/{}) and from {}",
                object_path_str(digest)
                    .unwrap_or_default()
                    .trim_start_matches("objects/"),
                repo.path().display()
            )));
        }
    }

    // Write: objects and image blobs, roots, channel heads last.
    let staged_channel = |name: &str| -> Result<Vec<u8>> {
        stage
            .channel(name, limits.max_release_bytes)?
            .ok_or_else(|| {
                bad(format!(
                    "{}: missing from the staging area",
                    channel_path(name)
                ))
            })
    };
    let mut batch = repo.object_batch();
    for address in &needed {
        if repo.has_object(address) {
            continue;
        }
        if let Some(data) = stage.get_object(
            address,
            limits.max_object_bytes.max(limits.max_manifest_bytes),
        )? {
            batch.add(address, &data)?;
        }
    }
    for (address, file) in staged_blobs {
        if batch.add_verified_file(&address, file)? {
            summary.image_blobs_written += 1;
        }
    }
    summary.objects_written = batch.commit()?;
    for r in chain.roots() {
        let rel = root_path(r.root().version);
        if roots.iter().any(|(v, _)| *v == r.root().version)
            && repo.read(&rel, MAX_ROOT_BYTES as u64)?.is_none()
        {
            repo.write(&rel, r.bytes())?;
            summary.roots_written.push(r.root().version);
        }
    }
    for (name, seq) in heads {
        repo.write(&channel_path(&name), &staged_channel(&name)?)?;
        summary.updated.push((name, seq));
    }
    drop(blob_stage);
    Ok(summary)
}

/// Verifies the staged channels (objects may also come from the target
/// repository) and decides what to write.
#[allow(clippy::too_many_arguments)]
fn verify_staged(
    archive: &Path,
    repo: &RepoDir,
    stage: &RepoDir,
    chain: &mut TrustChain,
    roots: &[(u64, Vec<u8>)],
    channels: &BTreeSet<String>,
    archived_objects: &BTreeSet<String>,
    now: u64,
    limits: &Limits,
) -> Result<Checked> {
    let bad = |reason: String| Error::Archive {
        path: archive.to_path_buf(),
        reason,
    };
    if channels.is_empty() {
        return Err(bad("no channels/NAME member: nothing to import".into()));
    }
    chain.extend(&format!("archive {}", archive.display()), roots)?;
    chain.extend(&repo.path().display().to_string(), &repo.roots()?)?;
    let mut summary = ImportSummary::default();
    let mut needed = BTreeSet::new();
    let mut heads = Vec::new();
    let mut blobs = BTreeMap::new();
    let chain_roots: Vec<cairn_keys::Root> =
        chain.roots().iter().map(|r| r.root().clone()).collect();
    let epoch = cairn_keys::root::release_epoch(&chain_roots).to_vec();
    for name in channels {
        let bytes = stage
            .channel(name, limits.max_release_bytes)?
            .ok_or_else(|| {
                bad(format!(
                    "{}: missing from the staging area",
                    channel_path(name)
                ))
            })?;
        let v = ChannelCheck {
            repo: stage,
            fallback: Some(repo),
            root: chain.current().root(),
            now,
            limits,
            threads: 2,
        }
        .verify(name)
        .map_err(|e| bad(format!("{}: {e}", channel_path(name))))?;
        needed.extend(v.objects.iter().cloned());
        if let Some(images) = &v.images {
            images.note_blobs(name, &mut blobs);
        }
        let seq = v.release.release().sequence;
        match repo.channel(name, limits.max_release_bytes)? {
            Some(existing) if existing == bytes => summary.unchanged.push(name.clone()),
            Some(existing) => {
                let (_, old) = Release::decode_envelope(&existing, limits.max_release_bytes)
                    .map_err(|e| {
                        Error::Repository(format!(
                            "{}: the repository's channel head is unreadable ({e}); repair or remove it",
                            repo.path().join(channel_path(name)).display()
                        ))
                    })?;
                // The same rollback rule as an agent's: the repository's
                // head binds only inside the current release epoch.
                let floor = binding_floor(&epoch, Some((old.sequence, &existing)), limits);
                check_sequence(name, floor, seq)?;
                heads.push((name.clone(), seq));
            }
            None => heads.push((name.clone(), seq)),
        }
    }
    summary.unreferenced = archived_objects.difference(&needed).count();
    Ok(Checked {
        summary,
        needed,
        heads,
        blobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_paths() {
        let hex = "ab".repeat(32);
        assert_eq!(classify("roots/1"), Some(Member::Root(1)));
        assert_eq!(classify("roots/01"), None);
        assert_eq!(classify("roots/0"), None);
        assert_eq!(
            classify("channels/stable"),
            Some(Member::Channel("stable".into()))
        );
        assert_eq!(classify("channels/Bad"), None);
        assert_eq!(
            classify(&format!("objects/sha256/ab/{hex}")),
            Some(Member::Object(format!("sha256:{hex}")))
        );
        assert_eq!(classify(&format!("objects/sha256/cd/{hex}")), None);
        assert_eq!(classify("objects/sha256/ab"), Some(Member::Dir));
        assert_eq!(
            classify(&format!("images/sha256/ab/{hex}")),
            Some(Member::Blob(format!("sha256:{hex}")))
        );
        assert_eq!(classify(&format!("images/sha256/cd/{hex}")), None);
        assert_eq!(classify("images/sha256/ab"), Some(Member::Dir));
        assert_eq!(classify("images/x"), None);
        assert_eq!(classify("etc/passwd"), None);
        assert_eq!(classify("roots/1/x"), None);
    }
}
