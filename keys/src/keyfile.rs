//! Key files on disk.
//!
//! * `NAME.key`: the private key as a PKCS#8 document (binary DER), mode 0600.
//! * `NAME.pub`: text, comment lines starting with `#`, then one line
//!   `ed25519 <64 hex digits>`.

use crate::fs::write_atomic;
use crate::key::{KeyPair, PublicKey};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Largest key file read (private or public).
const MAX_KEY_FILE: u64 = 16 << 10;

fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_KEY_FILE {
        return Err(Error::KeyFile {
            path: path.to_path_buf(),
            reason: format!("{} bytes is too large for a key file", meta.len()),
        });
    }
    std::fs::read(path).map_err(io)
}

/// Reads a private key file.
pub fn read_private(path: &Path) -> Result<KeyPair> {
    let bytes = read_limited(path)?;
    if bytes.starts_with(b"# cairn public key") || bytes.starts_with(b"ed25519 ") {
        return Err(Error::KeyFile {
            path: path.to_path_buf(),
            reason: "this is a public key file; signing needs the private .key file".into(),
        });
    }
    KeyPair::from_pkcs8(&bytes).map_err(|reason| Error::KeyFile {
        path: path.to_path_buf(),
        reason,
    })
}

/// Renders a public key file.
pub fn render_public(pk: &PublicKey) -> String {
    format!(
        "# cairn public key, key id {}\ned25519 {}\n",
        pk.key_id(),
        hex::encode(&pk.0)
    )
}

/// Reads a public key file.
pub fn read_public(path: &Path) -> Result<PublicKey> {
    let bytes = read_limited(path)?;
    let bad = |reason: String| Error::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        bad("not a public key file (binary data; is this a private .key file?)".into())
    })?;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let hexkey = line
            .strip_prefix("ed25519 ")
            .ok_or_else(|| bad(format!("line {}: expected `ed25519 <hex>`", n + 1)))?;
        let raw = hex::decode(hexkey.trim())
            .map_err(|e| bad(format!("line {}: bad hex ({e})", n + 1)))?;
        return PublicKey::from_bytes(&raw).map_err(|e| bad(format!("line {}: {e}", n + 1)));
    }
    Err(bad("no `ed25519 <hex>` line found".into()))
}

/// Generates a key pair and writes `DIR/NAME.key` (0600) and `DIR/NAME.pub`.
/// Refuses to overwrite existing files. Returns the pair and both paths.
pub fn generate(dir: &Path, name: &str) -> Result<(KeyPair, PathBuf, PathBuf)> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(Error::KeyFile {
            path: dir.join(name),
            reason: "a key name must be a plain file name".into(),
        });
    }
    let key_path = dir.join(format!("{name}.key"));
    let pub_path = dir.join(format!("{name}.pub"));
    for p in [&key_path, &pub_path] {
        if p.exists() {
            return Err(Error::KeyFile {
                path: p.clone(),
                reason: "already exists; refusing to overwrite a key".into(),
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let kp = KeyPair::generate()?;
    write_atomic(&key_path, kp.pkcs8(), Some(0o600)).map_err(|source| Error::Io {
        path: key_path.clone(),
        source,
    })?;
    write_atomic(
        &pub_path,
        render_public(&kp.public_key()).as_bytes(),
        Some(0o644),
    )
    .map_err(|source| Error::Io {
        path: pub_path.clone(),
        source,
    })?;
    Ok((kp, key_path, pub_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_read_back() {
        let d = tempfile::tempdir().unwrap();
        let (kp, kpath, ppath) = generate(d.path(), "a").unwrap();
        assert_eq!(read_private(&kpath).unwrap().key_id(), kp.key_id());
        assert_eq!(read_public(&ppath).unwrap(), kp.public_key());
        assert!(matches!(read_private(&ppath), Err(Error::KeyFile { .. })));
        assert!(matches!(read_public(&kpath), Err(Error::KeyFile { .. })));
        assert!(generate(d.path(), "a").is_err(), "no overwrite");
    }
}
