//! The self-contained bundle file (file IO; the manifest and object checks
//! are pure and live in [`cairn_core::bundle`]).
//!
//! A bundle file is the manifest followed by every object, in entry order,
//! and is verified on every read.

use cairn_core::bundle::{verify_object, Entry, Manifest};
use cairn_core::bundle_file::{encode_head, read_head};
use cairn_core::limits::Limits;
use cairn_core::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;

/// Writes a bundle file: magic, format, manifest length and bytes, then
/// each entry's object bytes in entry order. `object` returns the bytes of
/// an entry.
pub fn write_bundle_file(
    path: &Path,
    manifest: &Manifest,
    mut object: impl FnMut(&Entry) -> Result<Vec<u8>>,
) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        w.write_all(&encode_head(manifest.format, &manifest.encode_all()))
            .map_err(io)?;
        for e in &manifest.entries {
            let bytes = object(e)?;
            verify_object(&e.object, &bytes)?;
            w.write_all(&bytes).map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Reads a bundle file, verifying the manifest and every object, and calls
/// `each` with every verified entry and its bytes. Returns the manifest.
/// Nothing larger than the limits is allocated.
pub fn read_bundle_file(
    path: &Path,
    limits: &Limits,
    mut each: impl FnMut(&Entry, Vec<u8>) -> Result<()>,
) -> Result<Manifest> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: String| Error::InvalidBundleFile {
        path: path.to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut r = std::io::BufReader::new(f);
    let manifest = read_head(&mut r, path, limits)?;
    for e in &manifest.entries {
        let mut buf = vec![0u8; e.size as usize];
        r.read_exact(&mut buf).map_err(|_| {
            bad(format!(
                "truncated at object {} ({})",
                e.object,
                e.display_name()
            ))
        })?;
        verify_object(&e.object, &buf)?;
        each(e, buf)?;
    }
    let mut extra = [0u8; 1];
    if r.read(&mut extra).map_err(io)? != 0 {
        return Err(bad("trailing bytes after the last object".into()));
    }
    Ok(manifest)
}
