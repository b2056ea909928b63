//! [`BlockBackend`] for a raw image file: positional I/O (`pread`/`pwrite`), cached reads
//! without waiting (`preadv2(RWF_NOWAIT)`, through [`vhd::io::BlockIo`]), and the file itself
//! as the read plan (zero-copy replies).

use nbd::backend::{write_zeroes_by_writing, BlockBackend, Extent, ExtentState};
use nbd::splice::Piece;
use nbd::Error;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

fn check_writable(read_only: bool) -> Result<(), Error> {
    if read_only {
        Err(Error::ReadOnly)
    } else {
        Ok(())
    }
}

/// A raw image file served as is, with positional I/O (`pread`/`pwrite`).
pub struct RawFileBackend {
    file: File,
    size: u64,
    read_only: bool,
    dirty: AtomicBool,
}

impl RawFileBackend {
    /// Opens `path` (read-write unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(RawFileBackend {
            file,
            size,
            read_only,
            dirty: AtomicBool::new(false),
        })
    }
}

impl BlockBackend for RawFileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.file.read_exact_at(buf, offset).map_err(Error::Io)
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool, Error> {
        vhd::io::BlockIo::try_read_at(&self.file, buf, offset).map_err(Error::Io)
    }
    fn read_plan(&self, offset: u64, len: u64) -> Result<Option<Vec<Piece<'_>>>, Error> {
        Ok(Some(vec![Piece::File {
            file: &self.file,
            offset,
            len,
        }]))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        check_writable(self.read_only)?;
        self.dirty.store(true, Ordering::Release);
        self.file.write_all_at(buf, offset).map_err(Error::Io)
    }
    fn flush(&self) -> Result<(), Error> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            self.file.sync_data().map_err(Error::Io)?;
        }
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<(), Error> {
        check_writable(self.read_only)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error> {
        check_writable(self.read_only)?;
        write_zeroes_by_writing(self, offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        Ok(vec![Extent {
            offset,
            length: len,
            state: ExtentState::Data,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_file_backend_reads_back_what_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let b = RawFileBackend::open(&p, false).unwrap();
        b.write_at(b"hello", 4000).unwrap();
        b.flush().unwrap();
        let mut buf = [0u8; 5];
        b.read_at(&mut buf, 4000).unwrap();
        assert_eq!(&buf, b"hello");
        b.write_zeroes(4000, 5).unwrap();
        b.read_at(&mut buf, 4000).unwrap();
        assert_eq!(buf, [0; 5]);
    }
}
