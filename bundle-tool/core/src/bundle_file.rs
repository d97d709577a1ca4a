//! Decoding a self-contained bundle file (pure: it reads from any
//! [`Read`], and opens nothing; the `cairn` CLI's `bundle_file` module
//! reads and writes the files, the agent's `plan` command decodes them with
//! [`decode_bundle_file`]).
//!
//! Layout (docs/FORMATS.md, "Bundle file"): magic `CAIRNBDL`, format
//! (u32 BE, 1 or 2), the length (u64 BE) of the document at the bundle id,
//! that document, then (format 2) every manifest chunk in the order the
//! top document lists them, then every entry's object bytes in entry
//! order.

use crate::bundle::{check_format, verify_object, Assembly, Encoded, Head, Manifest};
use crate::limits::Limits;
use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// The first eight bytes of a bundle file.
pub const FILE_MAGIC: &[u8; 8] = b"CAIRNBDL";

/// Everything of a bundle file before the objects: magic, format, the
/// top document's length and bytes, and (format 2) the chunks.
pub fn encode_head(format: u32, encoded: &Encoded) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + encoded.len() as usize);
    out.extend_from_slice(FILE_MAGIC);
    out.extend_from_slice(&format.to_be_bytes());
    out.extend_from_slice(&(encoded.top.len() as u64).to_be_bytes());
    out.extend_from_slice(&encoded.top);
    for (_, c) in &encoded.chunks {
        out.extend_from_slice(c);
    }
    out
}

/// Reads a bundle file's head (magic, format, the document at the bundle
/// id and, format 2, each chunk, checked against the top document) from
/// `r`, which is left at the first object. `path` only names the file in
/// errors. Nothing over the limits is allocated.
pub fn read_head(r: &mut impl Read, path: &Path, limits: &Limits) -> Result<Manifest> {
    let bad = |reason: String| Error::InvalidBundleFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut head = [0u8; 20];
    r.read_exact(&mut head)
        .map_err(|_| bad("truncated header".into()))?;
    if &head[..8] != FILE_MAGIC {
        return Err(bad("wrong magic (not a cairn bundle file)".into()));
    }
    let format = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    check_format(format, limits).map_err(|e| bad(e.to_string()))?;
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
    let head = Head::decode(&mbytes, None, limits).map_err(|e| bad(e.to_string()))?;
    let manifest = match head {
        Head::Whole(m) => m,
        Head::Chunked(top) => {
            let mut a = Assembly::new(top);
            for (i, (address, size)) in a.missing().into_iter().enumerate() {
                // Sizes were checked against the limits with the top.
                let mut buf = vec![0u8; size as usize];
                r.read_exact(&mut buf)
                    .map_err(|_| bad(format!("truncated at manifest chunk {}", i + 1)))?;
                a.add(&address, &buf, limits)
                    .map_err(|e| bad(e.to_string()))?;
            }
            a.finish(limits).map_err(|e| bad(e.to_string()))?
        }
    };
    if manifest.format != format {
        return Err(bad(format!(
            "the header says format {format}, the manifest {}",
            manifest.format
        )));
    }
    Ok(manifest)
}

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
    let mut rest = bytes;
    let manifest = read_head(&mut rest, path, limits)?;
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
