//! Creating disks and changing their metadata: dynamic and differencing creation (blktap-style
//! relative parent locators), fixed creation, the hidden flag, re-pointing a child at a new
//! parent, and a summary of a file.

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::format::*;
use crate::io::BlockIo;
use std::fs::OpenOptions;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

/// Bytes reserved for a parent locator holding `data_len` bytes: whole sectors, at least one
/// (as libvhd reserves them; a sector holds a relative path of 256 UTF-16 characters, so
/// [`set_parent`] can re-point a child in place at any path of an SR).
fn locator_space(data_len: usize) -> u64 {
    round_up(data_len as u64, SECTOR).max(SECTOR)
}

/// Options for creating a disk.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Block size in bytes: a power of two from 4 KiB to 256 MiB (default 2 MiB). A
    /// differencing disk always takes its parent's.
    pub block_size: u32,
    /// The new disk's uuid (random when `None`).
    pub uuid: Option<Uuid>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            block_size: DEFAULT_BLOCK_SIZE,
            uuid: None,
        }
    }
}

fn check_size(size: u64) -> Result<u64> {
    if size == 0 || size > MAX_VIRTUAL_SIZE {
        return Err(Error::InvalidArgument(format!(
            "virtual size {size} must be between 1 byte and 2040 GiB"
        )));
    }
    Ok(round_up(size, SECTOR))
}

fn check_block_size(bs: u32) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::InvalidArgument(format!(
            "block size {bs} must be a power of two from 4 KiB to 256 MiB"
        )));
    }
    Ok(())
}

fn create_new(path: &Path) -> Result<std::fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            Error::io(
                &path.display().to_string(),
                "creating (refusing to overwrite an existing file)",
                e,
            )
        })
}

/// Parent of a new differencing disk, as recorded in the child.
#[derive(Debug, Clone)]
pub struct ParentRef {
    /// Parent uuid.
    pub uuid: Uuid,
    /// Parent modification time (VHD timestamp).
    pub timestamp: u32,
    /// Parent file name (header's Unicode name).
    pub name: String,
    /// Path of the parent relative to the child's directory (`./p.vhd`, `../x/p.vhd`).
    pub relative_path: String,
}

/// Writes a new dynamic (`parent = None`) or differencing disk of `size` bytes into `io`,
/// which must be empty. Returns the new disk's uuid. `size` is rounded up to whole sectors.
///
/// The layout is blktap's (libvhd's `vhd_create`/`vhd_snapshot`): footer copy at 0, dynamic
/// header at 512, BAT at 1536, the batmap header in the sector after the BAT and the (empty)
/// batmap right after it, then the MacX, W2ku and W2ru parent locators of a differencing disk
/// (relative paths, each in its own whole sectors, `data_space` in bytes as libvhd writes it),
/// then the footer. Blocks are placed after all of it.
pub fn create_dynamic_io(
    io: &dyn BlockIo,
    name: &str,
    size: u64,
    opts: &CreateOptions,
    parent: Option<&ParentRef>,
) -> Result<Uuid> {
    let size = check_size(size)?;
    check_block_size(opts.block_size)?;
    let uuid = opts.uuid.unwrap_or_else(Uuid::new_v4);
    let entries = size.div_ceil(opts.block_size as u64);
    let bat_off = 512 + HEADER_SIZE as u64;
    let bat_bytes = round_up(entries * 4, SECTOR);
    let mut header = Header {
        data_offset: u64::MAX,
        table_offset: bat_off,
        version: 0x0001_0000,
        max_table_entries: entries as u32,
        block_size: opts.block_size,
        parent_uuid: Uuid::nil(),
        parent_timestamp: 0,
        parent_name: String::new(),
        locators: Default::default(),
    };
    let batmap_hdr_off = bat_off + bat_bytes;
    let map_sectors = batmap_sectors(entries);
    let map = vec![0u8; (map_sectors * SECTOR) as usize];
    let batmap = BatmapHeader::new(
        batmap_hdr_off + SECTOR,
        map_sectors as u32,
        batmap_checksum(&map, BATMAP_VERSION, size),
    );
    let mut end = batmap.offset + map_sectors * SECTOR;
    let mut locator_data = Vec::new();
    let ty = if let Some(p) = parent {
        header.parent_uuid = p.uuid;
        header.parent_timestamp = p.timestamp;
        header.parent_name = p.name.clone();
        for (i, code) in [PLAT_MACX, PLAT_W2KU, PLAT_W2RU].into_iter().enumerate() {
            let mut data = encode_locator(code, &p.relative_path);
            let space = locator_space(data.len());
            if space > u32::MAX as u64 {
                return Err(Error::InvalidArgument(format!(
                    "parent path {:?} is too long for a locator",
                    p.relative_path
                )));
            }
            header.locators[i] = ParentLocator {
                code,
                data_space: space as u32,
                data_len: data.len() as u32,
                reserved: 0,
                data_offset: end,
            };
            data.resize(space as usize, 0);
            locator_data.push((end, data));
            end += space;
        }
        DiskType::Differencing
    } else {
        DiskType::Dynamic
    };
    let footer = Footer::new(ty, size, uuid);
    let werr = |e| Error::io(name, "writing the new disk's metadata", e);
    if io.len().map_err(werr)? != 0 {
        return Err(Error::InvalidArgument(format!("{name}: not empty")));
    }
    let fb = footer.to_bytes();
    io.write_at(&fb, 0).map_err(werr)?;
    io.write_at(&header.to_bytes(), 512).map_err(werr)?;
    let mut bat = vec![0u8; bat_bytes as usize];
    bat[..(entries * 4) as usize].fill(0xFF);
    io.write_at(&bat, bat_off).map_err(werr)?;
    let mut bm = batmap.to_bytes().to_vec();
    bm.extend_from_slice(&map);
    io.write_at(&bm, batmap_hdr_off).map_err(werr)?;
    for (off, data) in &locator_data {
        io.write_at(data, *off).map_err(werr)?;
    }
    io.write_at(&fb, end).map_err(werr)?;
    io.sync().map_err(werr)?;
    Ok(uuid)
}

/// Creates a new dynamic disk at `path` (which must not exist). Returns its uuid.
pub fn create_dynamic(path: &Path, size: u64, opts: &CreateOptions) -> Result<Uuid> {
    let f = create_new(path)?;
    let name = path.display().to_string();
    let r = create_dynamic_io(&f, &name, size, opts, None);
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Creates a fixed disk (raw data + footer) of `size` bytes at `path`. Returns its uuid.
pub fn create_fixed(path: &Path, size: u64, opts: &CreateOptions) -> Result<Uuid> {
    let size = check_size(size)?;
    let f = create_new(path)?;
    let name = path.display().to_string();
    let uuid = opts.uuid.unwrap_or_else(Uuid::new_v4);
    let footer = Footer::new(DiskType::Fixed, size, uuid);
    let r = (|| {
        f.set_len(size)?;
        BlockIo::write_at(&f, &footer.to_bytes(), size)?;
        f.sync_data()
    })()
    .map_err(|e| Error::io(&name, "writing the new fixed disk", e));
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r.map(|_| uuid)
}

/// The path of `target` relative to directory `from_dir` (both absolute): `./x.vhd` in the
/// same directory, with `..` components otherwise.
pub fn relative_path(from_dir: &Path, target: &Path) -> String {
    let a: Vec<Component> = from_dir.components().collect();
    let b: Vec<Component> = target.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..a.len() {
        parts.push("..".into());
    }
    for c in &b[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    if parts.first().map_or(true, |p| p != "..") {
        parts.insert(0, ".".into());
    }
    parts.join("/")
}

fn mtime(path: &Path) -> u32 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| vhd_time(d.as_secs()))
}

fn parent_ref(child: &Path, parent: &Path) -> Result<(ParentRef, Disk)> {
    let pc = parent.canonicalize().map_err(|e| {
        Error::io(
            &parent.display().to_string(),
            "resolving the parent path",
            e,
        )
    })?;
    let child_dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let cd = child_dir.canonicalize().map_err(|e| {
        Error::io(
            &child_dir.display().to_string(),
            "resolving the child's directory",
            e,
        )
    })?;
    let pdisk = Disk::open(&pc, false)?;
    let name = pc
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((
        ParentRef {
            uuid: pdisk.uuid(),
            timestamp: mtime(&pc),
            name,
            relative_path: relative_path(&cd, &pc),
        },
        pdisk,
    ))
}

/// Creates `child` (which must not exist) as a new, empty differencing disk of `parent`:
/// same size and block size, parent uuid and timestamp, relative MacX/W2ku/W2ru locators.
pub fn create_differencing(child: &Path, parent: &Path, opts: &CreateOptions) -> Result<Uuid> {
    let (pref, pdisk) = parent_ref(child, parent)?;
    let mut o = opts.clone();
    if pdisk.disk_type() != DiskType::Fixed {
        o.block_size = pdisk.block_size() as u32;
    }
    let f = create_new(child)?;
    let name = child.display().to_string();
    let r = create_dynamic_io(&f, &name, pdisk.virtual_size(), &o, Some(&pref));
    if r.is_err() {
        let _ = std::fs::remove_file(child);
    }
    r
}

fn open_rw(path: &Path) -> Result<(Arc<dyn BlockIo>, String)> {
    let name = path.display().to_string();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(&name, "opening for writing", e))?;
    Ok((Arc::new(f), name))
}

/// Sets or clears blktap's hidden flag (footer byte 85) in both footer copies, recomputing
/// each checksum, and syncs.
pub fn set_hidden_io(io: Arc<dyn BlockIo>, name: &str, hidden: bool) -> Result<()> {
    let disk = Disk::from_io(io.clone(), name, false)?;
    let len = io
        .len()
        .map_err(|e| Error::io(name, "reading the size", e))?;
    let mut f = disk.footer().clone();
    f.hidden = hidden as u8;
    let b = f.to_bytes();
    let werr = |e| Error::io(name, "writing the footer", e);
    if disk.disk_type() != DiskType::Fixed {
        io.write_at(&b, 0).map_err(werr)?;
    }
    if disk.trailing_footer_ok() {
        io.write_at(&b, len - FOOTER_SIZE as u64).map_err(werr)?;
    }
    io.sync().map_err(werr)
}

/// [`set_hidden_io`] on a file.
pub fn set_hidden(path: &Path, hidden: bool) -> Result<()> {
    let (io, name) = open_rw(path)?;
    set_hidden_io(io, &name, hidden)
}

/// Re-points differencing disk `child` at `new_parent`: parent uuid, timestamp and name in the
/// header, and every locator rewritten in place (relative path), then synced. The caller
/// guarantees that the new parent holds the content the old one did (compose/coalesce).
pub fn set_parent(child: &Path, new_parent: &Path) -> Result<()> {
    let (pref, _) = parent_ref(child, new_parent)?;
    let (io, name) = open_rw(child)?;
    let disk = Disk::from_io(io.clone(), &name, false)?;
    if disk.disk_type() != DiskType::Differencing {
        return Err(Error::InvalidArgument(format!(
            "{name}: not a differencing disk"
        )));
    }
    let mut h = disk
        .header()
        .cloned()
        .expect("differencing disk has a header");
    let werr = |e| Error::io(&name, "rewriting parent locators", e);
    for l in h.locators.iter_mut() {
        if ![PLAT_MACX, PLAT_W2KU, PLAT_W2RU].contains(&l.code) {
            continue;
        }
        let data = encode_locator(l.code, &pref.relative_path);
        let space = l.space_bytes().max(round_up(l.data_len as u64, SECTOR));
        if data.len() as u64 > space {
            return Err(Error::Unsupported(format!(
                "{name}: new parent path {:?} does not fit the {space} bytes of the {} locator",
                pref.relative_path,
                l.code_name()
            )));
        }
        let mut d = data.clone();
        d.resize(round_up(data.len() as u64, SECTOR).min(space) as usize, 0);
        io.write_at(&d, l.data_offset).map_err(werr)?;
        l.data_len = data.len() as u32;
    }
    h.parent_uuid = pref.uuid;
    h.parent_timestamp = pref.timestamp;
    h.parent_name = pref.name;
    io.write_at(&h.to_bytes(), disk.footer().data_offset)
        .map_err(werr)?;
    io.sync().map_err(werr)
}

/// A summary of one VHD file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Info {
    /// The path.
    pub path: String,
    /// `fixed`, `dynamic` or `differencing`.
    pub disk_type: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Block size in bytes (dynamic/differencing).
    pub block_size: Option<u64>,
    /// Unique id.
    pub uuid: Uuid,
    /// Hidden flag.
    pub hidden: bool,
    /// Creator application.
    pub creator: String,
    /// Creation time (seconds since 2000-01-01).
    pub timestamp: u32,
    /// File size in bytes.
    pub file_size: u64,
    /// BAT entries.
    pub bat_entries: u32,
    /// Allocated blocks.
    pub allocated_blocks: u64,
    /// True when a blktap batmap is present.
    pub batmap: bool,
    /// Parent uuid (differencing).
    pub parent_uuid: Option<Uuid>,
    /// Parent name (differencing).
    pub parent_name: Option<String>,
    /// Parent locators as `(platform, text)` (differencing).
    pub parent_locators: Vec<(String, String)>,
}

/// Summarises the VHD at `path`.
pub fn info(path: &Path) -> Result<Info> {
    let d = Disk::open(path, false)?;
    let file_size = d
        .io()
        .len()
        .map_err(|e| Error::io(d.name(), "reading the size", e))?;
    let mut locs = Vec::new();
    let diff = d.disk_type() == DiskType::Differencing;
    if let (true, Some(h)) = (diff, d.header()) {
        for l in h
            .locators
            .iter()
            .filter(|l| l.code != 0 && l.data_len > 0 && l.data_len <= 65536)
        {
            let mut data = vec![0u8; l.data_len as usize];
            let text = match d.io().read_at(&mut data, l.data_offset) {
                Ok(()) => decode_locator(l.code, &data).unwrap_or_else(|| "(undecodable)".into()),
                Err(_) => "(past end of file)".into(),
            };
            locs.push((l.code_name(), text));
        }
    }
    Ok(Info {
        path: path.display().to_string(),
        disk_type: d.disk_type().name().into(),
        virtual_size: d.virtual_size(),
        block_size: d.header().map(|h| h.block_size as u64),
        uuid: d.uuid(),
        hidden: d.is_hidden(),
        creator: d.footer().creator(),
        timestamp: d.footer().timestamp,
        file_size,
        bat_entries: d.bat_entries(),
        allocated_blocks: if d.disk_type() == DiskType::Fixed {
            d.blocks()
        } else {
            d.allocated_blocks()
        },
        batmap: d.batmap().is_some(),
        parent_uuid: d.header().filter(|_| diff).map(|h| h.parent_uuid),
        parent_name: d.header().filter(|_| diff).map(|h| h.parent_name.clone()),
        parent_locators: locs,
    })
}
