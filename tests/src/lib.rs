//! Shared helpers for ddstor's end-to-end tests: locating the project's binaries and the
//! third-party peers (qemu-img, nbdinfo, vhdimount, xenstore-utils…) the tests drive.
//!
//! Tests never skip silently when a peer is missing: [`require_tool`] panics with the package
//! to install (the project's `scripts/test.sh` installs every one of them).

pub mod agent;
pub mod libvhdi;
pub mod nbd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

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
    if name == "ddstor" {
        static CHECKED: std::sync::Once = std::sync::Once::new();
        CHECKED.call_once(|| assert_fresh(&path, DDSTOR_SOURCES));
    }
    path
}

/// Source folders of the crates in the `ddstor` binary (`cargo test` of this package does not
/// rebuild another package's binary).
pub const DDSTOR_SOURCES: &[&str] = &[
    "agent/src",
    "vhd/src",
    "transport/src",
    "xs-registry/src",
    "interface/src",
];

/// The newest `.rs` file under `dirs` (paths relative to the workspace root).
fn newest_source(dirs: &[&str]) -> Option<(SystemTime, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| root.join(d)).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    if newest.as_ref().map_or(true, |(n, _)| t > *n) {
                        newest = Some((t, p));
                    }
                }
            }
        }
    }
    newest
}

/// Panics when `artifact` (a workspace binary or library a test runs as is) is older than a
/// source file under `dirs` (the crates it is built from): the test would run stale code.
pub fn assert_fresh(artifact: &Path, dirs: &[&str]) {
    let Some((newest, file)) = newest_source(dirs) else {
        return;
    };
    let built = std::fs::metadata(artifact)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", artifact.display()));
    assert!(
        built >= newest,
        "{} is older than {}: rebuild with `cargo build --workspace --all-targets` (scripts/test.sh \
         does) — the test would run stale code",
        artifact.display(),
        file.display()
    );
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
