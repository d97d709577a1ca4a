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

mod writer;
use writer::{spawn_writer, temp_path, WriterMsg};
