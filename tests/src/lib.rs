//! Shared helpers for ddstor's end-to-end tests: locating the project's binaries and the
//! third-party peers (qemu-img, nbdinfo, vhdimount, xenstore-utils…) the tests drive.
//!
//! Tests never skip silently when a peer is missing: [`require_tool`] panics with the package
//! to install (the project's `scripts/test.sh` installs every one of them).

pub mod agent;
pub mod libvhdi;
pub mod nbd;

use std::path::PathBuf;
use std::process::Command;

/// Path of one of the workspace's binaries (`ddstor`, …) built into the same target directory
/// as the running test. Panics with a hint when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Path of a third-party tool on `PATH`; panics naming the Debian package that provides it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .expect("sh");
    let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !found.is_empty(),
        "{tool} not found: install Debian package {package} (scripts/test.sh does)"
    );
    PathBuf::from(found)
}
