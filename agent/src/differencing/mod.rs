//! Chain mechanics for SRs of VHD files: the on-disk node format behind a small trait
//! ([`Format`]), the in-memory index of which node is whose parent ([`ChainIndex`]), and the
//! double-child snapshot/clone steps the engine journals.
//!
//! Every chain node is `<uuid>.vhd` at the SR's root. The VHD headers (parent uuid + relative
//! parent locator) are the truth about structure; the index is rebuilt from them at attach.

pub mod compose;
#[cfg(test)]
pub mod fake;
pub mod gc;
pub mod online;
pub mod vhdfmt;

use crate::core::error::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The lock serialising an SR's differencing work (GC rounds, online leaf merges, compose),
/// so two of them never re-point the same nodes at once.
pub fn sr_op_lock(sr: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>> =
        Mutex::new(BTreeMap::new());
    LOCKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(sr.to_string())
        .or_default()
        .clone()
}

/// Recovery of differencing's own journals (compose, online leaf merge) at `SR.attach`, after
/// the engine's journal and before the chain index is rebuilt. Returns what was recovered.
pub fn recover_at_attach(sr: &crate::core::sr::Sr) -> Result<Vec<String>> {
    let fp = crate::failpoint::Failpoints::none();
    Ok(compose::recover(sr, &fp)?
        .into_iter()
        .chain(online::recover(sr)?)
        .collect())
}

/// What the engine needs to know about one chain node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Footer `hidden` flag (blktap): an internal base, not a VDI.
    pub hidden: bool,
    /// The parent's node name (`<name>.vhd` in the same directory), if differencing.
    pub parent: Option<String>,
    /// Bytes the file occupies.
    pub physical_size: u64,
}

/// The on-disk format of chain nodes. Implementations must make every change durable (fsync)
/// before returning, except the `stage_*` methods, whose callers sync the returned files.
pub trait Format: Send + Sync + std::fmt::Debug + 'static {
    /// Creates an empty base disk of `virtual_size` bytes (a multiple of the block size).
    fn create_base(&self, path: &Path, virtual_size: u64) -> Result<()>;
    /// Creates an empty differencing disk at `child` whose parent is `parent` (same directory).
    fn create_child(&self, child: &Path, parent: &Path) -> Result<()>;
    /// Sets or clears the hidden flag.
    fn set_hidden(&self, path: &Path, hidden: bool) -> Result<()>;
    /// Reads what [`NodeInfo`] holds.
    fn inspect(&self, path: &Path) -> Result<NodeInfo>;
    /// Writes, **without syncing**, an empty differencing disk at `child` (which must not exist)
    /// whose parent is the node that is at `parent` now but will be published as node
    /// `parent_name` (`./<parent_name>.vhd`, same directory) before the child is used. Returns
    /// the open file: the caller makes it durable (`sync_data`) as part of a barrier.
    fn stage_child(&self, child: &Path, parent: &Path, parent_name: &str) -> Result<File>;
    /// Sets or clears the hidden flag **without syncing**; returns the open file for the
    /// caller's barrier.
    fn stage_hidden(&self, path: &Path, hidden: bool) -> Result<File>;
}

/// File name of node `name` (`<name>.vhd`).
pub fn node_file(root: &Path, name: &str) -> PathBuf {
    root.join(format!("{name}.vhd"))
}

/// Names (without `.vhd`) of every node file at the SR's root.
pub fn list_nodes(root: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(root).map_err(|e| crate::core::error::io("list SR", root, e))?;
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().to_string();
        if let Some(stem) = name.strip_suffix(".vhd") {
            if !stem.starts_with('.') && ent.file_type().map(|t| t.is_file()).unwrap_or(false) {
                out.push(stem.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Who is whose parent, and which nodes are hidden bases, for one SR.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChainIndex {
    parent: BTreeMap<String, Option<String>>,
    hidden: BTreeSet<String>,
}

impl ChainIndex {
    /// Adds or replaces a node.
    pub fn insert(&mut self, name: &str, parent: Option<String>, hidden: bool) {
        self.parent.insert(name.to_string(), parent);
        if hidden {
            self.hidden.insert(name.to_string());
        } else {
            self.hidden.remove(name);
        }
    }

    /// Removes a node.
    pub fn remove(&mut self, name: &str) {
        self.parent.remove(name);
        self.hidden.remove(name);
    }

    /// Renames a node, keeping its parent (children of the old name are not re-pointed: a leaf
    /// has none).
    pub fn rename(&mut self, from: &str, to: &str, hidden: bool) {
        let p = self.parent.remove(from).flatten();
        self.hidden.remove(from);
        self.insert(to, p, hidden);
    }

    /// Whether `name` is a known node.
    pub fn contains(&self, name: &str) -> bool {
        self.parent.contains_key(name)
    }

    /// The parent of `name`.
    pub fn parent_of(&self, name: &str) -> Option<&str> {
        self.parent.get(name).and_then(|p| p.as_deref())
    }

    /// Whether `name` is a hidden base.
    pub fn is_hidden(&self, name: &str) -> bool {
        self.hidden.contains(name)
    }

    /// Children of `name`.
    pub fn children_of(&self, name: &str) -> Vec<String> {
        self.parent
            .iter()
            .filter(|(_, p)| p.as_deref() == Some(name))
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Every hidden node.
    pub fn hidden_nodes(&self) -> Vec<String> {
        self.hidden.iter().cloned().collect()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.parent.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    /// Removes from the index, starting at `start` and walking up, every hidden node left with
    /// no child, and returns their names in the order their files must be deleted (children
    /// before parents).
    pub fn collect_garbage_from(&mut self, start: Option<String>) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = start;
        while let Some(name) = cur {
            if !self.is_hidden(&name) || !self.children_of(&name).is_empty() {
                break;
            }
            cur = self.parent_of(&name).map(str::to_string);
            self.remove(&name);
            out.push(name);
        }
        out
    }

    /// Every hidden node with no child anywhere (garbage), children before parents.
    pub fn all_garbage(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let found: Vec<String> = self
                .hidden
                .iter()
                .filter(|h| self.children_of(h).is_empty())
                .cloned()
                .collect();
            if found.is_empty() {
                return out;
            }
            for f in found {
                self.remove(&f);
                out.push(f);
            }
        }
    }

    /// The chain of `name`: itself, its parent, … up to the base (stops at cycles).
    pub fn ancestry(&self, name: &str) -> Vec<String> {
        let mut out = vec![name.to_string()];
        let mut cur = self.parent_of(name);
        while let Some(p) = cur {
            if out.iter().any(|x| x == p) {
                break;
            }
            out.push(p.to_string());
            cur = self.parent_of(p);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_collection_walks_up_only_through_childless_hidden_bases() {
        let mut ix = ChainIndex::default();
        ix.insert("b0", None, true);
        ix.insert("b1", Some("b0".into()), true);
        ix.insert("leaf", Some("b1".into()), false);
        ix.insert("other", Some("b0".into()), false);
        ix.remove("leaf");
        assert_eq!(ix.collect_garbage_from(Some("b1".into())), vec!["b1"]);
        assert!(ix.contains("b0"), "b0 still has a child");
        ix.remove("other");
        assert_eq!(ix.all_garbage(), vec!["b0"]);
        assert!(ix.is_empty());
    }

    #[test]
    fn ancestry_lists_leaf_to_base() {
        let mut ix = ChainIndex::default();
        ix.insert("b0", None, true);
        ix.insert("b1", Some("b0".into()), true);
        ix.insert("leaf", Some("b1".into()), false);
        assert_eq!(ix.ancestry("leaf"), vec!["leaf", "b1", "b0"]);
        ix.rename("leaf", "b2", true);
        assert_eq!(ix.children_of("b1"), vec!["b2"]);
        assert!(ix.is_hidden("b2"));
    }
}
