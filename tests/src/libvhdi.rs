//! libvhdi's `vhdimount` (FUSE) as the independent reader of VHD chains in tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A chain mounted with `vhdimount LEAF MNT`; unmounted (`umount`) when dropped.
#[derive(Debug)]
pub struct VhdiMount {
    mnt: PathBuf,
}

impl VhdiMount {
    /// Mounts the chain whose leaf is `leaf` on the (existing, empty) directory `mnt`.
    /// Panics naming the package when vhdimount is missing, with its output when it fails.
    pub fn new(leaf: &Path, mnt: &Path) -> VhdiMount {
        crate::require_tool("vhdimount", "libvhdi-utils");
        std::fs::create_dir_all(mnt).expect("mount point");
        let out = Command::new("vhdimount")
            .arg(leaf)
            .arg(mnt)
            .stdin(Stdio::null())
            .output()
            .expect("spawn vhdimount");
        assert!(
            out.status.success(),
            "vhdimount {} failed (needs fuse3 and /dev/fuse): {}{}",
            leaf.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        VhdiMount {
            mnt: mnt.to_path_buf(),
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// The layer files vhdimount exposes (`vhdi1` = the base … `vhdiN` = the leaf), in order.
    pub fn layers(&self) -> Vec<PathBuf> {
        let mut n: Vec<u32> = std::fs::read_dir(&self.mnt)
            .expect("reading the vhdimount mount point")
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_string_lossy()
                    .strip_prefix("vhdi")
                    .and_then(|n| n.parse::<u32>().ok())
            })
            .collect();
        n.sort_unstable();
        n.into_iter()
            .map(|i| self.mnt.join(format!("vhdi{i}")))
            .collect()
    }

    /// The leaf's flattened view: the highest-numbered layer file.
    pub fn leaf_view(&self) -> PathBuf {
        self.layers().pop().expect("vhdimount exposes vhdiN files")
    }

    /// The bytes of the leaf's flattened view (what libvhdi reads from the whole chain).
    pub fn read_leaf(&self) -> Vec<u8> {
        let leaf = self.leaf_view();
        std::fs::read(&leaf).unwrap_or_else(|e| panic!("reading {}: {e}", leaf.display()))
    }
}

impl Drop for VhdiMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Unprivileged FUSE mounts are released through fusermount3.
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .status();
        }
    }
}
