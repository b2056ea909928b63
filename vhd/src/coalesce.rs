//! Offline coalescing (like `vhd-util coalesce`): copy a differencing child's own sectors into
//! its parent, so that the child's content becomes the parent's and the child can be dropped
//! (its children re-pointed with [`crate::set_parent`]).
//!
//! Only allocated blocks are read, and within them only the runs of sectors the child holds;
//! each run is written with one call. The copy is idempotent — the child is not modified and
//! every write puts the same bytes at the same place — so an interrupted coalesce resumes by
//! running it again; the parent is flushed at the end. The parent's other descendants (if any)
//! would see the change: callers coalesce only a hidden base with exactly one child.

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::format::{DiskType, SECTOR};
use std::path::Path;

/// What a coalesce did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoalesceReport {
    /// Child blocks examined (allocated).
    pub blocks: u64,
    /// Bytes copied into the parent.
    pub bytes: u64,
}

/// Copies every sector `child` holds into `parent` (which must be `child`'s parent, opened
/// writable). `progress(done, total)` is called after each block.
pub fn coalesce_disks(
    child: &Disk,
    parent: &Disk,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CoalesceReport> {
    if child.disk_type() != DiskType::Differencing {
        return Err(Error::InvalidArgument(format!(
            "{}: not a differencing disk; nothing to coalesce",
            child.name()
        )));
    }
    let want = child.header().map(|h| h.parent_uuid).unwrap_or_default();
    if parent.uuid() != want {
        return Err(Error::ParentMismatch {
            child: child.name().into(),
            parent: parent.name().into(),
            expected: want,
            found: parent.uuid(),
        });
    }
    if !parent.is_writable() {
        return Err(Error::ReadOnly(parent.name().into()));
    }
    if parent.disk_type() != DiskType::Fixed && parent.block_size() != child.block_size() {
        return Err(Error::ChainMismatch(format!(
            "{}: block size {} differs from the child's {}",
            parent.name(),
            parent.block_size(),
            child.block_size()
        )));
    }
    if parent.virtual_size() < child.virtual_size() {
        return Err(Error::ChainMismatch(format!(
            "{}: parent is smaller ({} bytes) than the child ({} bytes)",
            parent.name(),
            parent.virtual_size(),
            child.virtual_size()
        )));
    }
    let blocks: Vec<u64> = (0..child.blocks())
        .filter(|&b| child.is_allocated(b))
        .collect();
    let total = blocks.len() as u64;
    let spb = (child.block_size() / SECTOR) as u32;
    let mut report = CoalesceReport::default();
    let mut buf = vec![0u8; child.block_size() as usize];
    for (i, &b) in blocks.iter().enumerate() {
        let bm = child.presence(b)?.expect("allocated block has a bitmap");
        // Sectors past the virtual size are not copied.
        let limit = ((child.virtual_size() - b * child.block_size()).min(child.block_size())
            / SECTOR) as u32;
        let mut s = 0u32;
        while s < limit.min(spb) {
            if !bm.get(s) {
                s += 1;
                continue;
            }
            let start = s;
            while s < limit && bm.get(s) {
                s += 1;
            }
            let bytes = ((s - start) as u64 * SECTOR) as usize;
            let data = &mut buf[..bytes];
            child.read_data(b, start as u64 * SECTOR, data)?;
            parent.write_sectors(b, start, data)?;
            report.bytes += bytes as u64;
        }
        report.blocks += 1;
        progress(i as u64 + 1, total);
    }
    parent.flush()?;
    tracing::info!(
        child = child.name(),
        parent = parent.name(),
        blocks = report.blocks,
        bytes = report.bytes,
        "coalesced"
    );
    Ok(report)
}

/// Opens `child` read-only and `parent` writable and coalesces the child into the parent.
/// The caller resolves (and confines) the parent path, e.g. with [`crate::Chain::open`].
pub fn coalesce(
    child: &Path,
    parent: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CoalesceReport> {
    let c = Disk::open(child, false)?;
    let p = Disk::open(parent, true)?;
    coalesce_disks(&c, &p, progress)
}
