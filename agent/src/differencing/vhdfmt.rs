//! The real node format: VHD files through the `vhd` crate (dynamic bases, differencing
//! children with relative parent locators, blktap's hidden flag).

use super::{Format, NodeInfo};
use crate::core::error::{backend, Result};
use crate::core::validate::BLOCK_SIZE;
use interface::codes;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use vhd::format::{Footer, Header, FOOTER_SIZE, HEADER_SIZE};

/// VHD chain nodes.
#[derive(Debug, Default, Clone, Copy)]
pub struct VhdFormat;

fn vhd_err(what: &str, path: &Path, e: vhd::Error) -> interface::StorageError {
    backend(
        codes::VHD_ERROR,
        format!("{what} {}: {}", path.display(), e.full_text()),
    )
}

/// A file whose `sync` is left to the caller (the engine syncs staged files together, in one
/// barrier, instead of one fsync per file as `vhd::create_*` would).
struct Unsynced<'a>(&'a File);

impl vhd::BlockIo for Unsynced<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
}

fn ioerr(what: &str, path: &Path, e: std::io::Error) -> interface::StorageError {
    crate::core::error::io(what, path, e)
}

/// The trailing footer (present in every VHD type) and, for dynamic/differencing disks, the
/// dynamic header: all a child needs of its parent, without reading the parent's BAT.
fn read_meta(f: &File, path: &Path) -> Result<(Footer, Option<Header>, u64)> {
    let name = path.display().to_string();
    let len = f
        .metadata()
        .map_err(|e| ioerr("reading the size of", path, e))?
        .len();
    if len < FOOTER_SIZE as u64 {
        return Err(backend(
            codes::VHD_ERROR,
            format!("{name}: too short for a VHD"),
        ));
    }
    let mut b = [0u8; FOOTER_SIZE];
    let off = len - FOOTER_SIZE as u64;
    f.read_exact_at(&mut b, off)
        .map_err(|e| ioerr("reading the footer of", path, e))?;
    let footer = Footer::parse(&b, &name, off).map_err(|e| vhd_err("reading", path, e))?;
    let header = if footer.disk_type == vhd::DiskType::Fixed {
        None
    } else {
        let mut h = vec![0u8; HEADER_SIZE];
        f.read_exact_at(&mut h, footer.data_offset)
            .map_err(|e| ioerr("reading the dynamic header of", path, e))?;
        Some(
            Header::parse(&h, &name, footer.data_offset)
                .map_err(|e| vhd_err("reading", path, e))?,
        )
    };
    Ok((footer, header, len))
}

impl Format for VhdFormat {
    fn stage_child(&self, child: &Path, parent: &Path, parent_name: &str) -> Result<File> {
        let pf = File::open(parent).map_err(|e| ioerr("opening", parent, e))?;
        let (footer, header, _) = read_meta(&pf, parent)?;
        let mtime = pf
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| vhd::format::vhd_time(d.as_secs()));
        let file_name = format!("{parent_name}.vhd");
        let pref = vhd::ParentRef {
            uuid: footer.uuid,
            timestamp: mtime,
            name: file_name.clone(),
            relative_path: format!("./{file_name}"),
        };
        let opts = vhd::CreateOptions {
            block_size: header.map_or(BLOCK_SIZE as u32, |h| h.block_size),
            ..Default::default()
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(child)
            .map_err(|e| ioerr("creating", child, e))?;
        let name = child.display().to_string();
        if let Err(e) = vhd::create_dynamic_io(
            &Unsynced(&f),
            &name,
            footer.current_size,
            &opts,
            Some(&pref),
        ) {
            let _ = std::fs::remove_file(child);
            return Err(vhd_err("creating differencing disk", child, e));
        }
        Ok(f)
    }

    fn stage_hidden(&self, path: &Path, hidden: bool) -> Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| ioerr("opening for writing", path, e))?;
        let (mut footer, _, len) = read_meta(&f, path)?;
        footer.hidden = hidden as u8;
        let b = footer.to_bytes();
        // Both copies (the one at offset 0 exists only in dynamic/differencing disks), each
        // with its checksum recomputed by `to_bytes`.
        if footer.disk_type != vhd::DiskType::Fixed {
            f.write_all_at(&b, 0)
                .map_err(|e| ioerr("writing the footer of", path, e))?;
        }
        f.write_all_at(&b, len - FOOTER_SIZE as u64)
            .map_err(|e| ioerr("writing the footer of", path, e))?;
        Ok(f)
    }

    fn create_base(&self, path: &Path, virtual_size: u64) -> Result<()> {
        let opts = vhd::CreateOptions {
            block_size: BLOCK_SIZE as u32,
            ..Default::default()
        };
        // vhd::create_* fsync the new file before returning.
        vhd::create_dynamic(path, virtual_size, &opts)
            .map(|_| ())
            .map_err(|e| vhd_err("creating", path, e))
    }

    fn create_child(&self, child: &Path, parent: &Path) -> Result<()> {
        vhd::create_differencing(child, parent, &vhd::CreateOptions::default())
            .map(|_| ())
            .map_err(|e| vhd_err("creating differencing disk", child, e))
    }

    fn set_hidden(&self, path: &Path, hidden: bool) -> Result<()> {
        vhd::set_hidden(path, hidden).map_err(|e| vhd_err("setting the hidden flag of", path, e))
    }

    fn inspect(&self, path: &Path) -> Result<NodeInfo> {
        let disk = vhd::Disk::open(path, false).map_err(|e| vhd_err("opening", path, e))?;
        let parent = if disk.disk_type() == vhd::DiskType::Differencing {
            let canon = path
                .canonicalize()
                .map_err(|e| crate::core::error::io("resolving", path, e))?;
            let root = canon.parent().unwrap_or(Path::new("/")).to_path_buf();
            let p = vhd::resolve_parent(&disk, &canon, &root)
                .map_err(|e| vhd_err("finding the parent of", path, e))?;
            if p.parent() != Some(root.as_path()) {
                return Err(backend(
                    codes::VHD_ERROR,
                    format!(
                        "{}: parent {} is not a node at the SR's root",
                        path.display(),
                        p.display()
                    ),
                ));
            }
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            match name.strip_suffix(".vhd") {
                Some(stem) => Some(stem.to_string()),
                None => {
                    return Err(backend(
                        codes::VHD_ERROR,
                        format!("{}: parent {name} is not named <uuid>.vhd", path.display()),
                    ))
                }
            }
        } else {
            None
        };
        Ok(NodeInfo {
            virtual_size: disk.virtual_size(),
            hidden: disk.is_hidden(),
            parent,
            physical_size: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        })
    }
}
