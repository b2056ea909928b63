//! Coalescing: merging a differencing disk's own data into its parent (like `vhd-util coalesce`),
//! and re-pointing the merged disk's children at that parent.
//!
//! Only what the child holds is copied: its allocated blocks, and inside each block only the
//! runs of sectors its bitmap marks present. The parent is written through [`Disk::write_sectors`]
//! (crash-ordered allocation), so the parent file is a valid VHD after a crash at any point.
//!
//! While a merge is in progress the parent's own content is a mix of old and merged sectors, but
//! the child's view (child over parent) never changes: every sector written into the parent is a
//! sector the child overrides with the same bytes. A merge is therefore safe to run while the
//! child (or any descendant of it) is being read, and safe to repeat: copying again gives the
//! same result. A journal file beside the parent records the merge and the first block not yet
//! durably merged, so an interrupted merge resumes where it stopped; its presence also marks the
//! parent as "mid-merge" (not usable on its own) until the merge completes.

use crate::chain::resolve_parent;
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::format::{DiskType, SECTOR};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How a merge runs.
#[derive(Debug, Clone)]
pub struct CoalesceOptions {
    /// Directory the child's parent must resolve inside (symlinks followed).
    pub root: PathBuf,
    /// Journal file. Default ([`None`]): `.<parent file name>.coalesce` beside the parent.
    pub journal: Option<PathBuf>,
    /// Highest copy rate in bytes per second ([`None`]: unlimited).
    pub rate_limit: Option<u64>,
    /// Bytes copied between durable checkpoints (parent fsync + journal update).
    pub checkpoint_bytes: u64,
}

impl CoalesceOptions {
    /// Default options confined to `root`: default journal, no rate limit, 64 MiB checkpoints.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CoalesceOptions {
            root: root.into(),
            journal: None,
            rate_limit: None,
            checkpoint_bytes: 64 << 20,
        }
    }
}

/// Progress of a merge, passed to the progress callback after each block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Blocks of the child examined so far (including those skipped by a resume).
    pub blocks_done: u64,
    /// Blocks of the child's virtual size.
    pub blocks_total: u64,
    /// Bytes copied into the parent by this run.
    pub bytes_copied: u64,
    /// Bytes the child holds in total (allocated sectors), the work of a merge from scratch.
    pub bytes_total: u64,
}

/// What a completed merge did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoalesceReport {
    /// The child merged.
    pub child: Uuid,
    /// The parent merged into.
    pub parent: Uuid,
    /// Path of the parent file.
    pub parent_path: PathBuf,
    /// Bytes copied by this run.
    pub bytes_copied: u64,
    /// Allocated blocks of the child.
    pub child_blocks: u64,
    /// Block the run started from (non-zero after a resume).
    pub resumed_from: u64,
}

/// The journal of one merge: which child into which parent, and the first block whose merge
/// is not yet durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// The child's uuid.
    pub child: Uuid,
    /// The parent's uuid.
    pub parent: Uuid,
    /// Every block below this one is durably merged.
    pub next_block: u64,
}

const JOURNAL_MAGIC: &str = "ddstor-coalesce-journal v1";

impl Journal {
    /// Reads a journal file; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<Journal>> {
        let name = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&name, "reading the coalesce journal", e)),
        };
        let bad = |what: &str| {
            Error::corrupt(
                &name,
                "coalesce journal",
                0,
                format!("{what}; remove the journal only if the parent is not needed on its own and restart the merge"),
            )
        };
        let mut lines = text.lines();
        if lines.next() != Some(JOURNAL_MAGIC) {
            return Err(bad("missing the header line"));
        }
        let mut field = |key: &str| -> Result<String> {
            let l = lines.next().ok_or_else(|| bad(&format!("missing {key}")))?;
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix(' '))
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("expected {key}, found {l:?}")))
        };
        let child = Uuid::parse_str(&field("child")?).map_err(|_| bad("bad child uuid"))?;
        let parent = Uuid::parse_str(&field("parent")?).map_err(|_| bad("bad parent uuid"))?;
        let next_block = field("next_block")?
            .parse()
            .map_err(|_| bad("bad next_block"))?;
        Ok(Some(Journal {
            child,
            parent,
            next_block,
        }))
    }

    /// Writes the journal durably and atomically (temporary file, fsync, rename, fsync of the
    /// directory).
    pub fn store(&self, path: &Path) -> Result<()> {
        let name = path.display().to_string();
        let tmp = path.with_extension("coalesce-tmp");
        let text = format!(
            "{JOURNAL_MAGIC}\nchild {}\nparent {}\nnext_block {}\n",
            self.child, self.parent, self.next_block
        );
        let err = |e| Error::io(&name, "writing the coalesce journal", e);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        sync_dir(path).map_err(err)
    }

    /// Removes a journal file (durably); absent is fine.
    pub fn remove(path: &Path) -> Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => sync_dir(path)
                .map_err(|e| Error::io(&path.display().to_string(), "removing the journal", e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(
                &path.display().to_string(),
                "removing the coalesce journal",
                e,
            )),
        }
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// The default journal path for merges into `parent`: `.<file name>.coalesce` beside it.
pub fn default_journal(parent: &Path) -> PathBuf {
    let name = parent
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent.with_file_name(format!(".{name}.coalesce"))
}

/// Finds the parent file of the differencing disk at `child`, inside `root`.
pub fn parent_of(child: &Path, root: &Path) -> Result<PathBuf> {
    let cname = child.display().to_string();
    let root = root
        .canonicalize()
        .map_err(|e| Error::io(&root.display().to_string(), "resolving the root", e))?;
    let cc = child
        .canonicalize()
        .map_err(|e| Error::io(&cname, "resolving the path", e))?;
    let disk = Disk::open(&cc, false)?;
    if disk.disk_type() != DiskType::Differencing {
        return Err(Error::InvalidArgument(format!(
            "{cname}: a {} disk has no parent to coalesce into",
            disk.disk_type().name()
        )));
    }
    resolve_parent(&disk, &cc, &root)
}

/// Merges the differencing disk at `child` into its parent (found through its locators, inside
/// `opts.root`), journaled and resumable. The child is left as it was (still a valid child of
/// the parent); re-point its children with [`relink`] and remove it afterwards if wanted.
pub fn coalesce(
    child: &Path,
    opts: &CoalesceOptions,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<CoalesceReport> {
    let parent_path = parent_of(child, &opts.root)?;
    let cdisk = Disk::open(child, false)?;
    let pdisk = Disk::open(&parent_path, true)?;
    let journal = opts
        .journal
        .clone()
        .unwrap_or_else(|| default_journal(&parent_path));
    let mut r = coalesce_disks(&cdisk, &pdisk, &journal, opts, cancel, progress)?;
    r.parent_path = parent_path;
    Ok(r)
}

/// Bytes the child holds: the sum of its allocated sectors.
fn allocated_bytes(child: &Disk) -> Result<u64> {
    let mut total = 0;
    for b in 0..child.blocks() {
        if let Some(bm) = child.presence(b)? {
            let spb = (child.block_size() / SECTOR) as u32;
            total += if bm.is_full() {
                child.block_size()
            } else {
                (0..spb).filter(|&s| bm.get(s)).count() as u64 * SECTOR
            };
        }
    }
    Ok(total)
}

/// Writes `data` (whole sectors) into `disk` at virtual byte `offset`, split at its blocks.
fn write_range(disk: &Disk, mut offset: u64, mut data: &[u8]) -> Result<()> {
    let bs = disk.block_size();
    while !data.is_empty() {
        let b = offset / bs;
        let within = offset % bs;
        let n = ((bs - within) as usize).min(data.len());
        disk.write_sectors(b, (within / SECTOR) as u32, &data[..n])?;
        offset += n as u64;
        data = &data[n..];
    }
    Ok(())
}

/// [`coalesce`] on open disks: `child` (any mode) into `parent` (writable), with the journal at
/// `journal`. Checks that `child` is a differencing disk of `parent` with the same size.
pub fn coalesce_disks(
    child: &Disk,
    parent: &Disk,
    journal: &Path,
    opts: &CoalesceOptions,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<CoalesceReport> {
    let cname = child.name().to_string();
    if child.disk_type() != DiskType::Differencing {
        return Err(Error::InvalidArgument(format!(
            "{cname}: a {} disk has no parent to coalesce into",
            child.disk_type().name()
        )));
    }
    let expected = child.header().map(|h| h.parent_uuid).unwrap_or_default();
    if parent.uuid() != expected {
        return Err(Error::ParentMismatch {
            child: PathBuf::from(&cname),
            parent: PathBuf::from(parent.name()),
            expected,
            found: parent.uuid(),
        });
    }
    if child.virtual_size() != parent.virtual_size() {
        return Err(Error::ChainMismatch(format!(
            "{cname}: virtual size {} differs from the parent {}'s {}; resize the parent first",
            child.virtual_size(),
            parent.name(),
            parent.virtual_size()
        )));
    }
    if !parent.is_writable() {
        return Err(Error::ReadOnly(parent.name().into()));
    }
    let start = match Journal::load(journal)? {
        Some(j) if j.child == child.uuid() && j.parent == parent.uuid() => j.next_block,
        Some(j) => {
            return Err(Error::InvalidArgument(format!(
                "{}: journal records an unfinished merge of {} into {}, not of {} into {}; finish that merge first",
                journal.display(),
                j.child,
                j.parent,
                child.uuid(),
                parent.uuid()
            )))
        }
        None => 0,
    };
    let mut j = Journal {
        child: child.uuid(),
        parent: parent.uuid(),
        next_block: start,
    };
    j.store(journal)?;
    let blocks_total = child.blocks();
    let bytes_total = allocated_bytes(child)?;
    let bs = child.block_size();
    tracing::info!(child = %cname, parent = %parent.name(), from_block = start, blocks = blocks_total, bytes = bytes_total, "coalescing");
    let t0 = Instant::now();
    let mut copied = 0u64;
    let mut since_checkpoint = 0u64;
    let mut child_blocks = 0u64;
    let mut buf = vec![0u8; bs as usize];
    for b in 0..blocks_total {
        if b < start {
            if child.is_allocated(b) {
                child_blocks += 1;
            }
            continue;
        }
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            parent.flush()?;
            j.next_block = b;
            j.store(journal)?;
            return Err(Error::Cancelled(format!(
                "merge of {cname} into {} stopped at block {b} of {blocks_total}; run it again to resume",
                parent.name()
            )));
        }
        if let Some(bm) = child.presence(b)? {
            child_blocks += 1;
            let block_start = b * bs;
            let limit = (child.virtual_size() - block_start).min(bs);
            let lim_s = (limit / SECTOR) as u32;
            let mut s = 0u32;
            while s < lim_s {
                if !bm.get(s) {
                    s += 1;
                    continue;
                }
                let mut e = s + 1;
                while e < lim_s && bm.get(e) {
                    e += 1;
                }
                let len = ((e - s) as u64 * SECTOR) as usize;
                let data = &mut buf[..len];
                child.read_data(b, s as u64 * SECTOR, data)?;
                write_range(parent, block_start + s as u64 * SECTOR, data)?;
                copied += len as u64;
                since_checkpoint += len as u64;
                s = e;
            }
            if let Some(rate) = opts.rate_limit.filter(|&r| r > 0) {
                let due = Duration::from_secs_f64(copied as f64 / rate as f64);
                let el = t0.elapsed();
                if due > el {
                    std::thread::sleep(due - el);
                }
            }
        }
        if since_checkpoint >= opts.checkpoint_bytes.max(1) {
            parent.flush()?;
            j.next_block = b + 1;
            j.store(journal)?;
            since_checkpoint = 0;
        }
        progress(&Progress {
            blocks_done: b + 1,
            blocks_total,
            bytes_copied: copied,
            bytes_total,
        });
    }
    parent.flush()?;
    Journal::remove(journal)?;
    tracing::info!(child = %cname, parent = %parent.name(), bytes = copied, elapsed_ms = t0.elapsed().as_millis() as u64, "coalesced");
    Ok(CoalesceReport {
        child: child.uuid(),
        parent: parent.uuid(),
        parent_path: parent.path().map(Path::to_path_buf).unwrap_or_default(),
        bytes_copied: copied,
        child_blocks,
        resumed_from: start,
    })
}

/// Re-points `grandchild` (a differencing disk whose parent is the merged disk `merged`) at
/// `new_parent`, which must already hold the merged disk's content. Idempotent: a grandchild
/// that already names `new_parent` is left alone; one naming any other disk is refused.
pub fn relink(grandchild: &Path, merged: Uuid, new_parent: &Path) -> Result<()> {
    let gname = grandchild.display().to_string();
    let g = Disk::open(grandchild, false)?;
    let current = g
        .header()
        .filter(|_| g.disk_type() == DiskType::Differencing)
        .map(|h| h.parent_uuid)
        .ok_or_else(|| Error::InvalidArgument(format!("{gname}: not a differencing disk")))?;
    let np = Disk::open(new_parent, false)?;
    if current == np.uuid() {
        // Locators may be half-rewritten by an interrupted relink: rewrite them anyway.
        return crate::create::set_parent(grandchild, new_parent);
    }
    if current != merged {
        return Err(Error::InvalidArgument(format!(
            "{gname}: its parent is {current}, neither the merged disk {merged} nor the new parent {}; refusing to relink",
            np.uuid()
        )));
    }
    if g.virtual_size() != np.virtual_size() {
        return Err(Error::ChainMismatch(format!(
            "{gname}: virtual size {} differs from the new parent {}'s {}",
            g.virtual_size(),
            new_parent.display(),
            np.virtual_size()
        )));
    }
    drop(g);
    crate::create::set_parent(grandchild, new_parent)?;
    tracing::info!(child = %gname, parent = %new_parent.display(), "relinked");
    Ok(())
}

#[cfg(test)]
mod tests;
