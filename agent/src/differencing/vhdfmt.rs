//! The real node format: VHD files through the `vhd` crate (dynamic bases, differencing
//! children with relative parent locators, blktap's hidden flag).

use super::{Format, NodeInfo};
use crate::core::error::{backend, Result};
use crate::core::validate::BLOCK_SIZE;
use interface::codes;
use std::path::Path;

/// VHD chain nodes.
#[derive(Debug, Default, Clone, Copy)]
pub struct VhdFormat;

fn vhd_err(what: &str, path: &Path, e: vhd::Error) -> interface::StorageError {
    backend(codes::VHD_ERROR, format!("{what} {}: {e}", path.display()))
}

impl Format for VhdFormat {
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
