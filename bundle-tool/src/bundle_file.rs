//! The self-contained bundle file (file IO; the manifest and object checks
//! are pure and live in [`cairn_core::bundle`]).
//!
//! A bundle file is the manifest followed by every object, in entry order,
//! and is verified on every read. Parsing is core's
//! ([`cairn_core::bundle_file`]); this module only opens and writes files.

use cairn_core::bundle::{verify_object, Entry, Manifest};
use cairn_core::bundle_file::{encode_head, read_bundle};
use cairn_core::limits::Limits;
use cairn_core::{BundleId, Error, Result};
use std::io::Write;
use std::path::Path;

/// Writes a bundle file: magic, format, manifest length and bytes, then
/// each entry's object bytes in entry order (each checked against its
/// entry's address). `object` returns the bytes of an entry. Returns the
/// bundle id, the address of the manifest document written.
pub fn write_bundle_file<B: AsRef<[u8]>>(
    path: &Path,
    manifest: &Manifest,
    mut object: impl FnMut(&Entry) -> Result<B>,
) -> Result<BundleId> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let id;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        let encoded = manifest.encode_all();
        w.write_all(&encode_head(manifest.format, &encoded))
            .map_err(io)?;
        id = encoded.id();
        for e in &manifest.entries {
            let bytes = object(e)?;
            let bytes = bytes.as_ref();
            verify_object(&e.object, bytes)?;
            w.write_all(bytes).map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(id)
}

/// Reads a bundle file with the one parser,
/// [`cairn_core::bundle_file::read_bundle`]: verifies the manifest and every
/// object and calls `each` with every verified entry and its bytes. Returns
/// the manifest. Errors name the file; nothing larger than the limits is
/// allocated.
pub fn read_bundle_file(
    path: &Path,
    limits: &Limits,
    each: impl FnMut(&Entry, Vec<u8>) -> Result<()>,
) -> Result<Manifest> {
    let f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_bundle(&mut std::io::BufReader::new(f), path, limits, each)
}
