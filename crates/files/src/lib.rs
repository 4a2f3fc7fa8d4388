//! Reading a file that someone else controls: a plugin's `plugin.toml` or signature,
//! an operator's policy or config, a key, an archive, an index.
//!
//! `std::fs::read` trusts the file: a FIFO blocks the reader until a writer comes (a
//! lifecycle pass, a reload or a CLI command hangs), `/dev/zero` or a symlink to a
//! large file grows the reader by whatever it yields, and a file that grows while it
//! is read defeats a size check made before. [`read_regular`] opens without blocking,
//! accepts regular files only (after symlinks), refuses one over its limit by its
//! size and reads at most one byte past the limit, so none of that can happen; every
//! refusal is a [`ReadError`] that says what the file was.

use std::fmt;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a file was not read. The messages name no path: callers say which file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a regular file (a {0})")]
    NotRegular(FileKind),
    #[error("{len} bytes, over the {} it may have", Size(*max))]
    TooLarge { len: u64, max: u64 },
    #[error("it grew past the {} it may have while being read", Size(*max))]
    Grew { max: u64 },
    #[error("not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
}

impl ReadError {
    /// Whether the file does not exist (callers often treat that as "not given").
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// What a path that is not a regular file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    Fifo,
    Socket,
    Device,
    Symlink,
    Other,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Directory => "directory",
            FileKind::Fifo => "FIFO",
            FileKind::Socket => "socket",
            FileKind::Device => "device",
            FileKind::Symlink => "symbolic link",
            FileKind::Other => "special file",
        })
    }
}

impl FileKind {
    fn of(meta: &std::fs::Metadata) -> FileKind {
        let t = meta.file_type();
        if t.is_dir() {
            FileKind::Directory
        } else if t.is_fifo() {
            FileKind::Fifo
        } else if t.is_socket() {
            FileKind::Socket
        } else if t.is_char_device() || t.is_block_device() {
            FileKind::Device
        } else if t.is_symlink() {
            FileKind::Symlink
        } else {
            FileKind::Other
        }
    }
}

/// A byte count for messages: "4 KiB", "1 MiB", "300 bytes".
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        match b {
            _ if b >= 1 << 20 && b.is_multiple_of(1 << 20) => write!(f, "{} MiB", b >> 20),
            _ if b >= 1 << 10 && b.is_multiple_of(1 << 10) => write!(f, "{} KiB", b >> 10),
            _ => write!(f, "{b} bytes"),
        }
    }
}

/// Open the regular file at `path` for reading, symlinks followed, without ever
/// blocking (`O_NONBLOCK`: a FIFO or device is refused by its type on the opened
/// descriptor, so nothing can be swapped in between a check and the open).
pub fn open_regular(path: &Path) -> Result<(File, Metadata), ReadError> {
    open(path, 0)
}

/// [`open_regular`], but a symlink at `path` itself is refused (`O_NOFOLLOW`): for
/// walking a tree someone else controls, where a file seen as regular may be
/// replaced by a link to anywhere before it is opened.
pub fn open_regular_here(path: &Path) -> Result<(File, Metadata), ReadError> {
    open(path, libc::O_NOFOLLOW)
}

fn open(path: &Path, flags: i32) -> Result<(File, Metadata), ReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) if flags & libc::O_NOFOLLOW != 0 => {
                ReadError::NotRegular(FileKind::Symlink)
            }
            _ => ReadError::Io(e),
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(FileKind::of(&meta)));
    }
    Ok((file, meta))
}

/// The bytes of the regular file at `path` (symlinks followed), at most `max` of
/// them: see [`open_regular`]. One over the limit by its size is refused before any
/// read, and one that holds more than its size said is read one byte past the limit
/// and refused.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let (file, meta) = open_regular(path)?;
    if meta.len() > max {
        return Err(ReadError::TooLarge {
            len: meta.len(),
            max,
        });
    }
    read_at_most(file, max, meta.len())
}

/// All of `r`, at most `max` bytes: at most one byte past the limit is read, and a
/// reader holding more is refused ([`ReadError::Grew`]) whatever it said its size
/// was (`size`, the room made first, capped at `max`).
pub fn read_at_most(r: impl Read, max: u64, size: u64) -> Result<Vec<u8>, ReadError> {
    let mut bytes = Vec::with_capacity(size.min(max) as usize);
    r.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::Grew { max });
    }
    Ok(bytes)
}

/// [`read_regular`], as UTF-8 text.
pub fn read_regular_string(path: &Path, max: u64) -> Result<String, ReadError> {
    String::from_utf8(read_regular(path, max)?).map_err(|e| ReadError::NotUtf8 {
        offset: e.utf8_error().valid_up_to(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::time::{Duration, Instant};

    #[test]
    fn regular_files_within_the_limit_are_read_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, "twelve bytes").unwrap();
        assert_eq!(read_regular_string(&p, 12).unwrap(), "twelve bytes");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(read_regular(&link, 100).unwrap(), b"twelve bytes");
    }

    #[test]
    fn a_file_over_the_limit_is_refused_by_its_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![b'x'; 4097]).unwrap();
        let e = read_regular(&p, 4096).unwrap_err();
        assert!(matches!(
            e,
            ReadError::TooLarge {
                len: 4097,
                max: 4096
            }
        ));
        assert_eq!(e.to_string(), "4097 bytes, over the 4 KiB it may have");
    }

    #[test]
    fn fifos_devices_and_directories_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo has no other preconditions.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = Instant::now();
        let e = read_regular(&fifo, 4096).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "it blocked");
        assert_eq!(e.to_string(), "not a regular file (a FIFO)");
        // A symlink to one is no better.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(matches!(
            read_regular(&link, 4096),
            Err(ReadError::NotRegular(FileKind::Fifo))
        ));
        assert!(matches!(
            read_regular(Path::new("/dev/zero"), 4096),
            Err(ReadError::NotRegular(FileKind::Device))
        ));
        assert!(matches!(
            read_regular(d.path(), 4096),
            Err(ReadError::NotRegular(FileKind::Directory))
        ));
        assert!(
            read_regular(&d.path().join("missing"), 1)
                .unwrap_err()
                .is_not_found()
        );
        // Walking someone else's tree: a link is refused, whatever it points at.
        let file = d.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let to_file = d.path().join("to-file");
        std::os::unix::fs::symlink(&file, &to_file).unwrap();
        assert!(open_regular_here(&file).is_ok());
        assert_eq!(
            open_regular_here(&to_file).unwrap_err().to_string(),
            "not a regular file (a symbolic link)"
        );
    }

    /// A file that holds more when read than its size said at the check (one that
    /// grows meanwhile, or a kernel file whose size is 0) is read one byte past the
    /// limit and refused. `/proc` files are the deterministic case: size 0, content
    /// on read.
    #[test]
    fn a_file_larger_when_read_than_its_size_is_refused_at_the_limit() {
        let status = Path::new("/proc/self/status");
        assert_eq!(std::fs::metadata(status).unwrap().len(), 0);
        let e = read_regular(status, 16).unwrap_err();
        assert!(matches!(e, ReadError::Grew { max: 16 }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "it grew past the 16 bytes it may have while being read"
        );
        assert!(read_regular(status, 1 << 20).unwrap().starts_with(b"Name:"));
    }

    /// A reader that holds far more than the limit gives up only one byte past it
    /// before it is refused: the rest is never read, so never held.
    #[test]
    fn a_reader_past_the_limit_is_read_one_byte_past_it_and_refused() {
        struct Counted(u64);
        impl Read for Counted {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                buf.fill(7);
                self.0 += buf.len() as u64;
                Ok(buf.len())
            }
        }
        let mut endless = Counted(0);
        let e = read_at_most(&mut endless, 1000, 0).unwrap_err();
        assert!(matches!(e, ReadError::Grew { max: 1000 }), "{e:?}");
        assert_eq!(endless.0, 1001, "read past the limit and a byte");
        assert_eq!(read_at_most(&b"abc"[..], 3, 3).unwrap(), b"abc");
        assert_eq!(read_at_most(&b"abc"[..], 3, 1 << 40).unwrap(), b"abc");
    }

    #[test]
    fn text_must_be_utf8_and_the_error_says_where() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"ok\xffno").unwrap();
        assert_eq!(
            read_regular_string(&p, 100).unwrap_err().to_string(),
            "not UTF-8 (invalid byte at offset 2)"
        );
    }
}
