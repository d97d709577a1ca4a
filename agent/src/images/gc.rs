//! Garbage collection of `<dataDir>/images`: blobs no adopted or staged
//! release names, and temporary files of interrupted fetches.

use std::collections::BTreeSet;
use std::path::Path;

/// What one garbage collection pass removes.
#[derive(Debug)]
pub(super) enum Pass {
    /// Temporary files of interrupted fetches (start-up, before any
    /// fetch).
    Temporaries,
    /// Blobs whose digest is not in the set.
    Unused(BTreeSet<String>),
}

/// What [`collect_garbage`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Garbage {
    pub(super) blobs: usize,
    pub(super) bytes: u64,
    pub(super) temporaries: usize,
}

/// Removes from `sha256` (`<dataDir>/images/sha256`) every regular file
/// `<2 hex>/<64 hex>` whose digest is not kept ([`Pass::Unused`]), or
/// every regular file whose name starts with `.` ([`Pass::Temporaries`]).
/// Directory entries are judged by their own type
/// (`DirEntry::file_type` does not follow links): symbolic links and
/// anything else are left alone, and only `<2 hex>` directories that are
/// real directories are entered. Emptied `<2 hex>` directories are
/// removed. Blocking.
pub(super) fn collect_garbage(sha256: &Path, pass: &Pass) -> Garbage {
    let mut g = Garbage::default();
    let is_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let Ok(top) = std::fs::read_dir(sha256) else {
        return g;
    };
    for d in top.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if !is_hex(&name, 2) || !d.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(files) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for f in files.flatten() {
            if !f.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let fname = f.file_name().to_string_lossy().into_owned();
            let remove = match pass {
                Pass::Temporaries => fname.starts_with('.'),
                Pass::Unused(keep) => {
                    is_hex(&fname, 64)
                        && fname.starts_with(&name)
                        && !keep.contains(&format!("sha256:{fname}"))
                }
            };
            if !remove {
                continue;
            }
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(f.path()) {
                Ok(()) if fname.starts_with('.') => g.temporaries += 1,
                Ok(()) => {
                    g.blobs += 1;
                    g.bytes += len;
                }
                Err(e) => {
                    tracing::warn!(file = %f.path().display(), error = %e, "cannot remove an unused image file")
                }
            }
        }
        // Only succeeds when empty.
        let _ = std::fs::remove_dir(d.path());
    }
    g
}
