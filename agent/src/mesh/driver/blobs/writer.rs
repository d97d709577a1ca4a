//! The blocking writer of a blob fetched from peers: pieces are written
//! to a temporary file and hashed as they arrive; the file is renamed into
//! place only when digest and size match, kept for the next peer when the
//! driver lets go, removed when the bytes are bad.

use super::*;

/// What the writer thread is told.
pub(super) enum WriterMsg {
    /// The next piece.
    Data(Vec<u8>),
    /// Everything arrived: check and rename.
    Finish,
    /// The bytes are bad: remove the temporary file. (Dropping the
    /// sender instead keeps the file for the next peer to resume.)
    Abort,
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
pub(super) fn spawn_writer(
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
pub(super) fn temp_path(dest: &Path, job: u64) -> PathBuf {
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
