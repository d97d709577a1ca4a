//! The one parser of self-contained bundle files (pure: it reads from any
//! [`Read`] and opens nothing). The `cairn` CLI's `bundle_file` module
//! opens and writes the files and reads them with [`read_bundle`]; the
//! agent's `plan` command does the same.
//!
//! Layout (docs/FORMATS.md, "Bundle file"): magic `CAIRNBDL`, format
//! (u32 BE, 1 or 2), the length (u64 BE) of the document at the bundle id,
//! that document, then (format 2) every manifest chunk in the order the
//! top document lists them, then every entry's object bytes in entry
//! order.

use crate::bundle::{check_format, verify_object, Assembly, Encoded, Entry, Head, Manifest};
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

/// Reads a whole bundle file from `r` (`path` only names the file in
/// errors): the head ([`read_head`]), then every entry's object bytes,
/// each verified against its address before `each` sees it, then checks
/// that nothing follows the last object. Returns the manifest. Nothing
/// over the limits is allocated: entry sizes were checked against them
/// with the manifest. This is the one bundle-file parser: the `cairn` CLI
/// (`verify`, `inspect`, `release`, `publish`, `diff`, …) opens the file and
/// calls it, the agent's `plan` command likewise.
pub fn read_bundle(
    r: &mut impl Read,
    path: &Path,
    limits: &Limits,
    mut each: impl FnMut(&Entry, Vec<u8>) -> Result<()>,
) -> Result<Manifest> {
    let bad = |reason: String| Error::InvalidBundleFile {
        path: path.to_path_buf(),
        reason,
    };
    let manifest = read_head(r, path, limits)?;
    for e in &manifest.entries {
        // The size was checked against `max_object_bytes` with the
        // manifest; `take` bounds the read whatever it says.
        let mut buf = Vec::with_capacity(usize::try_from(e.size).unwrap_or(0));
        let got = r
            .by_ref()
            .take(e.size)
            .read_to_end(&mut buf)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if (got as u64) < e.size {
            return Err(bad(format!(
                "truncated at object {} ({})",
                e.object,
                e.display_name()
            )));
        }
        verify_object(&e.object, &buf)
            .map_err(|err| bad(format!("{err} ({})", e.display_name())))?;
        each(e, buf)?;
    }
    let mut extra = [0u8; 1];
    let n = r.read(&mut extra).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if n != 0 {
        return Err(bad("trailing bytes after the last object".into()));
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{FORMAT_1, FORMAT_2};
    use crate::testing::{manifest_format, object};

    const PATH: &str = "/tmp/x.bundle";

    /// A bundle file of two objects in `format`, its manifest and objects.
    fn file(format: u32) -> (Vec<u8>, Manifest, Vec<Vec<u8>>) {
        let objs = [object("ns", "a", "1"), object("ns", "b", "2")];
        let m = manifest_format(format, &objs);
        let mut out = encode_head(format, &m.encode_all());
        let mut bodies = Vec::new();
        for e in &m.entries {
            let (_, b) = objs.iter().find(|(o, _)| o.object == e.object).unwrap();
            out.extend_from_slice(b);
            bodies.push(b.clone());
        }
        (out, m, bodies)
    }

    fn read(bytes: &[u8], limits: &Limits) -> Result<(Manifest, Vec<Vec<u8>>)> {
        let mut got = Vec::new();
        let m = read_bundle(&mut &bytes[..], Path::new(PATH), limits, |_, b| {
            got.push(b);
            Ok(())
        })?;
        Ok((m, got))
    }

    fn refused(bytes: &[u8], limits: &Limits) -> String {
        let e = read(bytes, limits).unwrap_err().to_string();
        assert!(e.contains(PATH), "names the file: {e}");
        e
    }

    #[test]
    fn reads_both_formats_and_verifies_every_object() {
        for format in [FORMAT_1, FORMAT_2] {
            let (bytes, m, bodies) = file(format);
            let (back, got) = read(&bytes, &Limits::default()).unwrap();
            assert_eq!(back, m);
            assert_eq!(got, bodies);
        }
    }

    #[test]
    fn bad_files_are_refused_naming_the_file() {
        let limits = Limits::default();
        for format in [FORMAT_1, FORMAT_2] {
            let (bytes, _, _) = file(format);
            let n = bytes.len();
            let e = refused(&bytes[..n - 1], &limits);
            assert!(e.contains("truncated at object"), "{e}");
            let mut more = bytes.clone();
            more.push(0);
            let e = refused(&more, &limits);
            assert!(e.contains("trailing bytes"), "{e}");
            let mut flipped = bytes.clone();
            flipped[n - 2] ^= 1;
            let e = refused(&flipped, &limits);
            assert!(e.contains("content hashes to"), "{e}");
            let mut magic = bytes.clone();
            magic[0] = b'X';
            let e = refused(&magic, &limits);
            assert!(e.contains("wrong magic"), "{e}");
            let e = refused(&bytes[..19], &limits);
            assert!(e.contains("truncated header"), "{e}");
            let e = refused(&bytes[..40], &limits);
            assert!(e.contains("truncated manifest"), "{e}");
        }
        // A length over the limit is refused before anything is allocated.
        let (mut bytes, _, _) = file(FORMAT_1);
        bytes[12..20].copy_from_slice(&u64::MAX.to_be_bytes());
        let e = refused(&bytes, &limits);
        assert!(e.contains("over the limit"), "{e}");
        // Objects over the limits are refused with the manifest, before
        // their bytes are read.
        let (bytes, _, _) = file(FORMAT_1);
        let small = Limits {
            max_object_bytes: 8,
            ..Limits::default()
        };
        let e = refused(&bytes, &small);
        assert!(!e.contains("truncated"), "{e}");
    }
}
