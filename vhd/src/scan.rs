//! The one validation pass over a VHD file's structures, shared by [`crate::Disk::open`] and
//! [`crate::check()`]: footers, dynamic header, BAT, blktap batmap, parent locators and the
//! placement of every block. Each problem found goes to a [`Findings`] sink: opening stops at
//! the first problem that makes the file unusable ([`FailFast`]); checking records every
//! problem and goes on where the file still makes sense ([`Collect`]).
//!
//! Problems come in two weights. A *fatal* one makes the file unusable (a bad footer, a BAT
//! that leads past the end, overlapping structures): open refuses the file. A *tolerable* one
//! is a fault a reader can live with (a damaged footer copy while the trailing footer is good,
//! an unknown locator platform, a batmap with a bad checksum): open logs it and goes on, check
//! reports it.

use crate::check::Problem;
use crate::disk::Region;
use crate::error::{Error, Result};
use crate::format::*;
use crate::io::BlockIo;

/// Where the problems a [`scan`] finds go.
pub(crate) trait Findings {
    /// A problem that makes the file unusable: `Err` stops the scan (open), `Ok` goes on (check).
    fn fatal(&mut self, e: Error) -> Result<()>;
    /// A problem a reader can live with: never stops the scan.
    fn tolerable(&mut self, e: Error);
}

/// Open's sink: the first fatal problem is the error; tolerable ones are logged.
pub(crate) struct FailFast;

impl Findings for FailFast {
    fn fatal(&mut self, e: Error) -> Result<()> {
        Err(e)
    }
    fn tolerable(&mut self, e: Error) {
        tracing::debug!(error = %e.full_text(), "tolerated while opening");
    }
}

/// Check's sink: every problem, in the order found.
#[derive(Debug, Default)]
pub(crate) struct Collect {
    /// What was found.
    pub(crate) problems: Vec<Problem>,
    /// True once a fatal problem was recorded (the layout cannot be used to open the file).
    pub(crate) fatal_seen: bool,
}

impl Findings for Collect {
    fn fatal(&mut self, e: Error) -> Result<()> {
        self.fatal_seen = true;
        self.problems.push(Problem::from_error(&e));
        Ok(())
    }
    fn tolerable(&mut self, e: Error) {
        self.problems.push(Problem::from_error(&e));
    }
}

/// A batmap found after the BAT.
#[derive(Debug, Clone)]
pub(crate) struct BatmapFound {
    /// Byte offset of the header sector.
    pub(crate) header_offset: u64,
    /// The header sector as read (marker and key hash are kept when it is rewritten).
    pub(crate) header_sector: [u8; SECTOR as usize],
    /// The parsed header.
    pub(crate) header: BatmapHeader,
    /// The map (`size_sectors` sectors); `None` when it could not be used (bad checksum, newer
    /// version, misplaced or too small).
    pub(crate) map: Option<Vec<u8>>,
    /// True when the header's placement and version let this engine keep the map up to date
    /// (a map with a bad checksum is then rewritten, all clear, on the next update).
    pub(crate) maintainable: bool,
}

/// Everything a scan learnt about a file.
#[derive(Debug)]
pub(crate) struct Layout {
    /// The footer in use.
    pub(crate) footer: Footer,
    /// False when the trailing footer was unusable and the copy at offset 0 was used.
    pub(crate) trailing_footer_ok: bool,
    /// The dynamic header (`None` for fixed disks).
    pub(crate) header: Option<Header>,
    /// BAT entries as read.
    pub(crate) bat: Vec<u32>,
    /// Metadata regions (footer copy, header, BAT, batmap, locators; the footer of fixed disks).
    pub(crate) regions: Vec<Region>,
    /// The blktap batmap, when there is one.
    pub(crate) batmap: Option<BatmapFound>,
    /// First byte after every piece of metadata, every block and the data area.
    pub(crate) next_free: u64,
}

/// The platform codes of the specification (others are reported as unknown).
const KNOWN_PLATFORMS: [u32; 6] = [
    PLAT_MACX,
    PLAT_W2KU,
    PLAT_W2RU,
    u32::from_be_bytes(*b"Wi2r"),
    u32::from_be_bytes(*b"Wi2k"),
    u32::from_be_bytes(*b"Mac "),
];

/// Longest locator data read as a path (the same bound [`crate::resolve_parent`] uses).
pub(crate) const MAX_LOCATOR_DATA: u32 = 65536;

/// A region with the byte offset of the field that places it (named in overlap reports).
struct Placed {
    region: Region,
    field: u64,
}

/// Reads and validates the structures of the file `io` (named `name`, `len` bytes long).
/// `Ok(None)`: the scan could not go on (only with a sink that does not stop at fatal problems,
/// which then holds the reason).
pub(crate) fn scan(
    io: &dyn BlockIo,
    name: &str,
    len: u64,
    f: &mut dyn Findings,
) -> Result<Option<Layout>> {
    let read = |off: u64, n: usize, what: &str| -> Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        io.read_at(&mut b, off)
            .map_err(|e| Error::io(name, format!("reading the {what} at offset {off}"), e))?;
        Ok(b)
    };
    if len < FOOTER_SIZE as u64 {
        f.fatal(Error::corrupt(
            name,
            "file",
            0,
            format!("{len} bytes is too short to hold a VHD footer"),
        ))?;
        return Ok(None);
    }
    if len % SECTOR != 0 {
        f.tolerable(Error::corrupt(
            name,
            "file size",
            len,
            format!("{len} is not a multiple of 512"),
        ));
    }
    let tail_off = len - FOOTER_SIZE as u64;
    let tail =
        read(tail_off, FOOTER_SIZE, "footer").and_then(|b| Footer::parse(&b, name, tail_off));
    let copy = || read(0, FOOTER_SIZE, "footer copy").and_then(|b| Footer::parse(&b, name, 0));
    let (footer, trailing_footer_ok) = match tail {
        Ok(t) => {
            if t.disk_type != DiskType::Fixed {
                // Open never needs the copy while the trailing footer is good; check compares.
                match copy() {
                    Ok(c) if c != t => f.tolerable(Error::corrupt(
                        name,
                        "footer copy",
                        0,
                        "differs from the footer at the end of the file",
                    )),
                    Ok(_) => {}
                    Err(e) => f.tolerable(e),
                }
            }
            (t, true)
        }
        Err(tail_err) => match copy() {
            // Dynamic disks keep a copy at offset 0: usable after a crash that lost the end.
            Ok(c) if c.disk_type != DiskType::Fixed => {
                tracing::warn!(file = name, error = %tail_err.full_text(), "trailing footer invalid; using the copy at offset 0");
                f.tolerable(tail_err);
                (c, false)
            }
            Ok(_) => {
                f.fatal(tail_err)?;
                return Ok(None);
            }
            Err(copy_err) => {
                f.fatal(tail_err)?;
                f.tolerable(copy_err);
                return Ok(None);
            }
        },
    };
    let size = footer.current_size;
    if footer.disk_type == DiskType::Fixed {
        if size > tail_off {
            f.fatal(Error::corrupt(
                name,
                "footer current size",
                tail_off + 48,
                format!("fixed disk of {size} bytes does not fit in a file of {len} bytes"),
            ))?;
        }
        return Ok(Some(Layout {
            footer,
            trailing_footer_ok,
            header: None,
            bat: Vec::new(),
            regions: vec![Region {
                start: tail_off,
                end: len,
                what: "footer".into(),
            }],
            batmap: None,
            next_free: len,
        }));
    }
    let mut placed = vec![Placed {
        region: Region {
            start: 0,
            end: 512,
            what: "footer copy".into(),
        },
        field: 0,
    }];
    let hoff = footer.data_offset;
    if hoff
        .checked_add(HEADER_SIZE as u64)
        .map_or(true, |e| e > len)
    {
        f.fatal(Error::corrupt(
            name,
            "footer data offset",
            16,
            format!("dynamic header at {hoff} lies past the end of the {len}-byte file"),
        ))?;
        return Ok(None);
    }
    let header = match Header::parse(&read(hoff, HEADER_SIZE, "dynamic header")?, name, hoff) {
        Ok(h) => h,
        Err(e) => {
            f.fatal(e)?;
            return Ok(None);
        }
    };
    placed.push(Placed {
        region: Region {
            start: hoff,
            end: hoff + HEADER_SIZE as u64,
            what: "dynamic header".into(),
        },
        field: hoff,
    });
    let block_size = header.block_size as u64;
    let needed = size.div_ceil(block_size);
    let entries = header.max_table_entries as u64;
    if entries < needed {
        f.fatal(Error::corrupt(name, "dynamic header max table entries", hoff + 28, format!("{entries} entries cannot map {size} bytes in blocks of {block_size} (need {needed})")))?;
    }
    let toff = header.table_offset;
    let bat_bytes = round_up(entries * 4, SECTOR);
    if toff.checked_add(bat_bytes).map_or(true, |e| e > len) {
        f.fatal(Error::corrupt(
            name,
            "dynamic header table offset",
            hoff + 16,
            format!(
                "BAT of {entries} entries at {toff} extends past the end of the {len}-byte file"
            ),
        ))?;
        return Ok(None);
    }
    placed.push(Placed {
        region: Region {
            start: toff,
            end: toff + bat_bytes,
            what: "BAT".into(),
        },
        field: hoff + 16,
    });
    let bat: Vec<u32> = read(toff, (entries * 4) as usize, "BAT")?
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let batmap = scan_batmap(io, name, len, &footer, &header, &mut placed, f)?;
    if footer.disk_type == DiskType::Differencing {
        scan_locators(io, name, len, hoff, &header, &mut placed, f)?;
        if header.parent_uuid.is_nil() {
            f.tolerable(Error::corrupt(
                name,
                "dynamic header parent uuid",
                hoff + 40,
                "a differencing disk with a nil parent uuid",
            ));
        }
    }
    let meta_end = placed.iter().map(|p| p.region.end).max().unwrap_or(0);
    let regions: Vec<Region> = placed.iter().map(|p| p.region.clone()).collect();
    // Blocks: inside the data area, and overlapping nothing.
    let bitmap_bytes = header.bitmap_bytes();
    let limit = if trailing_footer_ok { tail_off } else { len };
    let mut blocks_end = 0;
    for (i, &e) in bat.iter().enumerate() {
        if e == BAT_UNUSED {
            continue;
        }
        let field = toff + 4 * i as u64;
        if i as u64 >= needed {
            f.tolerable(Error::corrupt(
                name,
                format!("BAT entry {i}"),
                field,
                "allocated past the virtual size",
            ));
        }
        let start = e as u64 * SECTOR;
        let end = start + bitmap_bytes + block_size;
        if end > limit {
            f.fatal(Error::corrupt(name, format!("BAT entry {i}"), field, format!("block at sector {e} (bytes {start}..{end}) extends past the end of the data area ({limit} bytes)")))?;
            continue;
        }
        blocks_end = blocks_end.max(end);
        placed.push(Placed {
            region: Region {
                start,
                end,
                what: format!("block {i}"),
            },
            field,
        });
    }
    placed.sort_by_key(|p| (p.region.start, p.region.end));
    let mut reach: Option<&Placed> = None;
    for p in &placed {
        if let Some(r) = reach {
            if p.region.start < r.region.end {
                // Name the BAT entry when a block is involved, else the later structure.
                let field = if r.region.what.starts_with("block ")
                    && !p.region.what.starts_with("block ")
                {
                    r.field
                } else {
                    p.field
                };
                f.fatal(Error::corrupt(
                    name,
                    format!("{} placement", p.region.what),
                    field,
                    format!(
                        "{} at {}..{} overlaps {} at {}..{}",
                        p.region.what,
                        p.region.start,
                        p.region.end,
                        r.region.what,
                        r.region.start,
                        r.region.end
                    ),
                ))?;
            }
        }
        if reach.map_or(true, |r| p.region.end > r.region.end) {
            reach = Some(p);
        }
    }
    let file_end = if trailing_footer_ok {
        tail_off
    } else {
        round_up(len, SECTOR)
    };
    Ok(Some(Layout {
        footer,
        trailing_footer_ok,
        header: Some(header),
        bat,
        regions,
        batmap,
        next_free: round_up(meta_end.max(blocks_end).max(file_end), SECTOR),
    }))
}

/// The batmap header in the sector after the BAT, and its map.
fn scan_batmap(
    io: &dyn BlockIo,
    name: &str,
    len: u64,
    footer: &Footer,
    header: &Header,
    placed: &mut Vec<Placed>,
    f: &mut dyn Findings,
) -> Result<Option<BatmapFound>> {
    let tail_off = len - FOOTER_SIZE as u64;
    let entries = header.max_table_entries as u64;
    let hdr_off = header.table_offset + round_up(entries * 4, SECTOR);
    let mut sector = [0u8; SECTOR as usize];
    let found = hdr_off + SECTOR <= tail_off
        && io.read_at(&mut sector, hdr_off).is_ok()
        && &sector[..8] == BATMAP_COOKIE;
    if !found {
        if footer.promises_batmap() {
            f.tolerable(Error::corrupt(
                name,
                "batmap header",
                hdr_off,
                format!(
                    "creator {:?} version {}.{} promises a batmap after the BAT, but there is none (blktap's vhd-util check refuses such a file)",
                    footer.creator(),
                    footer.creator_version >> 16,
                    footer.creator_version & 0xFFFF
                ),
            ));
        }
        return Ok(None);
    }
    let Some(bm) = BatmapHeader::parse(&sector) else {
        return Ok(None);
    };
    placed.push(Placed {
        region: Region {
            start: hdr_off,
            end: hdr_off + SECTOR,
            what: "batmap header".into(),
        },
        field: hdr_off,
    });
    let map_len = bm.size_sectors as u64 * SECTOR;
    let map_end = bm.offset.saturating_add(map_len);
    if map_end > len {
        f.fatal(Error::corrupt(
            name,
            "batmap offset",
            hdr_off + 8,
            format!(
                "batmap at {} of {} sectors extends past the end of the file",
                bm.offset, bm.size_sectors
            ),
        ))?;
        return Ok(None);
    }
    placed.push(Placed {
        region: Region {
            start: bm.offset,
            end: map_end,
            what: "batmap".into(),
        },
        field: hdr_off + 8,
    });
    let mut usable = true;
    if bm.offset % SECTOR != 0 || bm.offset == 0 {
        f.tolerable(Error::corrupt(
            name,
            "batmap offset",
            hdr_off + 8,
            format!("{} is not a non-zero multiple of 512", bm.offset),
        ));
        usable = false;
    }
    if bm.version > BATMAP_VERSION {
        f.tolerable(Error::Unsupported(format!(
            "{name}: batmap version {:#010x} is newer than {BATMAP_VERSION:#010x}; its map is left alone",
            bm.version
        )));
        usable = false;
    }
    if bm.size_sectors == 0 || (bm.size_sectors as u64) << 12 < entries {
        f.tolerable(Error::corrupt(
            name,
            "batmap size",
            hdr_off + 16,
            format!(
                "{} sectors cannot map the {entries} BAT entries",
                bm.size_sectors
            ),
        ));
        usable = false;
    }
    let mut map = None;
    if usable {
        let m = {
            let mut b = vec![0u8; map_len as usize];
            io.read_at(&mut b, bm.offset).map_err(|e| {
                Error::io(
                    name,
                    format!("reading the batmap at offset {}", bm.offset),
                    e,
                )
            })?;
            b
        };
        let computed = batmap_checksum(&m, bm.version, footer.current_size);
        if computed != bm.checksum {
            f.tolerable(Error::Checksum {
                file: name.into(),
                structure: "batmap",
                offset: hdr_off,
                stored: bm.checksum,
                computed,
            });
        } else {
            for b in entries..(map_len * 8) {
                if batmap_bit(&m, b) {
                    f.tolerable(Error::corrupt(
                        name,
                        "batmap",
                        bm.offset + b / 8,
                        format!("bit {b} is set past the last BAT entry"),
                    ));
                    break;
                }
            }
            map = Some(m);
        }
    }
    Ok(Some(BatmapFound {
        header_offset: hdr_off,
        header_sector: sector,
        header: bm,
        map,
        maintainable: usable,
    }))
}

/// The parent locators of a differencing disk (a dynamic disk's entries mean nothing and are
/// ignored, whatever they hold). Their data must lie inside the file: a region past the end
/// could otherwise be overlapped by blocks allocated later.
fn scan_locators(
    io: &dyn BlockIo,
    name: &str,
    len: u64,
    hoff: u64,
    header: &Header,
    placed: &mut Vec<Placed>,
    f: &mut dyn Findings,
) -> Result<()> {
    for (i, l) in header.locators.iter().enumerate() {
        if l.code == 0 {
            continue;
        }
        let field = hoff + 576 + 24 * i as u64;
        if !KNOWN_PLATFORMS.contains(&l.code) {
            f.tolerable(Error::corrupt(
                name,
                format!("parent locator {i}"),
                field,
                format!("unknown platform code {}", l.code_name()),
            ));
            continue;
        }
        if l.data_len == 0 {
            continue;
        }
        let what = format!("parent locator {i} ({})", l.code_name());
        let end = l
            .data_offset
            .saturating_add(round_up(l.data_len as u64, SECTOR));
        if end > len {
            f.fatal(Error::corrupt(
                name,
                what,
                field,
                format!(
                    "data at {} of {} bytes lies past the end of the {len}-byte file",
                    l.data_offset, l.data_len
                ),
            ))?;
            continue;
        }
        if l.data_len as u64 > l.space_bytes() {
            f.tolerable(Error::corrupt(
                name,
                what.clone(),
                field,
                format!(
                    "data length {} exceeds its space of {} bytes",
                    l.data_len,
                    l.space_bytes()
                ),
            ));
        }
        if l.data_len > MAX_LOCATOR_DATA {
            f.tolerable(Error::corrupt(
                name,
                what.clone(),
                field,
                format!("data length {} is longer than any path", l.data_len),
            ));
        } else if [PLAT_MACX, PLAT_W2KU, PLAT_W2RU].contains(&l.code) {
            let mut data = vec![0u8; l.data_len as usize];
            if io.read_at(&mut data, l.data_offset).is_err()
                || decode_locator(l.code, &data).is_none()
            {
                f.tolerable(Error::corrupt(
                    name,
                    what.clone(),
                    l.data_offset,
                    "data does not decode as a path",
                ));
            }
        }
        placed.push(Placed {
            region: Region {
                start: l.data_offset,
                end,
                what,
            },
            field,
        });
    }
    Ok(())
}
