//! Image blobs over the mesh (protocol version 4): blobs the images
//! module asks for ([`BlobRequest`]) are fetched from one peer at a time
//! in ranges of at most [`cairn_mesh::MeshLimits::max_blob_piece`] bytes,
//! one range in flight per blob, each written and hashed on a blocking
//! thread before the next is asked for. The file is renamed into place
//! only when its digest and size match; a peer whose bytes do not is cut
//! off ([`Endpoint::blob_refused`]) and the next peer is tried from the
//! start. A peer that goes away or stops serving the blob costs nothing
//! already written: the next peer is asked from the temporary file's
//! length, whose bytes the new writer hashes again first. Nothing is kept
//! in memory beyond one piece.

use super::*;
use crate::images::{BlobRequest, BlobSize};
use cairn_mesh::wire::BlobRange;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a blob from a peer was not kept.
#[derive(Debug)]
pub(in crate::mesh) enum BlobFailure {
    /// The peer's bytes do not make the blob (digest or size): its fault.
    Mismatch(String),
    /// Our disk failed: nobody's fault.
    Local(String),
}

/// What the writer thread is told.
enum WriterMsg {
    /// The next piece.
    Data(Vec<u8>),
    /// Everything arrived: check and rename.
    Finish,
    /// The bytes are bad: remove the temporary file. (Dropping the
    /// sender instead keeps the file for the next peer to resume.)
    Abort,
}

/// One blob being fetched.
pub(super) struct BlobJob {
    req: BlobRequest,
    /// The attempt (one per peer tried); writer reports of older attempts
    /// are ignored.
    attempt: u64,
    conn: Option<ConnId>,
    peer: String,
    tried: BTreeSet<String>,
    /// Bytes received and handed to the writer.
    offset: u64,
    /// The range in flight.
    request: Option<u64>,
    /// The last piece was handed to the writer.
    last: bool,
    /// Bytes of this attempt's file that came from earlier peers.
    resumed_from: u64,
    writer: Option<mpsc::Sender<WriterMsg>>,
    /// Closed when the current writer has let go of the file.
    writer_done: Option<tokio::sync::oneshot::Receiver<()>>,
    last_error: Option<String>,
}

impl Driver {
    /// A blob to fetch from peers.
    pub(super) fn start_blob(&mut self, req: BlobRequest, now: Millis) {
        let job = self.next_blob_job;
        self.next_blob_job += 1;
        self.blob_jobs.insert(
            job,
            BlobJob {
                req,
                attempt: 0,
                conn: None,
                peer: String::new(),
                tried: BTreeSet::new(),
                offset: 0,
                request: None,
                last: false,
                resumed_from: 0,
                writer: None,
                writer_done: None,
                last_error: None,
            },
        );
        self.next_blob_peer(job, now);
    }

    /// Continues the blob from a peer not tried yet, from the bytes
    /// already written (`offset`; 0 after [`Driver::refuse_blob`]), or
    /// answers that no peer has it.
    fn next_blob_peer(&mut self, job: u64, now: Millis) {
        let peers = self.ep.blob_peers();
        let Some(j) = self.blob_jobs.get_mut(&job) else {
            return;
        };
        // Dropping the writer's sender makes it keep its file (written up
        // to `offset`) and let go of it.
        j.writer = None;
        j.request = None;
        j.conn = None;
        let Some((conn, peer)) = peers
            .into_iter()
            .find(|(_, p)| !j.tried.contains(p.as_str()))
        else {
            let j = self.blob_jobs.remove(&job);
            if let Some(mut j) = j {
                // Nobody continues it: the file goes once its writer is done.
                let (done, tmp) = (j.writer_done.take(), temp_path(&j.req.dest, job));
                tokio::task::spawn_blocking(move || {
                    if let Some(d) = done {
                        let _ = d.blocking_recv();
                    }
                    let _ = std::fs::remove_file(tmp);
                });
                let why = j.last_error.unwrap_or_else(|| {
                    format!(
                        "image blob {}: no source has it and no mesh peer serves it",
                        j.req.digest
                    )
                });
                let _ = j.req.reply.send(Err(why));
            }
            return;
        };
        j.tried.insert(peer.to_string());
        j.attempt += 1;
        j.conn = Some(conn);
        j.peer = peer.to_string();
        j.last = false;
        j.resumed_from = j.offset;
        if j.offset > 0 {
            tracing::debug!(peer = %j.peer, blob = %j.req.digest, offset = j.offset, "resuming an image blob from another mesh peer");
        }
        let (writer, done) = spawn_writer(
            job,
            j.attempt,
            j.req.digest.to_string(),
            j.req.size,
            j.req.dest.clone(),
            j.offset,
            j.writer_done.take(),
            self.tx.clone(),
        );
        j.writer = Some(writer);
        j.writer_done = Some(done);
        self.ask_blob(job, now);
    }

    /// Asks the job's peer for the next range.
    fn ask_blob(&mut self, job: u64, now: Millis) {
        let piece = self.ep.config().limits.max_blob_piece;
        let Some(j) = self.blob_jobs.get_mut(&job) else {
            return;
        };
        let Some(conn) = j.conn else { return };
        let length = match j.req.size {
            BlobSize::Exact(size) => {
                let left = size.saturating_sub(j.offset);
                if left == 0 {
                    return self.finish_blob(job);
                }
                u32::try_from(left.min(u64::from(piece))).unwrap_or(piece)
            }
            BlobSize::AtMost(_) => piece,
        };
        let range = BlobRange {
            digest: j.req.digest.clone(),
            offset: j.offset,
            length,
        };
        match self.ep.want_blob(conn, range, now) {
            Some(id) => j.request = Some(id),
            None => {
                j.last_error = Some(format!(
                    "image blob {}: peer {} cannot be asked now",
                    j.req.digest, j.peer
                ));
                self.next_blob_peer(job, now);
            }
        }
    }

    /// A peer's answer to a range.
    pub(super) fn blob_piece(
        &mut self,
        conn: ConnId,
        id: u64,
        range: BlobRange,
        bytes: Option<Vec<u8>>,
        now: Millis,
    ) {
        let Some((&job, j)) = self
            .blob_jobs
            .iter_mut()
            .find(|(_, j)| j.conn == Some(conn) && j.request == Some(id))
        else {
            return;
        };
        j.request = None;
        let Some(bytes) = bytes else {
            tracing::debug!(peer = %j.peer, blob = %j.req.digest, "mesh peer does not serve the image blob");
            j.last_error = Some(format!(
                "image blob {}: no source has it and no mesh peer serves it",
                j.req.digest
            ));
            return self.next_blob_peer(job, now);
        };
        let n = bytes.len() as u64;
        let wrong = match j.req.size {
            // Every range but the last is a full piece, the last one ends
            // at the size: anything else is not the blob.
            BlobSize::Exact(_) if n != u64::from(range.length) => Some(format!(
                "{n} bytes of image blob {} at offset {} where {} were due",
                j.req.digest, range.offset, range.length
            )),
            BlobSize::AtMost(max) if j.offset + n > max => Some(format!(
                "image blob {} longer than {max} bytes",
                j.req.digest
            )),
            _ => None,
        };
        if let Some(detail) = wrong {
            return self.refuse_blob(job, detail, now);
        }
        let sent = j
            .writer
            .as_ref()
            .is_some_and(|w| w.try_send(WriterMsg::Data(bytes)).is_ok());
        if !sent {
            // The writer ended (its failure report is on the way; it
            // removed its file) or cannot keep up with one piece: start
            // over elsewhere.
            j.last_error = Some(format!("image blob {}: writing failed", j.req.digest));
            if let Some(w) = j.writer.take() {
                let _ = w.try_send(WriterMsg::Abort);
            }
            j.offset = 0;
            return self.next_blob_peer(job, now);
        }
        j.offset += n;
        j.last = match j.req.size {
            BlobSize::Exact(size) => j.offset >= size,
            BlobSize::AtMost(_) => n < u64::from(range.length),
        };
    }

    /// The writer wrote a piece: ask for the next, or finish.
    pub(super) fn blob_written(&mut self, job: u64, attempt: u64, now: Millis) {
        let Some(j) = self.blob_jobs.get(&job) else {
            return;
        };
        if j.attempt != attempt {
            return;
        }
        if j.last {
            self.finish_blob(job);
        } else {
            self.ask_blob(job, now);
        }
    }

    fn finish_blob(&mut self, job: u64) {
        if let Some(w) = self.blob_jobs.get(&job).and_then(|j| j.writer.as_ref()) {
            let _ = w.try_send(WriterMsg::Finish);
        }
    }

    /// The writer's verdict on the whole blob (or a write failure).
    pub(super) fn blob_done(
        &mut self,
        job: u64,
        attempt: u64,
        result: Result<u64, BlobFailure>,
        now: Millis,
    ) {
        let Some(j) = self.blob_jobs.get_mut(&job) else {
            return;
        };
        if j.attempt != attempt {
            return;
        }
        match result {
            Ok(n) => {
                if let Some(j) = self.blob_jobs.remove(&job) {
                    let _ = j.req.reply.send(Ok(n));
                }
            }
            // Part of the file came from earlier peers: nobody can be
            // blamed. Start over from byte 0, this peer included.
            Err(BlobFailure::Mismatch(detail)) if j.resumed_from > 0 => {
                tracing::warn!(peer = %j.peer, blob = %j.req.digest, detail = %escape_untrusted(&detail), "a resumed image blob does not match; fetching it again from the start");
                let peer = j.peer.clone();
                j.tried.retain(|p| p.as_str() != peer);
                j.writer = None;
                j.offset = 0;
                j.last_error = Some(format!("image blob {}: {detail}", j.req.digest));
                self.next_blob_peer(job, now);
            }
            Err(BlobFailure::Mismatch(detail)) => self.refuse_blob(job, detail, now),
            Err(BlobFailure::Local(e)) => {
                if let Some(j) = self.blob_jobs.remove(&job) {
                    let _ = j.req.reply.send(Err(e));
                }
            }
        }
    }

    /// The peer served bytes that are not the blob: nothing is kept, the
    /// peer is cut off and banned, the next peer is tried.
    fn refuse_blob(&mut self, job: u64, detail: String, now: Millis) {
        let Some(j) = self.blob_jobs.get_mut(&job) else {
            return;
        };
        // Nothing of it is kept (the channel has room: at most one piece
        // and `Finish` are queued).
        if let Some(w) = j.writer.take() {
            let _ = w.try_send(WriterMsg::Abort);
        }
        j.offset = 0;
        tracing::warn!(peer = %j.peer, blob = %j.req.digest, detail = %escape_untrusted(&detail), "image blob from mesh peer refused");
        if let Some(im) = &self.images {
            im.metrics().blobs_refused.inc();
        }
        j.last_error = Some(format!("image blob {}: {detail}", j.req.digest));
        if let Some(conn) = j.conn {
            self.ep.blob_refused(conn, &detail, now);
        }
        self.next_blob_peer(job, now);
    }

    /// A connection went away: its blobs start over from another peer.
    pub(super) fn blob_peer_down(&mut self, conn: ConnId, now: Millis) {
        let jobs: Vec<u64> = self
            .blob_jobs
            .iter()
            .filter(|(_, j)| j.conn == Some(conn))
            .map(|(k, _)| *k)
            .collect();
        for job in jobs {
            if let Some(j) = self.blob_jobs.get_mut(&job) {
                j.last_error = Some(format!(
                    "image blob {}: peer {} went away",
                    j.req.digest, j.peer
                ));
            }
            self.next_blob_peer(job, now);
        }
    }
}

/// Starts the writer of one attempt: a blocking thread that (after the
/// previous attempt's writer let go, `after`) continues the job's
/// temporary file next to `dest` from `resume` bytes (hashing those
/// again) or starts it, writes the pieces, hashing as it goes, and on
/// [`WriterMsg::Finish`] checks digest and size, syncs and renames. Its
/// reports come back as inputs. When the driver drops the sender the
/// file is kept for the next attempt; on [`WriterMsg::Abort`] or any
/// failure it is removed. The returned receiver closes when the thread
/// has let go of the file.
#[allow(clippy::too_many_arguments)]
fn spawn_writer(
    job: u64,
    attempt: u64,
    digest: String,
    size: BlobSize,
    dest: PathBuf,
    resume: u64,
    after: Option<tokio::sync::oneshot::Receiver<()>>,
    tx: mpsc::Sender<Input>,
) -> (mpsc::Sender<WriterMsg>, tokio::sync::oneshot::Receiver<()>) {
    let (wtx, mut wrx) = mpsc::channel::<WriterMsg>(4);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _done = done_tx;
        if let Some(a) = after {
            let _ = a.blocking_recv();
        }
        let tmp = temp_path(&dest, job);
        let result = write_blob(&mut wrx, &tmp, &dest, &digest, size, resume, || {
            tx.blocking_send(Input::BlobWritten { job, attempt })
                .is_ok()
        });
        if let Some(result) = result.transpose() {
            let _ = tx.blocking_send(Input::BlobDone {
                job,
                attempt,
                result,
            });
        }
    });
    (wtx, done_rx)
}

/// The temporary file of blob job `job` (every attempt continues it).
fn temp_path(dest: &Path, job: u64) -> PathBuf {
    let name = dest
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.peer.{}.{job}", std::process::id()))
}

/// How a writer's loop ended without the blob in place.
enum Ended {
    /// The blob is in place, with this size.
    Done(u64),
    /// The driver let go (another peer continues): keep the file.
    Suspended,
    /// The driver aborted: remove the file.
    Aborted,
}

/// The writer's loop (blocking): the blob in place, `Ok(None)` when
/// suspended (the driver dropped the sender: the file is kept for the
/// next attempt) or aborted (the file is removed), or why not (the file
/// is removed).
#[allow(clippy::too_many_arguments)]
fn write_blob(
    rx: &mut mpsc::Receiver<WriterMsg>,
    tmp: &Path,
    dest: &Path,
    digest: &str,
    size: BlobSize,
    resume: u64,
    written: impl FnMut() -> bool,
) -> Result<Option<u64>, BlobFailure> {
    match write_pieces(rx, tmp, dest, digest, size, resume, written) {
        Ok(Ended::Done(n)) => Ok(Some(n)),
        Ok(Ended::Suspended) => Ok(None),
        Ok(Ended::Aborted) => {
            let _ = std::fs::remove_file(tmp);
            Ok(None)
        }
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_pieces(
    rx: &mut mpsc::Receiver<WriterMsg>,
    tmp: &Path,
    dest: &Path,
    digest: &str,
    size: BlobSize,
    resume: u64,
    mut written: impl FnMut() -> bool,
) -> Result<Ended, BlobFailure> {
    use std::io::{Read, Seek};
    use std::os::unix::fs::OpenOptionsExt;
    let local = |e: std::io::Error, p: &Path| {
        BlobFailure::Local(format!("image blob {digest}: writing {}: {e}", p.display()))
    };
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| local(e, parent))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(resume == 0)
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)
        .map_err(|e| local(e, tmp))?;
    let max = match size {
        BlobSize::Exact(n) | BlobSize::AtMost(n) => n,
    };
    let mut hasher = cairn_keys::AddressHasher::default();
    let mut n = 0u64;
    if resume > 0 {
        // What earlier peers sent: hashed again from the file (it may have
        // changed on disk; the final digest check covers it either way).
        let len = f.metadata().map_err(|e| local(e, tmp))?.len();
        if len < resume || resume > max {
            return Err(BlobFailure::Local(format!(
                "image blob {digest}: {} holds {len} bytes, {resume} expected to resume from",
                tmp.display()
            )));
        }
        f.set_len(resume).map_err(|e| local(e, tmp))?;
        let mut buf = vec![0u8; 256 << 10];
        let mut r = (&f).take(resume);
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    hasher.update(&buf[..k]);
                    n += k as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(local(e, tmp)),
            }
        }
        if n != resume {
            return Err(BlobFailure::Local(format!(
                "image blob {digest}: {} ended after {n} of {resume} bytes",
                tmp.display()
            )));
        }
        f.seek(std::io::SeekFrom::End(0))
            .map_err(|e| local(e, tmp))?;
    }
    loop {
        match rx.blocking_recv() {
            None => {
                f.flush().map_err(|e| local(e, tmp))?;
                return Ok(Ended::Suspended);
            }
            Some(WriterMsg::Abort) => return Ok(Ended::Aborted),
            Some(WriterMsg::Data(b)) => {
                n += b.len() as u64;
                if n > max {
                    return Err(BlobFailure::Mismatch(format!(
                        "image blob {digest}: more than {max} bytes"
                    )));
                }
                hasher.update(&b);
                f.write_all(&b).map_err(|e| local(e, tmp))?;
                if !written() {
                    return Ok(Ended::Suspended);
                }
            }
            Some(WriterMsg::Finish) => break,
        }
    }
    if let BlobSize::Exact(want) = size {
        if n != want {
            return Err(BlobFailure::Mismatch(format!(
                "image blob {digest}: {n} bytes, the image list says {want}"
            )));
        }
    }
    let actual = hasher.finish();
    if actual != digest {
        return Err(BlobFailure::Mismatch(format!(
            "image blob {digest}: content does not match its digest (got {actual}): the \
             peer's copy is corrupt or was tampered with"
        )));
    }
    f.sync_all().map_err(|e| local(e, tmp))?;
    std::fs::rename(tmp, dest).map_err(|e| local(e, dest))?;
    Ok(Ended::Done(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the writer over `pieces` (then `Finish`, if `finish`).
    fn write(
        dir: &Path,
        digest: &str,
        size: BlobSize,
        pieces: &[&[u8]],
        finish: bool,
    ) -> Result<Option<u64>, BlobFailure> {
        write_from(dir, digest, size, 0, pieces, Some(finish))
    }

    /// The writer resuming job 1's file from `resume` bytes over
    /// `pieces`, then `Finish` (`Some(true)`), nothing (`Some(false)`:
    /// suspended) or `Abort` (`None`).
    fn write_from(
        dir: &Path,
        digest: &str,
        size: BlobSize,
        resume: u64,
        pieces: &[&[u8]],
        end: Option<bool>,
    ) -> Result<Option<u64>, BlobFailure> {
        let (tx, mut rx) = mpsc::channel(pieces.len() + 1);
        for p in pieces {
            tx.try_send(WriterMsg::Data(p.to_vec())).unwrap();
        }
        match end {
            Some(true) => tx.try_send(WriterMsg::Finish).unwrap(),
            Some(false) => {}
            None => tx.try_send(WriterMsg::Abort).unwrap(),
        }
        drop(tx);
        let dest = dir.join("blob");
        let tmp = temp_path(&dest, 1);
        write_blob(&mut rx, &tmp, &dest, digest, size, resume, || true)
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn only_pieces_that_make_the_blob_reach_the_destination() {
        let blob = b"0123456789".repeat(100);
        let d = cairn_keys::sha256_address(&blob);
        let (a, b) = blob.split_at(512);
        let dir = tempfile::tempdir().unwrap();
        let exact = BlobSize::Exact(blob.len() as u64);
        // Right pieces: renamed into place.
        assert_eq!(
            write(dir.path(), &d, exact, &[a, b], true).unwrap(),
            Some(1000)
        );
        assert_eq!(std::fs::read(dir.path().join("blob")).unwrap(), blob);
        std::fs::remove_file(dir.path().join("blob")).unwrap();
        // A flipped byte, a short blob, one byte too many, an aborted
        // fetch: nothing is left behind.
        let mut bad = b.to_vec();
        bad[0] ^= 1;
        let cases: Vec<(Vec<&[u8]>, Option<bool>)> = vec![
            (vec![a, &bad], Some(true)),
            (vec![a], Some(true)),
            (vec![a, b, b"x"], Some(true)),
            (vec![a], None),
        ];
        for (pieces, end) in cases {
            let r = write_from(dir.path(), &d, exact, 0, &pieces, end);
            match (end, r) {
                (Some(true), Err(BlobFailure::Mismatch(_))) | (None, Ok(None)) => {}
                (_, other) => panic!("{other:?}"),
            }
            assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
        }
        // An image list of unknown size: at most the limit.
        assert!(matches!(
            write(dir.path(), &d, BlobSize::AtMost(999), &[a, b], true),
            Err(BlobFailure::Mismatch(_))
        ));
        assert_eq!(
            write(dir.path(), &d, BlobSize::AtMost(8 << 20), &[a, b], true).unwrap(),
            Some(1000)
        );
    }

    #[test]
    fn a_suspended_blob_resumes_from_its_file_and_a_bad_prefix_is_not_kept() {
        let blob = b"0123456789".repeat(100);
        let d = cairn_keys::sha256_address(&blob);
        let (a, rest) = blob.split_at(300);
        let (b, c) = rest.split_at(300);
        let dir = tempfile::tempdir().unwrap();
        let exact = BlobSize::Exact(blob.len() as u64);
        let tmp = temp_path(&dir.path().join("blob"), 1);
        // The first peer sends two pieces and goes away: the file stays.
        assert!(write_from(dir.path(), &d, exact, 0, &[a, b], Some(false))
            .unwrap()
            .is_none());
        assert_eq!(std::fs::read(&tmp).unwrap().len(), 600);
        // The next peer is asked from byte 600 (bytes past it, say of a
        // piece a dying writer half wrote, are cut off).
        std::fs::OpenOptions::new()
            .append(true)
            .open(&tmp)
            .unwrap()
            .write_all(b"junk")
            .unwrap();
        assert_eq!(
            write_from(dir.path(), &d, exact, 600, &[c], Some(true)).unwrap(),
            Some(1000)
        );
        assert_eq!(std::fs::read(dir.path().join("blob")).unwrap(), blob);
        assert_eq!(files(dir.path()), vec!["blob".to_owned()]);
        std::fs::remove_file(dir.path().join("blob")).unwrap();

        // A prefix altered on disk while suspended: the prefix is hashed
        // again, the blob refused, nothing kept.
        write_from(dir.path(), &d, exact, 0, &[a], Some(false)).unwrap();
        let mut f = std::fs::read(&tmp).unwrap();
        f[0] ^= 1;
        std::fs::write(&tmp, f).unwrap();
        assert!(matches!(
            write_from(dir.path(), &d, exact, 300, &[b, c], Some(true)),
            Err(BlobFailure::Mismatch(_))
        ));
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));

        // A file shorter than the resume point: a local failure, removed.
        write_from(dir.path(), &d, exact, 0, &[a], Some(false)).unwrap();
        assert!(matches!(
            write_from(dir.path(), &d, exact, 600, &[c], Some(true)),
            Err(BlobFailure::Local(_))
        ));
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    }
}
