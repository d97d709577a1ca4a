//! Reading files in the target directory, which anyone with write access
//! to it can replace: never follow a symbolic link, never block on a FIFO
//! or device, and never allocate more than a cap known before reading.
//!
//! A view of [`crate::fsread`] (the agent's one no-follow, capped reader)
//! that sorts the outcomes the way the target needs them.

use crate::fsread::{read_regular_file_capped, ReadFileErrorKind};
use std::io;
use std::path::Path;

/// What reading a local file found.
#[derive(Debug)]
pub(super) enum LocalFile {
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
pub(super) fn read_regular(path: &Path, cap: u64) -> io::Result<LocalFile> {
    match read_regular_file_capped(path, cap) {
        Ok(bytes) => Ok(LocalFile::Bytes(bytes)),
        Err(e) => match e.kind {
            ReadFileErrorKind::NotFound => Ok(LocalFile::Missing),
            ReadFileErrorKind::Symlink | ReadFileErrorKind::NotRegular(_) => {
                Ok(LocalFile::NotRegular)
            }
            ReadFileErrorKind::TooLarge { size, .. } => Ok(LocalFile::TooLarge(size)),
            ReadFileErrorKind::Io(e) => Err(e),
        },
    }
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
