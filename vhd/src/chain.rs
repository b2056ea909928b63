//! [`Chain`]: a leaf VHD and its ancestors, opened from the leaf with parents confined to a
//! root directory, read through a merged block index built once, written into the leaf.

use crate::disk::{Bitmap, Disk};
use crate::error::{Error, Result};
use crate::format::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

/// Default limit on chain depth.
pub const DEFAULT_MAX_DEPTH: usize = 1000;

/// How to open a chain.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    /// Every member of the chain (the leaf included) must resolve, symlinks followed, inside
    /// this directory.
    pub root: PathBuf,
    /// Refuse chains with more layers than this.
    pub max_depth: usize,
    /// Open the leaf for writing (ancestors are always read-only).
    pub writable: bool,
}

impl ChainOptions {
    /// Options with `root`, the default depth limit, read-only.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ChainOptions {
            root: root.into(),
            max_depth: DEFAULT_MAX_DEPTH,
            writable: false,
        }
    }
    /// The same options, writable or not.
    pub fn writable(mut self, w: bool) -> Self {
        self.writable = w;
        self
    }
}

/// Allocation state of a byte range, as reported by [`Chain::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentState {
    /// Data held by layer `layer` (0 = leaf).
    Data {
        /// Index into [`Chain::paths`].
        layer: usize,
    },
    /// Not allocated in any layer: reads as zeros.
    Zero,
}

/// A run of bytes with one [`ExtentState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Where the bytes come from.
    pub state: ExtentState,
}

/// A leaf and its ancestors. `Send + Sync`; all I/O takes `&self`. Reads take no lock on the
/// block index (the leaf's BAT is atomic, the ancestors' index immutable) and only a shared
/// lock on bitmap caches, so concurrent reads proceed in parallel.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Disk>,
    paths: Vec<PathBuf>,
    /// Per block: the ancestor layers (index ≥ 1) that allocate it, nearest first.
    index: Vec<Box<[u16]>>,
    virtual_size: u64,
    block_size: u64,
    writable: bool,
}

/// One piece of a [`Chain::read_plan`]: `len` bytes that are zeros, or that lie contiguously
/// in one layer's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPiece {
    /// Length in bytes (> 0).
    pub len: u64,
    /// Where the bytes are.
    pub source: PieceSource,
}

impl ReadPiece {
    /// Whether bytes from `next` carry on where this piece ends (zeros after zeros, or the next
    /// bytes of the same file).
    fn continued_by(&self, next: PieceSource) -> bool {
        match (self.source, next) {
            (PieceSource::Zero, PieceSource::Zero) => true,
            (
                PieceSource::File { layer, file_offset },
                PieceSource::File {
                    layer: l2,
                    file_offset: o2,
                },
            ) => layer == l2 && file_offset + self.len == o2,
            _ => false,
        }
    }
}

/// Where the bytes of a [`ReadPiece`] are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceSource {
    /// Allocated in no layer: zeros.
    Zero,
    /// In layer `layer` (index into [`Chain::layers`]) at byte `file_offset` of its file.
    File {
        /// Index into [`Chain::layers`], 0 = leaf.
        layer: usize,
        /// Byte offset in that layer's file.
        file_offset: u64,
    },
}

impl Chain {
    /// Opens the chain whose leaf is `leaf`, following parent locators inside `opts.root`.
    pub fn open(leaf: &Path, opts: &ChainOptions) -> Result<Chain> {
        let (leaf_c, root) = confine_leaf(leaf, &opts.root)?;
        let mut layers = Vec::new();
        let mut paths = Vec::new();
        let mut seen = HashSet::new();
        let mut cur = leaf_c;
        loop {
            if !seen.insert(cur.clone()) {
                return Err(Error::Cycle(cur));
            }
            if layers.len() >= opts.max_depth {
                return Err(Error::TooDeep {
                    leaf: leaf.to_path_buf(),
                    max: opts.max_depth,
                });
            }
            let disk = Disk::open(&cur, opts.writable && layers.is_empty())?;
            let parent = if disk.disk_type() == DiskType::Differencing {
                Some(resolve_parent(&disk, &cur, &root)?)
            } else {
                None
            };
            layers.push(disk);
            paths.push(cur.clone());
            match parent {
                Some(p) => cur = p,
                None => break,
            }
        }
        Chain::from_layers(layers, paths, opts.writable)
    }

    /// Builds a chain from already-open disks, leaf first (e.g. in-memory disks). Checks that
    /// each differencing layer's parent uuid matches the next layer and that block sizes agree.
    pub fn from_layers(layers: Vec<Disk>, paths: Vec<PathBuf>, writable: bool) -> Result<Chain> {
        if layers.is_empty() {
            return Err(Error::InvalidArgument(
                "a chain needs at least one disk".into(),
            ));
        }
        if layers.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "{} layers is more than this engine indexes",
                layers.len()
            )));
        }
        if writable && !layers[0].is_writable() {
            return Err(Error::ReadOnly(layers[0].name().into()));
        }
        for (i, d) in layers.iter().enumerate() {
            let child_path = || PathBuf::from(d.name());
            if d.disk_type() == DiskType::Differencing {
                let Some(p) = layers.get(i + 1) else {
                    return Err(Error::ChainMismatch(format!(
                        "{}: differencing disk has no parent in the chain",
                        d.name()
                    )));
                };
                let expected = d.header().map(|h| h.parent_uuid).unwrap_or_default();
                if p.uuid() != expected {
                    return Err(Error::ParentMismatch {
                        child: child_path(),
                        parent: PathBuf::from(p.name()),
                        expected,
                        found: p.uuid(),
                    });
                }
            } else if i + 1 != layers.len() {
                return Err(Error::ChainMismatch(format!(
                    "{}: a {} disk cannot have a parent",
                    d.name(),
                    d.disk_type().name()
                )));
            }
        }
        let block_size = layers[0].block_size();
        for d in &layers[1..] {
            if d.disk_type() != DiskType::Fixed && d.block_size() != block_size {
                return Err(Error::ChainMismatch(format!(
                    "{}: block size {} differs from the leaf's {}",
                    d.name(),
                    d.block_size(),
                    block_size
                )));
            }
        }
        let virtual_size = layers[0].virtual_size();
        let nblocks = virtual_size.div_ceil(block_size);
        let index = (0..nblocks)
            .map(|b| {
                (1..layers.len())
                    .filter(|&i| layers[i].is_allocated(b))
                    .map(|i| i as u16)
                    .collect::<Vec<u16>>()
                    .into_boxed_slice()
            })
            .collect();
        let paths = if paths.len() == layers.len() {
            paths
        } else {
            layers.iter().map(|d| PathBuf::from(d.name())).collect()
        };
        Ok(Chain {
            layers,
            paths,
            index,
            virtual_size,
            block_size,
            writable,
        })
    }

    /// Virtual size in bytes (the leaf's).
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    /// Block size of the chain.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }
    /// Number of layers (1 for a lone dynamic disk).
    pub fn depth(&self) -> usize {
        self.layers.len()
    }
    /// Paths of the layers, leaf first (canonical when opened with [`Chain::open`]).
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }
    /// The layers, leaf first.
    pub fn layers(&self) -> &[Disk] {
        &self.layers
    }
    /// The leaf's unique id.
    pub fn leaf_uuid(&self) -> Uuid {
        self.layers[0].uuid()
    }
    /// True when opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .map_or(true, |e| e > self.virtual_size)
        {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.virtual_size,
            });
        }
        Ok(())
    }

    /// Layers that hold block `b`, nearest first.
    fn sources(&self, b: u64) -> impl Iterator<Item = usize> + '_ {
        let leaf = self.layers[0].is_allocated(b).then_some(0);
        leaf.into_iter().chain(
            self.index
                .get(b as usize)
                .into_iter()
                .flat_map(|v| v.iter().map(|&i| i as usize)),
        )
    }

    /// Reads `buf.len()` bytes at `offset` through the chain. Any alignment. Executes the
    /// [`Chain::read_plan`] of the range, piece by piece, without building it.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_with(buf, offset, false).map(|_| ())
    }

    /// Like [`Chain::read_at`] but only when it needs no waiting for a device: every bitmap
    /// involved is cached and the data is in the page cache. `Ok(false)` means nothing useful
    /// was done (`buf` may be partly written) and the caller should use [`Chain::read_at`] on a
    /// thread that may block. Lets a server answer cached reads on its event loop; allocates
    /// nothing.
    pub fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.read_with(buf, offset, true)
    }

    /// [`Chain::read_at`] (`nowait` false: always `Ok(true)`) or [`Chain::try_read_at`]: the
    /// plan's pieces, each read from its layer's file or zero-filled.
    fn read_with(&self, buf: &mut [u8], offset: u64, nowait: bool) -> Result<bool> {
        let mut at = 0usize;
        self.walk(offset, buf.len() as u64, nowait, |p| {
            let dst = &mut buf[at..at + p.len as usize];
            at += dst.len();
            match p.source {
                PieceSource::Zero => {
                    dst.fill(0);
                    Ok(true)
                }
                PieceSource::File { layer, file_offset } => {
                    self.layers[layer].read_file(dst, file_offset, nowait)
                }
            }
        })
    }

    /// Where the `len` bytes at `offset` are, without reading them: pieces in disk order, each
    /// zeros or a contiguous byte range of one layer's file, adjacent ones merged. Lets a
    /// server send file data without copying it (splice/sendfile from the layer's file). Reads
    /// sector bitmaps that are not cached yet, so it may block. [`Chain::read_at`] executes
    /// the same plan.
    pub fn read_plan(&self, offset: u64, len: u64) -> Result<Vec<ReadPiece>> {
        let mut out = Vec::new();
        self.walk(offset, len, false, |p| {
            out.push(p);
            Ok(true)
        })?;
        Ok(out)
    }

    /// The plan of `[offset, offset+len)`: calls `f` with each piece in order, adjacent pieces
    /// merged (zeros after zeros, the next bytes of the same file). `f` returning `Ok(false)`
    /// stops the walk, which then returns `Ok(false)`; so does `nowait` when a bitmap the plan
    /// needs is not cached. Allocates nothing (unless more than [`INLINE_PARTIAL`] layers hold
    /// parts of one block).
    fn walk(
        &self,
        offset: u64,
        len: u64,
        nowait: bool,
        mut f: impl FnMut(ReadPiece) -> Result<bool>,
    ) -> Result<bool> {
        self.check_range(offset, len)?;
        let bs = self.block_size;
        let end = offset + len;
        let mut pos = offset;
        let mut cur: Option<ReadPiece> = None;
        while pos < end {
            let b = pos / bs;
            let block_start = b * bs;
            let bend = (block_start + bs).min(end);
            let s0 = ((pos - block_start) / SECTOR) as u32;
            let s1 = (bend - block_start).div_ceil(SECTOR) as u32;
            let done = self.block_runs(b, s0, s1, nowait, |rs, re, src| {
                let a = (block_start + rs as u64 * SECTOR).max(pos);
                let z = (block_start + re as u64 * SECTOR).min(bend);
                let source = match src {
                    Some(layer) => PieceSource::File {
                        layer,
                        file_offset: self.layers[layer].data_offset(b)? + (a - block_start),
                    },
                    None => PieceSource::Zero,
                };
                match &mut cur {
                    Some(c) if c.continued_by(source) => c.len += z - a,
                    _ => {
                        if let Some(prev) = cur.replace(ReadPiece { len: z - a, source }) {
                            return f(prev);
                        }
                    }
                }
                Ok(true)
            })?;
            if !done {
                return Ok(false);
            }
            pos = bend;
        }
        match cur {
            Some(last) => f(last),
            None => Ok(true),
        }
    }

    /// Calls `f(first, end, source)` for each run of sectors `s0..s1` of block `b` that one
    /// source holds (`Some(layer)`, or `None`: zeros), in order. `Ok(false)` when `f` stopped
    /// or (`nowait`) a bitmap is not cached.
    fn block_runs(
        &self,
        b: u64,
        s0: u32,
        s1: u32,
        nowait: bool,
        mut f: impl FnMut(u32, u32, Option<usize>) -> Result<bool>,
    ) -> Result<bool> {
        // The bitmaps of the layers that hold parts of the block, nearest first, up to the
        // first that holds all of it.
        let mut partial = Partial::default();
        let mut whole = None;
        for l in self.sources(b) {
            let presence = if nowait {
                match self.layers[l].cached_presence(b) {
                    Some(p) => p,
                    None => return Ok(false),
                }
            } else {
                self.layers[l].presence(b)?
            };
            if let Some(bm) = presence {
                if bm.is_full() {
                    whole = Some(l);
                    break;
                }
                partial.push(l, bm);
            }
        }
        if partial.is_empty() {
            return f(s0, s1, whole);
        }
        let mut run: Option<(u32, Option<usize>)> = None;
        for s in s0..s1 {
            let src = partial.holder(s).or(whole);
            match run {
                Some((_, r)) if r == src => {}
                Some((start, r)) => {
                    if !f(start, s, r)? {
                        return Ok(false);
                    }
                    run = Some((s, src));
                }
                None => run = Some((s, src)),
            }
        }
        match run {
            Some((start, r)) => f(start, s1, r),
            None => Ok(true),
        }
    }

    /// Writes `buf` at `offset` into the leaf, allocating blocks as needed. Unaligned edges
    /// are completed from the chain (read-modify-write of the edge sectors).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(self.layers[0].name().into()));
        }
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let a0 = offset / SECTOR * SECTOR;
        let a1 = round_up(offset + buf.len() as u64, SECTOR);
        if a0 == offset && a1 == offset + buf.len() as u64 {
            return self.write_aligned(buf, offset);
        }
        let mut tmp = vec![0u8; (a1 - a0) as usize];
        self.read_at(&mut tmp[..SECTOR as usize], a0)?;
        let last = tmp.len() - SECTOR as usize;
        self.read_at(&mut tmp[last..], a1 - SECTOR)?;
        tmp[(offset - a0) as usize..(offset - a0) as usize + buf.len()].copy_from_slice(buf);
        self.write_aligned(&tmp, a0)
    }

    fn write_aligned(&self, buf: &[u8], offset: u64) -> Result<()> {
        let bs = self.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = pos / bs;
            let in_block = pos % bs;
            let n = ((bs - in_block) as usize).min(buf.len() - done);
            self.layers[0].write_sectors(b, (in_block / SECTOR) as u32, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros, writing only where some layer holds data.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(self.layers[0].name().into()));
        }
        self.check_range(offset, len)?;
        let zeros = vec![0u8; self.block_size as usize];
        for e in self.block_status(offset, len)? {
            if e.state == ExtentState::Zero {
                continue;
            }
            let mut done = 0;
            while done < e.length {
                let n = (e.length - done).min(zeros.len() as u64);
                self.write_at(&zeros[..n as usize], e.offset + done)?;
                done += n;
            }
        }
        Ok(())
    }

    /// Allocation map of `len` bytes at `offset`: runs of data (with the layer that holds
    /// them) and of zeros (allocated nowhere), from the same plan reads execute. Adjacent runs
    /// with one state are merged.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        self.walk(offset, len, false, |p| {
            let state = match p.source {
                PieceSource::File { layer, .. } => ExtentState::Data { layer },
                PieceSource::Zero => ExtentState::Zero,
            };
            match out.last_mut() {
                Some(l) if l.state == state => l.length += p.len,
                _ => out.push(Extent {
                    offset: pos,
                    length: p.len,
                    state,
                }),
            }
            pos += p.len;
            Ok(true)
        })?;
        Ok(out)
    }

    /// Makes every write so far durable (fsync of the leaf).
    pub fn flush(&self) -> Result<()> {
        self.layers[0].flush()
    }
}

/// Resolves `leaf` and `root` (symlinks followed) and refuses a leaf that lies outside the
/// root, as every tool that opens a chain or checks a file does. Returns both canonical paths.
pub fn confine_leaf(leaf: &Path, root: &Path) -> Result<(PathBuf, PathBuf)> {
    let root = root.canonicalize().map_err(|e| {
        Error::io(
            &root.display().to_string(),
            "resolving the root directory",
            e,
        )
    })?;
    let leaf_c = leaf
        .canonicalize()
        .map_err(|e| Error::io(&leaf.display().to_string(), "resolving the path", e))?;
    if !leaf_c.starts_with(&root) {
        return Err(Error::OutsideRoot {
            child: leaf.to_path_buf(),
            locator: "(the leaf itself)".into(),
            resolved: leaf_c,
            root,
        });
    }
    Ok((leaf_c, root))
}

/// Finds the parent of differencing disk `disk` (at canonical `child`) from its locators and
/// parent name, refusing any that resolve (symlinks followed) outside `root`.
pub fn resolve_parent(disk: &Disk, child: &Path, root: &Path) -> Result<PathBuf> {
    let header = disk.header().ok_or_else(|| {
        Error::InvalidArgument(format!("{}: not a differencing disk", disk.name()))
    })?;
    let dir = child.parent().unwrap_or(Path::new("/"));
    let mut candidates: Vec<(String, String)> = Vec::new();
    for code in [PLAT_MACX, PLAT_W2RU, PLAT_W2KU] {
        for (i, l) in header.locators.iter().enumerate() {
            if l.code != code || l.data_len == 0 || l.data_len > 65536 {
                continue;
            }
            let mut data = vec![0u8; l.data_len as usize];
            if disk.io().read_at(&mut data, l.data_offset).is_err() {
                return Err(Error::corrupt(
                    disk.name(),
                    format!("parent locator {i} ({})", l.code_name()),
                    576 + 24 * i as u64 + disk.footer().data_offset,
                    format!(
                        "data at {} of {} bytes lies past the end of the file",
                        l.data_offset, l.data_len
                    ),
                ));
            }
            if let Some(t) = decode_locator(code, &data) {
                candidates.push((format!("{} {t:?}", l.code_name()), t));
            }
        }
    }
    if !header.parent_name.is_empty() {
        let name = header.parent_name.replace('\\', "/");
        candidates.push((format!("parent name {:?}", header.parent_name), name));
    }
    for (label, text) in &candidates {
        let p = Path::new(text);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        };
        if let Ok(c) = p.canonicalize() {
            if !c.starts_with(root) {
                return Err(Error::OutsideRoot {
                    child: child.to_path_buf(),
                    locator: label.clone(),
                    resolved: c,
                    root: root.to_path_buf(),
                });
            }
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    Err(Error::ParentNotFound {
        child: child.to_path_buf(),
        candidates: candidates.into_iter().map(|(l, _)| l).collect(),
    })
}

/// Layers held inline by [`Partial`] before it spills to the heap.
const INLINE_PARTIAL: usize = 4;

/// The bitmaps of the layers holding parts of one block, nearest first: inline for the usual
/// few, on the heap beyond [`INLINE_PARTIAL`].
#[derive(Default)]
struct Partial {
    inline: [Option<(usize, Arc<Bitmap>)>; INLINE_PARTIAL],
    n: usize,
    spill: Vec<(usize, Arc<Bitmap>)>,
}

impl Partial {
    fn push(&mut self, layer: usize, bm: Arc<Bitmap>) {
        if self.n < INLINE_PARTIAL {
            self.inline[self.n] = Some((layer, bm));
            self.n += 1;
        } else {
            self.spill.push((layer, bm));
        }
    }
    fn is_empty(&self) -> bool {
        self.n == 0
    }
    /// The nearest layer whose bitmap holds sector `s`.
    fn holder(&self, s: u32) -> Option<usize> {
        self.inline[..self.n]
            .iter()
            .flatten()
            .chain(self.spill.iter())
            .find(|(_, bm)| bm.get(s))
            .map(|(l, _)| *l)
    }
}
