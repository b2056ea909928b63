//! Positional I/O: the [`BlockIo`] trait the engine reads and writes files through, implemented
//! for [`std::fs::File`] (pread/pwrite, no shared cursor) and for the in-memory [`MemFile`] used
//! by tests and fuzz targets.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::RwLock;

/// Positional, thread-safe I/O on one file-like object. Every method takes `&self`, so many
/// threads may read and write concurrently (no shared seek position).
pub trait BlockIo: Send + Sync {
    /// Fills all of `buf` from `offset`; reading past the end is an `UnexpectedEof` error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file when needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync for files).
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True when the length is zero.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Fills all of `buf` from `offset` only if that needs no waiting for a device (the
    /// data is in memory, e.g. the page cache): `Ok(true)` when `buf` was filled, `Ok(false)`
    /// when the caller should use [`BlockIo::read_at`] (on a thread that may block) instead.
    /// The default never tries.
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }
    /// The operating-system file behind this object, if it is one (lets a server move its
    /// pages to a socket without copying them). The default is `None`.
    fn as_file(&self) -> Option<&File> {
        None
    }
}

impl BlockIo for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        read_nowait(self, buf, offset)
    }
    fn as_file(&self) -> Option<&File> {
        Some(self)
    }
}

/// `preadv2(RWF_NOWAIT)` until `buf` is full: `Ok(false)` as soon as the kernel would have to
/// wait for the device (EAGAIN, or a short read part-way through uncached pages), or when the
/// kernel does not know the flag (EOPNOTSUPP/EINVAL on old kernels or odd file systems).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn read_nowait(f: &File, buf: &mut [u8], offset: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let Ok(off) = libc::off_t::try_from(offset + done as u64) else {
            return Ok(false);
        };
        // SAFETY: `iov` describes `rest`, a live, exclusively borrowed buffer of exactly
        // `iov_len` bytes, for the duration of the call; the fd is owned by `f`, which outlives
        // the call; the kernel writes at most `iov_len` bytes into it.
        let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Ok(false),
                _ => Err(e),
            };
        }
        if n == 0 {
            // End of file: let the blocking path report it the usual way.
            return Ok(false);
        }
        done += n as usize;
    }
    Ok(true)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn read_nowait(_f: &File, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
    Ok(false)
}

/// Opens the VHD file at `path` (read-write when `writable`) without blocking and only if it
/// is a regular file: a FIFO would otherwise block the open (and every read) until a writer
/// came, and a directory or device is no VHD. `O_NONBLOCK` has no effect on a regular file's
/// reads and writes.
pub fn open_regular(path: &std::path::Path, writable: bool) -> crate::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let name = path.display().to_string();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EISDIR) => crate::Error::NotRegular {
                path: path.to_path_buf(),
                kind: "directory",
            },
            _ => crate::Error::io(&name, "opening", e),
        })?;
    let t = f
        .metadata()
        .map_err(|e| crate::Error::io(&name, "reading the file type", e))?
        .file_type();
    let kind = if t.is_file() {
        return Ok(f);
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else {
        "special file"
    };
    Err(crate::Error::NotRegular {
        path: path.to_path_buf(),
        kind,
    })
}

/// An in-memory file for tests and fuzzing. Cloning is not shared: wrap it in an `Arc` to share.
#[derive(Debug, Default)]
pub struct MemFile {
    data: RwLock<Vec<u8>>,
}

impl MemFile {
    /// An empty in-memory file.
    pub fn new() -> Self {
        Self::default()
    }
    /// An in-memory file holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemFile {
            data: RwLock::new(bytes),
        }
    }
    /// A copy of the whole content.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockIo for MemFile {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.read_at(buf, offset).map(|()| true)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= data.len() as u64)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of MemFile")
            })?;
        buf.copy_from_slice(&data[offset as usize..end as usize]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= isize::MAX as u64)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "MemFile offset overflow")
            })?;
        if data.len() < end as usize {
            data.resize(end as usize, 0);
        }
        data[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "MemFile too large"))?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfile_reads_back_writes_and_refuses_reads_past_end() {
        let m = MemFile::new();
        m.write_at(b"hello", 10).unwrap();
        assert_eq!(m.len().unwrap(), 15);
        let mut b = [1u8; 15];
        m.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..10], &[0; 10]);
        assert_eq!(&b[10..], b"hello");
        assert!(m.read_at(&mut [0u8; 2], 14).is_err());
        m.set_len(3).unwrap();
        assert_eq!(m.len().unwrap(), 3);
    }
}
