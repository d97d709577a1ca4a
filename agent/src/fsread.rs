//! Reading small local files that someone else may have planted: the one
//! way the agent and `cairn-agent status` read files outside the store
//! (`hold.json`, `status.json`, the configuration file).
//!
//! A file is read only if it is a regular file, at most `cap` bytes:
//!
//! * opened with `O_NONBLOCK`, so a FIFO cannot block the open (and the
//!   thread doing it) waiting for a writer;
//! * opened with `O_NOFOLLOW` for files in the data directory, so a link to
//!   `/dev/zero` or to another user's file is refused, not followed (the
//!   configuration file may be a link: Kubernetes mounts ConfigMaps as
//!   links, see [`Links`]);
//! * checked with `fstat` on the opened descriptor (no race between the
//!   check and the read): anything but a regular file is refused before a
//!   byte is read;
//! * read through `take(cap + 1)`, so a file that grows after the check
//!   still cannot make us hold more than `cap` bytes.
//!
//! These are blocking calls: async code runs them in `spawn_blocking`.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Whether the last path component may be a symbolic link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// Refuse a link (files in the data directory, which other local
    /// users or a confused script may write).
    Refuse,
    /// Follow it (the operator's configuration file, which Kubernetes
    /// mounts as `agent.yaml -> ..data/agent.yaml`).
    Follow,
}

/// Why a file was not read. Its `Display` names the file.
#[derive(Debug)]
pub struct ReadFileError {
    /// The file.
    pub path: PathBuf,
    /// What was wrong.
    pub kind: ReadFileErrorKind,
}

/// What was wrong with a file.
#[derive(Debug)]
pub enum ReadFileErrorKind {
    /// There is no such file.
    NotFound,
    /// It is a symbolic link and links are refused here.
    Symlink,
    /// It is not a regular file (`"a FIFO"`, `"a directory"`, ...).
    NotRegular(&'static str),
    /// It is larger than the cap.
    TooLarge {
        /// Its size (at least; a growing file is cut at `cap + 1`).
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// Any other error from the operating system.
    Io(std::io::Error),
}

impl std::fmt::Display for ReadFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason())
    }
}

impl std::error::Error for ReadFileError {}

impl ReadFileError {
    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.kind, ReadFileErrorKind::NotFound)
    }

    /// The reason without the path (for messages that name the file
    /// themselves).
    pub fn reason(&self) -> String {
        match &self.kind {
            ReadFileErrorKind::NotFound => "no such file".into(),
            ReadFileErrorKind::Symlink => {
                "is a symbolic link; refusing to follow it (replace it with a regular file)".into()
            }
            ReadFileErrorKind::NotRegular(what) => {
                format!("is {what}, not a regular file; refusing to read it")
            }
            ReadFileErrorKind::TooLarge { size, cap } => {
                format!("{size} bytes is over the limit of {cap} bytes")
            }
            ReadFileErrorKind::Io(e) => e.to_string(),
        }
    }
}

/// Reads `path` if it is a regular file (not a link) of at most `cap`
/// bytes. See the module documentation.
pub fn read_regular_file_capped(path: &Path, cap: u64) -> Result<Vec<u8>, ReadFileError> {
    read_capped(path, cap, Links::Refuse)
}

/// [`read_regular_file_capped`] with a choice about a link as the last
/// path component.
pub fn read_capped(path: &Path, cap: u64, links: Links) -> Result<Vec<u8>, ReadFileError> {
    let fail = |kind| ReadFileError {
        path: path.to_path_buf(),
        kind,
    };
    let file = open(path, links).map_err(|e| {
        fail(match e.kind() {
            std::io::ErrorKind::NotFound => ReadFileErrorKind::NotFound,
            _ if is_link_refusal(&e) && links == Links::Refuse => ReadFileErrorKind::Symlink,
            _ => ReadFileErrorKind::Io(e),
        })
    })?;
    let meta = file
        .metadata()
        .map_err(|e| fail(ReadFileErrorKind::Io(e)))?;
    if !meta.is_file() {
        return Err(fail(ReadFileErrorKind::NotRegular(file_type_name(&meta))));
    }
    if meta.len() > cap {
        return Err(fail(ReadFileErrorKind::TooLarge {
            size: meta.len(),
            cap,
        }));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| fail(ReadFileErrorKind::Io(e)))?;
    if bytes.len() as u64 > cap {
        return Err(fail(ReadFileErrorKind::TooLarge {
            size: bytes.len() as u64,
            cap,
        }));
    }
    Ok(bytes)
}

#[cfg(unix)]
fn open(path: &Path, links: Links) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if links == Links::Refuse {
        flags |= libc::O_NOFOLLOW;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
}

#[cfg(not(unix))]
fn open(path: &Path, _links: Links) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

/// `open(O_NOFOLLOW)` on a link fails with `ELOOP` (Linux, the BSDs use
/// `EMLINK`).
fn is_link_refusal(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::EMLINK))
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

fn file_type_name(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_regular_files_and_refuses_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        assert_eq!(read_regular_file_capped(&f, 5).unwrap(), b"hello");
        let e = read_regular_file_capped(&f, 4).unwrap_err();
        assert!(matches!(
            e.kind,
            ReadFileErrorKind::TooLarge { size: 5, cap: 4 }
        ));
        assert!(e.to_string().starts_with(&f.display().to_string()), "{e}");

        let missing = read_regular_file_capped(&d.path().join("nope"), 9).unwrap_err();
        assert!(missing.is_not_found(), "{missing}");

        let link = d.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let e = read_regular_file_capped(&link, 9).unwrap_err();
        assert!(matches!(e.kind, ReadFileErrorKind::Symlink), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // Followed where allowed, and then refused for not being regular.
        let e = read_capped(&link, 9, Links::Follow).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");

        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let started = std::time::Instant::now();
        let e = read_regular_file_capped(&fifo, 9).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));

        let e = read_regular_file_capped(d.path(), 9).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
    }
}
