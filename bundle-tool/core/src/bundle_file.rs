//! Decoding a self-contained bundle file from bytes (pure; the `cairn`
//! CLI's `bundle_file` module reads and writes the files, the agent's
//! `plan` command decodes them with this).
//!
//! Layout: magic `CAIRNBDL`, format (u32 BE), manifest length (u64 BE),
//! the manifest, then every entry's object bytes in entry order.

use crate::bundle::{verify_object, Manifest, BUNDLE_FORMAT};
use crate::limits::Limits;
use crate::{Error, Result};
use std::path::Path;

/// The first eight bytes of a bundle file.
pub const FILE_MAGIC: &[u8; 8] = b"CAIRNBDL";

/// Decodes a bundle file's bytes (`path` only names it in errors),
/// verifying the manifest and every object against its address. Returns
/// the manifest and each entry's object bytes, in entry order.
pub fn decode_bundle_file<'a>(
    bytes: &'a [u8],
    path: &Path,
    limits: &Limits,
) -> Result<(Manifest, Vec<&'a [u8]>)> {
    let bad = |reason: String| Error::InvalidBundleFile {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 20 {
        return Err(bad("truncated header".into()));
    }
    if &bytes[..8] != FILE_MAGIC {
        return Err(bad("wrong magic (not a cairn bundle file)".into()));
    }
    let format = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if format != BUNDLE_FORMAT {
        return Err(bad(format!("format {format}, expected {BUNDLE_FORMAT}")));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[12..20]);
    let mlen = u64::from_be_bytes(len8);
    if mlen > limits.max_manifest_bytes {
        return Err(bad(format!(
            "manifest of {mlen} bytes is over the limit of {}",
            limits.max_manifest_bytes
        )));
    }
    let rest = &bytes[20..];
    let mlen = usize::try_from(mlen).map_err(|_| bad("manifest length".into()))?;
    if rest.len() < mlen {
        return Err(bad("truncated manifest".into()));
    }
    let (mbytes, mut rest) = rest.split_at(mlen);
    let manifest = Manifest::decode(mbytes, None, limits).map_err(|e| bad(e.to_string()))?;
    let mut objects = Vec::with_capacity(manifest.entries.len());
    for e in &manifest.entries {
        let size = usize::try_from(e.size).unwrap_or(usize::MAX);
        if rest.len() < size {
            return Err(bad(format!(
                "truncated at object {} ({})",
                e.object,
                e.display_name()
            )));
        }
        let (obj, tail) = rest.split_at(size);
        verify_object(&e.object, obj)?;
        objects.push(obj);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the last object".into()));
    }
    Ok((manifest, objects))
}
