//! The object pack: object bodies (objects and format 2 manifest chunks)
//! appended to `<dataDir>/objects/pack-<gen>.pack`, found through a sorted
//! on-disk index `pack-<gen>.idx`, like git's pack and `.idx`. sled keeps
//! none of them, so its in-memory size does not grow with the bundle
//! (docs/PERFORMANCE.md, "Memory"; byte layout in docs/FORMATS.md, "Agent
//! store").
//!
//! * **Writes** append the body to the pack (at the pack's logical end,
//!   with `pwrite`) and note `(offset, length)` in a small in-memory table
//!   of *pending* entries.
//! * **Index writes** ([`Pack::write_index`], from every [`Store::flush`]
//!   and whenever [`PENDING_MAX`] entries are pending): fsync the pack,
//!   then stream a merge of the current index and the pending entries into
//!   a temporary file, fsync it, rename it over `pack-<gen>.idx`, fsync the
//!   directory. So the pack holds an object before any index names it, and
//!   both are durable before the sled transaction that switches a head.
//! * **Reads** look up the pending table, then the index: a 256-bucket
//!   fan-out table (1 KiB, built when the index is opened) narrows the
//!   search to one bucket, which is binary-searched with `pread` until a
//!   few entries are left and those are read at once. Neither file is read
//!   whole into the heap nor mapped. The length is bounded by
//!   [`MAX_OBJECT_BYTES`] and the pack's indexed end (checked when the
//!   index is opened) before anything is allocated, and the caller hashes
//!   the bytes against the address.
//! * **Crash**: bytes after the index's recorded pack end (appended, never
//!   indexed) are cut off at open; a generation without an index is an
//!   unfinished compaction (removed); older generations than the newest
//!   indexed one are a finished compaction's leftovers (removed).
//! * **GC**: removing an object (a corrupt copy, before it is fetched
//!   again) is a *tombstone* in the pending table: the next index omits
//!   it. Its bytes, and those of replaced copies, are garbage; when
//!   garbage exceeds the live bytes and [`COMPACT_MIN_GARBAGE`], a flush
//!   compacts: every live object is copied (and hash-checked: a corrupt
//!   body is dropped) into generation `gen + 1`, its pack and index are
//!   made durable, then the old pair is deleted.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// First bytes of a pack file.
pub(super) const PACK_MAGIC: &[u8; 8] = b"CAIRNPAK";
/// First bytes of an index file.
pub(super) const IDX_MAGIC: &[u8; 8] = b"CAIRNIDX";
/// Version of both files' layout.
pub(super) const PACK_VERSION: u32 = 1;
/// Pack header: magic, version (u32), zero (u32), generation (u64).
pub(super) const PACK_HEADER: u64 = 24;
/// Index header: magic, version (u32), entry size (u32), generation
/// (u64), entry count (u64), pack end (u64), SHA-256 (32 bytes).
pub(super) const IDX_HEADER: u64 = 72;
/// Index entry: digest (32 bytes), offset (u64), length (u32).
pub(super) const ENTRY: u64 = 44;

/// Largest object the pack stores or reads (4× the default largest
/// manifest, far above the default largest object, 2 MiB). A length in an
/// index above it is corruption, refused before allocating.
pub const MAX_OBJECT_BYTES: u64 = 64 << 20;

/// Pending entries after which a write also writes the index, so the
/// in-memory table stays small during a large sync (at most about
/// 4096 × 80 bytes).
pub(super) const PENDING_MAX: usize = 4096;

/// Garbage (bytes of removed or replaced objects) below which a pack is
/// never compacted.
pub(super) const COMPACT_MIN_GARBAGE: u64 = 1 << 20;

/// Entries at most read with one `pread` at the end of a search.
const SCAN: u64 = 64;

/// A pack failure: an IO error, or a file that fails a check.
#[derive(Debug)]
pub(super) enum PackError {
    Io(String, std::io::Error),
    Corrupt(String),
}

type PResult<T> = Result<T, PackError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PackError {
    let what = what.into();
    move |e| PackError::Io(what, e)
}

/// The 32-byte digest of a `sha256:<hex>` address.
pub(super) fn digest_of(address: &str) -> Option<[u8; 32]> {
    let hex = address.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Where an object's bytes are in the pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Loc {
    pub offset: u64,
    pub len: u32,
}

/// An open index file.
struct Idx {
    file: File,
    path: PathBuf,
    count: u64,
    /// `fanout[b]`: entries whose digest's first byte is at most `b`.
    fanout: Box<[u32; 256]>,
}

fn parse_entry(b: &[u8]) -> ([u8; 32], Loc) {
    let mut d = [0u8; 32];
    d.copy_from_slice(&b[..32]);
    let mut off = [0u8; 8];
    off.copy_from_slice(&b[32..40]);
    let mut len = [0u8; 4];
    len.copy_from_slice(&b[40..44]);
    (
        d,
        Loc {
            offset: u64::from_be_bytes(off),
            len: u32::from_be_bytes(len),
        },
    )
}

fn encode_entry(d: &[u8; 32], loc: Loc) -> [u8; ENTRY as usize] {
    let mut e = [0u8; ENTRY as usize];
    e[..32].copy_from_slice(d);
    e[32..40].copy_from_slice(&loc.offset.to_be_bytes());
    e[40..44].copy_from_slice(&loc.len.to_be_bytes());
    e
}

impl Idx {
    /// Looks `d` up with `pread`s.
    fn find(&self, d: &[u8; 32]) -> PResult<Option<Loc>> {
        let b = d[0] as usize;
        let mut lo = if b == 0 { 0 } else { self.fanout[b - 1] as u64 };
        let mut hi = self.fanout[b] as u64;
        let mut buf = [0u8; ENTRY as usize];
        let read_err = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                // Checked at open: it shrank under the running store.
                PackError::Corrupt(format!("object index {} is truncated", self.path.display()))
            } else {
                PackError::Io(format!("reading {}", self.path.display()), e)
            }
        };
        while hi - lo > SCAN {
            let mid = lo + (hi - lo) / 2;
            self.file
                .read_exact_at(&mut buf, IDX_HEADER + mid * ENTRY)
                .map_err(read_err)?;
            let (md, loc) = parse_entry(&buf);
            match md.cmp(d) {
                std::cmp::Ordering::Equal => return Ok(Some(loc)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        if hi <= lo {
            return Ok(None);
        }
        let mut run = vec![0u8; ((hi - lo) * ENTRY) as usize];
        self.file
            .read_exact_at(&mut run, IDX_HEADER + lo * ENTRY)
            .map_err(read_err)?;
        Ok(run
            .chunks_exact(ENTRY as usize)
            .map(parse_entry)
            .find(|(ed, _)| ed == d)
            .map(|(_, loc)| loc))
    }
}

/// Reads an index's entries in order, 64 KiB at a time.
struct IdxStream<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    at: usize,
}

impl<'a> IdxStream<'a> {
    fn new(idx: Option<&'a Idx>) -> Option<Self> {
        idx.map(|i| IdxStream {
            file: &i.file,
            pos: IDX_HEADER,
            end: IDX_HEADER + i.count * ENTRY,
            buf: Vec::new(),
            at: 0,
        })
    }

    fn next_entry(&mut self) -> std::io::Result<Option<([u8; 32], Loc)>> {
        if self.at >= self.buf.len() {
            if self.pos >= self.end {
                return Ok(None);
            }
            let n = (self.end - self.pos).min(1489 * ENTRY); // ~64 KiB
            self.buf.resize(n as usize, 0);
            self.file.read_exact_at(&mut self.buf, self.pos)?;
            self.pos += n;
            self.at = 0;
        }
        let e = parse_entry(&self.buf[self.at..self.at + ENTRY as usize]);
        self.at += ENTRY as usize;
        Ok(Some(e))
    }
}

/// The mutable state, behind [`Pack::state`].
struct State {
    gen: u64,
    pack: Arc<File>,
    pack_path: PathBuf,
    /// Where the next object is appended.
    end: u64,
    idx: Option<Arc<Idx>>,
    /// Written since the last index write; `None`: removed.
    pending: BTreeMap<[u8; 32], Option<Loc>>,
    /// Live objects and their bytes.
    count: u64,
    live_bytes: u64,
}

impl State {
    fn find(&self, d: &[u8; 32]) -> PResult<Option<Loc>> {
        match self.pending.get(d) {
            Some(p) => Ok(*p),
            None => match &self.idx {
                Some(i) => i.find(d),
                None => Ok(None),
            },
        }
    }
}

/// The object pack of one store.
pub(super) struct Pack {
    dir: PathBuf,
    state: Mutex<State>,
    /// Serialises index writes and compactions (reads and appends go on
    /// meanwhile, under `state` only).
    writer: Mutex<()>,
}

fn pack_name(gen: u64) -> String {
    format!("pack-{gen}.pack")
}

fn idx_name(gen: u64) -> String {
    format!("pack-{gen}.idx")
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn pack_header(gen: u64) -> [u8; PACK_HEADER as usize] {
    let mut h = [0u8; PACK_HEADER as usize];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&PACK_VERSION.to_be_bytes());
    h[16..24].copy_from_slice(&gen.to_be_bytes());
    h
}

/// Creates `pack-<gen>.pack` holding only its header, durably.
fn create_pack(dir: &Path, gen: u64) -> PResult<File> {
    let path = dir.join(pack_name(gen));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io(format!("creating {}", path.display())))?;
    f.write_all_at(&pack_header(gen), 0)
        .and_then(|()| f.sync_all())
        .and_then(|()| fsync_dir(dir))
        .map_err(io(format!("writing {}", path.display())))?;
    Ok(f)
}

/// Writes `pack-<gen>.idx` from sorted entries: temporary file, fsync,
/// rename, directory fsync. Returns the opened index.
fn write_idx(
    dir: &Path,
    gen: u64,
    pack_end: u64,
    mut entries: impl FnMut() -> PResult<Option<([u8; 32], Loc)>>,
) -> PResult<Idx> {
    let path = dir.join(idx_name(gen));
    let tmp = dir.join(format!(".{}.tmp-{}", idx_name(gen), std::process::id()));
    let written = (|| -> PResult<(u64, Box<[u32; 256]>)> {
        let f = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        let werr = io(format!("writing {}", tmp.display()));
        let mut w = std::io::BufWriter::with_capacity(64 << 10, &f);
        let mut head = [0u8; IDX_HEADER as usize];
        let mut err = None;
        if let Err(e) = w.write_all(&head) {
            err = Some(e);
        }
        let mut hash = cairn_keys::AddressHasher::default();
        let mut count = 0u64;
        let mut fanout = Box::new([0u32; 256]);
        let mut last: Option<[u8; 32]> = None;
        while err.is_none() {
            let Some((d, loc)) = entries()? else { break };
            debug_assert!(last.is_none_or(|l| l < d));
            last = Some(d);
            let e = encode_entry(&d, loc);
            hash.update(&e);
            fanout[d[0] as usize] += 1;
            count += 1;
            if let Err(e) = w.write_all(&e) {
                err = Some(e);
            }
        }
        if let Some(e) = err {
            return Err(werr(e));
        }
        w.flush()
            .map_err(io(format!("writing {}", tmp.display())))?;
        drop(w);
        for b in 1..256 {
            fanout[b] += fanout[b - 1];
        }
        head[..8].copy_from_slice(IDX_MAGIC);
        head[8..12].copy_from_slice(&PACK_VERSION.to_be_bytes());
        head[12..16].copy_from_slice(&(ENTRY as u32).to_be_bytes());
        head[16..24].copy_from_slice(&gen.to_be_bytes());
        head[24..32].copy_from_slice(&count.to_be_bytes());
        head[32..40].copy_from_slice(&pack_end.to_be_bytes());
        let checksum = idx_checksum(&head[..40], hash);
        head[40..72].copy_from_slice(&checksum);
        f.write_all_at(&head, 0)
            .and_then(|()| f.sync_all())
            .map_err(io(format!("writing {}", tmp.display())))?;
        Ok((count, fanout))
    })();
    let (count, fanout) = match written {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &path)
        .and_then(|()| fsync_dir(dir))
        .map_err(io(format!(
            "renaming {} to {}",
            tmp.display(),
            path.display()
        )))?;
    let file = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
    Ok(Idx {
        file,
        path,
        count,
        fanout,
    })
}

/// The index checksum: SHA-256 of the entries' SHA-256 followed by the
/// header's first 40 bytes, so it can be computed in one streaming pass
/// over the entries.
fn idx_checksum(fields: &[u8], entries: cairn_keys::AddressHasher) -> [u8; 32] {
    let mut buf = digest_of(&entries.finish()).unwrap_or_default().to_vec();
    buf.extend_from_slice(fields);
    cairn_keys::sha256(&buf)
}

/// Opens and checks `pack-<gen>.idx` against a pack of `pack_len` bytes
/// (streamed: checksum, order, bounds). Returns the index, its pack end,
/// live count and bytes.
fn open_idx(dir: &Path, gen: u64, pack_len: u64) -> PResult<(Idx, u64, u64)> {
    let path = dir.join(idx_name(gen));
    let bad = |why: String| PackError::Corrupt(format!("object index {}: {why}", path.display()));
    let file = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
    let len = file
        .metadata()
        .map_err(io(format!("reading {}", path.display())))?
        .len();
    let mut head = [0u8; IDX_HEADER as usize];
    if len < IDX_HEADER {
        return Err(bad(format!("truncated ({len} bytes)")));
    }
    file.read_exact_at(&mut head, 0)
        .map_err(io(format!("reading {}", path.display())))?;
    let u32_at = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[i..i + 8]);
        u64::from_be_bytes(b)
    };
    if &head[..8] != IDX_MAGIC {
        return Err(bad("not an object index (bad magic)".into()));
    }
    if u32_at(8) != PACK_VERSION || u32_at(12) != ENTRY as u32 {
        return Err(bad(format!(
            "version {} with {}-byte entries, this build reads version {PACK_VERSION}",
            u32_at(8),
            u32_at(12)
        )));
    }
    if u64_at(16) != gen {
        return Err(bad(format!("names generation {}", u64_at(16))));
    }
    let count = u64_at(24);
    let pack_end = u64_at(32);
    if count
        .checked_mul(ENTRY)
        .and_then(|n| n.checked_add(IDX_HEADER))
        != Some(len)
    {
        return Err(bad(format!(
            "{len} bytes, its header says {count} entries (truncated or damaged)"
        )));
    }
    let pack_path = dir.join(pack_name(gen));
    if pack_end < PACK_HEADER || pack_end > pack_len {
        return Err(bad(format!(
            "names {pack_end} bytes of {}, which has {pack_len} (the pack is truncated or damaged)",
            pack_path.display()
        )));
    }
    let mut fanout = Box::new([0u32; 256]);
    let mut hash = cairn_keys::AddressHasher::default();
    let mut live = 0u64;
    let mut last: Option<[u8; 32]> = None;
    let mut r = std::io::BufReader::with_capacity(64 << 10, &file);
    let mut skip = [0u8; IDX_HEADER as usize];
    r.read_exact(&mut skip)
        .map_err(io(format!("reading {}", path.display())))?;
    let mut e = [0u8; ENTRY as usize];
    for n in 0..count {
        r.read_exact(&mut e)
            .map_err(io(format!("reading {}", path.display())))?;
        hash.update(&e);
        let (d, loc) = parse_entry(&e);
        if last.is_some_and(|l| l >= d) {
            return Err(bad(format!("entry {n} is out of order")));
        }
        let end = loc.offset.checked_add(u64::from(loc.len));
        if loc.offset < PACK_HEADER
            || u64::from(loc.len) > MAX_OBJECT_BYTES
            || end.is_none_or(|end| end > pack_end)
        {
            return Err(bad(format!(
                "entry {n} ({} bytes at {}) lies outside the pack's {pack_end} indexed bytes or over the {MAX_OBJECT_BYTES}-byte object limit",
                loc.len, loc.offset
            )));
        }
        last = Some(d);
        fanout[d[0] as usize] += 1;
        live += u64::from(loc.len);
    }
    if idx_checksum(&head[..40], hash) != head[40..72] {
        return Err(bad("checksum mismatch (damaged)".into()));
    }
    for b in 1..256 {
        fanout[b] += fanout[b - 1];
    }
    Ok((
        Idx {
            file,
            path,
            count,
            fanout,
        },
        pack_end,
        live,
    ))
}

/// Generations of pack and index files in `dir`.
fn generations(dir: &Path) -> PResult<(Vec<u64>, Vec<u64>)> {
    let mut packs = Vec::new();
    let mut idxs = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("pack-") else {
            continue;
        };
        if let Some(g) = rest.strip_suffix(".pack").and_then(|g| g.parse().ok()) {
            packs.push(g);
        } else if let Some(g) = rest.strip_suffix(".idx").and_then(|g| g.parse().ok()) {
            idxs.push(g);
        }
    }
    Ok((packs, idxs))
}

fn remove_gen(dir: &Path, gen: u64) {
    let _ = std::fs::remove_file(dir.join(idx_name(gen)));
    let _ = std::fs::remove_file(dir.join(pack_name(gen)));
}

impl Pack {
    /// Opens (creating if needed) the pack in `dir` (`<dataDir>/objects`).
    /// A damaged index or pack is [`PackError::Corrupt`] naming the file,
    /// and nothing is changed then.
    pub(super) fn open(dir: &Path) -> PResult<Pack> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let (packs, idxs) = generations(dir)?;
        let state = match idxs.iter().copied().max() {
            None => {
                // A pack without an index never held an indexed object (a
                // crash before the first index write): start afresh.
                for g in packs {
                    remove_gen(dir, g);
                }
                Self::fresh(dir, 1)?
            }
            Some(gen) => {
                let pack_path = dir.join(pack_name(gen));
                let pack = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&pack_path)
                    .map_err(|e| {
                        if e.kind() == std::io::ErrorKind::NotFound {
                            PackError::Corrupt(format!(
                                "object pack {} is missing (its index {} exists)",
                                pack_path.display(),
                                dir.join(idx_name(gen)).display()
                            ))
                        } else {
                            PackError::Io(format!("opening {}", pack_path.display()), e)
                        }
                    })?;
                let pack_len = pack
                    .metadata()
                    .map_err(io(format!("reading {}", pack_path.display())))?
                    .len();
                let mut head = [0u8; PACK_HEADER as usize];
                if pack_len < PACK_HEADER
                    || pack.read_exact_at(&mut head, 0).is_err()
                    || head != pack_header(gen)
                {
                    return Err(PackError::Corrupt(format!(
                        "object pack {}: bad header (not a generation {gen} pack, or damaged)",
                        pack_path.display()
                    )));
                }
                let (idx, end, live_bytes) = open_idx(dir, gen, pack_len)?;
                // Checked: nothing is changed before here.
                if pack_len > end {
                    // A crash's appended, never indexed tail.
                    pack.set_len(end)
                        .and_then(|()| pack.sync_all())
                        .map_err(io(format!("truncating {}", pack_path.display())))?;
                }
                for g in packs.iter().chain(&idxs).copied().filter(|&g| g != gen) {
                    // Older: a finished compaction's leftovers; newer: an
                    // unfinished one's.
                    remove_gen(dir, g);
                }
                State {
                    gen,
                    pack: Arc::new(pack),
                    pack_path,
                    end,
                    count: idx.count,
                    idx: Some(Arc::new(idx)),
                    pending: BTreeMap::new(),
                    live_bytes,
                }
            }
        };
        // Temporary index files of a crashed write.
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".pack-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Pack {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
            writer: Mutex::new(()),
        })
    }

    /// A new, empty generation `gen` with its (empty) index.
    fn fresh(dir: &Path, gen: u64) -> PResult<State> {
        let pack = create_pack(dir, gen)?;
        let idx = write_idx(dir, gen, PACK_HEADER, || Ok(None))?;
        Ok(State {
            gen,
            pack: Arc::new(pack),
            pack_path: dir.join(pack_name(gen)),
            end: PACK_HEADER,
            idx: Some(Arc::new(idx)),
            pending: BTreeMap::new(),
            count: 0,
            live_bytes: 0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the pack holds `d` (its bytes are checked on read).
    pub(super) fn contains(&self, d: &[u8; 32]) -> PResult<bool> {
        Ok(self.lock().find(d)?.is_some())
    }

    /// The bytes stored under `d`, unchecked (the caller hashes them).
    pub(super) fn get(&self, d: &[u8; 32]) -> PResult<Option<Vec<u8>>> {
        let (loc, pack, path) = {
            let s = self.lock();
            match s.find(d)? {
                None => return Ok(None),
                Some(loc) => (loc, Arc::clone(&s.pack), s.pack_path.clone()),
            }
        };
        // Bounded when the entry was indexed or appended; checked again so
        // no path allocates an unchecked length.
        if u64::from(loc.len) > MAX_OBJECT_BYTES {
            return Err(PackError::Corrupt(format!(
                "object pack {}: entry of {} bytes over the limit",
                path.display(),
                loc.len
            )));
        }
        let mut buf = vec![0u8; loc.len as usize];
        match pack.read_exact_at(&mut buf, loc.offset) {
            Ok(()) => Ok(Some(buf)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(PackError::Corrupt(format!(
                    "object pack {} is truncated: {} bytes at offset {} are missing",
                    path.display(),
                    loc.len,
                    loc.offset
                )))
            }
            Err(e) => Err(PackError::Io(format!("reading {}", path.display()), e)),
        }
    }

    /// Appends `bytes` under `d` unless present (or always, with
    /// `replace`). Returns whether the caller should write the index now
    /// ([`PENDING_MAX`] entries pending).
    pub(super) fn put(&self, d: &[u8; 32], bytes: &[u8], replace: bool) -> PResult<bool> {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|&l| u64::from(l) <= MAX_OBJECT_BYTES)
            .ok_or_else(|| {
                PackError::Corrupt(format!(
                    "an object of {} bytes is over the store's {MAX_OBJECT_BYTES}-byte limit",
                    bytes.len()
                ))
            })?;
        let mut s = self.lock();
        let old = s.find(d)?;
        if old.is_some() && !replace {
            return Ok(false);
        }
        let offset = s.end;
        s.pack
            .write_all_at(bytes, offset)
            .map_err(io(format!("writing {}", s.pack_path.display())))?;
        s.end += u64::from(len);
        s.pending.insert(*d, Some(Loc { offset, len }));
        match old {
            Some(o) => s.live_bytes -= u64::from(o.len),
            None => s.count += 1,
        }
        s.live_bytes += u64::from(len);
        Ok(s.pending.len() >= PENDING_MAX)
    }

    /// Removes `d` (a tombstone until the next index write).
    pub(super) fn remove(&self, d: &[u8; 32]) -> PResult<()> {
        let mut s = self.lock();
        if let Some(o) = s.find(d)? {
            s.pending.insert(*d, None);
            s.count -= 1;
            s.live_bytes -= u64::from(o.len);
        }
        Ok(())
    }

    /// Every live digest, in order (after an index write; for tests).
    pub(super) fn digests(&self) -> PResult<Vec<[u8; 32]>> {
        self.write_index()?;
        let s = self.lock();
        let mut out = Vec::new();
        if let Some(mut it) = IdxStream::new(s.idx.as_deref()) {
            while let Some((d, _)) = it.next_entry().map_err(io("reading the object index"))? {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Live objects.
    pub(super) fn count(&self) -> u64 {
        self.lock().count
    }

    /// (pack end, live bytes): garbage is `end - header - live`.
    pub(super) fn usage(&self) -> (u64, u64) {
        let s = self.lock();
        (s.end, s.live_bytes)
    }

    /// The files of the current generation.
    pub(super) fn files(&self) -> (PathBuf, PathBuf) {
        let s = self.lock();
        (s.pack_path.clone(), self.dir.join(idx_name(s.gen)))
    }

    /// Makes every appended object durable and indexed: fsync the pack,
    /// then write the merged index (durably). A no-op with nothing pending.
    pub(super) fn write_index(&self) -> PResult<()> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (snapshot, pack, pack_path, end, idx, gen) = {
            let s = self.lock();
            if s.pending.is_empty() {
                return Ok(());
            }
            (
                s.pending.clone(),
                Arc::clone(&s.pack),
                s.pack_path.clone(),
                s.end,
                s.idx.clone(),
                s.gen,
            )
        };
        pack.sync_data()
            .map_err(io(format!("syncing {}", pack_path.display())))?;
        let mut old = IdxStream::new(idx.as_deref());
        let old_path = idx.as_ref().map(|i| i.path.clone()).unwrap_or_default();
        let mut a = None; // buffered old entry
        let mut new = snapshot.iter().peekable();
        let mut old_done = old.is_none();
        let new_idx = write_idx(&self.dir, gen, end, || loop {
            if a.is_none() && !old_done {
                a = match old.as_mut().map(|o| o.next_entry()) {
                    Some(Ok(Some(e))) => Some(e),
                    Some(Ok(None)) | None => {
                        old_done = true;
                        None
                    }
                    Some(Err(e)) => {
                        return Err(PackError::Io(format!("reading {}", old_path.display()), e))
                    }
                };
            }
            let take_new = match (&a, new.peek()) {
                (None, None) => return Ok(None),
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((ad, _)), Some((nd, _))) => *nd <= ad,
            };
            if take_new {
                let (nd, nl) = new.next().expect("peeked");
                if a.as_ref().is_some_and(|(ad, _)| ad == nd) {
                    a = None; // replaced or removed
                }
                if let Some(loc) = nl {
                    return Ok(Some((*nd, *loc)));
                }
            } else {
                return Ok(a.take());
            }
        })?;
        let mut s = self.lock();
        s.idx = Some(Arc::new(new_idx));
        for (d, v) in &snapshot {
            if s.pending.get(d) == Some(v) {
                s.pending.remove(d);
            }
        }
        Ok(())
    }

    /// Whether garbage passes the compaction rule.
    pub(super) fn wants_compaction(&self) -> bool {
        let (end, live) = self.usage();
        let garbage = end.saturating_sub(PACK_HEADER + live);
        garbage >= COMPACT_MIN_GARBAGE && garbage > live
    }

    /// Copies every live object whose bytes match `check` into a new
    /// generation, indexes it durably, switches to it and deletes the old
    /// pair. Holds the state lock throughout (reads wait): it is rare.
    /// Returns the objects dropped because their bytes failed `check`.
    pub(super) fn compact(&self, check: impl Fn(&[u8; 32], &[u8]) -> bool) -> PResult<u64> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = self.lock();
        let gen = s.gen + 1;
        let new_path = self.dir.join(pack_name(gen));
        let result = (|| -> PResult<(State, u64)> {
            let new_pack = create_pack(&self.dir, gen)?;
            let werr = io(format!("writing {}", new_path.display()));
            // The header was written with `pwrite`: the cursor is at 0.
            use std::io::Seek;
            (&new_pack)
                .seek(std::io::SeekFrom::Start(PACK_HEADER))
                .map_err(io(format!("writing {}", new_path.display())))?;
            let mut w = std::io::BufWriter::with_capacity(256 << 10, &new_pack);
            // Live entries, in order: the old index merged with pending.
            let mut live: Vec<([u8; 32], Loc)> = Vec::new();
            let mut dropped = 0u64;
            let mut end = PACK_HEADER;
            let mut live_bytes = 0;
            let mut old = IdxStream::new(s.idx.as_deref());
            let mut buf = Vec::new();
            let mut copy = |d: [u8; 32], loc: Loc, out: &mut Vec<([u8; 32], Loc)>| -> PResult<()> {
                buf.resize(loc.len as usize, 0);
                if s.pack.read_exact_at(&mut buf, loc.offset).is_err() || !check(&d, &buf) {
                    dropped += 1;
                    return Ok(());
                }
                w.write_all(&buf)
                    .map_err(io(format!("writing {}", new_path.display())))?;
                out.push((
                    d,
                    Loc {
                        offset: end,
                        len: loc.len,
                    },
                ));
                end += u64::from(loc.len);
                live_bytes += u64::from(loc.len);
                Ok(())
            };
            // Streamed from both sources in order; only the new index's
            // entries (44 bytes each) are held until the pack is durable.
            let mut pend = s.pending.iter().peekable();
            let mut a = None;
            loop {
                if a.is_none() {
                    if let Some(o) = old.as_mut() {
                        a = o.next_entry().map_err(io("reading the object index"))?;
                    }
                }
                let take_new = match (&a, pend.peek()) {
                    (None, None) => break,
                    (Some(_), None) => false,
                    (None, Some(_)) => true,
                    (Some((ad, _)), Some((nd, _))) => *nd <= ad,
                };
                if take_new {
                    let (nd, nl) = pend.next().expect("peeked");
                    if a.as_ref().is_some_and(|(ad, _)| ad == nd) {
                        a = None;
                    }
                    if let Some(loc) = nl {
                        copy(*nd, *loc, &mut live)?;
                    }
                } else if let Some((ad, al)) = a.take() {
                    copy(ad, al, &mut live)?;
                }
            }
            w.flush().map_err(werr)?;
            drop(w);
            new_pack
                .sync_all()
                .map_err(io(format!("syncing {}", new_path.display())))?;
            let mut it = live.into_iter();
            let idx = write_idx(&self.dir, gen, end, || Ok(it.next()))?;
            Ok((
                State {
                    gen,
                    pack: Arc::new(new_pack),
                    pack_path: new_path.clone(),
                    end,
                    count: idx.count,
                    idx: Some(Arc::new(idx)),
                    pending: BTreeMap::new(),
                    live_bytes,
                },
                dropped,
            ))
        })();
        match result {
            Ok((new, dropped)) => {
                let old_gen = s.gen;
                *s = new;
                drop(s);
                remove_gen(&self.dir, old_gen);
                let _ = fsync_dir(&self.dir);
                Ok(dropped)
            }
            Err(e) => {
                remove_gen(&self.dir, gen);
                Err(e)
            }
        }
    }
}
