//! What an export serves: the [`BlockBackend`] trait (positional, `&self`, thread-safe so many
//! requests run at once) and an in-memory disk ([`MemBackend`], for tests and fuzzing). Disks
//! in files (raw images, VHD chains) implement it where their formats live.

use crate::splice::Piece;
use crate::Error;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

/// Allocation state of one extent, as `NBD_CMD_BLOCK_STATUS` (`base:allocation`) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentState {
    /// Allocated data.
    Data,
    /// Allocated, known to read as zeroes.
    Zero,
    /// Not allocated anywhere; reads as zeroes.
    Hole,
}

/// One run of equal allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset in the disk.
    pub offset: u64,
    /// Length in bytes (> 0).
    pub length: u64,
    /// Its state.
    pub state: ExtentState,
}

/// A virtual disk served by an export. Every method takes `&self` and may run concurrently
/// with the others from many threads; implementations lock internally where they must.
/// Offsets and lengths are bytes; callers keep `offset + len <= size()`.
pub trait BlockBackend: Send + Sync + 'static {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// True when writes must be refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error>;
    /// Fills `buf` from `offset` only if that needs no waiting for a device (everything is
    /// cached in memory): `Ok(true)` when done, `Ok(false)` when the caller must use
    /// [`BlockBackend::read_at`] on a thread that may block. Lets the server answer cached
    /// reads on its event loop without a hop to the blocking pool. The default never tries.
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool, Error> {
        let _ = (buf, offset);
        Ok(false)
    }
    /// Where the bytes of `[offset, offset+len)` are, without reading them: zeros and ranges
    /// of the backend's files ([`Piece::Zero`], [`Piece::File`]), in order, for replies that
    /// move file pages to the socket without copying them. `Ok(None)` (the default) when the
    /// backend has no files; the caller then reads. May block (it may read metadata).
    fn read_plan(&self, offset: u64, len: u64) -> Result<Option<Vec<Piece<'_>>>, Error> {
        let _ = (offset, len);
        Ok(None)
    }
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), Error>;
    /// Advisory discard of a range (may do nothing; reads afterwards are unspecified by NBD).
    fn trim(&self, offset: u64, len: u64) -> Result<(), Error>;
    /// Makes a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error>;
    /// Allocation map of `[offset, offset+len)`: contiguous extents covering a non-empty
    /// prefix of the range (ideally all of it).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error>;
}

/// Writes zeroes through `write_at` in bounded chunks (for backends with no cheaper way).
pub fn write_zeroes_by_writing<B: BlockBackend + ?Sized>(
    b: &B,
    offset: u64,
    len: u64,
) -> Result<(), Error> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        b.write_at(&zeroes[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

fn check_writable(read_only: bool) -> Result<(), Error> {
    if read_only {
        Err(Error::ReadOnly)
    } else {
        Ok(())
    }
}

/// An in-memory disk, tracking allocation in 64 KiB granules (tests, fuzzing).
pub struct MemBackend {
    data: Mutex<Vec<u8>>,
    allocated: Mutex<Vec<bool>>,
    read_only: bool,
    flushes: std::sync::atomic::AtomicU64,
}

/// Allocation granule of [`MemBackend`].
pub const MEM_GRANULE: u64 = 64 << 10;

impl MemBackend {
    /// A zeroed, unallocated disk of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> Self {
        MemBackend {
            data: Mutex::new(vec![0; size as usize]),
            allocated: Mutex::new(vec![false; size.div_ceil(MEM_GRANULE) as usize]),
            read_only,
            flushes: Default::default(),
        }
    }

    /// How many times `flush` ran (lets tests prove `pause` flushes).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn mark(&self, offset: u64, len: u64, on: bool) {
        if len == 0 {
            return;
        }
        let mut a = self.allocated.lock().expect("poisoned");
        let first = offset / MEM_GRANULE;
        let last = (offset + len - 1) / MEM_GRANULE;
        for g in first..=last {
            a[g as usize] = on;
        }
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.data.lock().expect("poisoned").len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let d = self.data.lock().expect("poisoned");
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool, Error> {
        self.read_at(buf, offset).map(|()| true)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        check_writable(self.read_only)?;
        {
            let mut d = self.data.lock().expect("poisoned");
            let o = offset as usize;
            d[o..o + buf.len()].copy_from_slice(buf);
        }
        self.mark(offset, buf.len() as u64, true);
        Ok(())
    }
    fn flush(&self) -> Result<(), Error> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<(), Error> {
        check_writable(self.read_only)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error> {
        check_writable(self.read_only)?;
        let mut d = self.data.lock().expect("poisoned");
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let a = self.allocated.lock().expect("poisoned");
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let g = pos / MEM_GRANULE;
            let gend = ((g + 1) * MEM_GRANULE).min(end);
            let state = if a[g as usize] {
                ExtentState::Data
            } else {
                ExtentState::Hole
            };
            match out.last_mut() {
                Some(l) if l.state == state => l.length += gend - pos,
                _ => out.push(Extent {
                    offset: pos,
                    length: gend - pos,
                    state,
                }),
            }
            pos = gend;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_backend_reports_written_granules_as_data_and_the_rest_as_holes() {
        let m = MemBackend::new(4 * MEM_GRANULE, false);
        m.write_at(&[1; 10], MEM_GRANULE + 5).unwrap();
        let map = m.block_status(0, 4 * MEM_GRANULE).unwrap();
        let states: Vec<_> = map.iter().map(|e| (e.offset, e.length, e.state)).collect();
        assert_eq!(
            states,
            vec![
                (0, MEM_GRANULE, ExtentState::Hole),
                (MEM_GRANULE, MEM_GRANULE, ExtentState::Data),
                (2 * MEM_GRANULE, 2 * MEM_GRANULE, ExtentState::Hole),
            ]
        );
    }

    #[test]
    fn read_only_mem_backend_refuses_writes() {
        let m = MemBackend::new(MEM_GRANULE, true);
        assert!(matches!(m.write_at(&[1], 0), Err(Error::ReadOnly)));
        assert!(matches!(m.write_zeroes(0, 1), Err(Error::ReadOnly)));
    }
}
