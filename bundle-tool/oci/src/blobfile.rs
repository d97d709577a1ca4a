//! Large blobs (container image layers) written to disk while they are
//! hashed: never held in memory, never more than a limit, and only moved
//! to their final path when the SHA-256 matches the expected digest.
//!
//! [`copy_verified`] is the blocking core (any `Read`: a file, a network
//! body fed through a channel); [`download_verified`] runs it on a
//! blocking thread fed by an async HTTP body, so the async runtime only
//! moves chunks.

use crate::OciError;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn tmp_path(dest: &Path) -> PathBuf {
    let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let name = dest
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.partial.{}.{n}", std::process::id()))
}

/// Reads all of `r` (at most `limit` bytes) into `dest`, hashing while
/// writing; the file is synced and renamed into place only when its
/// address equals `expected`. Returns the size. Blocking.
pub fn copy_verified(
    r: &mut dyn Read,
    expected: &str,
    limit: u64,
    dest: &Path,
    what: &str,
) -> Result<u64, OciError> {
    let io = |e: std::io::Error, p: &Path| {
        OciError::Unavailable(format!("{what}: writing {}: {e}", p.display()))
    };
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(e, parent))?;
    }
    let tmp = tmp_path(dest);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io(e, &tmp))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0u64;
        loop {
            let k = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(OciError::Unavailable(format!("{what}: reading: {e}"))),
            };
            n += k as u64;
            if n > limit {
                return Err(OciError::TooLarge {
                    what: what.to_owned(),
                    limit,
                });
            }
            ctx.update(&buf[..k]);
            f.write_all(&buf[..k]).map_err(|e| io(e, &tmp))?;
        }
        let actual = format!("sha256:{}", hex(ctx.finish().as_ref()));
        if actual != expected {
            return Err(OciError::Invalid(format!(
                "{what}: content does not match its digest {expected} (got {actual}): the \
                 copy is corrupt or was tampered with"
            )));
        }
        f.sync_all().map_err(|e| io(e, &tmp))?;
        std::fs::rename(&tmp, dest).map_err(|e| io(e, dest))?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter().fold(String::with_capacity(64), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// A `Read` over chunks sent from an async task.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
    cur: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let k = out.len().min(self.cur.len());
        out[..k].copy_from_slice(&self.cur[..k]);
        let _ = self.cur.split_to(k);
        Ok(k)
    }
}

/// Streams an HTTP response body into `dest` through [`copy_verified`] on
/// a blocking thread. A `Content-Length` over `limit` is refused before
/// reading.
pub async fn download_verified(
    mut resp: reqwest::Response,
    expected: &str,
    limit: u64,
    dest: &Path,
    what: &str,
) -> Result<u64, OciError> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(OciError::TooLarge {
            what: what.to_owned(),
            limit,
        });
    }
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let (exp, d, w) = (expected.to_owned(), dest.to_path_buf(), what.to_owned());
    let writer = tokio::task::spawn_blocking(move || {
        let mut r = ChannelReader {
            rx,
            cur: bytes::Bytes::new(),
        };
        copy_verified(&mut r, &exp, limit, &d, &w)
    });
    loop {
        let item = match resp.chunk().await {
            Ok(Some(c)) => Ok(c),
            Ok(None) => break,
            Err(e) => Err(format!("reading body: {}", crate::error_text(&e))),
        };
        let stop = item.is_err();
        if tx.send(item).await.is_err() || stop {
            break; // the writer stopped (limit, IO error) or the body failed
        }
    }
    drop(tx);
    writer
        .await
        .map_err(|e| OciError::Unavailable(format!("{what}: writer thread: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_matching_bytes_reach_the_destination() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("a/b/blob");
        let good = cairn_keys::sha256_address(b"layer");
        let n = copy_verified(&mut &b"layer"[..], &good, 10, &dest, "t").unwrap();
        assert_eq!((n, std::fs::read(&dest).unwrap()), (5, b"layer".to_vec()));
        let other = d.path().join("c");
        let e = copy_verified(&mut &b"layes"[..], &good, 10, &other, "t").unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        let e = copy_verified(&mut &b"layer"[..], &good, 4, &other, "t").unwrap_err();
        assert!(matches!(e, OciError::TooLarge { .. }), "{e}");
        assert!(!other.exists());
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no partial files left"
        );
    }
}
