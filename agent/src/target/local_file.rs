//! Reading files in the target directory, which anyone with write access
//! to it can replace: never follow a symbolic link, never block on a FIFO
//! or device, and never allocate more than a cap known before reading.
//!
//! (A private helper: the agent has no shared no-follow reader yet. If
//! `crate::fsread` appears, this module should become a call to it.)

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What reading a local file found.
#[derive(Debug)]
pub enum LocalFile {
    /// No such file.
    Missing,
    /// A regular file's bytes.
    Bytes(Vec<u8>),
    /// A symbolic link, directory, FIFO, device or socket (not read).
    NotRegular,
    /// A regular file larger than the cap (not read).
    TooLarge(u64),
}

/// Reads `path` if it is a regular file of at most `cap` bytes. The final
/// path component is opened with `O_NOFOLLOW` (a symlink is
/// [`LocalFile::NotRegular`]) and `O_NONBLOCK` (a FIFO never blocks); the
/// type and size are checked on the open descriptor, and the read stops at
/// `cap + 1` bytes in case the file grows meanwhile.
pub fn read_regular(path: &Path, cap: u64) -> io::Result<LocalFile> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LocalFile::Missing),
        // ELOOP: the last component is a symlink.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(LocalFile::NotRegular),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Ok(LocalFile::NotRegular);
    }
    if meta.len() > cap {
        return Ok(LocalFile::TooLarge(meta.len()));
    }
    read_capped(f, cap, meta.len())
}

fn read_capped(f: File, cap: u64, hint: u64) -> io::Result<LocalFile> {
    let mut buf = Vec::with_capacity(hint as usize);
    f.take(cap + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        return Ok(LocalFile::TooLarge(buf.len() as u64));
    }
    Ok(LocalFile::Bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_links_fifos_directories_and_oversized_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        assert!(matches!(read_regular(&f, 5).unwrap(), LocalFile::Bytes(b) if b == b"hello"));
        assert!(matches!(
            read_regular(&f, 4).unwrap(),
            LocalFile::TooLarge(5)
        ));
        assert!(matches!(
            read_regular(&d.path().join("none"), 5).unwrap(),
            LocalFile::Missing
        ));
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(matches!(
            read_regular(&link, 5).unwrap(),
            LocalFile::NotRegular
        ));
        assert!(matches!(
            read_regular(d.path(), 5).unwrap(),
            LocalFile::NotRegular
        ));
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read_regular(&fifo, 5).unwrap(),
            LocalFile::NotRegular
        ));
    }
}
