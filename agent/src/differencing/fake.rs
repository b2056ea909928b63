//! A test double of [`Format`]: each node is a small JSON file. Lets the engine's journal and
//! recovery logic be tested quickly and independently of the VHD code.

use super::{Format, NodeInfo};
use crate::core::error::{io, Result};
use std::io::Write;
use std::path::Path;

/// JSON-file nodes (tests only).
#[derive(Debug, Default)]
pub struct FakeFormat;

#[derive(serde::Serialize, serde::Deserialize)]
struct Node {
    size: u64,
    hidden: bool,
    parent: Option<String>,
}

fn write(path: &Path, n: &Node) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| io("create", path, e))?;
    f.write_all(&serde_json::to_vec(n).unwrap())
        .map_err(|e| io("write", path, e))?;
    f.sync_all().map_err(|e| io("fsync", path, e))
}

fn read(path: &Path) -> Result<Node> {
    let b = std::fs::read(path).map_err(|e| io("read", path, e))?;
    serde_json::from_slice(&b).map_err(|e| crate::core::error::backend("BAD_NODE", e.to_string()))
}

impl Format for FakeFormat {
    fn create_base(&self, path: &Path, virtual_size: u64) -> Result<()> {
        write(
            path,
            &Node {
                size: virtual_size,
                hidden: false,
                parent: None,
            },
        )
    }
    fn create_child(&self, child: &Path, parent: &Path) -> Result<()> {
        let p = read(parent)?;
        let name = parent.file_stem().unwrap().to_string_lossy().to_string();
        write(
            child,
            &Node {
                size: p.size,
                hidden: false,
                parent: Some(name),
            },
        )
    }
    fn set_hidden(&self, path: &Path, hidden: bool) -> Result<()> {
        let mut n = read(path)?;
        n.hidden = hidden;
        write(path, &n)
    }
    fn stage_child(&self, child: &Path, parent: &Path, parent_name: &str) -> Result<std::fs::File> {
        let p = read(parent)?;
        let n = Node {
            size: p.size,
            hidden: false,
            parent: Some(parent_name.to_string()),
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(child)
            .map_err(|e| io("create", child, e))?;
        f.write_all(&serde_json::to_vec(&n).unwrap())
            .map_err(|e| io("write", child, e))?;
        Ok(f)
    }
    fn stage_hidden(&self, path: &Path, hidden: bool) -> Result<std::fs::File> {
        let mut n = read(path)?;
        n.hidden = hidden;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io("open", path, e))?;
        f.write_all(&serde_json::to_vec(&n).unwrap())
            .map_err(|e| io("write", path, e))?;
        Ok(f)
    }
    fn inspect(&self, path: &Path) -> Result<NodeInfo> {
        let n = read(path)?;
        Ok(NodeInfo {
            virtual_size: n.size,
            hidden: n.hidden,
            parent: n.parent,
            physical_size: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        })
    }
}
