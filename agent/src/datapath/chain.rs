//! [`BlockBackend`] for a VHD chain ([`vhd::Chain`]): reads through the chain, writes into the
//! leaf, block status straight from the BATs and sector bitmaps.

use nbd::backend::{BlockBackend, Extent, ExtentState};
use nbd::splice::Piece;
use nbd::Error;
use std::path::Path;

/// A VHD chain served as a disk.
pub struct ChainBackend {
    chain: vhd::Chain,
}

impl ChainBackend {
    /// Wraps an open chain.
    pub fn new(chain: vhd::Chain) -> Self {
        ChainBackend { chain }
    }

    /// Opens the chain whose leaf is `leaf`, parents confined to `root`.
    pub fn open(leaf: &Path, root: &Path, writable: bool) -> Result<Self, Error> {
        let opts = vhd::ChainOptions::new(root).writable(writable);
        let chain = vhd::Chain::open(leaf, &opts).map_err(vhd_error)?;
        Ok(ChainBackend { chain })
    }

    /// The chain served.
    pub fn chain(&self) -> &vhd::Chain {
        &self.chain
    }
}

/// Maps a VHD error to the datapath's, keeping OS errors (ENOSPC…) visible to clients.
pub fn vhd_error(e: vhd::Error) -> Error {
    match e {
        vhd::Error::ReadOnly(_) => Error::ReadOnly,
        vhd::Error::Io { source, .. }
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::ENOMEM)
            ) =>
        {
            Error::Io(source)
        }
        // The VHD error's whole text (its own sources included) as the backend's error: the
        // NBD layer prints it once, with nothing under it to repeat.
        other => Error::Backend {
            what: "VHD",
            source: other.full_text().into(),
        },
    }
}

impl BlockBackend for ChainBackend {
    fn size(&self) -> u64 {
        self.chain.virtual_size()
    }
    fn read_only(&self) -> bool {
        !self.chain.is_writable()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.chain.read_at(buf, offset).map_err(vhd_error)
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool, Error> {
        self.chain.try_read_at(buf, offset).map_err(vhd_error)
    }
    fn read_plan(&self, offset: u64, len: u64) -> Result<Option<Vec<Piece<'_>>>, Error> {
        let plan = self.chain.read_plan(offset, len).map_err(vhd_error)?;
        let layers = self.chain.layers();
        let mut out = Vec::with_capacity(plan.len());
        for p in plan {
            out.push(match p.source {
                vhd::PieceSource::Zero => Piece::Zero(p.len),
                vhd::PieceSource::File { layer, file_offset } => {
                    // A layer that is not an OS file (in-memory tests) cannot be spliced.
                    let Some(file) = layers[layer].io().as_file() else {
                        return Ok(None);
                    };
                    Piece::File {
                        file,
                        offset: file_offset,
                        len: p.len,
                    }
                }
            });
        }
        Ok(Some(out))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.chain.write_at(buf, offset).map_err(vhd_error)
    }
    fn flush(&self) -> Result<(), Error> {
        self.chain.flush().map_err(vhd_error)
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<(), Error> {
        // VHD cannot release space inside a file (blocks are never freed); discard is
        // advisory in NBD, so it is accepted and does nothing.
        if self.read_only() {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.chain.write_zeroes(offset, len).map_err(vhd_error)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let x = self.chain.block_status(offset, len).map_err(vhd_error)?;
        Ok(x.into_iter()
            .map(|e| Extent {
                offset: e.offset,
                length: e.length,
                state: match e.state {
                    vhd::ExtentState::Data { .. } => ExtentState::Data,
                    vhd::ExtentState::Zero => ExtentState::Hole,
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_backend_reads_writes_and_maps_a_dynamic_vhd() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.vhd");
        vhd::create_dynamic(&p, 8 << 20, &Default::default()).unwrap();
        let b = ChainBackend::open(&p, dir.path(), true).unwrap();
        assert_eq!(b.size(), 8 << 20);
        assert!(!b.read_only());
        b.write_at(&[0xab; 4096], 3 << 20).unwrap();
        b.flush().unwrap();
        let mut buf = [0u8; 4096];
        b.read_at(&mut buf, 3 << 20).unwrap();
        assert_eq!(buf, [0xab; 4096]);
        let map = b.block_status(0, 8 << 20).unwrap();
        assert!(map
            .iter()
            .any(|e| e.state == ExtentState::Data && e.offset <= 3 << 20));
        assert_eq!(map[0].state, ExtentState::Hole);
        let ro = ChainBackend::open(&p, dir.path(), false).unwrap();
        assert!(matches!(ro.write_at(&[1], 0), Err(Error::ReadOnly)));
    }
}
