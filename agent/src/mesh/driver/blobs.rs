//! Image blobs over the mesh (protocol version 4): blobs the images
//! module asks for ([`BlobRequest`]) are fetched from one peer at a time
//! in ranges of at most [`cairn_mesh::MeshLimits::max_blob_piece`] bytes,
//! one range in flight per blob, each written and hashed on a blocking
//! thread before the next is asked for. The file is renamed into place
//! only when its digest and size match; a peer whose bytes do not is cut
//! off ([`Endpoint::blob_refused`]) and the next peer is tried from the
//! start. Nothing is kept in memory beyond one piece.

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
    writer: Option<mpsc::Sender<WriterMsg>>,
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
                writer: None,
                last_error: None,
            },
        );
        self.next_blob_peer(job, now);
    }

    /// Starts the blob over from a peer not tried yet, or answers that
    /// no peer has it.
    fn next_blob_peer(&mut self, job: u64, now: Millis) {
        let peers = self.ep.blob_peers();
        let Some(j) = self.blob_jobs.get_mut(&job) else {
            return;
        };
        // Dropping the writer's sender makes it remove its file.
        j.writer = None;
        j.request = None;
        j.conn = None;
        let Some((conn, peer)) = peers
            .into_iter()
            .find(|(_, p)| !j.tried.contains(p.as_str()))
        else {
            let j = self.blob_jobs.remove(&job);
            if let Some(j) = j {
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
        j.offset = 0;
        j.last = false;
        j.writer = Some(spawn_writer(
            job,
            j.attempt,
            j.req.digest.to_string(),
            j.req.size,
            j.req.dest.clone(),
            self.tx.clone(),
        ));
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
        j.offset += n;
        j.last = match j.req.size {
            BlobSize::Exact(size) => j.offset >= size,
            BlobSize::AtMost(_) => n < u64::from(range.length),
        };
        let sent = j
            .writer
            .as_ref()
            .is_some_and(|w| w.try_send(WriterMsg::Data(bytes)).is_ok());
        if !sent {
            // The writer ended (its failure report is on the way) or
            // cannot keep up with one piece: start over elsewhere.
            j.last_error = Some(format!("image blob {}: writing failed", j.req.digest));
            self.next_blob_peer(job, now);
        }
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
        j.writer = None;
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

/// Starts the writer of one attempt: a blocking thread that writes the
/// pieces to a temporary file next to `dest`, hashing as it goes, and on
/// [`WriterMsg::Finish`] checks digest and size, syncs and renames. Its
/// reports come back as inputs. When the driver drops the sender, or on
/// any failure, the temporary file is removed.
fn spawn_writer(
    job: u64,
    attempt: u64,
    digest: String,
    size: BlobSize,
    dest: PathBuf,
    tx: mpsc::Sender<Input>,
) -> mpsc::Sender<WriterMsg> {
    let (wtx, mut wrx) = mpsc::channel::<WriterMsg>(2);
    tokio::task::spawn_blocking(move || {
        let tmp = temp_path(&dest, job, attempt);
        let result = write_blob(&mut wrx, &tmp, &dest, &digest, size, || {
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
    wtx
}

fn temp_path(dest: &Path, job: u64, attempt: u64) -> PathBuf {
    let name = dest
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(
        ".{name}.peer.{}.{job}.{attempt}",
        std::process::id()
    ))
}

/// The writer's loop (blocking): the blob in place, `Ok(None)` when
/// abandoned (the driver dropped the sender), or why not. Unless the blob
/// is in place, the temporary file is removed.
fn write_blob(
    rx: &mut mpsc::Receiver<WriterMsg>,
    tmp: &Path,
    dest: &Path,
    digest: &str,
    size: BlobSize,
    written: impl FnMut() -> bool,
) -> Result<Option<u64>, BlobFailure> {
    let result = write_pieces(rx, tmp, dest, digest, size, written);
    if !matches!(result, Ok(Some(_))) {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

fn write_pieces(
    rx: &mut mpsc::Receiver<WriterMsg>,
    tmp: &Path,
    dest: &Path,
    digest: &str,
    size: BlobSize,
    mut written: impl FnMut() -> bool,
) -> Result<Option<u64>, BlobFailure> {
    let local = |e: std::io::Error, p: &Path| {
        BlobFailure::Local(format!("image blob {digest}: writing {}: {e}", p.display()))
    };
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| local(e, parent))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| local(e, tmp))?;
    let max = match size {
        BlobSize::Exact(n) | BlobSize::AtMost(n) => n,
    };
    let mut hasher = cairn_keys::AddressHasher::default();
    let mut n = 0u64;
    loop {
        match rx.blocking_recv() {
            None => return Ok(None),
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
                    return Ok(None);
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
    Ok(Some(n))
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
        let (tx, mut rx) = mpsc::channel(pieces.len() + 1);
        for p in pieces {
            tx.try_send(WriterMsg::Data(p.to_vec())).unwrap();
        }
        if finish {
            tx.try_send(WriterMsg::Finish).unwrap();
        }
        drop(tx);
        let dest = dir.join("blob");
        let tmp = temp_path(&dest, 1, 1);
        write_blob(&mut rx, &tmp, &dest, digest, size, || true)
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
        // A flipped byte, a short blob, one byte too many, an abandoned
        // fetch: nothing is left behind.
        let mut bad = b.to_vec();
        bad[0] ^= 1;
        let cases: Vec<(Vec<&[u8]>, bool)> = vec![
            (vec![a, &bad], true),
            (vec![a], true),
            (vec![a, b, b"x"], true),
            (vec![a], false),
        ];
        for (pieces, finish) in cases {
            let r = write(dir.path(), &d, exact, &pieces, finish);
            match (finish, r) {
                (true, Err(BlobFailure::Mismatch(_))) | (false, Ok(None)) => {}
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
}
