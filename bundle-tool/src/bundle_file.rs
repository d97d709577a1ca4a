//! The self-contained bundle file (file IO; the manifest and object checks
//! are pure and live in [`cairn_core::bundle`]).
//!
//! A bundle file is the manifest followed by every object, in entry order,
//! and is verified on every read.

use cairn_core::bundle::{verify_object, Entry, Manifest, BUNDLE_FORMAT};
use cairn_core::limits::Limits;
use cairn_core::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;

const FILE_MAGIC: &[u8; 8] = b"CAIRNBDL";

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
        let m = manifest.encode();
        w.write_all(FILE_MAGIC).map_err(io)?;
        w.write_all(&BUNDLE_FORMAT.to_be_bytes()).map_err(io)?;
        w.write_all(&(m.len() as u64).to_be_bytes()).map_err(io)?;
        w.write_all(&m).map_err(io)?;
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
    let mut head = [0u8; 20];
    r.read_exact(&mut head)
        .map_err(|_| bad("truncated header".into()))?;
    if &head[..8] != FILE_MAGIC {
        return Err(bad("wrong magic (not a cairn bundle file)".into()));
    }
    let format = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if format != BUNDLE_FORMAT {
        return Err(bad(format!("format {format}, expected {BUNDLE_FORMAT}")));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&head[12..20]);
    let mlen = u64::from_be_bytes(len8);
    if mlen > limits.max_manifest_bytes {
        return Err(bad(format!(
            "manifest of {mlen} bytes is over the limit of {}",
            limits.max_manifest_bytes
        )));
    }
    let mut mbytes = vec![0u8; mlen as usize];
    r.read_exact(&mut mbytes)
        .map_err(|_| bad("truncated manifest".into()))?;
    let manifest = Manifest::decode(&mbytes, None, limits).map_err(|e| bad(e.to_string()))?;
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
