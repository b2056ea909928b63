//! `check`: validates every structure of a VHD file and reports each problem found (it does
//! not stop at the first, unlike [`Disk::open`]).

use crate::chain::resolve_parent;
use crate::disk::Disk;
use crate::error::Result;
use crate::format::*;
use crate::io::BlockIo;
use std::path::Path;
use std::sync::Arc;

/// One problem found by [`check`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Byte offset of the faulty structure or field, when there is one.
    pub offset: Option<u64>,
    /// What is wrong.
    pub what: String,
}

/// The result of [`check`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// The file checked.
    pub file: String,
    /// Disk type, when a footer could be read.
    pub disk_type: Option<String>,
    /// Allocated blocks examined.
    pub blocks_checked: u64,
    /// Every problem found (empty = valid).
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the VHD at `path`, resolving a differencing disk's parent inside its own directory.
pub fn check(path: &Path) -> Result<CheckReport> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    check_with_root(path, &dir)
}

/// Checks the VHD at `path`; a differencing disk's parent must resolve inside `root`.
pub fn check_with_root(path: &Path, root: &Path) -> Result<CheckReport> {
    let name = path.display().to_string();
    let f =
        std::fs::File::open(path).map_err(|e| crate::Error::io(&name, "opening for check", e))?;
    let io: Arc<dyn BlockIo> = Arc::new(f);
    let mut report = check_io(io.clone(), &name);
    if report.is_ok() && report.disk_type.as_deref() == Some("differencing") {
        let p = |what: String| Problem { offset: None, what };
        match (path.canonicalize(), root.canonicalize()) {
            (Ok(child), Ok(root)) => match Disk::from_io(io, &name, false) {
                Ok(d) => match resolve_parent(&d, &child, &root) {
                    Ok(parent) => match Disk::open(&parent, false) {
                        Ok(pd) => {
                            let want = d.header().map(|h| h.parent_uuid).unwrap_or_default();
                            if pd.uuid() != want {
                                report.problems.push(p(format!(
                                    "parent {} has uuid {}, but the header expects {want}",
                                    parent.display(),
                                    pd.uuid()
                                )));
                            }
                            if pd.virtual_size() < d.virtual_size()
                                && pd.disk_type() == DiskType::Fixed
                            {
                                report.problems.push(p(format!(
                                    "parent {} is smaller than the child",
                                    parent.display()
                                )));
                            }
                        }
                        Err(e) => report
                            .problems
                            .push(p(format!("parent {} does not open: {e}", parent.display()))),
                    },
                    Err(e) => report.problems.push(p(format!("parent link: {e}"))),
                },
                Err(e) => report.problems.push(p(e.to_string())),
            },
            (Err(e), _) | (_, Err(e)) => report.problems.push(p(format!("resolving paths: {e}"))),
        }
    }
    Ok(report)
}

/// Checks the VHD held by `io` (every structure but the parent link, which needs paths).
pub fn check_io(io: Arc<dyn BlockIo>, name: &str) -> CheckReport {
    let mut r = CheckReport {
        file: name.to_string(),
        disk_type: None,
        blocks_checked: 0,
        problems: Vec::new(),
    };
    let mut prob = |offset: Option<u64>, what: String| r.problems.push(Problem { offset, what });
    let len = match io.len() {
        Ok(l) => l,
        Err(e) => {
            prob(None, format!("cannot read the file size: {e}"));
            return r;
        }
    };
    if len < FOOTER_SIZE as u64 {
        prob(
            Some(0),
            format!("file of {len} bytes is too short to hold a footer"),
        );
        return r;
    }
    let read = |off: u64, n: usize| -> Option<Vec<u8>> {
        let mut b = vec![0u8; n];
        io.read_at(&mut b, off).ok().map(|_| b)
    };
    let tail_off = len - FOOTER_SIZE as u64;
    if len % SECTOR != 0 {
        prob(
            Some(len),
            format!("file size {len} is not a multiple of 512"),
        );
    }
    let tail = read(tail_off, FOOTER_SIZE).map(|b| Footer::parse(&b, name, tail_off));
    let tail = match tail {
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => {
            prob(Some(tail_off), format!("footer at the end: {e}"));
            None
        }
        None => None,
    };
    let head = if tail
        .as_ref()
        .is_some_and(|f| f.disk_type == DiskType::Fixed)
    {
        None
    } else {
        match read(0, FOOTER_SIZE).map(|b| Footer::parse(&b, name, 0)) {
            Some(Ok(f)) => Some(f),
            Some(Err(e)) => {
                prob(Some(0), format!("footer copy at offset 0: {e}"));
                None
            }
            None => None,
        }
    };
    if let (Some(t), Some(h)) = (&tail, &head) {
        if t != h {
            prob(
                Some(0),
                "the footer copy at offset 0 differs from the footer at the end".into(),
            );
        }
    }
    let Some(footer) = tail.or(head) else {
        return r;
    };
    r.disk_type = Some(footer.disk_type.name().into());
    if footer.disk_type == DiskType::Fixed {
        if footer.current_size > tail_off {
            prob(
                Some(tail_off + 48),
                format!(
                    "fixed disk size {} exceeds the data area of {tail_off} bytes",
                    footer.current_size
                ),
            );
        }
        return r;
    }
    // Everything else is what Disk::open validates; it stops at the first problem, so
    // collect structure problems here one by one.
    let hoff = footer.data_offset;
    let Some(hb) = hoff
        .checked_add(HEADER_SIZE as u64)
        .filter(|&e| e <= len)
        .and_then(|_| read(hoff, HEADER_SIZE))
    else {
        prob(
            Some(16),
            format!("dynamic header offset {hoff} lies past the end of the file"),
        );
        return r;
    };
    let header = match Header::parse(&hb, name, hoff) {
        Ok(h) => h,
        Err(e) => {
            prob(Some(hoff), e.to_string());
            return r;
        }
    };
    let bs = header.block_size as u64;
    let bitmap_bytes = header.bitmap_bytes();
    let entries = header.max_table_entries as u64;
    if entries < footer.current_size.div_ceil(bs) {
        prob(
            Some(hoff + 28),
            format!(
                "{entries} BAT entries cannot map {} bytes",
                footer.current_size
            ),
        );
    }
    let toff = header.table_offset;
    let bat_bytes = round_up(entries * 4, SECTOR);
    let Some(bat_raw) = toff
        .checked_add(bat_bytes)
        .filter(|&e| e <= len)
        .and_then(|_| read(toff, (entries * 4) as usize))
    else {
        prob(
            Some(hoff + 16),
            format!("BAT at {toff} of {entries} entries extends past the end of the file"),
        );
        return r;
    };
    let mut regions: Vec<(u64, u64, String, u64)> = vec![
        (0, 512, "footer copy".into(), 0),
        (
            hoff,
            hoff + HEADER_SIZE as u64,
            "dynamic header".into(),
            hoff,
        ),
        (toff, toff + bat_bytes, "BAT".into(), toff),
        (tail_off, len, "footer".into(), tail_off),
    ];
    if let Some(bm) = read(toff + bat_bytes, SECTOR as usize).and_then(|b| BatmapHeader::parse(&b))
    {
        let end = bm.offset.saturating_add(bm.size_sectors as u64 * SECTOR);
        regions.push((
            toff + bat_bytes,
            toff + bat_bytes + SECTOR,
            "batmap header".into(),
            toff + bat_bytes,
        ));
        if end > len {
            prob(
                Some(toff + bat_bytes + 8),
                format!("batmap at {} extends past the end of the file", bm.offset),
            );
        } else {
            regions.push((bm.offset, end, "batmap".into(), toff + bat_bytes + 8));
        }
    }
    for (i, l) in header.locators.iter().enumerate() {
        // Locators are meaningful only in differencing disks (see Disk::from_io).
        if l.code == 0 || footer.disk_type != DiskType::Differencing {
            continue;
        }
        let field = hoff + 576 + 24 * i as u64;
        if ![
            PLAT_MACX,
            PLAT_W2KU,
            PLAT_W2RU,
            u32::from_be_bytes(*b"Wi2r"),
            u32::from_be_bytes(*b"Wi2k"),
            u32::from_be_bytes(*b"Mac "),
        ]
        .contains(&l.code)
        {
            prob(
                Some(field),
                format!(
                    "parent locator {i}: unknown platform code {}",
                    l.code_name()
                ),
            );
            continue;
        }
        let end = l.data_offset.saturating_add(l.data_len as u64);
        if end > len {
            prob(
                Some(field),
                format!(
                    "parent locator {i} ({}): data at {} of {} bytes lies past the end of the file",
                    l.code_name(),
                    l.data_offset,
                    l.data_len
                ),
            );
            continue;
        }
        if l.data_len as u64 > l.space_bytes() {
            prob(
                Some(field),
                format!(
                    "parent locator {i} ({}): data length {} exceeds its space of {} bytes",
                    l.code_name(),
                    l.data_len,
                    l.space_bytes()
                ),
            );
        }
        if [PLAT_MACX, PLAT_W2KU, PLAT_W2RU].contains(&l.code) {
            let data = read(l.data_offset, l.data_len as usize).unwrap_or_default();
            if decode_locator(l.code, &data).is_none() {
                prob(
                    Some(l.data_offset),
                    format!(
                        "parent locator {i} ({}): data does not decode as a path",
                        l.code_name()
                    ),
                );
            }
        }
        regions.push((
            l.data_offset,
            l.data_offset + round_up(l.data_len as u64, SECTOR),
            format!("parent locator {i}"),
            field,
        ));
    }
    if footer.disk_type == DiskType::Differencing && header.parent_uuid.is_nil() {
        prob(
            Some(hoff + 40),
            "differencing disk with a nil parent uuid".into(),
        );
    }
    for (i, c) in bat_raw.chunks_exact(4).enumerate() {
        let e = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        if e == BAT_UNUSED {
            continue;
        }
        let field = toff + 4 * i as u64;
        if i as u64 >= footer.current_size.div_ceil(bs) {
            prob(
                Some(field),
                format!("BAT entry {i} is allocated past the virtual size"),
            );
        }
        let start = e as u64 * SECTOR;
        let end = start + bitmap_bytes + bs;
        if end > tail_off {
            prob(Some(field), format!("BAT entry {i}: block at {start}..{end} extends past the data area ({tail_off} bytes)"));
            continue;
        }
        r_blocks(&mut regions, start, end, i, field);
        if read(start, bitmap_bytes as usize).is_none() {
            prob(Some(start), format!("bitmap of block {i} is unreadable"));
        }
    }
    let nblocks = regions.iter().filter(|r| r.2.starts_with("block ")).count() as u64;
    regions.sort_by_key(|r| (r.0, r.1));
    let mut max_end: Option<(u64, String)> = None;
    for reg in &regions {
        if let Some((end, what)) = &max_end {
            if reg.0 < *end {
                prob(
                    Some(reg.3),
                    format!("{} at {}..{} overlaps {what}", reg.2, reg.0, reg.1),
                );
            }
        }
        if max_end.as_ref().map_or(true, |(e, _)| reg.1 > *e) {
            max_end = Some((reg.1, reg.2.clone()));
        }
    }
    r.blocks_checked = nblocks;
    if r.problems.is_empty() {
        if let Err(e) = Disk::from_io(io, name, false) {
            r.problems.push(Problem {
                offset: None,
                what: e.to_string(),
            });
        }
    }
    r
}

fn r_blocks(
    regions: &mut Vec<(u64, u64, String, u64)>,
    start: u64,
    end: u64,
    i: usize,
    field: u64,
) {
    regions.push((start, end, format!("block {i}"), field));
}
