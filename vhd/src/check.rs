//! `check`: validates every structure of a VHD file and reports each problem found (it does
//! not stop at the first, unlike [`Disk::open`]).

use crate::chain::{confine_leaf, resolve_parent, DEFAULT_MAX_DEPTH};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::format::*;
use crate::io::BlockIo;
use crate::scan::{scan, Collect};
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

impl Problem {
    /// The problem an error describes: its byte offset, when it names one, and its text without
    /// the file name (the report names the file once).
    pub fn from_error(e: &Error) -> Problem {
        let offset = match e {
            Error::Corrupt { offset, .. } | Error::Checksum { offset, .. } => Some(*offset),
            _ => None,
        };
        let text = e.full_text();
        let what = match e {
            Error::Io { file, .. } | Error::Corrupt { file, .. } | Error::Checksum { file, .. } => {
                text.strip_prefix(&format!("{file}: "))
                    .unwrap_or(&text)
                    .to_string()
            }
            _ => text,
        };
        Problem { offset, what }
    }
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

/// Checks the VHD at `path`, resolving a differencing disk's ancestors inside its own
/// directory (see [`check_with_root`]).
pub fn check(path: &Path) -> Result<CheckReport> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    check_with_root(path, &dir)
}

/// Checks the VHD at `path`, which must be a regular file inside `root` (symlinks followed,
/// refused with the same error [`crate::Chain::open`] gives); a differencing disk's ancestors must
/// resolve inside `root` too, each with the uuid its child records, without a cycle (a disk
/// that is its own parent, or any longer loop) and no deeper than [`DEFAULT_MAX_DEPTH`].
pub fn check_with_root(path: &Path, root: &Path) -> Result<CheckReport> {
    let (canon, root) = confine_leaf(path, root)?;
    let name = path.display().to_string();
    let io: Arc<dyn BlockIo> = Arc::new(crate::io::open_regular(path, false)?);
    let mut report = check_io(io.clone(), &name);
    if !report.is_ok() || report.disk_type.as_deref() != Some("differencing") {
        return Ok(report);
    }
    let p = |what: String| Problem { offset: None, what };
    // Walk the ancestors: each link resolves inside the root, names the uuid its child
    // expects, and leads to a disk not seen before.
    let mut seen = vec![canon.clone()];
    let mut cur = match Disk::from_io(io, &name, false) {
        Ok(d) => d,
        Err(e) => {
            report.problems.push(Problem::from_error(&e));
            return Ok(report);
        }
    };
    let mut cur_path = canon;
    while cur.disk_type() == DiskType::Differencing {
        if seen.len() > DEFAULT_MAX_DEPTH {
            report.problems.push(p(format!(
                "the chain is deeper than the limit of {DEFAULT_MAX_DEPTH} layers"
            )));
            break;
        }
        let parent = match resolve_parent(&cur, &cur_path, &root) {
            Ok(pp) => pp,
            Err(e) => {
                report.problems.push(p(format!(
                    "parent link of {}: {}",
                    cur.name(),
                    e.full_text()
                )));
                break;
            }
        };
        if let Some(i) = seen.iter().position(|s| *s == parent) {
            report.problems.push(p(if i + 1 == seen.len() {
                format!("parent cycle: {} is its own parent", parent.display())
            } else {
                format!(
                    "parent cycle: {} is an ancestor of itself ({} links)",
                    parent.display(),
                    seen.len() - i
                )
            }));
            break;
        }
        let pd = match Disk::open(&parent, false) {
            Ok(d) => d,
            Err(e) => {
                report.problems.push(p(format!(
                    "parent {} does not open: {}",
                    parent.display(),
                    e.full_text()
                )));
                break;
            }
        };
        let want = cur.header().map(|h| h.parent_uuid).unwrap_or_default();
        if pd.uuid() != want {
            report.problems.push(p(format!(
                "parent {} has uuid {}, but {} expects {want}",
                parent.display(),
                pd.uuid(),
                cur.name()
            )));
            break;
        }
        if pd.virtual_size() < cur.virtual_size() && pd.disk_type() == DiskType::Fixed {
            report.problems.push(p(format!(
                "parent {} is smaller than its child {}",
                parent.display(),
                cur.name()
            )));
        }
        seen.push(parent.clone());
        cur = pd;
        cur_path = parent;
    }
    Ok(report)
}

/// Checks the VHD held by `io` (every structure but the parent link, which needs paths): the
/// validation [`Disk::open`] does ([`crate::scan`]), reporting every problem instead of the
/// first, then what open does not read: every allocated block's sector bitmap, and the batmap
/// against those bitmaps (a set bit must mean the block is wholly present).
pub fn check_io(io: Arc<dyn BlockIo>, name: &str) -> CheckReport {
    let mut r = CheckReport {
        file: name.to_string(),
        disk_type: None,
        blocks_checked: 0,
        problems: Vec::new(),
    };
    let len = match io.len() {
        Ok(l) => l,
        Err(e) => {
            r.problems.push(Problem::from_error(&crate::Error::io(
                name,
                "reading the file size",
                e,
            )));
            return r;
        }
    };
    let mut found = Collect::default();
    let layout = match scan(io.as_ref(), name, len, &mut found) {
        Ok(l) => l,
        Err(e) => {
            found.problems.push(Problem::from_error(&e));
            None
        }
    };
    r.problems = found.problems;
    let Some(layout) = layout else {
        return r;
    };
    r.disk_type = Some(layout.footer.disk_type.name().into());
    r.blocks_checked = layout.bat.iter().filter(|&&e| e != BAT_UNUSED).count() as u64;
    if found.fatal_seen {
        return r;
    }
    let disk = Disk::from_layout(io, name, false, layout);
    for b in 0..disk.bat_entries() as u64 {
        let bm = match disk.presence(b) {
            Ok(Some(bm)) => Some(bm),
            Ok(None) => None,
            Err(e) => {
                r.problems.push(Problem::from_error(&e));
                continue;
            }
        };
        if disk.batmap_bit(b) {
            match bm {
                None => r.problems.push(Problem {
                    offset: disk.batmap().map(|h| h.offset + b / 8),
                    what: format!("batmap bit {b} is set, but block {b} is not allocated"),
                }),
                Some(bm) if !bm.is_full() => r.problems.push(Problem {
                    offset: disk.batmap().map(|h| h.offset + b / 8),
                    what: format!(
                        "batmap bit {b} says block {b} is wholly written, but its bitmap marks only some sectors present"
                    ),
                }),
                Some(_) => {}
            }
        }
    }
    r
}
